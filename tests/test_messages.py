"""The typed messages between processes (pipeline.transport.messages): each kind survives
the wire unchanged, malformed fields are refused with ProtocolError, and the architecture
document's table is the one the module makes."""

import re
from dataclasses import fields
from pathlib import Path

import msgpack
import numpy as np
import pytest

from pipeline.transport import ProtocolError, encode
from pipeline.transport.messages import (
    MESSAGE_TYPES,
    Acks,
    Credit,
    Failure,
    FrameMessage,
    Heartbeat,
    Hello,
    LineOutMessage,
    Ready,
    RemoteConfig,
    Reset,
    Results,
    Stop,
    WireMessage,
    message_table,
    read,
    read_as,
)

ROOT = Path(__file__).resolve().parents[1]


def _examples() -> list[WireMessage]:
    rng = np.random.default_rng(0)
    counts = rng.poisson(50, 16).astype(np.float32)
    line_out = LineOutMessage(
        index=7,
        scan_id="scan-1",
        counts=counts,
        counts_sd=np.sqrt(counts),
        timestamp=1.7e9,
        received_time=1.7e9 + 0.01,
        truth={"pitch_nm": 100.0, "width_nm": 40.0},
        source="/data/a.cbf",
        frame_id="3",
        normalization=2.5,
    )
    n = 3
    frame = rng.poisson(5, (4, 6)).astype(np.uint32)
    return [
        line_out,
        line_out.failure("inference", "line-out holds NaN", with_line_out=True),
        Failure(index=4, stage="read", error="corrupt file"),
        Results(
            columns={
                "index": np.arange(n, dtype=np.int64),
                "samples": rng.normal(size=(n, 10, 5)).astype(np.float32),
                "counts": rng.poisson(5, (n, 16)).astype(np.float32),
            },
            source=("a", "b", "c"),
            frame_id=("1", "2", "3"),
        ),
        Acks(
            status=("ok", "failed", "ok"),
            error=("", "why", ""),
            index=np.arange(n, dtype=np.int64),
            duplicate=np.array([0, 0, 1], np.uint8),
            mean=np.ones((n, 5), np.float32),
            sd=np.ones((n, 5), np.float32),
            quantiles=np.ones((n, 3, 5), np.float32),
            predictive_z=np.array([0.5, np.nan, 1.0], np.float32),
        ),
        Ready(role="worker", id=2, pid=1234, credits=16, device="cpu"),
        Ready(role="writer", id=0, pid=99, path="/data/scan.h5"),
        Credit(id=2, credits=8, inferred=8, batch_s=0.02, batch_size=4),
        Heartbeat(id=1),
        Heartbeat(id=1, pid=5, host="node-3"),
        Hello(pid=5, host="node-3"),
        RemoteConfig(
            config='{"scan_id": "x"}',
            worker_id=1,
            model_sha256="ab" * 32,
            weights=np.arange(10, dtype=np.uint8),
            card=np.frombuffer(b"{}", np.uint8),
        ),
        Stop(),
        Stop(n_exposures=12),
        Reset(),
        FrameMessage.of({"index": 8, "source": "a.h5::0", "normalization": 2.5}, frame),
        FrameMessage(
            index=9,
            image=np.frombuffer(b"compressed", np.uint8),
            compression="bslz4",
            image_dtype="<u4",
            rows=4,
            columns=6,
            element_bytes=4,
            framing="auto",
        ),
    ]


def _same(a: object, b: object) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return np.array_equal(np.asarray(a), np.asarray(b), equal_nan=True)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, float) and isinstance(b, float) and np.isnan(a):
        return bool(np.isnan(b))
    return a == b


@pytest.mark.parametrize("sent", _examples(), ids=lambda m: type(m).__name__)
def test_every_kind_arrives_as_it_was_sent(sent):
    received = read([bytes(frame) for frame in sent.to_frames()])
    assert type(received) is type(sent)
    for field in fields(sent):  # type: ignore[arg-type]
        assert _same(getattr(received, field.name), getattr(sent, field.name)), field.name
    assert isinstance(read_as(type(sent), sent.to_frames()), type(sent))


def test_every_kind_is_exercised_and_registered():
    assert {type(m) for m in _examples()} == set(MESSAGE_TYPES.values())
    assert len(MESSAGE_TYPES) == 12


def test_a_frame_is_an_image_or_its_compressed_bytes():
    image = np.ones((2, 3), np.int32)
    flat = encode("frame", {"index": 0}, image=image.reshape(-1))
    with pytest.raises(ProtocolError, match=r"a frame of shape \(6,\) with compression ''"):
        read(flat)
    bytes_as_image = encode("frame", {"index": 0, "compression": "lz4"}, image=image)
    with pytest.raises(ProtocolError, match="neither an image nor its compressed bytes"):
        read(bytes_as_image)


def test_a_line_out_goes_as_float32_and_nan_times_as_none():
    sent = LineOutMessage(index=0, scan_id="s", counts=np.ones(4), counts_sd=np.ones(4))
    header = msgpack.unpackb(bytes(sent.to_frames()[0]))
    assert header["timestamp"] is None and header["received_time"] is None
    received = read_as(LineOutMessage, sent.to_frames())
    assert received.counts.dtype == np.float32 and np.isnan(received.timestamp)


def _line_out_header(**changes) -> dict:
    header = {"index": 1, "scan_id": "s", "timestamp": 1.0, "truth": None}
    header.update(changes)
    return {k: v for k, v in header.items() if v is not ...}


@pytest.mark.parametrize(
    ("header", "arrays", "why"),
    [
        (_line_out_header(index=...), {}, "without 'index'"),
        (_line_out_header(index="1"), {}, "'index' must be an integer"),
        (_line_out_header(index=True), {}, "'index' must be an integer"),
        (_line_out_header(timestamp="noon"), {}, "'timestamp' must be a number"),
        (_line_out_header(scan_id=3), {}, "'scan_id' must be text"),
        (_line_out_header(truth={"pitch_nm": "big"}), {}, "'truth' must be a number"),
        (_line_out_header(truth=[1.0]), {}, "'truth' must map names to numbers"),
        (_line_out_header(), {"counts": np.ones(4)}, "without 'counts_sd'"),
        (_line_out_header(), {"counts": np.ones(4), "counts_sd": np.ones(5)}, "not one line-out"),
        (_line_out_header(), {"counts": np.ones((2, 4)), "counts_sd": np.ones((2, 4))}, "not one"),
    ],
)
def test_a_malformed_line_out_is_refused_with_the_reason(header, arrays, why):
    arrays = arrays or {"counts": np.ones(4), "counts_sd": np.ones(4)}
    with pytest.raises(ProtocolError, match=re.escape(why)):
        read(encode("line_out", header, **arrays))


def test_results_and_acks_need_one_row_per_exposure():
    index = np.arange(2, dtype=np.int64)
    with pytest.raises(ProtocolError, match="'samples' has not one row for each of 2"):
        read(encode("results", {}, index=index, samples=np.zeros((1, 5, 5), "f4")))
    with pytest.raises(ProtocolError, match="'source' has not one text for each of 2"):
        read(encode("results", {"source": ["a"]}, index=index))
    with pytest.raises(ProtocolError, match="integer 'index'"):
        read(encode("results", {}, index=np.zeros(2)))
    acks = _examples()[4]
    assert isinstance(acks, Acks)
    header = {"status": ["ok"], "error": ["", "", ""]}
    with pytest.raises(ProtocolError, match="differ in length"):
        read(encode("acks", header, **acks.arrays()))


def test_an_unknown_kind_or_a_kind_not_expected_is_refused():
    with pytest.raises(ProtocolError, match="unknown message kind 'shutdown'"):
        read(encode("shutdown", {}))
    with pytest.raises(ProtocolError, match="a 'hello' message where a 'stop' was expected"):
        read_as(Stop, Hello(pid=1, host="h").to_frames())


def test_the_architecture_document_holds_the_message_table():
    text = (ROOT / "docs" / "architecture.md").read_text()
    begin, end = "<!-- message-table -->\n", "\n<!-- /message-table -->"
    assert begin in text and end in text, "docs/architecture.md lost its message table markers"
    documented = text.split(begin, 1)[1].split(end, 1)[0]
    assert documented == message_table(), (
        "docs/architecture.md's message table differs from pipeline.transport.messages: "
        "paste message_table() between the markers"
    )


def test_no_process_reads_message_fields_by_name():
    """Header fields are read only in pipeline/transport (the typed messages)."""
    pattern = re.compile(r"\.header\[|\.header\.get\(|\.arrays\[|\.arrays\.get\(")
    offenders = [
        f"{path.relative_to(ROOT)}:{number}"
        for folder in ("pipeline", "workers", "flows")
        for path in sorted((ROOT / folder).rglob("*.py"))
        if "transport" not in path.parts
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert offenders == []
