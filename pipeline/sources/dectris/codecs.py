"""Image data of the DECTRIS SIMPLON stream: v1 data blobs and v2 CBOR typed arrays, checked
into an :class:`~pipeline.sources.compression.EncodedFrame` and decoded (LZ4 and
bitshuffle-LZ4 themselves are :mod:`pipeline.sources.compression`'s).

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

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import cbor2
import numpy as np

from pipeline.sources.compression import Buffer, Compression, EncodedFrame, FormatError

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

_ENCODING = re.compile(r"(?:bs(?P<bits>8|16|32|64))?(?P<lz4>-?lz4)?(?P<order>[<>])")


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
    pipeline.sources.compression.FormatError: shape None is not [x, y] with two positive integers
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
