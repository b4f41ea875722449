"""The feeder's ledger on its own (no sockets, no processes, no clocks): work by credit,
a lost worker's exposures sent again first, duplicates, the in-flight bound."""

import math

import numpy as np
import pytest

from pipeline.transport.messages import Acks
from workers.feeder.ledger import Ledger


def _ledger(n_exposures: int, credits: dict[bytes, int], high_water_mark: int = 4) -> Ledger:
    """A ledger with workers of these ``credits`` (numbered in order) and ``n_exposures``
    line-outs handed over at 0 s, waiting."""
    ledger = Ledger(high_water_mark=high_water_mark, largest_capacity=16)
    for number, (identity, credit) in enumerate(credits.items()):
        ledger.join(identity, number, pid=100 + number, credits=credit, now_s=0.0)
    for index in range(n_exposures):
        ledger.take(index, at_s=0.0)
        ledger.hold_line_out(index, [f"line-out {index}".encode()])
    return ledger


def _dispatch(ledger: Ledger) -> list[tuple[int, int]]:
    """Send what the credits allow, as the feeder does; (worker number, exposure) each."""
    sent = []
    while (sending := ledger.next_send()) is not None:
        assert sending.frames == [f"line-out {sending.index}".encode()]
        ledger.sent(sending.worker, sending.index)
        sent.append((sending.worker.number, sending.index))
    return sent


def _acks(*rows: tuple[int, str], duplicate: bool = False) -> Acks:
    """The writer's acknowledgement of ``(index, status)`` rows."""
    n = len(rows)
    return Acks(
        status=tuple(status for _, status in rows),
        error=tuple("" if status == "ok" else "bad frame" for _, status in rows),
        index=np.array([index for index, _ in rows]),
        duplicate=np.full(n, duplicate, "u1"),
        mean=np.ones((n, 5), "f4"),
        sd=np.ones((n, 5), "f4"),
        quantiles=np.ones((n, 3, 5), "f4"),
        predictive_z=np.zeros(n, "f4"),
    )


def test_each_waiting_exposure_goes_to_the_worker_with_most_credits():
    ledger = _ledger(6, {b"a": 1, b"b": 3, b"c": 1})
    # b first (3 credits), then b again (2, ahead of a's and c's 1), then a tie: the first
    # to join; nothing more once every credit is spent
    assert _dispatch(ledger) == [(1, 0), (1, 1), (0, 2), (1, 3), (2, 4)]
    assert ledger.waiting == (5,)
    assert {w.number: sorted(w.holding) for w in ledger.workers.values()} == {
        0: [2],
        1: [0, 1, 3],
        2: [4],
    }
    ledger.credit(b"c", 2)  # a batch done: credits back
    assert _dispatch(ledger) == [(2, 5)]
    assert ledger.next_send() is None  # nothing waits


def test_nothing_is_sent_without_a_worker_or_credit():
    ledger = _ledger(2, {})
    assert ledger.next_send() is None and ledger.waiting == (0, 1)
    ledger.join(b"a", 0, pid=1, credits=0, now_s=0.0)
    assert ledger.next_send() is None
    ledger.credit(b"a", 1)
    sending = ledger.next_send()
    assert sending is not None and sending.index == 0
    with pytest.raises(ValueError, match="exposure 1 is not the first waiting"):
        ledger.sent(sending.worker, 1)


def test_a_lost_worker_s_exposures_are_sent_again_first():
    ledger = _ledger(6, {b"a": 3, b"b": 2})
    assert _dispatch(ledger) == [(0, 0), (0, 1), (1, 2), (0, 3), (1, 4)]
    ledger.acknowledge(1, "ok", "", duplicate=False, now_s=1.0)  # written before a was lost
    assert ledger.lose(b"a") == [0, 3]  # what it held, not yet written
    assert ledger.waiting == (0, 3, 5)  # ahead of the exposure that waited already
    assert ledger.resent == 2 and ledger.lose(b"a") is None  # known no more
    ledger.credit(b"b", 3)
    assert _dispatch(ledger) == [(1, 0), (1, 3), (1, 5)]
    assert ledger.in_flight == 5  # every line-out kept until it is written


def test_a_worker_silent_for_longer_than_the_timeout_is_found():
    ledger = _ledger(0, {b"a": 1, b"b": 1})
    assert ledger.heard_from(b"a", now_s=8.0) is ledger.workers[b"a"]
    assert ledger.heard_from(b"unknown", now_s=8.0) is None
    assert [w.number for w in ledger.silent(now_s=12.0, timeout_s=10.0)] == [1]
    assert ledger.silent(now_s=10.0, timeout_s=10.0) == []


def test_an_exposure_acknowledged_twice_counts_once():
    ledger = _ledger(2, {b"a": 2})
    _dispatch(ledger)
    assert ledger.acknowledge(0, "ok", "", duplicate=False, now_s=0.5) == 0.5
    assert ledger.acknowledge(0, "ok", "", duplicate=False, now_s=0.9) is None  # a copy
    assert ledger.duplicates == 1 and dict(ledger.acknowledged) == {0: "ok"}
    # stored by a writer that exited before it acknowledged it: news, and a duplicate
    assert ledger.acknowledge(1, "failed", "bad", duplicate=True, now_s=0.7) == 0.7
    assert ledger.duplicates == 2 and ledger.failures == {1: "bad"}
    assert ledger.workers[b"a"].holding == set() and ledger.in_flight == 0
    assert dict(ledger.latencies_s) == {0: 0.5, 1: 0.7} and ledger.missing() == []


def test_an_exposure_acknowledged_while_it_waits_is_not_sent_again():
    ledger = _ledger(3, {b"a": 2, b"b": 0})
    assert _dispatch(ledger) == [(0, 0), (0, 1)]
    ledger.lose(b"a")  # 0 and 1 wait again, before 2
    ledger.acknowledge(0, "ok", "", duplicate=False, now_s=1.0)  # a finished it after all
    ledger.credit(b"b", 3)
    assert _dispatch(ledger) == [(1, 1), (1, 2)]  # 0 left the queue unsent


def test_an_exposure_handed_over_twice_is_refused():
    ledger = _ledger(1, {})
    with pytest.raises(ValueError, match="exposure 0 was already submitted"):
        ledger.take(0, at_s=1.0)


def test_the_in_flight_limit_is_per_worker_the_high_water_mark_or_its_capacity():
    ledger = Ledger(high_water_mark=8, largest_capacity=100)
    assert ledger.in_flight_limit() == 8  # no worker yet: the high-water mark
    ledger.join(b"cpu", 0, pid=1, credits=4, now_s=0.0)  # asked for less than the mark
    assert ledger.in_flight_limit() == 8
    ledger.join(b"gpu", 1, pid=2, credits=4096, now_s=0.0)  # more than any worker may keep
    assert ledger.workers[b"gpu"].capacity == 100
    assert ledger.in_flight_limit() == 8 + 100
    ledger.lose(b"gpu")
    assert ledger.in_flight_limit() == 8


def test_a_new_writer_gets_every_exposure_not_acknowledged_again():
    ledger = _ledger(4, {b"a": 2})
    ledger.take(9, at_s=0.0)
    ledger.hold_failure(9, [b"failure record 9"])  # straight to the writer
    assert _dispatch(ledger) == [(0, 0), (0, 1)]
    ledger.acknowledge(1, "ok", "", duplicate=False, now_s=1.0)
    n_line_outs, records = ledger.resend_unwritten()
    assert n_line_outs == 1 and records == [[b"failure record 9"]]
    assert ledger.waiting == (0, 2, 3) and ledger.resent == 2
    ledger.acknowledge(9, "failed", "unreadable", duplicate=False, now_s=1.0)
    assert ledger.resend_unwritten()[1] == []  # acknowledged: kept no more


def test_a_block_of_acknowledgements_gives_each_new_exposure_once():
    ledger = _ledger(3, {b"a": 3})
    _dispatch(ledger)
    results = ledger.acknowledge_block(_acks((0, "ok"), (1, "failed")), now_s=2.0)
    assert [(r.index, r.status, r.latency_s, r.error) for r in results] == [
        (0, "ok", 2.0, ""),
        (1, "failed", 2.0, "bad frame"),
    ]
    assert results[0].mean == (1.0,) * 5 and results[1].mean == ()  # summaries of ok ones
    again = ledger.acknowledge_block(_acks((1, "failed"), (2, "ok"), duplicate=True), 3.0)
    assert [r.index for r in again] == [2] and ledger.duplicates == 2
    assert list(ledger.acknowledged) == [0, 1, 2] and ledger.failures == {1: "bad frame"}


def test_an_exposure_never_handed_over_has_no_latency():
    ledger = Ledger(high_water_mark=4, largest_capacity=16)
    latency_s = ledger.acknowledge(7, "ok", "", duplicate=False, now_s=1.0)
    assert latency_s is not None and math.isnan(latency_s)
