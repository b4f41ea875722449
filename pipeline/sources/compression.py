"""Detector frames as detectors compress them, and their decoding: bitshuffle with
LZ4-compressed blocks and LZ4, with or without the 12-byte header of the HDF5 filters
(big-endian uint64 decompressed size, big-endian uint32 block size in bytes), and
:class:`EncodedFrame`, a frame checked but not yet decoded, which a DECTRIS stream
(:mod:`pipeline.sources.dectris.codecs`) and an HDF5 file's chunks
(:func:`pipeline.sources.hdf5.read_encoded_frame`) give where integrator processes decode
the frames.

Sources: the HDF5 LZ4 filter format (HDFGroup hdf5_plugins ``LZ4/LZ4_HDF5_format.md``),
bitshuffle's HDF5 filter (kiyo-masui/bitshuffle ``src/bshuf_h5filter.c``). Every decoder
checks sizes before it allocates or calls into C, and raises :class:`FormatError` saying
what is wrong.

Example (an image of 2 rows and 3 columns, bitshuffle-LZ4 without a header):

    >>> blob = bitshuffle.compress_lz4(np.arange(6, dtype="<u4")).tobytes()
    >>> EncodedFrame(blob, (2, 3), "<u4", "bslz4", 4, "auto").decode().tolist()
    [[0, 1, 2], [3, 4, 5]]
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import math
import threading
from dataclasses import dataclass
from typing import Literal

import bitshuffle
import lz4.block
import numpy as np

#: Bytes as a stream or a file delivers them.
Buffer = bytes | bytearray | memoryview

#: Size of the HDF5 filter header (decompressed size, block size) before LZ4 blocks, bytes.
H5_HEADER_BYTES = 12


class FormatError(ValueError):
    """Data (a stream's message, part of one, a compressed frame) that does not follow its
    format; the text says how."""


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
    data: Buffer,
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
    payload, block_elements = _bitshuffle_lz4_blocks(data, n_bytes, element_bytes, framing)
    _bitshuffle_single_threaded()
    try:
        out = bitshuffle.decompress_lz4(
            np.frombuffer(payload, np.uint8),
            (n_bytes // element_bytes,),
            np.dtype(f"u{element_bytes}"),
            block_elements,
        )
    except (RuntimeError, ValueError) as error:
        raise FormatError(f"bitshuffle-LZ4 data does not decompress: {error}") from None
    return out.view(np.uint8)


def _bitshuffle_lz4_blocks(
    data: Buffer,
    n_bytes: int,
    element_bytes: int,
    framing: Literal["auto", "hdf5", "none"],
) -> tuple[memoryview, int]:
    """The blocks of bitshuffle-LZ4 data (after its header, where it has one) and their size
    in elements, once the header and the block headers are found to hold exactly ``n_bytes``
    (:func:`decompress_bitshuffle_lz4`'s arguments; :class:`FormatError` otherwise)."""
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
    _check_bitshuffle_blocks(view, n_bytes // element_bytes, element_bytes, block_elements)
    return view, block_elements


def _check_lz4_ratio(compressed_bytes: int, n_bytes: int) -> None:
    """LZ4 shrinks data at most about 255-fold: refuse sizes no blob of this length can hold
    before allocating them."""
    if n_bytes > 255 * compressed_bytes + 4096:
        raise FormatError(f"{compressed_bytes} bytes of LZ4 data cannot hold {n_bytes} bytes")


def decompress_lz4_block(data: Buffer, n_bytes: int) -> bytearray:
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


def decompress_lz4_hdf5(data: Buffer, n_bytes: int) -> bytearray:
    """LZ4 in HDF5 framing (filter 32004): a 12-byte header (big-endian uint64 size, uint32
    block size), then per block a big-endian uint32 compressed size and the LZ4 block (stored
    as is when that size equals the block's own).

    >>> import struct
    >>> block = lz4.block.compress(b"x" * 40, store_size=False)
    >>> blob = struct.pack(">QiI", 40, 1 << 20, len(block)) + block
    >>> bytes(decompress_lz4_hdf5(blob, 40)) == b"x" * 40
    True
    """
    blocks = _lz4_hdf5_blocks(memoryview(data).cast("B"), n_bytes)  # checked, then allocated
    out = bytearray(n_bytes)
    for written, expected, block in blocks:
        if len(block) == expected:
            out[written : written + expected] = block
        else:
            out[written : written + expected] = decompress_lz4_block(block, expected)
    return out


def _lz4_hdf5_blocks(view: memoryview, n_bytes: int) -> list[tuple[int, int, memoryview]]:
    """The blocks of LZ4 data in HDF5 framing (:func:`decompress_lz4_hdf5`), each with the
    place and size of its decoded bytes, once the header and the blocks' sizes are found to
    hold exactly ``n_bytes`` (:class:`FormatError` otherwise)."""
    if len(view) < H5_HEADER_BYTES:
        raise FormatError(f"LZ4 (HDF5) data of {len(view)} bytes has no 12-byte header")
    stated_bytes = int.from_bytes(view[:8], "big")
    block_bytes = int.from_bytes(view[8:12], "big")
    if stated_bytes != n_bytes:
        raise FormatError(f"LZ4 (HDF5) header says {stated_bytes} bytes, the image needs {n_bytes}")
    if block_bytes <= 0 or block_bytes >= 1 << 31:
        raise FormatError(f"LZ4 (HDF5) block size {block_bytes} is not a positive int32")
    _check_lz4_ratio(len(view), n_bytes)
    blocks = []
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
        blocks.append((written, expected, view[position : position + compressed]))
        position += compressed
        written += expected
    if position != len(view):
        raise FormatError(f"LZ4 (HDF5) data has {len(view) - position} bytes after the last block")
    return blocks


# --------------------------------------------------------------------------------------------
# Frames checked, not yet decoded

#: How an :class:`EncodedFrame`'s bytes are packed: as they are, bitshuffled, bitshuffled with
#: LZ4-compressed blocks, or LZ4.
Compression = Literal["none", "bitshuffle", "bslz4", "lz4"]


@dataclass(frozen=True)
class EncodedFrame:
    """An image as the detector sent it: checked (shape, type, encoding), not yet decoded.

    Decoding is most of what receiving a frame costs (9-23 ms for an Eiger 4M
    bitshuffle-LZ4 frame, against about 1 ms to integrate a sector of it), so a stream can
    leave its frames so (:class:`~pipeline.sources.dectris.receiver.DectrisStream`'s
    ``decode_frames``) for integrator processes to decode, and so can a reader of HDF5
    files whose chunks are in the same framing
    (:func:`~pipeline.sources.hdf5.read_encoded_frame`): the process that receives them
    then only passes on the compressed bytes. :meth:`without_data` is its description
    alone (it pickles), to send beside bytes copied elsewhere.

    Attributes:
        data: the bytes, as received (compressed, bitshuffled or raw).
        shape: the image's dimensions, (rows, columns) for a detector frame.
        dtype: the element type as stored, with its byte order (numpy's ``str``, e.g. ``<u4``).
        compression: how ``data`` is packed (:data:`Compression`).
        element_bytes: bitshuffle's element size, bytes (1 where there is no bitshuffle).
        framing: ``hdf5``: a 12-byte HDF5 filter header comes first; ``none``: blocks only;
            ``auto``: a header where the first 8 bytes equal the image's size (stream v1).
        order: ``C`` (row-major) or ``F`` (column-major) element order.

    Example:
        >>> raw = np.arange(6, dtype="<u4")
        >>> blob = bitshuffle.compress_lz4(raw).tobytes()
        >>> EncodedFrame(blob, (2, 3), "<u4", "bslz4", 4, "auto").decode()
        array([[0, 1, 2],
               [3, 4, 5]], dtype=uint32)
    """

    data: Buffer
    shape: tuple[int, ...]
    dtype: str
    compression: Compression
    element_bytes: int
    framing: Literal["auto", "hdf5", "none"]
    order: Literal["C", "F"] = "C"

    @property
    def n_bytes(self) -> int:
        """The decoded image's size, bytes."""
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize

    def without_data(self) -> EncodedFrame:
        """This description with no bytes (they travel apart: :meth:`with_data` puts them
        back)."""
        return dataclasses.replace(self, data=b"")

    def with_data(self, data: Buffer) -> EncodedFrame:
        """This description with ``data`` as its bytes."""
        return dataclasses.replace(self, data=data)

    def check(self, source: str | None = None) -> None:
        """Check, without decoding, that the bytes are whole: the headers of bitshuffle-LZ4
        data and of LZ4 data in HDF5 framing and the sizes of all their blocks add up to the
        data's length and the image's size (uncompressed data: its length is the image's
        size; a bare LZ4 block, which has no headers, only its size ratio). A chunk
        caught while its writer is still writing it fails here; data damaged inside a block
        fails only when decoded. About 1 ms for an Eiger 4M frame, against 9-23 ms to decode
        it.

        Raises:
            FormatError: as :meth:`decode` would for bytes missing or left over.

        Example:
            >>> blob = bitshuffle.compress_lz4(np.arange(4096, dtype="<u4")).tobytes()
            >>> EncodedFrame(blob, (64, 64), "<u4", "bslz4", 4, "auto").check()
            >>> EncodedFrame(blob[:-9], (64, 64), "<u4", "bslz4", 4, "auto").check("f.h5")
            Traceback (most recent call last):
            ...
            pipeline.sources.compression.FormatError: f.h5: bitshuffle-LZ4 data is ...
        """
        n_bytes = self.n_bytes
        view = memoryview(self.data).cast("B")
        try:
            if self.compression == "bslz4":
                _bitshuffle_lz4_blocks(view, n_bytes, self.element_bytes, self.framing)
            elif self.compression == "lz4" and self._lz4_framed(view, n_bytes):
                _lz4_hdf5_blocks(view, n_bytes)
            elif self.compression == "lz4":
                _check_lz4_ratio(len(view), n_bytes)
            elif len(view) != n_bytes:
                raise FormatError(f"data is {len(view)} bytes, the image needs {n_bytes}")
        except FormatError as error:
            if source:
                raise FormatError(f"{source}: {error}") from None
            raise

    def _lz4_framed(self, view: memoryview, n_bytes: int) -> bool:
        """Whether LZ4 data comes in HDF5 framing (a header and blocks)."""
        header = len(view) >= H5_HEADER_BYTES and int.from_bytes(view[:8], "big") == n_bytes
        return self.framing == "hdf5" or (self.framing == "auto" and header)

    def decode(self, source: str | None = None) -> np.ndarray:
        """The image, a writable native-byte-order array of :attr:`shape`.

        Raises:
            FormatError: data that does not decompress to the image's size (its text begins
                with ``source``, where the frame came from, when given).
        """
        try:
            return self._decoded()
        except FormatError as error:
            if source:
                raise FormatError(f"{source}: {error}") from None
            raise

    def _decoded(self) -> np.ndarray:
        n_bytes = self.n_bytes
        view = memoryview(self.data).cast("B")
        raw: Buffer | np.ndarray
        if self.compression == "bslz4":
            raw = decompress_bitshuffle_lz4(view, n_bytes, self.element_bytes, self.framing)
        elif self.compression == "lz4":
            if self._lz4_framed(view, n_bytes):
                raw = decompress_lz4_hdf5(view, n_bytes)
            else:
                raw = decompress_lz4_block(view, n_bytes)
        else:
            if len(view) != n_bytes:
                raise FormatError(f"data is {len(view)} bytes, the image needs {n_bytes}")
            raw = view
            if self.compression == "bitshuffle":
                _bitshuffle_single_threaded()
                elements = np.frombuffer(view, np.dtype(f"u{self.element_bytes}")).copy()
                raw = bitshuffle.bitunshuffle(elements).view(np.uint8)
        dtype = np.dtype(self.dtype)
        array = np.frombuffer(raw, dtype).reshape(self.shape, order=self.order)
        return _writable(np.ascontiguousarray(array, dtype.newbyteorder("=")))


def _writable(array: np.ndarray) -> np.ndarray:
    return array if array.flags.writeable else array.copy()
