"""DECTRIS SIMPLON stream messages, parsed into typed, frozen objects.

Both wire formats are understood, and told apart per message (:func:`parse_message`):

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

**Stream v2** (``format: cbor``, port 31001): one CBOR map per message, ``type`` ``start``,
``image`` or ``end``; image data is a map channel -> array (decoded by
:func:`~pipeline.sources.dectris.codecs.decode_v2_array`). ``threshold`` picks the channel
(default: the first listed in the start message).

Sources: DECTRIS' stream v2 specification (github.com/dectris/documentation,
``stream_v2/README.md``, ``stream_v2/examples``), DECTRIS' example v1 client, DIALS' stream
format and LiberTEM-dectris.

A message comes back as a :class:`HeaderMessage` (carrying a :class:`SeriesHeader`), an
:class:`ImageMessage` or an :class:`EndMessage`. A message that names no series raises
:class:`~pipeline.sources.compression.FormatError`; an image that names its series and
number but cannot be decoded comes back with ``frame=None`` and ``error`` saying why. With
``decode=False`` an image's data is checked but left compressed, as the message's ``encoded``
(an :class:`~pipeline.sources.compression.EncodedFrame`), for another process to decode.

Example (a stream v1 image message):

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

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import cbor2
import numpy as np
import zmq

from pipeline.sources.compression import Buffer, EncodedFrame, FormatError
from pipeline.sources.dectris.codecs import (
    TYPED_ARRAY_TAGS,
    TaggedValue,
    cbor_tag_hook,
    decode_v1_data,
    decode_v2_array,
    encoded_v1_data,
    encoded_v2_array,
)

#: Which wire format to expect: ``auto`` tells them apart per message.
Protocol = Literal["auto", "v1", "v2"]

#: A message part as received: bytes, or a ZeroMQ frame.
Part = Buffer | zmq.Frame


@dataclass(frozen=True)
class SeriesHeader:
    """What a series header (v1 ``dheader-1.0``, v2 ``start``) says about the series.

    Attributes:
        series_id: the detector's series number (the ``sequence id`` that ``arm`` returns).
        protocol: ``v1`` or ``v2``.
        header_detail: v1 ``all``, ``basic`` or ``none`` (as sent); ``None`` for v2.
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

    >>> SeriesHeader(series_id=2, protocol="v2", n_images=10).n_images
    10
    """

    series_id: int
    protocol: Literal["v1", "v2"]
    header_detail: object = None
    config: Mapping[str, Any] = field(default_factory=dict)
    n_images: int | None = None
    unique_id: str | None = None
    channels: tuple[str, ...] = ()
    pixel_mask: np.ndarray | None = None
    flatfield: np.ndarray | None = None
    countrate_table: np.ndarray | None = None
    series_date: float | None = None
    problems: tuple[str, ...] = ()


@dataclass(frozen=True)
class HeaderMessage:
    """A series header (v1 ``dheader-1.0``, v2 ``start``).

    Attributes:
        protocol: ``v1`` or ``v2``.
        series_id: the series it starts.
        header: what it says.
        kind: ``header``.
    """

    protocol: Literal["v1", "v2"]
    series_id: int
    header: SeriesHeader
    kind: Literal["header"] = field(default="header", init=False)

    @property
    def problems(self) -> tuple[str, ...]:
        """Defects of the header that did not stop it from counting."""
        return self.header.problems


@dataclass(frozen=True)
class ImageMessage:
    """One image of a series.

    Attributes:
        protocol: ``v1`` or ``v2``.
        series_id: the series it belongs to.
        image_number: the image (frame) number, 0-based.
        frame: the decoded image (rows, columns), or ``None`` when it could not be decoded
            or was not (``encoded``).
        error: why it could not be decoded, else ``None``.
        encoded: the image checked but not decoded, where the parser was asked not to decode
            (``decode=False``), else ``None``.
        metadata: per-image facts as text (encoding, pixel type, exposure times, ...).
        acquired_at: acquisition start, seconds since the epoch, where the message says (v2;
            v1 images need their series header:
            :func:`~pipeline.sources.dectris.assembler.v1_acquired_at`).
        kind: ``image``.
    """

    protocol: Literal["v1", "v2"]
    series_id: int
    image_number: int
    frame: np.ndarray | None = None
    error: str | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)
    acquired_at: float | None = None
    encoded: EncodedFrame | None = None
    kind: Literal["image"] = field(default="image", init=False)


@dataclass(frozen=True)
class EndMessage:
    """The end of a series (v1 ``dseries_end-1.0``, v2 ``end``).

    Attributes:
        protocol: ``v1`` or ``v2``.
        series_id: the series it ends.
        problems: defects that did not stop it from counting.
        kind: ``end``.
    """

    protocol: Literal["v1", "v2"]
    series_id: int
    problems: tuple[str, ...] = ()
    kind: Literal["end"] = field(default="end", init=False)


#: One parsed stream message.
StreamMessage = HeaderMessage | ImageMessage | EndMessage


# --------------------------------------------------------------------------------------------
# Stream v1


def _json_part(part: Part, what: str) -> dict[str, Any]:
    try:
        value = json.loads(bytes(_bytes_of(part)))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise FormatError(f"{what} is not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise FormatError(f"{what} is JSON {type(value).__name__}, not an object")
    return value


def _integer(mapping: Mapping[str, Any], key: str, what: str) -> int:
    value = mapping.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise FormatError(f"{what} has no non-negative integer {key!r} (got {value!r})")
    return value


def _htype(message: Mapping[str, Any], expected: str, what: str) -> None:
    if message.get("htype") != expected:
        raise FormatError(f"{what} has htype {message.get('htype')!r}, expected {expected!r}")


def _bytes_of(part: Part) -> memoryview:
    if isinstance(part, zmq.Frame):
        return part.buffer
    return memoryview(part)


def _v1_expected_images(config: Mapping[str, Any]) -> int | None:
    nimages, ntrigger = config.get("nimages"), config.get("ntrigger", 1)
    if not isinstance(ntrigger, int) or isinstance(ntrigger, bool) or ntrigger < 1:
        return None
    if config.get("trigger_mode") in ("inte", "exte"):
        return ntrigger
    if not isinstance(nimages, int) or isinstance(nimages, bool) or nimages < 1:
        return None
    return nimages * ntrigger


_V1_HEADER_BLOBS = (
    ("dflatfield-1.0", "flatfield"),
    ("dpixelmask-1.0", "pixel_mask"),
    ("dcountrate_table-1.0", "countrate_table"),
)


def _v1_header(parts: Sequence[Part], first: Mapping[str, Any]) -> HeaderMessage:
    series_id = _integer(first, "series", "dheader-1.0")
    detail = first.get("header_detail")
    problems: list[str] = []
    expected_parts = (
        {"none": 1, "basic": 2, "all": 8}.get(detail) if isinstance(detail, str) else None
    )
    if expected_parts is None:
        problems.append(f"dheader-1.0 has unknown header_detail {detail!r}")
    elif len(parts) not in (expected_parts, expected_parts + 1):
        problems.append(
            f"dheader-1.0 with header_detail {detail!r} has {len(parts)} parts, "
            f"expected {expected_parts} (or {expected_parts + 1} with an appendix)"
        )
    config: dict[str, Any] = {}
    n_images = series_date = None
    if len(parts) >= 2 and detail in ("basic", "all"):
        try:
            config = _json_part(parts[1], "detector configuration part")
            n_images = _v1_expected_images(config)
            series_date = _epoch_seconds(config.get("data_collection_date"))
        except FormatError as error:
            problems.append(str(error))
    blobs: dict[str, np.ndarray] = {}
    if detail == "all":
        for index, (htype, attribute) in enumerate(_V1_HEADER_BLOBS):
            if 3 + 2 * index >= len(parts):
                break
            try:
                description = _json_part(parts[2 + 2 * index], htype)
                _htype(description, htype, f"header part {3 + 2 * index}")
                blobs[attribute] = decode_v1_data(
                    _bytes_of(parts[3 + 2 * index]),
                    description.get("shape"),
                    description.get("type"),
                    "<",
                )
            except FormatError as error:
                problems.append(f"{htype}: {error}")
    header = SeriesHeader(
        series_id=series_id,
        protocol="v1",
        header_detail=detail,
        config=config,
        n_images=n_images,
        series_date=series_date,
        pixel_mask=blobs.get("pixel_mask"),
        flatfield=blobs.get("flatfield"),
        countrate_table=blobs.get("countrate_table"),
        problems=tuple(problems),
    )
    return HeaderMessage(protocol="v1", series_id=series_id, header=header)


def _v1_image(parts: Sequence[Part], first: Mapping[str, Any], decode: bool) -> ImageMessage:
    series_id = _integer(first, "series", "dimage-1.0")
    number = _integer(first, "frame", "dimage-1.0")
    metadata: dict[str, str] = {}
    if first.get("hash"):
        metadata["hash"] = str(first["hash"])
    frame = error = encoded = None
    try:
        if len(parts) not in (4, 5):
            raise FormatError(
                f"image message has {len(parts)} parts, expected 4 "
                "(dimage, dimage_d, data, dconfig) or 5 with an appendix"
            )
        description = _json_part(parts[1], "dimage_d part")
        _htype(description, "dimage_d-1.0", "image part 2")
        timing = _json_part(parts[3], "dconfig part")
        _htype(timing, "dconfig-1.0", "image part 4")
        blob = _bytes_of(parts[2])
        encoding, pixel_type = description.get("encoding"), description.get("type")
        metadata.update(encoding=str(encoding), pixel_type=str(pixel_type))
        for key in ("start_time", "stop_time", "real_time"):
            if key in timing:
                metadata[f"{key}_ns"] = str(timing[key])
        size = description.get("size")
        if isinstance(size, int) and not isinstance(size, bool) and size != len(blob):
            raise FormatError(f"data part is {len(blob)} bytes, dimage_d-1.0 says size {size}")
        encoded = encoded_v1_data(blob, description.get("shape"), pixel_type, encoding)
        if decode:
            frame, encoded = encoded.decode(), None
    except FormatError as failure:
        encoded, error = None, f"stream v1 image {number} of series {series_id}: {failure}"
    return ImageMessage(
        protocol="v1",
        series_id=series_id,
        image_number=number,
        frame=frame,
        error=error,
        metadata=metadata,
        encoded=encoded,
    )


def parse_v1_message(parts: Sequence[Part], decode: bool = True) -> StreamMessage:
    """Parse one stream v1 (JSON multipart) message; an image's data is decoded unless
    ``decode`` is false (then checked and left as its ``encoded``).

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
    pipeline.sources.compression.FormatError: first part is not valid JSON: ...
    """
    if not parts:
        raise FormatError("empty message")
    first = _json_part(parts[0], "first part")
    htype = first.get("htype")
    if htype == "dheader-1.0":
        return _v1_header(parts, first)
    if htype == "dseries_end-1.0":
        series_id = _integer(first, "series", "dseries_end-1.0")
        problems = () if len(parts) == 1 else (f"dseries_end-1.0 has {len(parts)} parts, not 1",)
        return EndMessage(protocol="v1", series_id=series_id, problems=problems)
    if htype != "dimage-1.0":
        raise FormatError(
            f"unknown htype {htype!r} (expected dheader-1.0, dimage-1.0 or dseries_end-1.0)"
        )
    return _v1_image(parts, first, decode)


def _epoch_seconds(value: object) -> float | None:
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return None
    return None


# --------------------------------------------------------------------------------------------
# Stream v2


def _rational_s(value: object) -> float | None:
    if (
        isinstance(value, list | tuple)
        and len(value) == 2
        and all(isinstance(n, int) and not isinstance(n, bool) for n in value)
        and value[1] > 0
    ):
        return value[0] / value[1]
    return None


def _plain(value: object) -> object:
    """CBOR values for a config dict: arrays summarised, datetimes as ISO text."""
    if isinstance(value, TaggedValue | cbor2.CBORTag):
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
    data: Mapping[Any, Any], threshold: int | str, channels: Sequence[str]
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


def _v2_image_description(value: object) -> dict[str, str]:
    """The pixel type and compression of a channel's array, as far as they can be told."""
    if not isinstance(value, TaggedValue) or not isinstance(value.value, list | tuple):
        return {}
    typed = value.value[1] if len(value.value) == 2 else None
    if not isinstance(typed, TaggedValue):
        return {}
    payload = typed.value
    compressed = isinstance(payload, TaggedValue) and isinstance(payload.value, list | tuple)
    return {
        "pixel_type": TYPED_ARRAY_TAGS.get(typed.tag, np.dtype("V1")).name,
        "compression": str(payload.value[0]) if compressed else "none",
    }


def _v2_image(
    message: Mapping[str, Any],
    series_id: int,
    threshold: int | str,
    channels: Sequence[str],
    decode: bool,
) -> ImageMessage:
    number = _integer(message, "image_id", "image message")
    metadata: dict[str, str] = {}
    unique_id = message.get("series_unique_id")
    if isinstance(unique_id, str):
        metadata["series_unique_id"] = unique_id
    for key in ("start_time", "stop_time", "real_time"):
        seconds = _rational_s(message.get(key))
        if seconds is not None:
            metadata[f"{key}_s"] = repr(seconds)
    series_date = _epoch_seconds(message.get("series_date"))
    start_s = _rational_s(message.get("start_time"))
    acquired_at = series_date + start_s if series_date is not None and start_s is not None else None
    frame = error = encoded = None
    try:
        channel_data = message.get("data")
        if not isinstance(channel_data, dict) or not channel_data:
            raise FormatError("image message has no 'data' map of channels")
        name, value = _pick_channel(channel_data, threshold, channels)
        metadata["channel"] = str(name)
        metadata.update(_v2_image_description(value))
        encoded = encoded_v2_array(value, f"channel {name!r}")
        if len(encoded.shape) != 2:
            raise FormatError(
                f"channel {name!r} has {len(encoded.shape)} dimensions, an image needs 2"
            )
        if decode:
            frame, encoded = encoded.decode(), None
    except FormatError as failure:
        frame, encoded = None, None
        error = f"stream v2 image {number} of series {series_id}: {failure}"
    return ImageMessage(
        protocol="v2",
        series_id=series_id,
        image_number=number,
        frame=frame,
        error=error,
        metadata=metadata,
        acquired_at=acquired_at,
        encoded=encoded,
    )


def _v2_start(message: Mapping[str, Any], series_id: int, threshold: int | str) -> HeaderMessage:
    problems: list[str] = []
    unique_id = message.get("series_unique_id")
    names = message.get("channels")
    channels: tuple[str, ...] = ()
    if isinstance(names, list | tuple) and all(isinstance(n, str) for n in names):
        channels = tuple(names)
    elif names is not None:
        problems.append(f"start message channels {names!r:.60} are not a list of names")
    n_images = message.get("number_of_images")
    arrays = ("pixel_mask", "flatfield", "countrate_correction_lookup_table")
    decoded: dict[str, np.ndarray] = {}
    for key in ("pixel_mask", "flatfield"):
        per_channel = message.get(key)
        if not isinstance(per_channel, dict) or not per_channel:
            continue
        try:
            name, value = _pick_channel(per_channel, threshold, channels)
            decoded[key] = decode_v2_array(value, f"{key} of channel {name!r}")
        except FormatError as error:
            problems.append(f"start message {key}: {error}")
    header = SeriesHeader(
        series_id=series_id,
        protocol="v2",
        config={k: _plain(v) for k, v in message.items() if k not in arrays},
        n_images=(
            n_images
            if isinstance(n_images, int) and not isinstance(n_images, bool) and n_images >= 0
            else None
        ),
        unique_id=unique_id if isinstance(unique_id, str) else None,
        channels=channels,
        series_date=_epoch_seconds(message.get("arm_date")),
        pixel_mask=decoded.get("pixel_mask"),
        flatfield=decoded.get("flatfield"),
        problems=tuple(problems),
    )
    return HeaderMessage(protocol="v2", series_id=series_id, header=header)


def parse_v2_message(
    data: Buffer, threshold: int | str = 0, channels: Sequence[str] = (), decode: bool = True
) -> StreamMessage:
    """Parse one stream v2 (CBOR) message.

    Args:
        data: the message.
        threshold: which channel of an image to take: its name (e.g. ``threshold_2``) or its
            position in ``channels`` (the start message's list; the image's own order if empty).
        channels: the series' channel names, from its start message.
        decode: decode an image's data (false: check it and leave it as its ``encoded``).

    Raises:
        FormatError: when the message names no series (not CBOR, not a map, unknown type, no
            ``series_id``/``image_id``).

    >>> message = cbor2.dumps({"type": "end", "series_id": 7, "series_unique_id": "x"})
    >>> parse_v2_message(message).kind
    'end'
    """
    try:
        message = cbor2.loads(bytes(data), tag_hook=cbor_tag_hook)
    except (cbor2.CBORDecodeError, ValueError, TypeError, OverflowError) as error:
        raise FormatError(f"message is not valid CBOR: {error}") from None
    if not isinstance(message, dict):
        raise FormatError(f"message is CBOR {type(message).__name__}, not a map")
    kind = message.get("type")
    if kind not in ("start", "image", "end"):
        raise FormatError(f"unknown message type {kind!r} (expected start, image or end)")
    series_id = _integer(message, "series_id", f"{kind} message")
    if kind == "end":
        return EndMessage(protocol="v2", series_id=series_id)
    if kind == "start":
        return _v2_start(message, series_id, threshold)
    return _v2_image(message, series_id, threshold, channels, decode)


def _is_v2(parts: Sequence[Part]) -> bool:
    if len(parts) != 1:
        return False
    head = bytes(_bytes_of(parts[0])[:1])
    return head not in (b"{", b" ", b"\n", b"\t", b"\r")


def parse_message(
    parts: Sequence[Part],
    protocol: Protocol = "auto",
    threshold: int | str = 0,
    channels: Sequence[str] = (),
    decode: bool = True,
) -> StreamMessage:
    """Parse one message of either protocol; ``auto`` takes single-part messages that do not
    start like JSON as v2 (CBOR), everything else as v1. An image's data is decoded unless
    ``decode`` is false (then checked and left as its ``encoded``).

    >>> parse_message([cbor2.dumps({"type": "end", "series_id": 2})]).protocol
    'v2'
    """
    if protocol == "v2" or (protocol == "auto" and _is_v2(parts)):
        if len(parts) != 1:
            raise FormatError(f"stream v2 message has {len(parts)} parts, expected 1")
        return parse_v2_message(_bytes_of(parts[0]), threshold, channels, decode)
    return parse_v1_message(parts, decode)
