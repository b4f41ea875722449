"""Live frames from a DECTRIS detector (EIGER, PILATUS4, ...) through its SIMPLON stream
interface, v1 (JSON multipart) and v2 (CBOR), in four layers:

- :mod:`~pipeline.sources.dectris.codecs`: image data (CBOR typed arrays, the encodings;
  LZ4 and bitshuffle-LZ4 are :mod:`pipeline.sources.compression`'s);
- :mod:`~pipeline.sources.dectris.messages`: messages parsed into typed, frozen objects;
- :mod:`~pipeline.sources.dectris.assembler`: one series assembled from its messages into
  exposures, without sockets or clocks;
- :mod:`~pipeline.sources.dectris.receiver`: :class:`DectrisStream`, the ZeroMQ PULL socket.
"""

from pipeline.sources.compression import (
    FormatError,
    bitshuffle_default_block_elements,
    decompress_bitshuffle_lz4,
    decompress_lz4_hdf5,
)
from pipeline.sources.dectris.assembler import SeriesAssembler, SeriesEnded, StreamStatistics
from pipeline.sources.dectris.codecs import decode_v1_data
from pipeline.sources.dectris.messages import (
    SeriesHeader,
    StreamMessage,
    parse_message,
    parse_v1_message,
    parse_v2_message,
)
from pipeline.sources.dectris.receiver import DectrisStream

__all__ = [
    "DectrisStream",
    "FormatError",
    "SeriesAssembler",
    "SeriesEnded",
    "SeriesHeader",
    "StreamMessage",
    "StreamStatistics",
    "bitshuffle_default_block_elements",
    "decode_v1_data",
    "decompress_bitshuffle_lz4",
    "decompress_lz4_hdf5",
    "parse_message",
    "parse_v1_message",
    "parse_v2_message",
]
