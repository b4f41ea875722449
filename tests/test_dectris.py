"""The DECTRIS SIMPLON stream source (pipeline.sources.dectris).

Three kinds of producer:
- an own encoder of the documented formats (below; its bitshuffle is a separate numpy
  implementation, cross-checked against the ``bitshuffle`` package and against HDF5 chunks
  written by h5py + hdf5plugin) for every encoding and every kind of bad input, v1 and v2;
- ALBA's ``eiger-simulator`` (PyPI), started as a subprocess on loopback and driven through its
  SIMPLON REST API, for live v1 series of 100 images in both of its encodings.
"""

from __future__ import annotations

import json
import struct
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime

import bitshuffle
import cbor2
import h5py
import hdf5plugin
import lz4.block
import numpy as np
import pytest
import zmq
import zmq.utils.monitor
from conftest import EigerSimulator

from pipeline.exposure import Exposure
from pipeline.sources.dectris import (
    DectrisStream,
    FormatError,
    bitshuffle_default_block_elements,
    decode_v1_data,
    decompress_bitshuffle_lz4,
    decompress_lz4_hdf5,
    parse_message,
    parse_v1_message,
)

TIMEOUT_S = 20.0

# ------------------------------------------------------------------------------------------
# Own encoder of the documented formats


def bit_transpose(block: np.ndarray) -> bytes:
    """Bitshuffle of one block (a multiple of 8 elements): for every bit of the element (byte
    by byte, least significant first) one row with that bit of every element."""
    n, size = block.size, block.dtype.itemsize
    bits = np.unpackbits(block.view(np.uint8).reshape(n, size), axis=1, bitorder="little")
    return np.packbits(bits.T, axis=1, bitorder="little").tobytes()


def bitshuffle_lz4_blocks(values: np.ndarray, block_elements: int) -> bytes:
    """Bitshuffle + LZ4 blocks (4-byte big-endian compressed size + LZ4 block each), the last
    ``n % 8`` elements copied as they are: the layout of bitshuffle's ``compress_lz4``."""
    flat = values.ravel()
    n = flat.size
    out = []
    start = 0
    while n - start >= 8:
        count = min(block_elements, (n - start) // 8 * 8)
        packed = lz4.block.compress(bit_transpose(flat[start : start + count]), store_size=False)
        out += [struct.pack(">I", len(packed)), packed]
        start += count
    out.append(flat[start:].tobytes())
    return b"".join(out)


def h5_header(n_bytes: int, block_bytes: int) -> bytes:
    return struct.pack(">QI", n_bytes, block_bytes)


def lz4_hdf5(data: bytes, block_bytes: int = 1 << 16) -> bytes:
    """LZ4 in HDF5 framing; a block that does not shrink is stored as is."""
    out = [h5_header(len(data), block_bytes)]
    for start in range(0, len(data), block_bytes):
        block = data[start : start + block_bytes]
        packed = lz4.block.compress(block, store_size=False)
        if len(packed) >= len(block):
            packed = block
        out += [struct.pack(">I", len(packed)), packed]
    return b"".join(out)


def encode_v1(frame: np.ndarray, encoding: str, *, header: bool = True, block: int = 0) -> bytes:
    """The data blob of a v1 image; ``header``: the 12-byte HDF5 header before bitshuffle data
    (or LZ4 in HDF5 framing for ``lz4<``)."""
    order = encoding[-1]
    values = frame.astype(frame.dtype.newbyteorder(order))
    if encoding in ("<", ">"):
        return values.tobytes()
    if encoding == "lz4<":
        raw = values.tobytes()
        return lz4_hdf5(raw) if header else lz4.block.compress(raw, store_size=False)
    bits = int(encoding[2:].split("-")[0].rstrip("<>"))
    elements = values.view(np.dtype(f"u{bits // 8}"))
    block_elements = block or bitshuffle_default_block_elements(bits // 8)
    if not encoding.endswith("lz4<"):  # bitshuffle only, one block-wise transpose
        return bitshuffle.bitshuffle(elements.ravel()).tobytes()
    body = bitshuffle_lz4_blocks(elements, block_elements)
    if header:
        return h5_header(values.nbytes, block_elements * (bits // 8)) + body
    return body


def v1_header(series: int, detail: str = "basic", **config: object) -> list[bytes]:
    parts = [json.dumps({"htype": "dheader-1.0", "series": series, "header_detail": detail})]
    if detail in ("basic", "all"):
        parts.append(json.dumps({"ntrigger": 1, "trigger_mode": "ints", **config}))
    encoded = [p.encode() for p in parts]
    if detail == "all":
        shape = [8, 6]
        for htype, values in (
            ("dflatfield-1.0", np.full((6, 8), 1.5, np.float32)),
            ("dpixelmask-1.0", np.eye(6, 8, dtype=np.uint32)),
            ("dcountrate_table-1.0", np.arange(48, dtype=np.float32).reshape(6, 8)),
        ):
            description = {"htype": htype, "shape": shape, "type": values.dtype.name}
            encoded += [
                json.dumps(description).encode(),
                values.astype("<" + values.dtype.str[1:]).tobytes(),
            ]
    return encoded


def v1_image(
    series: int,
    number: int,
    frame: np.ndarray,
    encoding: str = "bs32-lz4<",
    *,
    blob: bytes | None = None,
    shape: list[int] | None = None,
    type_name: str | None = None,
    size: int | None = None,
    header: bool = True,
) -> list[bytes]:
    data = blob if blob is not None else encode_v1(frame, encoding, header=header)
    description = {
        "htype": "dimage_d-1.0",
        "shape": shape or [frame.shape[1], frame.shape[0]],
        "type": type_name or frame.dtype.name,
        "encoding": encoding,
        "size": len(data) if size is None else size,
    }
    timing = {
        "htype": "dconfig-1.0",
        "start_time": 1000 * number,
        "stop_time": 1000 * number + 900,
        "real_time": 900,
    }
    return [
        json.dumps({"htype": "dimage-1.0", "series": series, "frame": number, "hash": ""}).encode(),
        json.dumps(description).encode(),
        data,
        json.dumps(timing).encode(),
    ]


def v1_end(series: int) -> list[bytes]:
    return [json.dumps({"htype": "dseries_end-1.0", "series": series}).encode()]


TYPED_TAGS = {"u1": 64, ">u2": 65, "<u2": 69, "<u4": 70, "<i4": 78, "<f4": 85, ">f4": 81}


def v2_array(values: np.ndarray, compression: str = "bslz4") -> cbor2.CBORTag:
    """Tag 40 [dims, typed array], the bytes in tag 56500 unless ``compression`` is none."""
    raw = values.tobytes()
    if compression == "bslz4":
        size = values.dtype.itemsize
        block = bitshuffle_default_block_elements(size)
        body = bitshuffle_lz4_blocks(values.view(np.dtype(f"u{size}")), block)
        payload = cbor2.CBORTag(56500, ["bslz4", size, h5_header(len(raw), block * size) + body])
    elif compression == "lz4":
        payload = cbor2.CBORTag(56500, ["lz4", 0, lz4_hdf5(raw, 4096)])
    else:
        payload = raw
    tag = TYPED_TAGS[values.dtype.str.replace("|", "")]
    return cbor2.CBORTag(40, [list(values.shape), cbor2.CBORTag(tag, payload)])


SERIES_DATE = datetime(2026, 11, 29, 1, 0, tzinfo=UTC)


def v2_start(
    series: int, n_images: int | None = None, channels=("threshold_1",), mask=None
) -> bytes:
    message = {
        "type": "start",
        "series_id": series,
        "series_unique_id": f"unique-{series}",
        "arm_date": cbor2.CBORTag(0, "2026-11-29T01:00:00Z"),
        "channels": list(channels),
        "count_time": 0.001,
        "detector_description": "own encoder",
        "image_size_x": 8,
        "image_size_y": 6,
    }
    if n_images is not None:
        message["number_of_images"] = n_images
    if mask is not None:
        message["pixel_mask"] = {name: v2_array(mask, "none") for name in channels}
    return cbor2.dumps(message)


def v2_image(series: int, number: int, data: dict[str, cbor2.CBORTag]) -> bytes:
    return cbor2.dumps(
        {
            "type": "image",
            "series_id": series,
            "series_unique_id": f"unique-{series}",
            "image_id": number,
            "series_date": cbor2.CBORTag(0, SERIES_DATE.isoformat().replace("+00:00", "Z")),
            "start_time": [number * 1000, 100_000],
            "stop_time": [number * 1000 + 900, 100_000],
            "real_time": [900, 100_000],
            "data": data,
        }
    )


def v2_end(series: int) -> bytes:
    return cbor2.dumps({"type": "end", "series_id": series, "series_unique_id": f"unique-{series}"})


def counts(rng: np.random.Generator, shape=(6, 8), dtype="uint32") -> np.ndarray:
    return rng.poisson(3.0, shape).astype(dtype)


# ------------------------------------------------------------------------------------------
# Encodings


@pytest.mark.parametrize(
    ("encoding", "dtype", "header"),
    [
        ("<", "uint32", False),
        (">", "uint16", False),
        ("<", "float32", False),
        ("lz4<", "uint32", False),
        ("lz4<", "uint16", True),
        ("bs8-lz4<", "uint8", True),
        ("bs16-lz4<", "uint16", True),
        ("bs16-lz4<", "uint16", False),
        ("bs32-lz4<", "uint32", True),
        ("bs32-lz4<", "uint32", False),
        ("bs32-lz4<", "int32", True),
        ("bs32<", "uint32", False),
    ],
)
@pytest.mark.parametrize("shape", [(6, 8), (37, 23), (64, 160)])
def test_v1_encodings_decode_to_the_frame(rng, encoding, dtype, header, shape):
    frame = counts(rng, shape, dtype)
    frame.flat[::7] = np.iinfo(dtype).max if dtype[0] in "ui" else -1.5
    blob = encode_v1(frame, encoding, header=header)
    decoded = decode_v1_data(blob, [shape[1], shape[0]], dtype, encoding)
    assert decoded.dtype == np.dtype(dtype) and decoded.dtype.isnative
    np.testing.assert_array_equal(decoded, frame)
    assert decoded.flags.writeable


@pytest.mark.parametrize("block_elements", [8, 256, 2048])
def test_bitshuffle_header_block_size_is_used(rng, block_elements):
    frame = counts(rng, (37, 23))
    blob = encode_v1(frame, "bs32-lz4<", header=True, block=block_elements)
    np.testing.assert_array_equal(decode_v1_data(blob, [23, 37], "uint32", "bs32-lz4<"), frame)


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "uint32"])
@pytest.mark.parametrize("n", [8, 851, 10_000, 70_003])
def test_own_bitshuffle_agrees_with_the_bitshuffle_package(rng, dtype, n):
    values = rng.integers(0, 1000, n).astype(dtype)
    usable = n - n % 8
    assert (
        bit_transpose(values[:usable]) == bitshuffle.bitshuffle(values[:usable], usable).tobytes()
    )
    block = bitshuffle_default_block_elements(values.itemsize)
    ours = bitshuffle_lz4_blocks(values, block)
    theirs = bitshuffle.compress_lz4(values).tobytes()
    np.testing.assert_array_equal(
        bitshuffle.decompress_lz4(np.frombuffer(ours, np.uint8), values.shape, values.dtype), values
    )
    for blob in (ours, theirs):
        out = decompress_bitshuffle_lz4(blob, values.nbytes, values.itemsize, framing="none")
        np.testing.assert_array_equal(out.view(dtype), values)


def test_hdf5_framing_agrees_with_hdf5plugin_both_ways(rng, tmp_path):
    frame = counts(rng, (37, 23))
    with h5py.File(tmp_path / "chunks.h5", "w") as file:
        bslz4 = file.create_dataset(
            "bslz4", data=frame, chunks=frame.shape, **hdf5plugin.Bitshuffle(cname="lz4")
        )
        plain = file.create_dataset(
            "lz4", data=frame, chunks=frame.shape, **hdf5plugin.LZ4(nbytes=512)
        )
        _, bs_chunk = bslz4.id.read_direct_chunk((0, 0))
        _, lz4_chunk = plain.id.read_direct_chunk((0, 0))
        # theirs -> ours
        out = decompress_bitshuffle_lz4(bs_chunk, frame.nbytes, 4, framing="hdf5")
        np.testing.assert_array_equal(out.view("<u4").reshape(frame.shape), frame)
        np.testing.assert_array_equal(
            np.frombuffer(decompress_lz4_hdf5(lz4_chunk, frame.nbytes), "<u4").reshape(frame.shape),
            frame,
        )
        np.testing.assert_array_equal(
            decode_v1_data(bs_chunk, [23, 37], "uint32", "bs32-lz4<"), frame
        )
        # ours -> theirs
        other = (frame + 1).astype(np.uint32)
        bslz4.id.write_direct_chunk((0, 0), encode_v1(other, "bs32-lz4<", header=True))
        plain.id.write_direct_chunk((0, 0), lz4_hdf5(other.tobytes(), 512))
        np.testing.assert_array_equal(bslz4[()], other)
        np.testing.assert_array_equal(plain[()], other)


@pytest.mark.parametrize(
    ("blob", "shape", "type_name", "encoding", "message"),
    [
        (b"\0" * 10, [3, 2], "uint16", "<", "raw data is 10 bytes, shape [3, 2] uint16 needs 12"),
        (b"\0" * 12, [3, 2], "complex64", "<", "unknown pixel type 'complex64'"),
        (b"\0" * 12, [3, 2], "uint16", "zstd<", "unknown encoding 'zstd<'"),
        (b"\0" * 12, [3], "uint16", "<", "shape [3] is not [x, y]"),
        (b"\0" * 12, None, "uint16", "<", "shape None is not [x, y]"),
        (b"\0" * 12, 6, "uint16", "<", "shape 6 is not [x, y]"),
        (b"\x12garbage", [3, 2], "uint16", "lz4<", "LZ4 data does not decompress"),
        (b"\0\0\0\x05abc", [3, 2], "uint16", "bs16-lz4<", "bitshuffle-LZ4 data is 7 bytes"),
    ],
)
def test_v1_data_errors_say_what_is_wrong(blob, shape, type_name, encoding, message):
    with pytest.raises(FormatError, match=message.replace("[", r"\[").replace("]", r"\]")):
        decode_v1_data(blob, shape, type_name, encoding)


def test_v1_parts_without_a_shape_fail_the_image_or_the_header_blob(rng):
    """A ``dimage_d-1.0`` or header blob description without ``shape`` is a failed image or a
    header problem, not an exception out of the parser."""
    image = v1_image(1, 0, counts(rng))
    image[1] = json.dumps({"htype": "dimage_d-1.0", "type": "uint32", "encoding": "<"}).encode()
    parsed = parse_v1_message(image)
    assert parsed.frame is None and "shape None is not [x, y]" in parsed.error
    header = v1_header(1, "all")
    header[2] = json.dumps({"htype": "dflatfield-1.0", "type": "float32"}).encode()
    parsed = parse_v1_message(header)
    assert parsed.header.flatfield is None and parsed.header.pixel_mask is not None
    assert any("dflatfield-1.0: shape None" in problem for problem in parsed.problems)


def test_decompressed_size_mismatch_is_reported(rng):
    small = counts(rng, (5, 8))
    for encoding, header in (
        ("bs32-lz4<", True),
        ("bs32-lz4<", False),
        ("lz4<", False),
        ("lz4<", True),
    ):
        with pytest.raises(FormatError):
            decode_v1_data(encode_v1(small, encoding, header=header), [8, 6], "uint32", encoding)


# ------------------------------------------------------------------------------------------
# v2 messages


@pytest.mark.parametrize("compression", ["none", "bslz4", "lz4"])
@pytest.mark.parametrize("dtype", ["u1", "<u2", "<u4", "<f4", ">u2", ">f4"])
def test_v2_image_channels_decode(rng, compression, dtype):
    frame = counts(rng, (37, 23), "uint32").astype(dtype)
    message = parse_message([v2_image(5, 3, {"threshold_1": v2_array(frame, compression)})])
    assert (message.protocol, message.kind, message.series_id, message.image_number) == (
        "v2",
        "image",
        5,
        3,
    )
    assert message.error is None
    assert message.frame.dtype.isnative and message.frame.dtype.kind == np.dtype(dtype).kind
    np.testing.assert_array_equal(message.frame, frame)
    assert message.metadata["compression"] == compression
    assert message.acquired_at == pytest.approx(SERIES_DATE.timestamp() + 0.03)


def test_v2_threshold_is_chosen_by_position_or_name(rng):
    first, second = counts(rng), counts(rng) + 100
    data = {"threshold_1": v2_array(first), "threshold_2": v2_array(second)}
    channels = ("threshold_1", "threshold_2")
    image = v2_image(1, 0, data)
    np.testing.assert_array_equal(parse_message([image], channels=channels).frame, first)
    np.testing.assert_array_equal(
        parse_message([image], threshold=1, channels=channels).frame, second
    )
    np.testing.assert_array_equal(parse_message([image], threshold="threshold_2").frame, second)
    np.testing.assert_array_equal(
        parse_message([image], channels=("threshold_2", "threshold_1")).frame, second
    )
    assert "no channel 'threshold_9'" in parse_message([image], threshold="threshold_9").error
    assert "threshold 2 chosen" in parse_message([image], threshold=2).error


def _tagged(dims, tag, payload):
    return cbor2.CBORTag(40, [dims, cbor2.CBORTag(tag, payload)])


@pytest.mark.parametrize(
    ("channel", "message"),
    [
        (_tagged([2, 3], 70, b"\0" * 20), "is 20 bytes, its shape needs 24"),
        (_tagged([2, 3], 87, b"\0" * 96), "unknown tag 87"),
        (
            _tagged([2, 3], 70, cbor2.CBORTag(56500, ["zstd", 4, b"x"])),
            "unknown compression 'zstd'",
        ),
        (_tagged([2, 3], 70, cbor2.CBORTag(56500, ["bslz4", 4, b"x" * 8])), "no 12-byte header"),
        (_tagged([2, 3], 70, cbor2.CBORTag(56500, ["bslz4", 3, b"x" * 20])), "element size 3"),
        (
            _tagged([2, 3], 70, cbor2.CBORTag(56500, ["lz4", 0, lz4_hdf5(b"\0" * 20)])),
            "header says 20 bytes",
        ),
        (cbor2.CBORTag(70, b"\0" * 24), "not a multi-dimensional array"),
        (_tagged([2, 3, 1], 70, b"\0" * 24), "3 dimensions"),
        (_tagged([2, -3], 70, b""), "dimensions [2, -3]"),
    ],
)
def test_v2_bad_image_data_fails_the_image(channel, message):
    parsed = parse_message([v2_image(1, 4, {"threshold_1": channel})])
    assert parsed.kind == "image" and parsed.image_number == 4 and parsed.frame is None
    assert message in parsed.error and "stream v2 image 4 of series 1" in parsed.error


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\xa2\x64type", "not valid CBOR"),
        (cbor2.dumps([1, 2]), "not a map"),
        (cbor2.dumps({"type": "preview", "series_id": 1}), "unknown message type 'preview'"),
        (cbor2.dumps({"type": "image", "series_id": 1}), "no non-negative integer 'image_id'"),
        (cbor2.dumps({"type": "end"}), "no non-negative integer 'series_id'"),
    ],
)
def test_v2_unreadable_messages_raise(data, message):
    with pytest.raises(FormatError, match=message):
        parse_message([data], protocol="v2")


@pytest.mark.parametrize(
    ("parts", "message"),
    [
        ([b"{not json"], "first part is not valid JSON"),
        ([b"[1, 2]"], "first part is JSON list"),
        ([b'{"htype": "dimage_x-9.9", "series": 1}'], "unknown htype 'dimage_x-9.9'"),
        ([b'{"htype": "dimage-1.0", "series": 1}'], "no non-negative integer 'frame'"),
        ([], "empty message"),
    ],
)
def test_v1_unreadable_messages_raise(parts, message):
    with pytest.raises(FormatError, match=message):
        parse_v1_message(parts)


# ------------------------------------------------------------------------------------------
# Live series from the own encoder over loopback


@pytest.fixture
def pushes() -> Iterator[Callable[[], tuple[zmq.Socket, str]]]:
    """New PUSH sockets bound to free loopback ports (one per receiver: a PUSH socket may
    still route a message to a receiver that has just gone)."""
    sockets: list[zmq.Socket] = []

    def new() -> tuple[zmq.Socket, str]:
        sender = zmq.Context.instance().socket(zmq.PUSH)
        sockets.append(sender)
        sender.setsockopt(zmq.LINGER, 0)
        sender.setsockopt(zmq.SNDTIMEO, int(TIMEOUT_S * 1000))
        sender.bind("tcp://127.0.0.1:*")
        return sender, sender.getsockopt_string(zmq.LAST_ENDPOINT)

    yield new
    for sender in sockets:
        sender.close(linger=0)


@pytest.fixture
def push(pushes) -> tuple[zmq.Socket, str]:
    return pushes()


def send_all(sender: zmq.Socket, messages: list[list[bytes] | bytes]) -> None:
    for message in messages:
        sender.send_multipart(message if isinstance(message, list) else [message])


def receive_series(push, messages, **options) -> tuple[list[Exposure], DectrisStream]:
    sender, endpoint = push
    options.setdefault("idle_timeout_s", 0.5)
    options.setdefault("start_timeout_s", TIMEOUT_S)
    stream = DectrisStream(endpoint, **options)
    assert stream.wait_connected(TIMEOUT_S)
    send_all(sender, messages)
    exposures = list(stream)
    stream.close()
    return exposures, stream


def test_v1_images_are_timed_from_the_series_date_of_their_header(push, rng):
    """v1 ``start_time`` counts from the series start: the header's ``data_collection_date``
    gives the image's acquisition time; without it, the time it was taken from the socket."""
    frame = counts(rng, (6, 8), "uint16")
    date = "2026-12-05T10:00:00.000+00:00"
    messages = [v1_header(4, "basic", nimages=2, data_collection_date=date)]
    messages += [v1_image(4, n, frame, "lz4<") for n in range(2)]  # start_time 0 and 1000 ns
    messages.append(v1_end(4))
    before = time.time()
    exposures, _ = receive_series(push, messages)
    series_start = datetime.fromisoformat(date).timestamp()
    assert [e.timestamp for e in exposures] == [series_start, series_start + 1e-6]
    assert all(e.received_at is not None and e.received_at >= before for e in exposures)
    messages[0] = v1_header(5, "basic", nimages=2)  # no date: taken from the socket
    messages[1:3] = [v1_image(5, n, frame, "lz4<") for n in range(2)]
    messages[3] = v1_end(5)
    exposures, _ = receive_series(push, messages)
    assert all(e.timestamp == e.received_at and e.timestamp >= before for e in exposures)


def test_v1_series_is_received_whole(push, rng):
    frames = [counts(rng, (6, 8), dtype) for dtype in ["uint32", "uint16", "uint8"] * 7]
    encodings = {"uint32": "bs32-lz4<", "uint16": "lz4<", "uint8": "<"}
    messages = [v1_header(3, "all", nimages=len(frames), description="EIGER2 own encoder")]
    messages += [v1_image(3, n, f, encodings[f.dtype.name]) for n, f in enumerate(frames)]
    messages.append(v1_end(3))
    exposures, stream = receive_series(push, messages, receive_hwm=50)
    assert [e.index for e in exposures] == list(range(len(frames)))
    for exposure, frame in zip(exposures, frames, strict=True):
        assert exposure.error is None and exposure.scan_id == "dectris-series-3"
        assert exposure.frame.dtype == frame.dtype
        np.testing.assert_array_equal(exposure.frame, frame)
        assert exposure.metadata["source"] == f"{push[1]} series 3 image {exposure.index}"
        assert exposure.metadata["protocol"] == "SIMPLON stream v1"
        assert exposure.metadata["start_time_ns"] == str(1000 * exposure.index)
    stats = stream.statistics
    assert stats.complete and stats.errors == []
    assert (stats.frames_received, stats.frames_decoded, stats.frames_missing) == (21, 21, 0)
    assert stream.header.config["description"] == "EIGER2 own encoder"
    np.testing.assert_array_equal(stream.header.pixel_mask, np.eye(6, 8, dtype=np.uint32))
    assert stream.header.flatfield.shape == (6, 8) and stream.header.n_images == 21
    assert stats.summary() == "series 3: 21 of 21 images received (21 decoded, 0 failed)"


def test_v2_series_is_received_whole(push, rng):
    frames = [counts(rng) for _ in range(12)]
    mask = np.zeros((6, 8), np.uint32)
    mask[2, 3] = 1
    messages = [v2_start(8, len(frames), channels=("threshold_1", "threshold_2"), mask=mask)]
    messages += [
        v2_image(8, n, {"threshold_1": v2_array(f, "bslz4"), "threshold_2": v2_array(f + 7, "lz4")})
        for n, f in enumerate(frames)
    ]
    messages.append(v2_end(8))
    exposures, stream = receive_series(push, messages, threshold=1)
    assert [e.index for e in exposures] == list(range(12))
    for exposure, frame in zip(exposures, frames, strict=True):
        assert exposure.error is None and exposure.scan_id == "unique-8"
        np.testing.assert_array_equal(exposure.frame, frame + 7)
        assert exposure.metadata["channel"] == "threshold_2"
        assert exposure.timestamp == pytest.approx(SERIES_DATE.timestamp() + exposure.index / 100)
    assert stream.statistics.complete and stream.statistics.protocol == "v2"
    np.testing.assert_array_equal(stream.header.pixel_mask, mask)
    assert stream.header.config["detector_description"] == "own encoder"


def _bad_v1(rng, case):
    frame = counts(rng)
    good = encode_v1(frame, "bs32-lz4<")
    return {
        "malformed dimage_d": [
            *v1_image(1, 1, frame)[:1],
            b"{broken",
            good,
            v1_image(1, 1, frame)[3],
        ],
        "dimage_d of another htype": [
            v1_image(1, 1, frame)[0],
            b'{"htype": "dconfig-1.0"}',
            good,
            v1_image(1, 1, frame)[3],
        ],
        "three parts": v1_image(1, 1, frame)[:3],
        "unknown pixel type": v1_image(1, 1, frame, type_name="uint12"),
        "unknown encoding": v1_image(1, 1, frame, "bs32-zstd<", blob=good),
        "shape larger than data": v1_image(1, 1, frame, shape=[8, 7], blob=good),
        "size field": v1_image(1, 1, frame, size=len(good) + 1),
        "corrupt data": v1_image(1, 1, frame, blob=good[:12] + b"\xff" * (len(good) - 12)),
    }[case]


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("malformed dimage_d", "dimage_d part is not valid JSON"),
        ("dimage_d of another htype", "has htype 'dconfig-1.0', expected 'dimage_d-1.0'"),
        ("three parts", "image message has 3 parts, expected 4"),
        ("unknown pixel type", "unknown pixel type 'uint12'"),
        ("unknown encoding", "unknown encoding 'bs32-zstd<'"),
        ("shape larger than data", "bitshuffle-LZ4 data"),
        ("size field", "dimage_d-1.0 says size"),
        ("corrupt data", "bitshuffle-LZ4 data"),
    ],
)
def test_bad_v1_image_becomes_a_failed_exposure(push, rng, case, message, reliability):
    frames = [counts(rng) for _ in range(3)]
    messages = [
        v1_header(1, nimages=3),
        v1_image(1, 0, frames[0]),
        _bad_v1(rng, case),
        v1_image(1, 2, frames[2]),
        v1_end(1),
    ]
    exposures, stream = receive_series(push, messages)
    assert [e.index for e in exposures] == [0, 1, 2]
    assert exposures[1].frame is None and message in exposures[1].error
    assert "image 1 of series 1" in exposures[1].error
    assert exposures[0].error is None and exposures[2].error is None
    stats = stream.statistics
    assert (stats.frames_decoded, stats.frames_failed, stats.frames_missing) == (2, 1, 0)
    assert stats.complete and message in stats.errors[0]
    reliability.record(
        "hostile message",
        f"stream v1 image message: {case}",
        tried=1,
        detail=f"a failed exposure ({exposures[1].error}); the {stats.frames_decoded} images "
        "around it decoded, the series complete",
    )


def test_unreadable_foreign_duplicate_and_out_of_order_messages(push, rng, reliability):
    frames = [counts(rng) for _ in range(4)]
    messages = [
        [b"{not json"],
        v1_header(2, nimages=4),
        [b'{"htype": "dimage-2.0", "series": 2, "frame": 0}', b"", b"", b""],
        v1_image(2, 1, frames[1]),
        v1_image(2, 0, frames[0]),  # out of order
        v1_image(2, 1, counts(rng)),  # duplicate: dropped, the first copy stays
        v1_image(1, 2, frames[2]),  # another series
        v1_end(1),  # another series' end
        v1_image(2, 3, frames[3]),
        v1_image(2, 2, frames[2]),  # out of order
        v1_end(2),
    ]
    exposures, stream = receive_series(push, messages)
    assert [e.index for e in exposures] == [1, 0, 3, 2]
    for exposure in exposures:
        np.testing.assert_array_equal(exposure.frame, frames[exposure.index])
    assert [e.metadata.get("out_of_order") for e in exposures] == [None, "true", None, "true"]
    stats = stream.statistics
    assert stats.complete
    assert (stats.rejected_messages, stats.foreign_messages, stats.duplicate_frames) == (2, 2, 1)
    assert stats.out_of_order_frames == 2
    text = "\n".join(stats.errors)
    assert "first part is not valid JSON" in text and "unknown htype 'dimage-2.0'" in text
    assert "second copy of image 1 of series 2" in text
    assert "dropped an image message of series 1 (receiving series 2)" in text
    reliability.record(
        "hostile message",
        "stream v1: unreadable, unknown htype, another series', duplicate, out-of-order",
        tried=stats.rejected_messages
        + stats.foreign_messages
        + stats.duplicate_frames
        + stats.out_of_order_frames,  # as asserted above: 7 of the 11 messages
        detail=f"{stats.rejected_messages} rejected, {stats.foreign_messages} of another series "
        f"and {stats.duplicate_frames} duplicate dropped, {stats.out_of_order_frames} "
        f"out-of-order images taken and marked; all {len(exposures)} frames equal to those sent",
    )


def test_a_stream_that_stops_ends_after_the_idle_timeout(push, rng):
    frames = [counts(rng) for _ in range(6)]
    sent = [0, 1, 3, 4]
    messages = [v1_header(4, nimages=6)] + [v1_image(4, n, frames[n]) for n in sent]
    began = time.monotonic()
    exposures, stream = receive_series(push, messages, idle_timeout_s=0.4)
    assert time.monotonic() - began < 5
    delivered = [e for e in exposures if e.error is None]
    assert [e.index for e in delivered] == sent  # nothing received is lost
    missing = [e for e in exposures if e.error is not None]
    assert [e.index for e in missing] == [2, 5]
    assert all(e.frame is None and "never arrived" in e.error for e in missing)
    assert missing[0].metadata["missing"] == "true"
    stats = stream.statistics
    assert stats.timed_out and not stats.end_received and not stats.complete
    assert stats.missing_frames == [2, 5] and stats.frames_missing == 2
    assert "missing: 2, 5" in "\n".join(stats.errors)
    assert stats.summary() == (
        "series 4: 4 of 6 images received (4 decoded, 0 failed), 2 missing (2, 5), "
        "no end message (idle timeout)"
    )


def test_missing_images_without_announced_count_and_report_missing_off(push, rng):
    frames = [counts(rng) for _ in range(5)]
    messages = [v1_header(5, "none")] + [v1_image(5, n, frames[n]) for n in (0, 1, 4)] + [v1_end(5)]
    exposures, stream = receive_series(push, messages, report_missing=False)
    assert [e.index for e in exposures] == [0, 1, 4]
    assert stream.statistics.missing_frames == [2, 3] and stream.statistics.end_received
    assert stream.statistics.expected_frames is None


def test_images_before_the_header(pushes, rng):
    frames = [counts(rng) for _ in range(3)]
    messages = [v1_image(6, 0, frames[0]), v1_header(6, nimages=3)]
    messages += [v1_image(6, n, frames[n]) for n in (1, 2)] + [v1_end(6)]
    exposures, stream = receive_series(pushes(), messages)
    assert exposures[0].frame is None and "came before the series header" in exposures[0].error
    assert exposures[0].metadata["header_missing"] == "true"
    assert [e.error for e in exposures[1:]] == [None, None]
    assert stream.statistics.frames_failed == 1 and stream.statistics.complete
    exposures, _ = receive_series(pushes(), messages, require_header=False)
    assert all(e.error is None for e in exposures)
    np.testing.assert_array_equal(exposures[0].frame, frames[0])


def test_next_series_on_the_same_connection_and_series_filter(pushes, rng):
    sender, endpoint = pushes()
    frames = [counts(rng) for _ in range(3)]
    with DectrisStream(endpoint, idle_timeout_s=2.0, start_timeout_s=TIMEOUT_S) as stream:
        assert stream.wait_connected(TIMEOUT_S)
        send_all(
            sender,
            [
                v1_header(1, nimages=3),
                v1_image(1, 0, frames[0]),
                v1_header(2, nimages=2),
                v1_image(2, 0, frames[1]),
                v1_image(2, 1, frames[2]),
                v1_end(2),
            ],
        )
        first = list(stream)
        assert [(e.index, e.error is None) for e in first] == [(0, True), (1, False), (2, False)]
        assert "series 2 started before the end message of series 1" in stream.statistics.errors[0]
        second = list(stream)
        assert stream.statistics.series_id == 2 and stream.statistics.complete
        np.testing.assert_array_equal(second[1].frame, frames[2])
    sender, endpoint = pushes()
    with DectrisStream(
        endpoint, series_id=9, idle_timeout_s=2.0, start_timeout_s=TIMEOUT_S
    ) as stream:
        assert stream.wait_connected(TIMEOUT_S)
        send_all(sender, [v1_header(8), v1_image(8, 0, frames[0]), v1_end(8)])
        send_all(sender, [v2_start(9, 1), v2_image(9, 0, {"t": v2_array(frames[1])}), v2_end(9)])
        exposures = list(stream)
        assert [e.scan_id for e in exposures] == ["unique-9"]
        assert stream.statistics.foreign_messages == 3 and stream.statistics.complete


def test_bad_v2_messages_in_a_live_series(push, rng, reliability):
    frame = counts(rng)
    messages = [
        b"\xa1\x64ty",  # truncated CBOR
        v2_start(3, 3),
        cbor2.dumps({"type": "status", "series_id": 3}),
        v2_image(3, 0, {"threshold_1": v2_array(frame)}),
        v2_image(3, 1, {"threshold_1": _tagged([6, 8], 70, b"\0" * 12)}),
        [json.dumps({"htype": "dseries_end-1.0", "series": 3}).encode()],  # v1 in a v2 series
        v2_image(3, 2, {"threshold_1": v2_array(frame, "lz4")}),
        v2_end(3),
    ]
    exposures, stream = receive_series(push, messages)
    assert [e.index for e in exposures] == [0, 1, 2]
    assert exposures[1].frame is None and "is 12 bytes, its shape needs 192" in exposures[1].error
    stats = stream.statistics
    assert stats.rejected_messages == 3 and stats.frames_failed == 1 and stats.complete
    text = "\n".join(stats.errors)
    assert "not valid CBOR" in text and "unknown message type 'status'" in text
    assert "stream v1 end message in a stream v2 series" in text
    reliability.record(
        "hostile message",
        "stream v2: truncated CBOR, unknown type, image too short for its shape, a v1 end",
        tried=stats.rejected_messages + stats.frames_failed,  # 3 + 1, as asserted above
        detail=f"{stats.rejected_messages} messages rejected with their cause, the short image a "
        f"failed exposure; the other {len(exposures) - stats.frames_failed} images taken, "
        "the series complete",
    )


def test_wrong_header_parts_are_recorded_and_the_series_taken(push, rng, reliability):
    frame = counts(rng)
    header = v1_header(7, "all", nimages=1)[:5]  # flatfield and half the mask only
    exposures, stream = receive_series(push, [header, v1_image(7, 0, frame), v1_end(7)])
    assert exposures[0].error is None
    assert "has 5 parts, expected 8" in stream.statistics.errors[0]
    assert stream.header.flatfield is not None and stream.header.pixel_mask is None
    reliability.record(
        "hostile message",
        "a stream v1 series header of 5 parts instead of 8 (flatfield, half the mask)",
        tried=1,
        detail="recorded as an error; the flatfield kept, the cut mask dropped, the series' "
        f"{sum(e.error is None for e in exposures)} image taken",
    )


def test_socket_options_and_oversized_messages(push, rng, reliability):
    sender, endpoint = push
    events = sender.get_monitor_socket(zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED)
    frames = [counts(rng), rng.poisson(3.0, (100, 100)).astype(np.uint32), counts(rng)]
    stream = DectrisStream(
        endpoint,
        receive_hwm=7,
        max_message_bytes=4096,
        idle_timeout_s=5.0,
        start_timeout_s=TIMEOUT_S,
    )
    try:
        assert stream.wait_connected(TIMEOUT_S)
        assert stream.socket.getsockopt(zmq.RCVHWM) == 7
        assert stream.socket.getsockopt(zmq.MAXMSGSIZE) == 4096
        send_all(
            sender,
            [v1_header(1, nimages=3), v1_image(1, 0, frames[0]), v1_image(1, 1, frames[1], "<")],
        )
        failures: list[BaseException] = []

        def rest_of_series() -> None:  # once the receiver has dropped and renewed the connection
            # (a message sent before that may go to the dropped connection, and be lost)
            try:
                seen: list[int] = []
                while seen[-2:] != [zmq.EVENT_DISCONNECTED, zmq.EVENT_HANDSHAKE_SUCCEEDED]:
                    assert events.poll(TIMEOUT_S * 1000), seen
                    seen.append(zmq.utils.monitor.recv_monitor_message(events)["event"])
                time.sleep(0.2)  # the sender's I/O thread may not have retired the old pipe yet
                send_all(sender, [v1_image(1, 2, frames[2]), v1_end(1)])
            except BaseException as error:
                failures.append(error)

        thread = threading.Thread(target=rest_of_series, daemon=True)
        thread.start()
        exposures = list(stream)
        thread.join(TIMEOUT_S)
        assert not failures, failures
    finally:
        stream.close()
        sender.disable_monitor()
        events.close(linger=0)
    assert [(e.index, e.error is None) for e in exposures] == [(0, True), (2, True), (1, False)]
    stats = stream.statistics
    assert stats.missing_frames == [1] and stats.end_received
    assert any("max_message_bytes = 4096" in error for error in stats.errors)
    reliability.record(
        "hostile message",
        f"an uncompressed image of {frames[1].nbytes:,} bytes, over max_message_bytes = 4096",
        tried=1,
        detail="ZeroMQ dropped it with the connection, which was renewed; image "
        f"{stats.missing_frames[0]} reported missing, the other "
        f"{sum(e.error is None for e in exposures)} and the end message received",
    )


def test_stop_and_start_timeout(push, rng):
    sender, endpoint = push
    stream = DectrisStream(endpoint, idle_timeout_s=60.0, start_timeout_s=0.3)
    assert list(stream) == []
    assert (
        stream.statistics.timed_out
        and "no series started within 0.3 s" in stream.statistics.errors[0]
    )
    assert stream.wait_connected(TIMEOUT_S)
    send_all(sender, [v1_header(1, nimages=2), v1_image(1, 0, counts(rng))])
    timer = threading.Timer(0.5, stream.stop)
    timer.start()
    began = time.monotonic()
    exposures = list(stream)
    timer.join()
    stream.close()
    assert time.monotonic() - began < 10
    assert [(e.index, e.error is None) for e in exposures] == [(0, True), (1, False)]
    assert "stopped before the end message" in stream.statistics.errors


def test_options_are_checked():
    with pytest.raises(ValueError, match="protocol"):
        DectrisStream("tcp://127.0.0.1:1", protocol="v3")
    with pytest.raises(ValueError, match="positive"):
        DectrisStream("tcp://127.0.0.1:1", idle_timeout_s=0)


# ------------------------------------------------------------------------------------------
# Third-party producer: ALBA's eiger-simulator (v1, bs16-lz4< without header and lz4<)


def run_simulated_series(
    simulator: EigerSimulator,
    n_images: int,
    compression: str,
    count_time_s: float = 0.001,
    receive_hwm: int = 1000,
    decode_frames: bool = True,
) -> tuple[list[Exposure], DectrisStream, int]:
    simulator.configure(n_images, compression, count_time_s)
    stream = DectrisStream(
        simulator.stream,
        idle_timeout_s=5.0,
        start_timeout_s=TIMEOUT_S,
        receive_hwm=receive_hwm,
        decode_frames=decode_frames,
    )
    try:
        assert stream.wait_connected(TIMEOUT_S), simulator.log.read_text(errors="replace")
        series = simulator.arm()
        thread, failures = simulator.trigger_in_background()
        exposures = list(stream)
        thread.join(TIMEOUT_S)
        assert not failures, failures
        return exposures, stream, series
    finally:
        stream.close()


@pytest.mark.parametrize("compression", ["bslz4", "lz4"])
def test_eiger_simulator_images_left_compressed_decode_to_its_frames(eiger_simulator, compression):
    """``decode_frames=False`` (a scan with integrator processes): each image comes checked
    and compressed, and decodes to the simulator's frame."""
    exposures, stream, _ = run_simulated_series(
        eiger_simulator, 20, compression, decode_frames=False
    )
    frames = eiger_simulator.frames
    assert [e.index for e in exposures] == list(range(20))
    for exposure in exposures:
        assert exposure.error is None and exposure.frame is None
        assert exposure.encoded is not None and exposure.encoded.compression == compression
        np.testing.assert_array_equal(exposure.image(), frames[exposure.index % len(frames)])
    assert stream.statistics.complete and stream.statistics.frames_decoded == 20


@pytest.mark.parametrize(("compression", "encoding"), [("bslz4", "bs16-lz4<"), ("lz4", "lz4<")])
def test_eiger_simulator_series_of_100_images(eiger_simulator, compression, encoding):
    exposures, stream, series = run_simulated_series(eiger_simulator, 100, compression)
    frames = eiger_simulator.frames
    assert [e.index for e in exposures] == list(range(100))
    for exposure in exposures:
        assert exposure.error is None, exposure.error
        assert exposure.frame.dtype == np.uint16 and exposure.frame.shape == (48, 64)
        np.testing.assert_array_equal(exposure.frame, frames[exposure.index % len(frames)])
        assert exposure.metadata["encoding"] == encoding
        assert (
            exposure.metadata["source"]
            == f"{eiger_simulator.stream} series {series} image {exposure.index}"
        )
    stats = stream.statistics
    assert stats.series_id == series and stats.expected_frames == 100
    assert stats.complete and stats.frames_decoded == 100 and stats.frames_missing == 0
    assert stream.header.header_detail == "all" and stream.header.config["nimages"] == 100
    # the simulator sends placeholder text instead of the flatfield, mask and count-rate blobs
    problems = [e for e in stats.errors if "header" in e]
    assert len(problems) == 3 and all("raw data is" in e for e in problems)
    # the detector's own times: the simulator sends start times since the epoch, one count
    # time apart; the time each image was taken from the socket is kept beside them
    starts = [e.timestamp for e in exposures]
    np.testing.assert_allclose(np.diff(starts), 0.001, atol=1e-6)
    assert all(e.received_at is not None and e.received_at >= e.timestamp for e in exposures)


def test_eiger_simulator_long_fast_series(eiger_simulator):
    """5000 images at 5 kHz: none lost, none out of order. The simulator drops what it has
    queued when its PUSH socket blocks for 0.5 s, so the receive queue must hold a backlog."""
    exposures, stream, _ = run_simulated_series(
        eiger_simulator, 5000, "bslz4", 0.0002, receive_hwm=10_000
    )
    assert [e.index for e in exposures] == list(range(5000))
    assert all(e.error is None for e in exposures)
    assert stream.statistics.complete and stream.statistics.out_of_order_frames == 0
