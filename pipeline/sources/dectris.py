"""Live frames from a DECTRIS detector (EIGER, PILATUS4, ...) through its SIMPLON stream interface.

The detector control unit pushes every series over ZeroMQ (PUSH); :class:`DectrisStream`
connects a PULL socket to it and yields one :class:`~pipeline.exposure.Exposure` per image.
Both wire formats are understood, and told apart per message:

**Stream v1** (``format: legacy``, port 9999): JSON multipart messages.

- series header: ``{"htype": "dheader-1.0", "series": N, "header_detail": "all|basic|none"}``,
  then for ``basic`` and ``all`` the detector configuration as JSON, then for ``all`` three
  (JSON description, raw blob) pairs: ``dflatfield-1.0``, ``dpixelmask-1.0``,
  ``dcountrate_table-1.0``; an optional last part is the user's header appendix.
- image: ``dimage-1.0`` (``series``, ``frame``, ``hash``), ``dimage_d-1.0`` (``shape`` as
  ``[x, y]`` = [width, height], ``type`` such as ``uint32``, ``encoding``, ``size``), the data
  blob, ``dconfig-1.0`` (``start_time``, ``stop_time``, ``real_time`` in ns); an optional fifth
  part is the image appendix.
- end: ``{"htype": "dseries_end-1.0", "series": N}``.

Encodings follow the manual's grammar ``[bs<BIT>][[-]lz4][<|>]``: ``<`` / ``>`` raw,
``lz4<`` one plain LZ4 block of the whole image, ``bs<BIT>-lz4<`` bitshuffle (element size
BIT/8 bytes) with LZ4-compressed blocks, ``bs<BIT><`` bitshuffle alone. The bitshuffle-LZ4
blob is read both with and without the 12-byte header of the HDF5 filter (big-endian uint64
decompressed size, big-endian uint32 block size in bytes): DECTRIS' own example client, DIALS'
stream format and LiberTEM-dectris expect that header from real detectors, while ALBA's
eiger-simulator (``bitshuffle.compress_lz4``) sends none, in which case bitshuffle's default
block size applies. The header is recognised by
its first 8 bytes equalling the image's size in bytes, which headerless data never starts with.

**Stream v2** (``format: cbor``, port 31001): one CBOR map per message, ``type`` ``start``,
``image`` or ``end``. Image data is a map channel -> multi-dimensional array (tag 40, row-major
``[rows, columns]``) of an RFC 8746 typed array (tags 64-86), whose bytes may be wrapped in the
DECTRIS compression tag 56500 ``[algorithm, element size, bytes]`` with algorithm ``bslz4`` or
``lz4``, both in HDF5 framing (the 12-byte header above, then blocks). ``threshold`` picks the
channel (default: the first listed in the start message).

Sources: DECTRIS' stream v2 specification and compression tag (github.com/dectris/documentation,
``stream_v2/README.md``, ``cbor/dectris-compression-tag.md``, ``stream_v2/examples``), the
HDF5 LZ4 filter format (HDFGroup hdf5_plugins ``LZ4/LZ4_HDF5_format.md``), bitshuffle's HDF5
filter (kiyo-masui/bitshuffle ``src/bshuf_h5filter.c``), LiberTEM-dectris and eiger-simulator.

**What the scan gets.** Every image of the series becomes one exposure, ``index`` = the image
number (0-based), in arrival order; ``timestamp`` is when the detector says the exposure began:
the v2 ``series_date`` + ``start_time``, or the v1 header's ``data_collection_date`` + the
image's ``start_time`` (which counts from the series start; :func:`v1_acquired_at`), else the
time the image was taken from the socket, which ``received_at`` holds in any case;
``metadata`` holds ``source`` (``"tcp://host:port series 3 image 17"``), the protocol, series
and image numbers, encoding, pixel type and exposure times, as text. An image that
cannot be decoded (malformed part, unknown pixel type or encoding, wrong number of parts, size
mismatch, no series header yet) still becomes an exposure with ``frame=None`` and ``error``
saying why. Messages that name no image
of this series are not exposures (their index would clash with the real image's): they are
counted and described in :attr:`DectrisStream.statistics` -- unparseable messages, messages
of another series, and duplicates of an image number already delivered (the first copy wins).
Out-of-order images are delivered as they come, marked ``metadata["out_of_order"] = "true"``
and counted. The iteration ends at the series' end message, at a header of a new series (kept
for the next iteration), after ``idle_timeout_s`` of silence (or ``start_timeout_s`` before the
series began), or after :meth:`DectrisStream.stop`, never by an exception for bad input; then
every image number the series should have had (``nimages`` x ``ntrigger`` of a v1 header, or
``ntrigger`` in the ``inte``/``exte`` trigger modes; ``number_of_images`` of a v2 start
message; else up to the highest received) that never came is delivered as a failed exposure
too (``report_missing``), so the results file accounts for all of them, and
:attr:`DectrisStream.statistics` says what was missing and why.

Example (a stream v1 image message, decoded without any socket):

    >>> import json
    >>> frame = np.arange(6, dtype="<u2").reshape(2, 3)
    >>> parts = [
    ...     json.dumps({"htype": "dimage-1.0", "series": 3, "frame": 17, "hash": ""}).encode(),
    ...     json.dumps({"htype": "dimage_d-1.0", "shape": [3, 2], "type": "uint16",
    ...                 "encoding": "<", "size": 12}).encode(),
    ...     frame.tobytes(),
    ...     json.dumps({"htype": "dconfig-1.0", "start_time": 0, "stop_time": 10,
    ...                 "real_time": 10}).encode(),
    ... ]
    >>> message = parse_v1_message(parts)
    >>> message.kind, message.series_id, message.image_number, message.error
    ('image', 3, 17, None)
    >>> message.frame
    array([[0, 1, 2],
           [3, 4, 5]], dtype=uint16)
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import math
import re
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import bitshuffle
import cbor2
import lz4.block
import numpy as np
import zmq
import zmq.utils.monitor

from pipeline.exposure import Exposure

log = logging.getLogger(__name__)

Protocol = Literal["auto", "v1", "v2"]

#: Pixel types of ``dimage_d-1.0`` (and the header blobs) by name.
PIXEL_TYPES: dict[str, np.dtype] = {
    name: np.dtype(name)
    for name in (
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "int8",
        "int16",
        "int32",
        "int64",
        "float32",
        "float64",
    )
}

#: RFC 8746 typed-array tags -> element type (float128 and the reserved tag 76 left out).
TYPED_ARRAY_TAGS: dict[int, np.dtype] = {
    tag: np.dtype(code)
    for tag, code in {
        64: "u1",
        65: ">u2",
        66: ">u4",
        67: ">u8",
        68: "u1",
        69: "<u2",
        70: "<u4",
        71: "<u8",
        72: "i1",
        73: ">i2",
        74: ">i4",
        75: ">i8",
        77: "<i2",
        78: "<i4",
        79: "<i8",
        80: ">f2",
        81: ">f4",
        82: ">f8",
        84: "<f2",
        85: "<f4",
        86: "<f8",
    }.items()
}

MULTI_DIM_ROW_MAJOR_TAG = 40
MULTI_DIM_COLUMN_MAJOR_TAG = 1040
DECTRIS_COMPRESSION_TAG = 56500

H5_HEADER_BYTES = 12
_ENCODING = re.compile(r"(?:bs(?P<bits>8|16|32|64))?(?P<lz4>-?lz4)?(?P<order>[<>])")
_MAX_ERRORS = 1000


class FormatError(ValueError):
    """A message, or part of one, that does not follow the stream format; the text says how."""


# --------------------------------------------------------------------------------------------
# Decompression


def bitshuffle_default_block_elements(element_bytes: int) -> int:
    """Bitshuffle's block size (elements) when none is given: 8 KiB of data, a multiple of 8,
    at least 128 elements.

    >>> bitshuffle_default_block_elements(2), bitshuffle_default_block_elements(4)
    (4096, 2048)
    """
    return max((8192 // element_bytes) // 8 * 8, 128)


def _check_bitshuffle_blocks(
    payload: memoryview, n_elements: int, element_bytes: int, block_elements: int
) -> None:
    """Walk the block headers so that the C decoder never reads past the end of ``payload``."""
    n_blocks = n_elements // block_elements
    if n_elements % block_elements >= 8:
        n_blocks += 1
    position = 0
    for block in range(n_blocks):
        if position + 4 > len(payload):
            raise FormatError(
                f"bitshuffle-LZ4 data ends in block {block} of {n_blocks} "
                f"({len(payload)} bytes for {n_elements} elements)"
            )
        position += 4 + int.from_bytes(payload[position : position + 4], "big")
    expected = position + (n_elements % 8) * element_bytes
    if expected != len(payload):
        raise FormatError(
            f"bitshuffle-LZ4 data is {len(payload)} bytes, its {n_blocks} block headers "
            f"(block size {block_elements} elements) say {expected} for {n_elements} elements"
        )


_openmp = threading.local()


def _bitshuffle_single_threaded() -> None:
    """Make bitshuffle use one OpenMP thread in the calling thread (only there: OpenMP keeps
    this setting per thread). On 2 busy cores its threads cost about 7 ms per call, for any
    image size, and decode an Eiger 4M frame in 14 ms against 9 ms with one thread."""
    if getattr(_openmp, "limited", False):
        return
    _openmp.limited = True
    with contextlib.suppress(OSError, AttributeError):  # a build without OpenMP
        ctypes.CDLL(bitshuffle.ext.__file__).omp_set_num_threads(1)


def decompress_bitshuffle_lz4(
    data: bytes | memoryview,
    n_bytes: int,
    element_bytes: int,
    framing: Literal["auto", "hdf5", "none"] = "auto",
) -> np.ndarray:
    """Bitshuffle + LZ4 data back to ``n_bytes`` bytes (a uint8 array).

    Args:
        data: the compressed blob.
        n_bytes: the decompressed size the image needs.
        element_bytes: the bitshuffle element size (1, 2, 4 or 8).
        framing: ``hdf5``: a 12-byte HDF5 filter header comes first (stream v2); ``none``:
            blocks only, bitshuffle's default block size; ``auto``: a header where the first
            8 bytes equal ``n_bytes`` (stream v1).

    Raises:
        FormatError: truncated or inconsistent data, or a size other than ``n_bytes``.

    >>> raw = np.arange(100, dtype="<u4")
    >>> blob = bitshuffle.compress_lz4(raw).tobytes()
    >>> out = decompress_bitshuffle_lz4(blob, raw.nbytes, 4)
    >>> bool((out.view("<u4") == raw).all())
    True
    """
    view = memoryview(data).cast("B")
    if element_bytes not in (1, 2, 4, 8):
        raise FormatError(f"bitshuffle element size {element_bytes} is not 1, 2, 4 or 8 bytes")
    if n_bytes % element_bytes:
        raise FormatError(f"{n_bytes} bytes are not whole {element_bytes}-byte elements")
    header = framing == "hdf5" or (
        framing == "auto"
        and len(view) >= H5_HEADER_BYTES
        and int.from_bytes(view[:8], "big") == n_bytes
    )
    block_elements = bitshuffle_default_block_elements(element_bytes)
    if header:
        if len(view) < H5_HEADER_BYTES:
            raise FormatError(f"bitshuffle-LZ4 data of {len(view)} bytes has no 12-byte header")
        stated_bytes = int.from_bytes(view[:8], "big")
        if stated_bytes != n_bytes:
            raise FormatError(
                f"bitshuffle-LZ4 header says {stated_bytes} bytes, the image needs {n_bytes}"
            )
        block_bytes = int.from_bytes(view[8:12], "big")
        if block_bytes == 0:
            block_bytes = block_elements * element_bytes
        if block_bytes % (8 * element_bytes):
            raise FormatError(
                f"bitshuffle block size {block_bytes} bytes is not a multiple of 8 elements "
                f"of {element_bytes} bytes"
            )
        block_elements = block_bytes // element_bytes
        view = view[H5_HEADER_BYTES:]
    n_elements = n_bytes // element_bytes
    _check_bitshuffle_blocks(view, n_elements, element_bytes, block_elements)
    _bitshuffle_single_threaded()
    try:
        out = bitshuffle.decompress_lz4(
            np.frombuffer(view, np.uint8),
            (n_elements,),
            np.dtype(f"u{element_bytes}"),
            block_elements,
        )
    except (RuntimeError, ValueError) as error:
        raise FormatError(f"bitshuffle-LZ4 data does not decompress: {error}") from None
    return out.view(np.uint8)


def _check_lz4_ratio(compressed_bytes: int, n_bytes: int) -> None:
    """LZ4 shrinks data at most about 255-fold: refuse sizes no blob of this length can hold
    before allocating them."""
    if n_bytes > 255 * compressed_bytes + 4096:
        raise FormatError(f"{compressed_bytes} bytes of LZ4 data cannot hold {n_bytes} bytes")


def decompress_lz4_block(data: bytes | memoryview, n_bytes: int) -> bytearray:
    """One plain LZ4 block (no size prefix) back to exactly ``n_bytes`` bytes.

    >>> decompress_lz4_block(lz4.block.compress(b"abc" * 10, store_size=False), 30)[:6]
    bytearray(b'abcabc')
    """
    _check_lz4_ratio(len(data), n_bytes)
    try:
        out = lz4.block.decompress(bytes(data), uncompressed_size=n_bytes, return_bytearray=True)
    except lz4.block.LZ4BlockError as error:
        raise FormatError(f"LZ4 data does not decompress to {n_bytes} bytes: {error}") from None
    if len(out) != n_bytes:
        raise FormatError(f"LZ4 data decompresses to {len(out)} bytes, the image needs {n_bytes}")
    return out


def decompress_lz4_hdf5(data: bytes | memoryview, n_bytes: int) -> bytearray:
    """LZ4 in HDF5 framing (filter 32004): a 12-byte header (big-endian uint64 size, uint32
    block size), then per block a big-endian uint32 compressed size and the LZ4 block (stored
    as is when that size equals the block's own).

    >>> import struct
    >>> block = lz4.block.compress(b"x" * 40, store_size=False)
    >>> blob = struct.pack(">QiI", 40, 1 << 20, len(block)) + block
    >>> bytes(decompress_lz4_hdf5(blob, 40)) == b"x" * 40
    True
    """
    view = memoryview(data).cast("B")
    if len(view) < H5_HEADER_BYTES:
        raise FormatError(f"LZ4 (HDF5) data of {len(view)} bytes has no 12-byte header")
    stated_bytes = int.from_bytes(view[:8], "big")
    block_bytes = int.from_bytes(view[8:12], "big")
    if stated_bytes != n_bytes:
        raise FormatError(f"LZ4 (HDF5) header says {stated_bytes} bytes, the image needs {n_bytes}")
    if block_bytes <= 0 or block_bytes >= 1 << 31:
        raise FormatError(f"LZ4 (HDF5) block size {block_bytes} is not a positive int32")
    _check_lz4_ratio(len(view), n_bytes)
    out = bytearray(n_bytes)
    position, written = H5_HEADER_BYTES, 0
    while written < n_bytes:
        expected = min(block_bytes, n_bytes - written)
        if position + 4 > len(view):
            raise FormatError(f"LZ4 (HDF5) data ends after {written} of {n_bytes} bytes")
        compressed = int.from_bytes(view[position : position + 4], "big")
        position += 4
        if position + compressed > len(view):
            raise FormatError(
                f"LZ4 (HDF5) block at byte {written} claims {compressed} bytes, "
                f"{len(view) - position} are left"
            )
        chunk = view[position : position + compressed]
        if compressed == expected:
            out[written : written + expected] = chunk
        else:
            out[written : written + expected] = decompress_lz4_block(chunk, expected)
        position += compressed
        written += expected
    if position != len(view):
        raise FormatError(f"LZ4 (HDF5) data has {len(view) - position} bytes after the last block")
    return out


def parse_encoding(encoding: str) -> tuple[int | None, bool, str]:
    """A stream v1 ``encoding`` as (bitshuffle bits or None, LZ4?, byte order).

    >>> parse_encoding("bs32-lz4<"), parse_encoding("lz4<"), parse_encoding("<")
    ((32, True, '<'), (None, True, '<'), (None, False, '<'))
    """
    match = _ENCODING.fullmatch(encoding) if isinstance(encoding, str) else None
    if match is None:
        raise FormatError(
            f"unknown encoding {encoding!r} (expected [bs<BIT>][[-]lz4][<|>], e.g. 'bs32-lz4<')"
        )
    bits = match["bits"]
    return (int(bits) if bits else None, match["lz4"] is not None, match["order"])


def _pixel_type(name: Any) -> np.dtype:
    if not isinstance(name, str) or name not in PIXEL_TYPES:
        raise FormatError(f"unknown pixel type {name!r} (known: {', '.join(PIXEL_TYPES)})")
    return PIXEL_TYPES[name]


def _shape_rows_columns(shape_xy: Any) -> tuple[int, int]:
    if (
        not isinstance(shape_xy, list | tuple)
        or len(shape_xy) != 2
        or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape_xy)
    ):
        raise FormatError(f"shape {shape_xy!r} is not [x, y] with two positive integers")
    return int(shape_xy[1]), int(shape_xy[0])


def _writable(array: np.ndarray) -> np.ndarray:
    return array if array.flags.writeable else array.copy()


def decode_v1_data(
    blob: bytes | memoryview, shape_xy: Sequence[int], pixel_type: str, encoding: str
) -> np.ndarray:
    """The image of a stream v1 data blob, as a native-byte-order (rows, columns) array.

    Args:
        blob: the data part of the image message.
        shape_xy: ``dimage_d-1.0``'s ``shape``: [x (columns), y (rows)].
        pixel_type: its ``type``, e.g. ``uint32``.
        encoding: its ``encoding``, e.g. ``bs32-lz4<``.

    Raises:
        FormatError: unknown type or encoding, undecodable data, or a size mismatch.

    >>> decode_v1_data(np.arange(6, dtype=">i4").tobytes(), [2, 3], "int32", ">")
    array([[0, 1],
           [2, 3],
           [4, 5]], dtype=int32)
    """
    rows, columns = _shape_rows_columns(list(shape_xy))
    dtype = _pixel_type(pixel_type)
    bits, compressed, order = parse_encoding(encoding)
    n_bytes = rows * columns * dtype.itemsize
    view = memoryview(blob).cast("B")
    if bits is not None:
        element_bytes = bits // 8
        if n_bytes % element_bytes:
            raise FormatError(
                f"{pixel_type} image of {n_bytes} bytes is not whole {bits}-bit elements"
            )
        if compressed:
            raw: Any = decompress_bitshuffle_lz4(view, n_bytes, element_bytes)
        else:
            if len(view) != n_bytes:
                raise FormatError(
                    f"bitshuffled data is {len(view)} bytes, shape {list(shape_xy)} "
                    f"{pixel_type} needs {n_bytes}"
                )
            _bitshuffle_single_threaded()
            raw = bitshuffle.bitunshuffle(
                np.frombuffer(view, np.dtype(f"u{element_bytes}")).copy()
            ).view(np.uint8)
    elif compressed:
        if len(view) >= H5_HEADER_BYTES and int.from_bytes(view[:8], "big") == n_bytes:
            raw = decompress_lz4_hdf5(view, n_bytes)
        else:
            raw = decompress_lz4_block(view, n_bytes)
    else:
        if len(view) != n_bytes:
            raise FormatError(
                f"raw data is {len(view)} bytes, shape {list(shape_xy)} {pixel_type} needs {n_bytes}"
            )
        raw = bytearray(view)
    frame = np.frombuffer(raw, dtype.newbyteorder(order)).reshape(rows, columns)
    return _writable(frame.astype(dtype.newbyteorder("="), copy=False))


# --------------------------------------------------------------------------------------------
# Messages


@dataclass
class SeriesHeader:
    """What a series header (v1 ``dheader-1.0``, v2 ``start``) says about the series.

    Attributes:
        series_id: the detector's series number (the ``sequence id`` that ``arm`` returns).
        protocol: ``v1`` or ``v2``.
        header_detail: v1 ``all``, ``basic`` or ``none``; ``None`` for v2.
        config: the detector configuration sent with it (v1 ``basic``/``all``: the config
            part; v2: the start message's fields except arrays), values as sent.
        n_images: images the series will have, when the header says; else ``None``.
        unique_id: v2 ``series_unique_id``; ``None`` for v1.
        channels: v2 channel (threshold) names in the order the detector lists them.
        pixel_mask: the detector's pixel mask (rows, columns) when sent (v1 ``all``, v2).
        flatfield: the flatfield (rows, columns) when sent.
        countrate_table: the count-rate correction table when sent.
        series_date: when the series began, seconds since the epoch: v2 ``arm_date``, v1 the
            configuration's ``data_collection_date``; else ``None``.
        problems: what was wrong with the header (the series is still taken).
    """

    series_id: int
    protocol: str
    header_detail: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    n_images: int | None = None
    unique_id: str | None = None
    channels: tuple[str, ...] = ()
    pixel_mask: np.ndarray | None = None
    flatfield: np.ndarray | None = None
    countrate_table: np.ndarray | None = None
    series_date: float | None = None
    problems: list[str] = field(default_factory=list)


@dataclass
class StreamMessage:
    """One parsed stream message.

    Attributes:
        kind: ``header``, ``image`` or ``end``.
        protocol: ``v1`` or ``v2``.
        series_id: the series it belongs to.
        image_number: the image (frame) number, for images.
        frame: the decoded image (rows, columns), or ``None`` when it could not be decoded.
        error: why an image could not be decoded, else ``None``.
        metadata: per-image facts as text (encoding, pixel type, exposure times, ...).
        acquired_at: acquisition start, seconds since the epoch, where the message says (v2;
            v1 images need their series header: :func:`v1_acquired_at`).
        header: the series header, for headers.
        problems: defects of a header or end message that did not stop it from counting.
    """

    kind: str
    protocol: str
    series_id: int
    image_number: int | None = None
    frame: np.ndarray | None = None
    error: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    acquired_at: float | None = None
    header: SeriesHeader | None = None
    problems: list[str] = field(default_factory=list)


def _json_part(part: Any, what: str) -> dict[str, Any]:
    try:
        value = json.loads(bytes(part))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise FormatError(f"{what} is not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise FormatError(f"{what} is JSON {type(value).__name__}, not an object")
    return value


def _integer(mapping: dict[str, Any], key: str, what: str) -> int:
    value = mapping.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise FormatError(f"{what} has no non-negative integer {key!r} (got {value!r})")
    return value


def _htype(message: dict[str, Any], expected: str, what: str) -> None:
    if message.get("htype") != expected:
        raise FormatError(f"{what} has htype {message.get('htype')!r}, expected {expected!r}")


def _bytes_of(part: Any) -> memoryview:
    if isinstance(part, zmq.Frame):
        return part.buffer
    return memoryview(part)


def _v1_expected_images(config: dict[str, Any]) -> int | None:
    nimages, ntrigger = config.get("nimages"), config.get("ntrigger", 1)
    if not isinstance(ntrigger, int) or isinstance(ntrigger, bool) or ntrigger < 1:
        return None
    if config.get("trigger_mode") in ("inte", "exte"):
        return ntrigger
    if not isinstance(nimages, int) or isinstance(nimages, bool) or nimages < 1:
        return None
    return nimages * ntrigger


def _v1_header(parts: Sequence[Any], first: dict[str, Any]) -> StreamMessage:
    series_id = _integer(first, "series", "dheader-1.0")
    detail = first.get("header_detail")
    header = SeriesHeader(series_id=series_id, protocol="v1", header_detail=detail)
    expected_parts = (
        {"none": 1, "basic": 2, "all": 8}.get(detail) if isinstance(detail, str) else None
    )
    if expected_parts is None:
        header.problems.append(f"dheader-1.0 has unknown header_detail {detail!r}")
    elif len(parts) not in (expected_parts, expected_parts + 1):
        header.problems.append(
            f"dheader-1.0 with header_detail {detail!r} has {len(parts)} parts, "
            f"expected {expected_parts} (or {expected_parts + 1} with an appendix)"
        )
    if len(parts) >= 2 and detail in ("basic", "all"):
        try:
            header.config = _json_part(_bytes_of(parts[1]), "detector configuration part")
            header.n_images = _v1_expected_images(header.config)
            header.series_date = _epoch_seconds(header.config.get("data_collection_date"))
        except FormatError as error:
            header.problems.append(str(error))
    if detail == "all":
        for index, (htype, attribute) in enumerate(
            (
                ("dflatfield-1.0", "flatfield"),
                ("dpixelmask-1.0", "pixel_mask"),
                ("dcountrate_table-1.0", "countrate_table"),
            )
        ):
            if 3 + 2 * index >= len(parts):
                break
            try:
                description = _json_part(_bytes_of(parts[2 + 2 * index]), htype)
                _htype(description, htype, f"header part {3 + 2 * index}")
                array = decode_v1_data(
                    _bytes_of(parts[3 + 2 * index]),
                    description.get("shape"),
                    description.get("type"),
                    "<",
                )
                setattr(header, attribute, array)
            except FormatError as error:
                header.problems.append(f"{htype}: {error}")
    return StreamMessage(
        kind="header",
        protocol="v1",
        series_id=series_id,
        header=header,
        problems=list(header.problems),
    )


def parse_v1_message(parts: Sequence[bytes | memoryview | zmq.Frame]) -> StreamMessage:
    """Parse one stream v1 (JSON multipart) message.

    An image whose ``dimage-1.0`` part names its series and frame comes back even when the
    rest is broken, with ``frame=None`` and ``error`` set.

    Raises:
        FormatError: when the message names no series (first part missing, not JSON, unknown
            htype, no ``series``/``frame``).

    >>> parse_v1_message([b'{"htype": "dseries_end-1.0", "series": 4}']).kind
    'end'
    >>> parse_v1_message([b'{"htype": "dimage-1.0"'])  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    pipeline.sources.dectris.FormatError: first part is not valid JSON: ...
    """
    if not parts:
        raise FormatError("empty message")
    first = _json_part(_bytes_of(parts[0]), "first part")
    htype = first.get("htype")
    if htype == "dheader-1.0":
        return _v1_header(parts, first)
    if htype == "dseries_end-1.0":
        series_id = _integer(first, "series", "dseries_end-1.0")
        problems = [] if len(parts) == 1 else [f"dseries_end-1.0 has {len(parts)} parts, not 1"]
        return StreamMessage(kind="end", protocol="v1", series_id=series_id, problems=problems)
    if htype != "dimage-1.0":
        raise FormatError(
            f"unknown htype {htype!r} (expected dheader-1.0, dimage-1.0 or dseries_end-1.0)"
        )
    series_id = _integer(first, "series", "dimage-1.0")
    number = _integer(first, "frame", "dimage-1.0")
    message = StreamMessage(kind="image", protocol="v1", series_id=series_id, image_number=number)
    if first.get("hash"):
        message.metadata["hash"] = str(first["hash"])
    try:
        if len(parts) not in (4, 5):
            raise FormatError(
                f"image message has {len(parts)} parts, expected 4 "
                "(dimage, dimage_d, data, dconfig) or 5 with an appendix"
            )
        description = _json_part(_bytes_of(parts[1]), "dimage_d part")
        _htype(description, "dimage_d-1.0", "image part 2")
        timing = _json_part(_bytes_of(parts[3]), "dconfig part")
        _htype(timing, "dconfig-1.0", "image part 4")
        blob = _bytes_of(parts[2])
        encoding, pixel_type = description.get("encoding"), description.get("type")
        message.metadata.update(encoding=str(encoding), pixel_type=str(pixel_type))
        for key in ("start_time", "stop_time", "real_time"):
            if key in timing:
                message.metadata[f"{key}_ns"] = str(timing[key])
        size = description.get("size")
        if isinstance(size, int) and not isinstance(size, bool) and size != len(blob):
            raise FormatError(f"data part is {len(blob)} bytes, dimage_d-1.0 says size {size}")
        message.frame = decode_v1_data(blob, description.get("shape"), pixel_type, encoding)
    except FormatError as error:
        message.error = f"stream v1 image {number} of series {series_id}: {error}"
    return message


@dataclass(frozen=True)
class _Tagged:
    tag: int
    value: Any


def _tag_hook(first: Any, second: Any) -> Any:
    # cbor2 < 6 calls hook(decoder, tag), cbor2 >= 6 calls hook(tag, immutable).
    tag = first if isinstance(first, cbor2.CBORTag) else second
    if tag.tag in TYPED_ARRAY_TAGS or tag.tag in (
        MULTI_DIM_ROW_MAJOR_TAG,
        MULTI_DIM_COLUMN_MAJOR_TAG,
        DECTRIS_COMPRESSION_TAG,
    ):
        return _Tagged(tag.tag, tag.value)
    return tag


def _v2_bytes(value: Any, n_bytes: int, element_bytes: int, what: str) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        if len(value) != n_bytes:
            raise FormatError(f"{what} is {len(value)} bytes, its shape needs {n_bytes}")
        return bytearray(value)
    if not isinstance(value, _Tagged) or value.tag != DECTRIS_COMPRESSION_TAG:
        raise FormatError(f"{what} is {type(value).__name__}, not a byte string or tag 56500")
    content = value.value
    if not isinstance(content, list | tuple) or len(content) != 3:
        raise FormatError(f"{what}: tag 56500 holds {content!r:.60}, not [algorithm, size, bytes]")
    algorithm, modifier, payload = content
    if not isinstance(payload, bytes | bytearray):
        raise FormatError(f"{what}: tag 56500 carries {type(payload).__name__}, not bytes")
    if algorithm == "bslz4":
        if modifier not in (1, 2, 4, 8):
            raise FormatError(f"{what}: bslz4 element size {modifier!r} is not 1, 2, 4 or 8")
        return decompress_bitshuffle_lz4(payload, n_bytes, modifier, framing="hdf5")
    if algorithm == "lz4":
        return decompress_lz4_hdf5(payload, n_bytes)
    raise FormatError(f"{what}: unknown compression {algorithm!r} (known: bslz4, lz4)")


def _decode_v2_array(value: Any, what: str = "array") -> np.ndarray:
    """A v2 multi-dimensional typed array (as parsed with :func:`_tag_hook`) as a
    native-byte-order numpy array.

    Raises:
        FormatError: not a tag-40 array of a known typed array, or a size mismatch.
    """
    if not isinstance(value, _Tagged) or value.tag not in (
        MULTI_DIM_ROW_MAJOR_TAG,
        MULTI_DIM_COLUMN_MAJOR_TAG,
    ):
        raise FormatError(f"{what} is not a multi-dimensional array (CBOR tag 40)")
    content = value.value
    if not isinstance(content, list | tuple) or len(content) != 2:
        raise FormatError(f"{what}: tag 40 holds {content!r:.60}, not [dimensions, array]")
    dims, typed = content
    if not isinstance(dims, list | tuple) or not all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in dims
    ):
        shown = list(dims) if isinstance(dims, list | tuple) else dims
        raise FormatError(f"{what}: dimensions {shown!r} are not non-negative integers")
    if not isinstance(typed, _Tagged) or typed.tag not in TYPED_ARRAY_TAGS:
        tag = typed.tag if isinstance(typed, _Tagged | cbor2.CBORTag) else None
        raise FormatError(
            f"{what}: element type is not an RFC 8746 typed array"
            + (f" (unknown tag {tag})" if tag is not None else "")
        )
    dtype = TYPED_ARRAY_TAGS[typed.tag]
    n_bytes = math.prod(dims) * dtype.itemsize
    raw = _v2_bytes(typed.value, n_bytes, dtype.itemsize, what)
    order = "F" if value.tag == MULTI_DIM_COLUMN_MAJOR_TAG else "C"
    array = np.frombuffer(raw, dtype).reshape(tuple(dims), order=order)
    return _writable(np.ascontiguousarray(array, dtype.newbyteorder("=")))


#: A v1 ``start_time`` past this many seconds is since the epoch, not since the series start
#: (ALBA's eiger-simulator sends those): 1e9 s is 2001-09-09, 31 years into a series.
_EPOCH_LIKE_S = 1e9


def v1_acquired_at(start_time_ns: str | None, header: SeriesHeader | None) -> float | None:
    """When a v1 image's exposure began, seconds since the epoch: its ``dconfig-1.0``
    ``start_time`` (ns, as the image's metadata holds it) from the series start, the header's
    ``data_collection_date``; a start time past 2001 (:data:`_EPOCH_LIKE_S`) is taken as
    since the epoch. ``None`` when neither applies (then the time the image was taken from
    the socket stands in).

    >>> header = SeriesHeader(series_id=1, protocol="v1", series_date=1_700_000_000.0)
    >>> v1_acquired_at("2500000000", header)
    1700000002.5
    >>> v1_acquired_at("1700000000500000000", None)
    1700000000.5
    >>> v1_acquired_at("2500000000", None) is None
    True
    """
    try:
        start_s = int(start_time_ns) / 1e9 if start_time_ns is not None else None
    except ValueError:
        return None
    if start_s is None:
        return None
    if start_s > _EPOCH_LIKE_S:
        return start_s
    if header is not None and header.series_date is not None:
        return header.series_date + start_s
    return None


def _epoch_seconds(value: Any) -> float | None:
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return None
    return None


def _rational_s(value: Any) -> float | None:
    if (
        isinstance(value, list | tuple)
        and len(value) == 2
        and all(isinstance(n, int) and not isinstance(n, bool) for n in value)
        and value[1] > 0
    ):
        return value[0] / value[1]
    return None


def _plain(value: Any) -> Any:
    """CBOR values for a config dict: arrays summarised, datetimes as ISO text."""
    if isinstance(value, _Tagged | cbor2.CBORTag):
        return f"<CBOR tag {value.tag}>"
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, bytes | bytearray):
        return f"<{len(value)} bytes>"
    return value


def _pick_channel(
    data: dict[str, Any], threshold: int | str, channels: Sequence[str]
) -> tuple[str, Any]:
    if isinstance(threshold, str):
        if threshold not in data:
            names = ", ".join(map(str, data))
            raise FormatError(f"no channel {threshold!r} in the image (has: {names})")
        return threshold, data[threshold]
    order = [name for name in channels if name in data] or list(data)
    if not 0 <= threshold < len(order):
        raise FormatError(f"threshold {threshold} chosen, the image has {len(order)} channels")
    return order[threshold], data[order[threshold]]


def parse_v2_message(
    data: bytes | memoryview, threshold: int | str = 0, channels: Sequence[str] = ()
) -> StreamMessage:
    """Parse one stream v2 (CBOR) message.

    Args:
        data: the message.
        threshold: which channel of an image to take: its name (e.g. ``threshold_2``) or its
            position in ``channels`` (the start message's list; the image's own order if empty).
        channels: the series' channel names, from its start message.

    Raises:
        FormatError: when the message names no series (not CBOR, not a map, unknown type, no
            ``series_id``/``image_id``).

    >>> message = cbor2.dumps({"type": "end", "series_id": 7, "series_unique_id": "x"})
    >>> parse_v2_message(message).kind
    'end'
    """
    try:
        message = cbor2.loads(bytes(data), tag_hook=_tag_hook)
    except (cbor2.CBORDecodeError, ValueError, TypeError, OverflowError) as error:
        raise FormatError(f"message is not valid CBOR: {error}") from None
    if not isinstance(message, dict):
        raise FormatError(f"message is CBOR {type(message).__name__}, not a map")
    kind = message.get("type")
    if kind not in ("start", "image", "end"):
        raise FormatError(f"unknown message type {kind!r} (expected start, image or end)")
    series_id = _integer(message, "series_id", f"{kind} message")
    unique_id = message.get("series_unique_id")
    if kind == "end":
        return StreamMessage(kind="end", protocol="v2", series_id=series_id)
    if kind == "start":
        return _v2_start(message, series_id, unique_id, threshold)
    number = _integer(message, "image_id", "image message")
    result = StreamMessage(kind="image", protocol="v2", series_id=series_id, image_number=number)
    if isinstance(unique_id, str):
        result.metadata["series_unique_id"] = unique_id
    for key in ("start_time", "stop_time", "real_time"):
        seconds = _rational_s(message.get(key))
        if seconds is not None:
            result.metadata[f"{key}_s"] = repr(seconds)
    series_date = _epoch_seconds(message.get("series_date"))
    start_s = _rational_s(message.get("start_time"))
    if series_date is not None and start_s is not None:
        result.acquired_at = series_date + start_s
    try:
        channel_data = message.get("data")
        if not isinstance(channel_data, dict) or not channel_data:
            raise FormatError("image message has no 'data' map of channels")
        name, value = _pick_channel(channel_data, threshold, channels)
        result.metadata["channel"] = str(name)
        if isinstance(value, _Tagged) and isinstance(value.value, list | tuple):
            typed = value.value[1] if len(value.value) == 2 else None
            if isinstance(typed, _Tagged):
                result.metadata["pixel_type"] = TYPED_ARRAY_TAGS.get(typed.tag, np.dtype("V1")).name
                payload = typed.value
                result.metadata["compression"] = (
                    str(payload.value[0])
                    if isinstance(payload, _Tagged) and isinstance(payload.value, list | tuple)
                    else "none"
                )
        frame = _decode_v2_array(value, f"channel {name!r}")
        if frame.ndim != 2:
            raise FormatError(f"channel {name!r} has {frame.ndim} dimensions, an image needs 2")
        result.frame = frame
    except FormatError as error:
        result.error = f"stream v2 image {number} of series {series_id}: {error}"
    return result


def _v2_start(
    message: dict[str, Any], series_id: int, unique_id: Any, threshold: int | str
) -> StreamMessage:
    header = SeriesHeader(series_id=series_id, protocol="v2")
    header.unique_id = unique_id if isinstance(unique_id, str) else None
    names = message.get("channels")
    if isinstance(names, list | tuple) and all(isinstance(n, str) for n in names):
        header.channels = tuple(names)
    elif names is not None:
        header.problems.append(f"start message channels {names!r:.60} are not a list of names")
    n_images = message.get("number_of_images")
    if isinstance(n_images, int) and not isinstance(n_images, bool) and n_images >= 0:
        header.n_images = n_images
    header.series_date = _epoch_seconds(message.get("arm_date"))
    arrays = ("pixel_mask", "flatfield", "countrate_correction_lookup_table")
    header.config = {k: _plain(v) for k, v in message.items() if k not in arrays}
    for key, attribute in (("pixel_mask", "pixel_mask"), ("flatfield", "flatfield")):
        per_channel = message.get(key)
        if not isinstance(per_channel, dict) or not per_channel:
            continue
        try:
            name, value = _pick_channel(per_channel, threshold, header.channels)
            setattr(header, attribute, _decode_v2_array(value, f"{key} of channel {name!r}"))
        except FormatError as error:
            header.problems.append(f"start message {key}: {error}")
    return StreamMessage(
        kind="header", protocol="v2", series_id=series_id, header=header, problems=header.problems
    )


def _is_v2(parts: Sequence[Any]) -> bool:
    if len(parts) != 1:
        return False
    head = bytes(_bytes_of(parts[0])[:1])
    return head not in (b"{", b" ", b"\n", b"\t", b"\r")


def parse_message(
    parts: Sequence[bytes | memoryview | zmq.Frame],
    protocol: Protocol = "auto",
    threshold: int | str = 0,
    channels: Sequence[str] = (),
) -> StreamMessage:
    """Parse one message of either protocol; ``auto`` takes single-part messages that do not
    start like JSON as v2 (CBOR), everything else as v1.

    >>> parse_message([cbor2.dumps({"type": "end", "series_id": 2})]).protocol
    'v2'
    """
    if protocol == "v2" or (protocol == "auto" and _is_v2(parts)):
        if len(parts) != 1:
            raise FormatError(f"stream v2 message has {len(parts)} parts, expected 1")
        return parse_v2_message(_bytes_of(parts[0]), threshold, channels)
    return parse_v1_message(parts)


# --------------------------------------------------------------------------------------------
# The live source


def _ranges(numbers: Sequence[int], limit: int = 20) -> str:
    """Image numbers as ranges, at most ``limit`` of them.

    >>> _ranges([7, 1, 2, 3, 9, 10])
    '1-3, 7, 9-10'
    """
    ordered = sorted(numbers)
    spans: list[str] = []
    first = 0
    while first < len(ordered):
        last = first
        while last + 1 < len(ordered) and ordered[last + 1] == ordered[last] + 1:
            last += 1
        start, stop = ordered[first], ordered[last]
        spans.append(str(start) if start == stop else f"{start}-{stop}")
        first = last + 1
    text = ", ".join(spans[:limit])
    return text + (f", ... ({len(spans) - limit} more ranges)" if len(spans) > limit else "")


@dataclass
class StreamStatistics:
    """Counts for one series, updated as the messages come.

    Attributes:
        series_id: the series received (``None`` until its first message).
        protocol: ``v1`` or ``v2`` once known.
        expected_frames: images the header announced, else ``None``.
        frames_received: image messages of the series taken as exposures (decoded or failed).
        frames_decoded: of these, with a frame.
        frames_failed: of these, with an error instead (images that never came are not
            counted here but in ``frames_missing``).
        frames_missing: image numbers that never came (final at the end of the iteration).
        missing_frames: those numbers.
        duplicate_frames: images whose number had been delivered already (dropped).
        out_of_order_frames: images with a lower number than one delivered before them.
        foreign_messages: messages of another series (dropped).
        rejected_messages: messages that could not be parsed at all (dropped).
        end_received: whether the series' end message came.
        timed_out: whether the iteration ended on ``idle_timeout_s`` of silence.
        errors: what went wrong, as text, oldest first (the first 1000).
        errors_dropped: how many more there were.

    >>> stats = StreamStatistics(series_id=3, expected_frames=4, frames_received=3,
    ...                          frames_decoded=3, frames_missing=1, missing_frames=[2])
    >>> stats.summary()
    'series 3: 3 of 4 images received (3 decoded, 0 failed), 1 missing (2), no end message'
    """

    series_id: int | None = None
    protocol: str | None = None
    expected_frames: int | None = None
    frames_received: int = 0
    frames_decoded: int = 0
    frames_failed: int = 0
    frames_missing: int = 0
    missing_frames: list[int] = field(default_factory=list)
    duplicate_frames: int = 0
    out_of_order_frames: int = 0
    foreign_messages: int = 0
    rejected_messages: int = 0
    end_received: bool = False
    timed_out: bool = False
    errors: list[str] = field(default_factory=list)
    errors_dropped: int = 0

    @property
    def complete(self) -> bool:
        """The end message came and no image is missing."""
        return self.end_received and self.frames_missing == 0 and self.series_id is not None

    def record(self, error: str) -> None:
        """Keep ``error`` and log it as a warning (only counted after the first 1000)."""
        if len(self.errors) < _MAX_ERRORS:
            log.warning("DECTRIS stream: %s", error)
            self.errors.append(error)
        else:
            log.debug("DECTRIS stream: %s", error)
            self.errors_dropped += 1

    def summary(self) -> str:
        """One line for a log or a report."""
        if self.series_id is None:
            return "no series received"
        of = f" of {self.expected_frames}" if self.expected_frames is not None else ""
        text = (
            f"series {self.series_id}: {self.frames_received}{of} images received "
            f"({self.frames_decoded} decoded, {self.frames_failed} failed)"
        )
        if self.frames_missing:
            text += f", {self.frames_missing} missing ({_ranges(self.missing_frames)})"
        for count, what in (
            (self.duplicate_frames, "duplicates dropped"),
            (self.out_of_order_frames, "out of order"),
            (self.foreign_messages, "messages of other series dropped"),
            (self.rejected_messages, "unreadable messages dropped"),
        ):
            if count:
                text += f", {count} {what}"
        if not self.end_received:
            text += ", no end message" + (" (idle timeout)" if self.timed_out else "")
        return text


class DectrisStream:
    """Exposures received live from a DECTRIS detector's stream (v1 or v2) over ZeroMQ PULL.

    Each iteration yields the exposures of one series, then ends (see the module docstring
    for what ends it and how bad input is reported); iterate again for the next series on the
    same connection. :attr:`statistics` and :attr:`header` describe the series of the latest
    iteration. Use it as a context manager, or call :meth:`close`.

    Args:
        endpoint: the detector's stream, e.g. ``tcp://10.0.0.5:9999`` (v1) or ``:31001`` (v2).
        scan_id: the exposures' scan id; default the v2 ``series_unique_id`` or
            ``dectris-series-N``.
        protocol: ``auto`` (per message), ``v1`` or ``v2``.
        series_id: take only this series (e.g. the ``sequence id`` returned by ``arm``);
            messages of others are dropped and counted. Default: the first one that comes.
        idle_timeout_s: end the series when no message came for this long once it started.
        start_timeout_s: give up when no message came for this long before the series
            started; ``None`` waits until :meth:`stop`.
        receive_hwm: ZeroMQ receive high-water mark (messages queued before the detector
            blocks).
        max_message_bytes: ZeroMQ ``MAXMSGSIZE``: libzmq drops the connection, and with it the
            message, when a message part is larger (the image then shows up as missing); the
            source then connects again, keeping what had already come. ``None``: no limit.
        threshold: v2 channel to take: its position in the start message's ``channels``
            (0: the first threshold) or its name.
        require_header: fail the images that come before their series header (``True``), or
            decode them anyway (``False``, e.g. when connecting to a series already running).
        report_missing: deliver a failed exposure for every image that never came.
        context: the ZeroMQ context (default: the process-wide one).

    Example (needs a detector or a simulator streaming at the endpoint)::

        >>> with DectrisStream("tcp://127.0.0.1:9999", idle_timeout_s=5.0) as stream:  # doctest: +SKIP
        ...     for exposure in stream:
        ...         print(exposure.index, exposure.frame.shape, exposure.error)
        ...     print(stream.statistics.summary())
    """

    POLL_INTERVAL_S = 0.1

    def __init__(
        self,
        endpoint: str,
        scan_id: str | None = None,
        *,
        protocol: Protocol = "auto",
        series_id: int | None = None,
        idle_timeout_s: float = 10.0,
        start_timeout_s: float | None = None,
        receive_hwm: int = 1000,
        max_message_bytes: int | None = None,
        threshold: int | str = 0,
        require_header: bool = True,
        report_missing: bool = True,
        context: zmq.Context | None = None,
    ) -> None:
        if protocol not in ("auto", "v1", "v2"):
            raise ValueError(f"protocol {protocol!r} is not auto, v1 or v2")
        if idle_timeout_s <= 0 or (start_timeout_s is not None and start_timeout_s <= 0):
            raise ValueError("timeouts must be positive")
        self.endpoint = endpoint
        self.scan_id = scan_id
        self.protocol = protocol
        self.series_id = series_id
        self.idle_timeout_s = idle_timeout_s
        self.start_timeout_s = start_timeout_s
        self.receive_hwm = receive_hwm
        self.max_message_bytes = max_message_bytes
        self.threshold = threshold
        self.require_header = require_header
        self.report_missing = report_missing
        self.statistics = StreamStatistics()
        self.header: SeriesHeader | None = None
        self._context = context or zmq.Context.instance()
        self._socket: zmq.Socket | None = None
        self._monitor: zmq.Socket | None = None
        self._backlog: deque[list[Any]] = deque()
        self._series_scan_id: str | None = None
        self._stop = threading.Event()
        #: whether the connection to the detector is up (as libzmq last reported).
        self.connected = False

    # -- connection --------------------------------------------------------------------------

    def connect(self) -> None:
        """Open the PULL socket and connect it (done by the first iteration if not before;
        connect before arming a detector whose PUSH socket drops messages without a peer)."""
        if self._socket is not None:
            return
        socket = self._context.socket(zmq.PULL)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.RCVHWM, self.receive_hwm)
        if self.max_message_bytes is not None:
            socket.setsockopt(zmq.MAXMSGSIZE, self.max_message_bytes)
        self._monitor = socket.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        socket.connect(self.endpoint)
        self._socket = socket

    def wait_connected(self, timeout_s: float) -> bool:
        """Connect, and wait until the connection to the detector is up; ``False`` when it is
        not within ``timeout_s``. Useful before arming a detector (or simulator) that drops
        messages while no receiver is connected."""
        self.connect()
        assert self._monitor is not None
        deadline = time.monotonic() + timeout_s
        while not self.connected:
            remaining_s = deadline - time.monotonic()
            if remaining_s <= 0 or not self._monitor.poll(remaining_s * 1000):
                return self.connected
            self._monitor_event()
        return True

    def _monitor_event(self) -> None:
        assert self._monitor is not None and self._socket is not None
        event = zmq.utils.monitor.recv_monitor_message(self._monitor)["event"]
        if event == zmq.EVENT_CONNECTED:
            self.connected = True
        elif event == zmq.EVENT_DISCONNECTED:
            # libzmq reconnects by itself after a network error but not after a protocol
            # error (such as a message over MAXMSGSIZE): keep what already came, then connect
            # anew either way.
            self.connected = False
            while self._socket.poll(0):
                self._backlog.append(self._socket.recv_multipart(copy=False))
            with contextlib.suppress(zmq.ZMQError):  # already gone after a protocol error
                self._socket.disconnect(self.endpoint)
            self._socket.connect(self.endpoint)
            note = f"the connection to {self.endpoint} was dropped; connecting again"
            if self.max_message_bytes is not None:
                note += (
                    f" (a message part over max_message_bytes = {self.max_message_bytes} "
                    "makes libzmq drop the connection, and the message with it)"
                )
            self.statistics.record(note)

    def close(self) -> None:
        """Close the socket; messages still queued in it are lost."""
        if self._socket is not None:
            self._socket.disable_monitor()
            if self._monitor is not None:
                self._monitor.close(linger=0)
            self._socket.close(linger=0)
        self._socket = self._monitor = None
        self.connected = False

    def stop(self) -> None:
        """Make the running iteration end (from any thread) once the messages already queued
        have been handled."""
        self._stop.set()

    def __enter__(self) -> DectrisStream:
        self.connect()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[Exposure]:
        return self.exposures()

    # -- receiving ---------------------------------------------------------------------------

    def _receive(self, timeout_s: float) -> list[Any] | None:
        """The next message, or ``None`` when none came within ``timeout_s``."""
        assert self._socket is not None and self._monitor is not None
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        deadline = time.monotonic() + timeout_s
        while True:
            if self._backlog:
                return self._backlog.popleft()
            events = dict(poller.poll(max(0.0, deadline - time.monotonic()) * 1000))
            if self._monitor in events:
                self._monitor_event()
                continue
            if self._socket in events:
                return self._socket.recv_multipart(copy=False)
            if time.monotonic() >= deadline:
                return None

    def exposures(self) -> Iterator[Exposure]:
        """The exposures of the next series (the same as iterating the stream)."""
        self.connect()
        self._stop.clear()
        self.statistics = stats = StreamStatistics()
        self.header = None
        self._series_scan_id = None
        series: int | None = None
        delivered: set[int] = set()
        highest = -1
        began = last_message = time.monotonic()
        while True:
            if self._stop.is_set():
                parts = self._receive(0.0)
                if parts is None:
                    stats.record("stopped before the end message")
                    break
            else:
                parts = self._receive(self.POLL_INTERVAL_S)
            if parts is None:
                now = time.monotonic()
                if series is not None and now - last_message >= self.idle_timeout_s:
                    stats.timed_out = True
                    stats.record(
                        f"no message for {self.idle_timeout_s:g} s and no end message of "
                        f"series {series}: the series is incomplete"
                    )
                    break
                if (
                    series is None
                    and self.start_timeout_s is not None
                    and now - began >= self.start_timeout_s
                ):
                    stats.timed_out = True
                    stats.record(f"no series started within {self.start_timeout_s:g} s")
                    break
                continue
            last_message = time.monotonic()
            received_at = time.time()
            channels = self.header.channels if self.header is not None else ()
            try:
                message = parse_message(parts, self.protocol, self.threshold, channels)
            except FormatError as error:
                stats.rejected_messages += 1
                stats.record(f"dropped an unreadable message: {error}")
                continue
            wanted = series if series is not None else self.series_id
            if wanted is not None and message.series_id != wanted:
                if message.kind == "header" and series is not None:
                    stats.record(
                        f"series {message.series_id} started before the end message of "
                        f"series {series}: ending series {series} as incomplete"
                    )
                    self._backlog.appendleft(parts)
                    break
                stats.foreign_messages += 1
                article = "an" if message.kind in ("image", "end") else "a"
                stats.record(
                    f"dropped {article} {message.kind} message of series {message.series_id} "
                    f"(receiving series {wanted})"
                )
                continue
            if stats.protocol is not None and message.protocol != stats.protocol:
                stats.rejected_messages += 1
                stats.record(
                    f"dropped a stream {message.protocol} {message.kind} message in a "
                    f"stream {stats.protocol} series"
                )
                continue
            if series is None:
                series = stats.series_id = message.series_id
                stats.protocol = message.protocol
                if message.kind == "end":
                    stats.record(f"series {series} ended before any header or image of it came")
            if message.kind == "header":
                assert message.header is not None
                if self.header is not None:
                    stats.record(f"ignored a repeated header of series {series}")
                    continue
                self.header = message.header
                self._series_scan_id = self._series_scan_id or self._scan_id(series)
                stats.expected_frames = message.header.n_images
                for problem in message.problems:
                    stats.record(f"series {series} header: {problem}")
                continue
            if message.kind == "end":
                for problem in message.problems:
                    stats.record(f"series {series} end: {problem}")
                stats.end_received = True
                break
            number = message.image_number
            assert number is not None
            if number in delivered:
                stats.duplicate_frames += 1
                stats.record(
                    f"dropped a second copy of image {number} of series {series} "
                    "(the first one was delivered)"
                )
                continue
            self._series_scan_id = self._series_scan_id or self._scan_id(series)
            exposure = self._exposure(message, received_at)
            if number < highest:
                stats.out_of_order_frames += 1
                exposure.metadata["out_of_order"] = "true"
            highest = max(highest, number)
            delivered.add(number)
            stats.frames_received += 1
            if exposure.error is None:
                stats.frames_decoded += 1
            else:
                stats.frames_failed += 1
                stats.record(exposure.error)
            yield exposure
        yield from self._finish(series, delivered, highest)

    def _source(self, series: int, number: int) -> str:
        return f"{self.endpoint} series {series} image {number}"

    def _scan_id(self, series: int) -> str:
        if self._series_scan_id is not None:
            return self._series_scan_id
        if self.scan_id is not None:
            return self.scan_id
        if self.header is not None and self.header.unique_id:
            return self.header.unique_id
        return f"dectris-series-{series}"

    def _exposure(self, message: StreamMessage, received_at: float) -> Exposure:
        series, number = message.series_id, message.image_number
        assert number is not None
        metadata = {
            "source": self._source(series, number),
            "protocol": f"SIMPLON stream {message.protocol}",
            "series_id": str(series),
            "image_number": str(number),
            **message.metadata,
        }
        acquired_at = message.acquired_at
        if acquired_at is None and message.protocol == "v1":
            acquired_at = v1_acquired_at(message.metadata.get("start_time_ns"), self.header)
        frame, error = message.frame, message.error
        if self.header is None:
            metadata["header_missing"] = "true"
            if self.require_header and error is None:
                frame = None
                error = (
                    f"image {number} of series {series} came before the series header "
                    "(no dheader-1.0 / start message received): it cannot be checked against "
                    "the series configuration"
                )
        return Exposure(
            scan_id=self._scan_id(series),
            index=number,
            timestamp=acquired_at if acquired_at is not None else received_at,
            received_at=received_at,
            frame=frame,
            metadata=metadata,
            error=error,
        )

    def _finish(self, series: int | None, delivered: set[int], highest: int) -> Iterator[Exposure]:
        stats = self.statistics
        if series is None:
            log.info("DECTRIS stream %s: %s", self.endpoint, stats.summary())
            return
        expected = stats.expected_frames
        end = expected if expected is not None else highest + 1
        stats.missing_frames = [n for n in range(end) if n not in delivered]
        stats.frames_missing = len(stats.missing_frames)
        if expected is not None and highest >= expected:
            stats.record(f"series {series} announced {expected} images but image {highest} came")
        reason = (
            "the end message came without it"
            if stats.end_received
            else "the stream ended without an end message"
        )
        if stats.frames_missing:
            stats.record(
                f"series {series} incomplete: {stats.frames_received}"
                + (f" of {expected}" if expected is not None else "")
                + f" images received, missing: {_ranges(stats.missing_frames)}"
            )
        log.info("DECTRIS stream %s: %s", self.endpoint, stats.summary())
        if not self.report_missing:
            return
        now = time.time()
        for number in stats.missing_frames:
            yield Exposure(
                scan_id=self._scan_id(series),
                index=number,
                timestamp=now,
                frame=None,
                metadata={
                    "source": self._source(series, number),
                    "protocol": f"SIMPLON stream {stats.protocol}",
                    "series_id": str(series),
                    "image_number": str(number),
                    "missing": "true",
                },
                error=f"image {number} of series {series} never arrived ({reason})",
            )
