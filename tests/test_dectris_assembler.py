"""The DECTRIS series assembler (pipeline.sources.dectris.assembler), fed parsed messages
directly: no sockets, no clocks. What each message does to the series is pinned here; the
ZeroMQ side is tested in test_dectris.py."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime

import cbor2
import numpy as np
import pytest

from pipeline.exposure import Exposure
from pipeline.sources.compression import FormatError
from pipeline.sources.dectris.assembler import SeriesAssembler, SeriesEnded
from pipeline.sources.dectris.messages import (
    EndMessage,
    HeaderMessage,
    ImageMessage,
    SeriesHeader,
    StreamMessage,
    parse_message,
)

SOURCE = "tcp://detector:9999"
RECEIVED_AT_S = 1_800_000_000.0


def header(series: int, n_images: int | None = None, protocol="v1", **fields) -> HeaderMessage:
    described = SeriesHeader(series_id=series, protocol=protocol, n_images=n_images, **fields)
    return HeaderMessage(protocol=protocol, series_id=series, header=described)


def image(series: int, number: int, protocol="v1", **fields) -> ImageMessage:
    fields.setdefault("frame", np.full((2, 3), number, np.uint16))
    return ImageMessage(protocol=protocol, series_id=series, image_number=number, **fields)


def end(series: int, protocol="v1", problems=()) -> EndMessage:
    return EndMessage(protocol=protocol, series_id=series, problems=problems)


def feed_all(
    assembler: SeriesAssembler, messages: list[StreamMessage]
) -> tuple[list[Exposure], SeriesEnded | None]:
    """The exposures the messages give, and the event that ended the series (then the rest
    of the messages are not fed)."""
    exposures = []
    for offset, message in enumerate(messages):
        outcome = assembler.feed(message, RECEIVED_AT_S + offset)
        if isinstance(outcome, SeriesEnded):
            return exposures, outcome
        if outcome is not None:
            exposures.append(outcome)
    return exposures, None


def errors(assembler: SeriesAssembler) -> str:
    return "\n".join(assembler.statistics.errors)


def test_a_whole_series():
    assembler = SeriesAssembler(SOURCE)
    assert not assembler.started and assembler.header is None
    messages = [header(3, 3), image(3, 0), image(3, 1), image(3, 2), end(3)]
    exposures, ended = feed_all(assembler, messages)
    assert ended == SeriesEnded(series_id=3, next_series_id=None)
    assert assembler.started and assembler.header is messages[0].header
    assert [e.index for e in exposures] == [0, 1, 2]
    for offset, exposure in enumerate(exposures, start=1):
        assert exposure.error is None and exposure.scan_id == "dectris-series-3"
        np.testing.assert_array_equal(exposure.frame, np.full((2, 3), exposure.index))
        assert exposure.timestamp == exposure.received_at == RECEIVED_AT_S + offset
        assert exposure.metadata == {
            "source": f"{SOURCE} series 3 image {exposure.index}",
            "protocol": "SIMPLON stream v1",
            "series_id": "3",
            "image_number": str(exposure.index),
        }
    assert assembler.finish(now=RECEIVED_AT_S + 10) == []
    stats = assembler.statistics
    assert stats.complete and stats.errors == [] and stats.protocol == "v1"
    assert stats.summary() == "series 3: 3 of 3 images received (3 decoded, 0 failed)"


def test_scan_id_given_else_the_v2_unique_id():
    given = SeriesAssembler(SOURCE, "scan-7")
    exposures, _ = feed_all(given, [header(2, protocol="v2", unique_id="u"), image(2, 0, "v2")])
    assert exposures[0].scan_id == "scan-7"
    unique = SeriesAssembler(SOURCE)
    exposures, _ = feed_all(unique, [header(2, protocol="v2", unique_id="u"), image(2, 0, "v2")])
    assert exposures[0].scan_id == "u"


def test_images_are_timed_by_the_detector():
    v1 = SeriesAssembler(SOURCE)
    series_date = datetime(2026, 12, 5, 10, tzinfo=UTC).timestamp()
    timed = image(1, 0, metadata={"start_time_ns": "2500000000"})
    exposures, _ = feed_all(v1, [header(1, series_date=series_date), timed])
    assert exposures[0].timestamp == series_date + 2.5
    assert exposures[0].received_at == RECEIVED_AT_S + 1
    v2 = SeriesAssembler(SOURCE)
    exposures, _ = feed_all(v2, [header(1, protocol="v2"), image(1, 0, "v2", acquired_at=5.0)])
    assert exposures[0].timestamp == 5.0


def test_failed_images_are_exposures_with_their_error():
    assembler = SeriesAssembler(SOURCE)
    broken = image(1, 1, frame=None, error="stream v1 image 1 of series 1: bad")
    exposures, _ = feed_all(assembler, [header(1, 2), image(1, 0), broken, end(1)])
    assert [(e.index, e.error) for e in exposures] == [(0, None), (1, broken.error)]
    stats = assembler.statistics
    assert (stats.frames_received, stats.frames_decoded, stats.frames_failed) == (2, 1, 1)
    assert stats.errors == [broken.error]


def test_images_before_the_header_fail_unless_it_is_not_required():
    messages = [image(6, 0), header(6, 2, protocol="v1"), image(6, 1), end(6)]
    strict = SeriesAssembler(SOURCE)
    exposures, _ = feed_all(strict, messages)
    assert exposures[0].frame is None and "came before the series header" in exposures[0].error
    assert exposures[0].metadata["header_missing"] == "true"
    assert exposures[1].error is None and "header_missing" not in exposures[1].metadata
    assert strict.statistics.frames_failed == 1
    lenient = SeriesAssembler(SOURCE, require_header=False)
    exposures, _ = feed_all(lenient, messages)
    assert [e.error for e in exposures] == [None, None]
    assert exposures[0].metadata["header_missing"] == "true"


def test_the_scan_id_is_fixed_by_the_first_image_or_header():
    assembler = SeriesAssembler(SOURCE)
    messages = [image(4, 0, "v2"), header(4, protocol="v2", unique_id="late"), image(4, 1, "v2")]
    exposures, _ = feed_all(assembler, messages)
    assert [e.scan_id for e in exposures] == ["dectris-series-4", "dectris-series-4"]


def test_the_first_message_chooses_the_series_and_others_are_dropped():
    assembler = SeriesAssembler(SOURCE)
    messages = [image(2, 0), image(1, 1), end(1), image(2, 1), end(2)]
    exposures, ended = feed_all(assembler, messages)
    assert [e.index for e in exposures] == [0, 1] and ended == SeriesEnded(2)
    assert assembler.statistics.foreign_messages == 2
    assert "dropped an image message of series 1 (receiving series 2)" in errors(assembler)
    assert "dropped an end message of series 1 (receiving series 2)" in errors(assembler)


def test_a_chosen_series_waits_for_its_own_messages():
    assembler = SeriesAssembler(SOURCE, series_id=9)
    exposures, ended = feed_all(assembler, [header(8), image(8, 0), end(8), header(9, 1)])
    assert exposures == [] and ended is None and assembler.started
    assert assembler.statistics.series_id == 9 and assembler.statistics.foreign_messages == 3
    assert "dropped a header message of series 8 (receiving series 9)" in errors(assembler)


def test_a_header_of_another_series_ends_the_series_and_belongs_to_the_next():
    assembler = SeriesAssembler(SOURCE)
    exposures, ended = feed_all(assembler, [header(1, 3), image(1, 0), header(2, 2)])
    assert [e.index for e in exposures] == [0]
    assert ended == SeriesEnded(series_id=1, next_series_id=2)
    assert errors(assembler).startswith(
        "series 2 started before the end message of series 1: ending series 1 as incomplete"
    )
    missing = assembler.finish(now=RECEIVED_AT_S)
    assert [(e.index, e.error) for e in missing] == [
        (n, f"image {n} of series 1 never arrived (the stream ended without an end message)")
        for n in (1, 2)
    ]
    assert not assembler.statistics.end_received and not assembler.statistics.complete


def test_duplicates_are_dropped_and_out_of_order_images_marked():
    assembler = SeriesAssembler(SOURCE)
    second_copy = image(1, 1, frame=np.full((2, 3), 99, np.uint16))
    messages = [header(1, 4), image(1, 1), image(1, 0), second_copy, image(1, 3), image(1, 2)]
    exposures, _ = feed_all(assembler, [*messages, end(1)])
    assert [e.index for e in exposures] == [1, 0, 3, 2]
    assert [e.metadata.get("out_of_order") for e in exposures] == [None, "true", None, "true"]
    np.testing.assert_array_equal(exposures[0].frame, np.full((2, 3), 1))  # the first copy
    stats = assembler.statistics
    assert (stats.duplicate_frames, stats.out_of_order_frames) == (1, 2)
    assert "dropped a second copy of image 1 of series 1 (the first one was delivered)" in (
        stats.errors
    )
    assert assembler.finish(now=RECEIVED_AT_S) == [] and stats.complete


def test_messages_of_the_other_protocol_are_rejected():
    assembler = SeriesAssembler(SOURCE)
    exposures, ended = feed_all(assembler, [header(3, 1, "v2"), end(3, "v1"), image(3, 0, "v2")])
    assert [e.index for e in exposures] == [0] and ended is None
    assert assembler.statistics.rejected_messages == 1
    assert "dropped a stream v1 end message in a stream v2 series" in errors(assembler)


def test_unreadable_messages_are_counted():
    assembler = SeriesAssembler(SOURCE)
    with pytest.raises(FormatError) as raised:
        parse_message([b"{not json"])
    assembler.reject(raised.value)
    assert assembler.statistics.rejected_messages == 1 and not assembler.started
    assert errors(assembler).startswith("dropped an unreadable message: first part is not valid")


def test_a_repeated_header_is_ignored_and_problems_are_recorded():
    assembler = SeriesAssembler(SOURCE)
    first = header(5, 1, problems=("dheader-1.0 has unknown header_detail 'most'",))
    feed_all(assembler, [first, header(5, 7), image(5, 0), end(5, problems=("extra part",))])
    assert assembler.header is first.header and assembler.statistics.expected_frames == 1
    assert assembler.statistics.errors == [
        "series 5 header: dheader-1.0 has unknown header_detail 'most'",
        "ignored a repeated header of series 5",
        "series 5 end: extra part",
    ]


def test_an_end_before_anything_else():
    assembler = SeriesAssembler(SOURCE)
    assert feed_all(assembler, [end(4)]) == ([], SeriesEnded(4))
    assert assembler.finish(now=RECEIVED_AT_S) == []
    assert errors(assembler) == "series 4 ended before any header or image of it came"
    assert assembler.statistics.complete


def test_missing_images_become_failed_exposures():
    assembler = SeriesAssembler(SOURCE, "scan")
    feed_all(assembler, [header(2, 5), image(2, 0), image(2, 3), end(2)])
    missing = assembler.finish(now=RECEIVED_AT_S + 60)
    assert [e.index for e in missing] == [1, 2, 4]
    assert missing[0] == Exposure(
        scan_id="scan",
        index=1,
        timestamp=RECEIVED_AT_S + 60,
        frame=None,
        metadata={
            "source": f"{SOURCE} series 2 image 1",
            "protocol": "SIMPLON stream v1",
            "series_id": "2",
            "image_number": "1",
            "missing": "true",
        },
        error="image 1 of series 2 never arrived (the end message came without it)",
    )
    stats = assembler.statistics
    assert stats.missing_frames == [1, 2, 4] and stats.frames_missing == 3
    assert "series 2 incomplete: 2 of 5 images received, missing: 1-2, 4" in stats.errors
    assert stats.summary() == (
        "series 2: 2 of 5 images received (2 decoded, 0 failed), 3 missing (1-2, 4)"
    )


def test_without_an_announced_count_images_are_missing_up_to_the_highest():
    assembler = SeriesAssembler(SOURCE)
    feed_all(assembler, [header(5), image(5, 0), image(5, 4), end(5)])
    assert [e.index for e in assembler.finish(now=RECEIVED_AT_S)] == [1, 2, 3]


def test_more_images_than_announced_are_taken_and_recorded():
    assembler = SeriesAssembler(SOURCE)
    exposures, _ = feed_all(assembler, [header(1, 2), image(1, 0), image(1, 1), image(1, 3)])
    assert [e.index for e in exposures] == [0, 1, 3]
    assert assembler.finish(now=RECEIVED_AT_S) == []
    assert "series 1 announced 2 images but image 3 came" in errors(assembler)


def test_time_outs_and_stop_are_recorded():
    waiting = SeriesAssembler(SOURCE)
    waiting.time_out(0.3)
    assert waiting.statistics.timed_out and waiting.finish(now=RECEIVED_AT_S) == []
    assert errors(waiting) == "no series started within 0.3 s"
    assert waiting.statistics.summary() == "no series received"
    running = SeriesAssembler(SOURCE)
    feed_all(running, [header(4, 2), image(4, 0)])
    running.time_out(10.0)
    assert [e.index for e in running.finish(now=RECEIVED_AT_S)] == [1]
    assert errors(running).startswith(
        "no message for 10 s and no end message of series 4: the series is incomplete"
    )
    assert running.statistics.summary().endswith("no end message (idle timeout)")
    stopped = SeriesAssembler(SOURCE)
    stopped.stop()
    assert stopped.statistics.errors == ["stopped before the end message"]
    assert not stopped.statistics.timed_out


def test_parsed_wire_messages_and_v2_channels():
    """The assembler takes what parse_message gives; a v2 header's channels pick the image's
    channel by position."""
    assembler = SeriesAssembler(SOURCE)
    assert assembler.channels == ()
    start = {"type": "start", "series_id": 8, "channels": ["t1", "t2"], "number_of_images": 1}
    assembler.feed(parse_message([cbor2.dumps(start)]), RECEIVED_AT_S)
    assert assembler.channels == ("t1", "t2")
    frames = {name: np.full((2, 2), value, "<u2") for name, value in (("t1", 1), ("t2", 2))}
    data = {
        name: cbor2.CBORTag(40, [[2, 2], cbor2.CBORTag(69, values.tobytes())])
        for name, values in reversed(frames.items())
    }
    message = cbor2.dumps({"type": "image", "series_id": 8, "image_id": 0, "data": data})
    exposure = assembler.feed(parse_message([message], channels=assembler.channels), 0.0)
    assert isinstance(exposure, Exposure) and exposure.metadata["channel"] == "t1"
    np.testing.assert_array_equal(exposure.frame, frames["t1"])
    v1_end = [json.dumps({"htype": "dseries_end-1.0", "series": 8}).encode()]
    assert assembler.feed(parse_message(v1_end), 0.0) is None  # the other protocol
    v2_end = cbor2.dumps({"type": "end", "series_id": 8})
    assert assembler.feed(parse_message([v2_end]), 0.0) == SeriesEnded(8)


def test_messages_are_frozen():
    for message in (header(1), image(1, 0), end(1)):
        with pytest.raises(dataclasses.FrozenInstanceError):
            message.series_id = 2  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        header(1).header.n_images = 3  # type: ignore[misc]
