"""The wire format between pipeline processes: ZeroMQ multipart messages, no pickle.

Frame 0 is a msgpack map (the header): ``proto`` (this module's :data:`PROTOCOL_VERSION`),
``kind`` (what the message is), free fields (ids, timestamps, text), and ``arrays``: a list of
``[name, dtype, shape]``. Frames 1.. are the raw C-ordered bytes of those arrays, in order,
so arrays travel without copies or serialisation.

Example:
    >>> import numpy as np
    >>> frames = encode("line_out", {"index": 3}, counts=np.arange(4.0))
    >>> message = decode(frames)
    >>> message.kind, message.header["index"], message.arrays["counts"].tolist()
    ('line_out', 3, [0.0, 1.0, 2.0, 3.0])
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

PROTOCOL_VERSION = 1
#: dtypes allowed on the wire (no object arrays, ever).
ALLOWED_DTYPES = frozenset(
    {"<f4", "<f8", "<i4", "<i8", "<u1", "<u2", "<u4", "<u8", "|u1", "|i1", "<i2"}
)


class ProtocolError(ValueError):
    """A message that does not follow this wire format."""


@dataclass
class Message:
    """A decoded message: its ``kind``, header fields, and arrays by name."""

    kind: str
    header: dict[str, Any]
    arrays: dict[str, np.ndarray]


def encode(kind: str, header: dict[str, Any] | None = None, **arrays: np.ndarray) -> list[Any]:
    """The frames of one message: a msgpack header, then one buffer per array."""
    specs = []
    buffers = []
    for name, array in arrays.items():
        array = np.asarray(array, order="C")  # (np.ascontiguousarray makes 0-d arrays 1-d)
        dtype = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
        if dtype.str not in ALLOWED_DTYPES:
            raise ProtocolError(f"array {name!r} has dtype {array.dtype}, not allowed on the wire")
        specs.append([name, dtype.str, list(array.shape)])
        # bytes as a flat uint8 view (a memoryview cast fails on arrays with a 0-length axis)
        buffers.append(array.astype(dtype, copy=False).reshape(-1).view(np.uint8).data)
    fields = dict(header or {})
    fields.update(proto=PROTOCOL_VERSION, kind=kind, arrays=specs)
    return [msgpack.packb(fields, use_bin_type=True), *buffers]


def decode(frames: list[Any]) -> Message:
    """Parse and check the frames of one message; raise :class:`ProtocolError` if malformed."""
    if not frames:
        raise ProtocolError("empty message")
    try:
        header = msgpack.unpackb(bytes(frames[0]), raw=False, strict_map_key=True)
    except (ValueError, msgpack.UnpackException) as error:
        raise ProtocolError(f"header is not msgpack: {error}") from error
    if not isinstance(header, dict):
        raise ProtocolError("header is not a map")
    if header.get("proto") != PROTOCOL_VERSION:
        raise ProtocolError(
            f"protocol version {header.get('proto')!r}, expected {PROTOCOL_VERSION}"
        )
    kind = header.get("kind")
    specs = header.get("arrays", [])
    if not isinstance(kind, str) or not isinstance(specs, list):
        raise ProtocolError("header needs a string 'kind' and a list 'arrays'")
    if len(frames) != 1 + len(specs):
        raise ProtocolError(f"header announces {len(specs)} arrays, got {len(frames) - 1} frames")
    arrays = {}
    for spec, frame in zip(specs, frames[1:], strict=True):
        try:
            name, dtype_str, shape = spec
            dtype = np.dtype(dtype_str)
            shape = tuple(int(n) for n in shape)
        except (TypeError, ValueError) as error:
            raise ProtocolError(f"bad array spec {spec!r}") from error
        if not isinstance(name, str) or name in arrays:
            raise ProtocolError(f"array name {name!r} is not a string, or given twice")
        if dtype.str not in ALLOWED_DTYPES or any(n < 0 for n in shape):
            raise ProtocolError(f"array {name!r}: dtype {dtype_str!r} or shape {shape} not allowed")
        buffer = memoryview(frame)
        expected = dtype.itemsize * math.prod(shape)  # exact: Python ints (np.prod: 3.5 us)
        if buffer.nbytes != expected:
            raise ProtocolError(f"array {name!r}: {buffer.nbytes} bytes, expected {expected}")
        arrays[name] = np.frombuffer(buffer, dtype=dtype).reshape(shape)
    for key in ("proto", "kind", "arrays"):
        header.pop(key)
    return Message(kind=kind, header=header, arrays=arrays)
