"""Cancelling a scan: SIGTERM (Prefect's runner cancelling the run, ``systemctl stop``) stops
the source, every frame taken is written, and the run ends *Cancelled* with its counts, never
*Crashed* (the online flow's clean stop, from a process and from ``beamline-inn serve``, is
tested in ``test_orchestration.py``)."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from flows.scan import (
    ScanCancelled,
    final_state,
    reconstruct_simulated_scan,
    stop_on_sigterm,
    summary_of,
)
from pipeline.sources.simulated import SimulatedScan
from pipeline.store import open_results, read_completion
from workers.feeder import ScanError, ScanSummary

CANCELLED = "cancelled, every frame taken was written"


def test_a_cancelled_scan_ends_its_run_cancelled_with_its_counts():
    """Cancelled whatever failed (a run being cancelled may end no other way), the counts
    as its message; taking its result raises ScanCancelled, a ScanError (a command says the
    scan stopped and exits non-zero), which carries the summary."""
    summary = ScanSummary(
        "s", "s.h5", 13, 10, 3, 0, 0, 0, 0, 0, 1.0, 13.0, 40.0, 90.0, cancelled=True
    )
    state = final_state(summary, max_failed_fraction=0.0)
    assert state.is_cancelled()
    assert state.message == f"13 exposures: 10 written, 3 failed, 0 flagged: {CANCELLED}"
    with pytest.raises(ScanCancelled, match=CANCELLED) as raised:
        summary_of(state)
    assert raised.value.summary is summary and isinstance(raised.value, ScanError)


def test_sigterm_outside_a_flow_run_goes_on_to_the_handler_before():
    """Outside a flow run, SIGTERM stops the source and, on leaving, goes on to the handler
    that was there before: a command's, or the default one (exit with 128 + SIGTERM)."""
    calls: list[object] = []
    before = signal.signal(signal.SIGTERM, lambda signum, frame: calls.append(signum))
    try:
        with stop_on_sigterm(lambda: calls.append("stop")) as requested:
            signal.raise_signal(signal.SIGTERM)
            assert requested.is_set() and calls == ["stop"]  # the handler before: not yet
        assert calls == ["stop", signal.SIGTERM]
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        with pytest.raises(SystemExit) as exited, stop_on_sigterm(lambda: None):
            signal.raise_signal(signal.SIGTERM)
        assert exited.value.code == 128 + signal.SIGTERM
    finally:
        signal.signal(signal.SIGTERM, before)


@pytest.mark.slow  # a whole demo scan (6-21 s): the default suite stays under 15 min
def test_sigterm_during_a_demo_scan_ends_its_run_cancelled(prefect_harness, tmp_path, monkeypatch):
    """SIGTERM in a flow run of archived or simulated frames (here the demo's, after its
    10th frame): the source stops, the 10 frames taken are written, the file is closed but
    not marked complete (a rerun resumes), and the run ends Cancelled with the counts;
    Prefect's own handler, which would end it Crashed, is not called."""
    simulated = SimulatedScan.exposures

    def exposures(scan: SimulatedScan):
        for exposure in simulated(scan):
            yield exposure
            if exposure.index == 9:  # the 10th frame taken: "cancel"
                signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(SimulatedScan, "exposures", exposures)
    caught: list[int] = []  # a SIGTERM that the scan did not take ends up here, not in pytest
    before = signal.signal(signal.SIGTERM, lambda signum, frame: caught.append(signum))
    try:
        state = reconstruct_simulated_scan(
            n_frames=64,
            n_workers=1,
            output_dir=tmp_path,
            scan_id="cancelled-demo",
            n_samples=100,
            batch_size=4,
            return_state=True,
        )
    finally:
        signal.signal(signal.SIGTERM, before)
    assert state.is_cancelled() and not caught, state
    assert state.message.startswith("10 exposures: 10 written, 0 failed"), state.message
    assert state.message.endswith(CANCELLED)
    with pytest.raises(ScanCancelled) as raised:
        summary_of(state)
    summary = raised.value.summary
    assert summary.cancelled and not summary.complete
    path = Path(summary.output_path)
    assert open_results(path).index.tolist() == list(range(10))
    assert read_completion(path) is None
