"""Image data of the DECTRIS SIMPLON stream, decoded: LZ4, bitshuffle-LZ4 and CBOR typed arrays.

**Stream v1 data blobs.** ``dimage_d-1.0``'s ``encoding`` follows the manual's grammar
``[bs<BIT>][[-]lz4][<|>]``: ``<`` / ``>`` raw, ``lz4<`` one plain LZ4 block of the whole
image, ``bs<BIT>-lz4<`` bitshuffle (element size BIT/8 bytes) with LZ4-compressed blocks,
``bs<BIT><`` bitshuffle alone. The bitshuffle-LZ4 blob is read both with and without the
12-byte header of the HDF5 filter (big-endian uint64 decompressed size, big-endian uint32
block size in bytes): DECTRIS' own example client, DIALS' stream format and LiberTEM-dectris
expect that header from real detectors, while ALBA's eiger-simulator
(``bitshuffle.compress_lz4``) sends none, in which case bitshuffle's default block size
applies. The header is recognised by its first 8 bytes equalling the image's size in bytes,
which headerless data never starts with.

**Stream v2 arrays.** A multi-dimensional array (CBOR tag 40, row-major ``[rows, columns]``;
tag 1040 column-major) of an RFC 8746 typed array (tags 64-86), whose bytes may be wrapped in
the DECTRIS compression tag 56500 ``[algorithm, element size, bytes]`` with algorithm
``bslz4`` or ``lz4``, both in HDF5 framing (the 12-byte header above, then blocks).

Sources: DECTRIS' compression tag (github.com/dectris/documentation,
``cbor/dectris-compression-tag.md``), the HDF5 LZ4 filter format (HDFGroup hdf5_plugins
``LZ4/LZ4_HDF5_format.md``), bitshuffle's HDF5 filter (kiyo-masui/bitshuffle
``src/bshuf_h5filter.c``), LiberTEM-dectris and eiger-simulator.

Every decoder checks sizes before it allocates or calls into C, and raises
:class:`FormatError` saying what is wrong.

Example (a big-endian int32 image of 2 columns and 3 rows):

    >>> decode_v1_data(np.arange(6, dtype=">i4").tobytes(), [2, 3], "int32", ">")
    array([[0, 1],
           [2, 3],
           [4, 5]], dtype=int32)
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import math
import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import bitshuffle
import cbor2
import lz4.block
import numpy as np

#: Bytes as the stream delivers them.
Buffer = bytes | bytearray | memoryview

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

#: Size of the HDF5 filter header (decompressed size, block size) before LZ4 blocks, bytes.
H5_HEADER_BYTES = 12
_ENCODING = re.compile(r"(?:bs(?P<bits>8|16|32|64))?(?P<lz4>-?lz4)?(?P<order>[<>])")


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
    ``decode_frames``) for integrator processes to decode: the process that receives them
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

    def decode(self) -> np.ndarray:
        """The image, a writable native-byte-order array of :attr:`shape`.

        Raises:
            FormatError: data that does not decompress to the image's size.
        """
        n_bytes = self.n_bytes
        view = memoryview(self.data).cast("B")
        raw: Buffer | np.ndarray
        if self.compression == "bslz4":
            raw = decompress_bitshuffle_lz4(view, n_bytes, self.element_bytes, self.framing)
        elif self.compression == "lz4":
            header = len(view) >= H5_HEADER_BYTES and int.from_bytes(view[:8], "big") == n_bytes
            if self.framing == "hdf5" or (self.framing == "auto" and header):
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


# --------------------------------------------------------------------------------------------
# Stream v1 data blobs


def parse_encoding(encoding: object) -> tuple[int | None, bool, Literal["<", ">"]]:
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
    order: Literal["<", ">"] = "<" if match["order"] == "<" else ">"
    return (int(bits) if bits else None, match["lz4"] is not None, order)


def _pixel_type(name: object) -> np.dtype:
    if not isinstance(name, str) or name not in PIXEL_TYPES:
        raise FormatError(f"unknown pixel type {name!r} (known: {', '.join(PIXEL_TYPES)})")
    return PIXEL_TYPES[name]


def _shape_rows_columns(shape_xy: object) -> tuple[int, int]:
    if (
        not isinstance(shape_xy, list | tuple)
        or len(shape_xy) != 2
        or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape_xy)
    ):
        raise FormatError(f"shape {shape_xy!r} is not [x, y] with two positive integers")
    return int(shape_xy[1]), int(shape_xy[0])


def _writable(array: np.ndarray) -> np.ndarray:
    return array if array.flags.writeable else array.copy()


def encoded_v1_data(
    blob: Buffer, shape_xy: object, pixel_type: object, encoding: object
) -> EncodedFrame:
    """A stream v1 data blob as an :class:`EncodedFrame`: everything checked that can be
    without decompressing it (:func:`decode_v1_data` decodes it too).

    Args:
        blob: the data part of the image message.
        shape_xy: ``dimage_d-1.0``'s ``shape``: [x (columns), y (rows)], as sent (checked).
        pixel_type: its ``type``, e.g. ``uint32``, as sent (checked).
        encoding: its ``encoding``, e.g. ``bs32-lz4<``, as sent (checked).

    Raises:
        FormatError: a shape that is not two positive integers, an unknown type or encoding,
            or uncompressed data of the wrong size.

    >>> encoded_v1_data(b"", [2070, 2167], "uint32", "bs32-lz4<").shape
    (2167, 2070)
    """
    shape = list(shape_xy) if isinstance(shape_xy, Iterable) else shape_xy
    rows, columns = _shape_rows_columns(shape)
    dtype = _pixel_type(pixel_type)
    bits, compressed, order = parse_encoding(encoding)
    n_bytes = rows * columns * dtype.itemsize
    view = memoryview(blob).cast("B")
    stored = dtype.newbyteorder(order).str
    element_bytes = bits // 8 if bits is not None else 1
    if n_bytes % element_bytes:
        raise FormatError(f"{pixel_type} image of {n_bytes} bytes is not whole {bits}-bit elements")
    if not compressed and len(view) != n_bytes:
        what = "bitshuffled data" if bits is not None else "raw data"
        raise FormatError(
            f"{what} is {len(view)} bytes, shape {shape} {pixel_type} needs {n_bytes}"
        )
    compression: Compression = "none"
    if bits is not None:
        compression = "bslz4" if compressed else "bitshuffle"
    elif compressed:
        compression = "lz4"
    return EncodedFrame(blob, (rows, columns), stored, compression, element_bytes, "auto")


def decode_v1_data(
    blob: Buffer, shape_xy: object, pixel_type: object, encoding: object
) -> np.ndarray:
    """The image of a stream v1 data blob, as a native-byte-order (rows, columns) array
    (the arguments and what is checked: :func:`encoded_v1_data`).

    Raises:
        FormatError: a shape that is not two positive integers, unknown type or encoding,
            undecodable data, or a size mismatch.

    >>> decode_v1_data(np.arange(4, dtype="<u2").tobytes(), [4, 1], "uint16", "<")
    array([[0, 1, 2, 3]], dtype=uint16)
    >>> decode_v1_data(b"", None, "uint16", "<")
    Traceback (most recent call last):
    ...
    pipeline.sources.dectris.codecs.FormatError: shape None is not [x, y] with two positive integers
    """
    return encoded_v1_data(blob, shape_xy, pixel_type, encoding).decode()


# --------------------------------------------------------------------------------------------
# Stream v2 (CBOR) arrays


@dataclass(frozen=True)
class TaggedValue:
    """A CBOR tag of the array family (typed array, multi-dimensional array, compression), as
    :func:`cbor_tag_hook` leaves it for :func:`decode_v2_array`.

    Attributes:
        tag: the CBOR tag number.
        value: the tagged item, as decoded.
    """

    tag: int
    value: Any


def cbor_tag_hook(first: Any, second: Any) -> Any:
    """``cbor2.loads``' ``tag_hook``: the array tags as :class:`TaggedValue`, others as they
    are (cbor2 < 6 calls ``hook(decoder, tag)``, cbor2 >= 6 ``hook(tag, immutable)``).

    >>> cbor2.loads(cbor2.dumps(cbor2.CBORTag(64, b"\\x01")), tag_hook=cbor_tag_hook)
    TaggedValue(tag=64, value=b'\\x01')
    """
    tag = first if isinstance(first, cbor2.CBORTag) else second
    if tag.tag in TYPED_ARRAY_TAGS or tag.tag in (
        MULTI_DIM_ROW_MAJOR_TAG,
        MULTI_DIM_COLUMN_MAJOR_TAG,
        DECTRIS_COMPRESSION_TAG,
    ):
        return TaggedValue(tag.tag, tag.value)
    return tag


def encoded_v2_array(value: object, what: str = "array") -> EncodedFrame:
    """A v2 multi-dimensional typed array (as parsed with :func:`cbor_tag_hook`) as an
    :class:`EncodedFrame`: everything checked that can be without decompressing it
    (:func:`decode_v2_array` decodes it too).

    Raises:
        FormatError: not a tag-40 array of a known typed array, an unknown compression, or
            uncompressed bytes of the wrong size.

    >>> typed = TaggedValue(69, TaggedValue(DECTRIS_COMPRESSION_TAG, ["bslz4", 2, b""]))
    >>> encoded = encoded_v2_array(TaggedValue(MULTI_DIM_ROW_MAJOR_TAG, [[2, 3], typed]))
    >>> encoded.shape, encoded.dtype, encoded.compression
    ((2, 3), '<u2', 'bslz4')
    """
    if not isinstance(value, TaggedValue) or value.tag not in (
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
    if not isinstance(typed, TaggedValue) or typed.tag not in TYPED_ARRAY_TAGS:
        tag = typed.tag if isinstance(typed, TaggedValue | cbor2.CBORTag) else None
        raise FormatError(
            f"{what}: element type is not an RFC 8746 typed array"
            + (f" (unknown tag {tag})" if tag is not None else "")
        )
    dtype = TYPED_ARRAY_TAGS[typed.tag]
    n_bytes = math.prod(dims) * dtype.itemsize
    order: Literal["C", "F"] = "F" if value.tag == MULTI_DIM_COLUMN_MAJOR_TAG else "C"
    shape = tuple(int(n) for n in dims)
    payload = typed.value
    if isinstance(payload, bytes | bytearray | memoryview):
        if len(payload) != n_bytes:
            raise FormatError(f"{what} is {len(payload)} bytes, its shape needs {n_bytes}")
        return EncodedFrame(payload, shape, dtype.str, "none", 1, "none", order)
    if not isinstance(payload, TaggedValue) or payload.tag != DECTRIS_COMPRESSION_TAG:
        raise FormatError(f"{what} is {type(payload).__name__}, not a byte string or tag 56500")
    compressed = payload.value
    if not isinstance(compressed, list | tuple) or len(compressed) != 3:
        raise FormatError(
            f"{what}: tag 56500 holds {compressed!r:.60}, not [algorithm, size, bytes]"
        )
    algorithm, modifier, data = compressed
    if not isinstance(data, bytes | bytearray):
        raise FormatError(f"{what}: tag 56500 carries {type(data).__name__}, not bytes")
    if algorithm == "bslz4":
        if modifier not in (1, 2, 4, 8):
            raise FormatError(f"{what}: bslz4 element size {modifier!r} is not 1, 2, 4 or 8")
        return EncodedFrame(data, shape, dtype.str, "bslz4", modifier, "hdf5", order)
    if algorithm == "lz4":
        return EncodedFrame(data, shape, dtype.str, "lz4", 1, "hdf5", order)
    raise FormatError(f"{what}: unknown compression {algorithm!r} (known: bslz4, lz4)")


def decode_v2_array(value: object, what: str = "array") -> np.ndarray:
    """A v2 multi-dimensional typed array (as parsed with :func:`cbor_tag_hook`) as a
    native-byte-order numpy array (what is checked: :func:`encoded_v2_array`).

    Raises:
        FormatError: not a tag-40 array of a known typed array, undecodable data, or a size
            mismatch.

    >>> typed = TaggedValue(69, np.arange(6, dtype="<u2").tobytes())
    >>> decode_v2_array(TaggedValue(MULTI_DIM_ROW_MAJOR_TAG, [[2, 3], typed]))
    array([[0, 1, 2],
           [3, 4, 5]], dtype=uint16)
    """
    return encoded_v2_array(value, what).decode()
