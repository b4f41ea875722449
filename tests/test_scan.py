"""The feeder end to end without Prefect: processes, ZeroMQ, HDF5, bad frames."""

import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
from conftest import nexus_validation_problems

from flows.cli import main
from pipeline.config import (
    CPU_MAX_BATCH,
    InferenceConfig,
    PipelineConfig,
    StoreConfig,
    TransportConfig,
)
from pipeline.exposure import Exposure, LineOut
from pipeline.physics import PARAMETER_NAMES, QGrid, simulate
from pipeline.sources import SimulatedDetector
from pipeline.store import open_results
from workers.feeder import RECENT_RESULTS, Feeder, ScanError


def test_bad_frames_are_recorded_and_the_scan_goes_on(tmp_path, reliability):
    config = PipelineConfig(scan_id="bad-input", n_workers=1, output_dir=tmp_path)
    exposures = list(
        SimulatedDetector(config.integration, seed=7).scan("bad-input", 10).exposures()
    )
    bad = {2, 4, 6, 8}  # spoiled below
    exposures[2].frame = exposures[2].frame[:100]
    exposures[4].frame = exposures[4].frame.astype(np.float32)
    exposures[4].frame[10, 10] = np.nan
    exposures[6].frame = exposures[6].frame.astype(np.float32) - 5.0  # negative counts
    exposures[8].frame, exposures[8].error = None, "truncated file: scan_00008.cbf"
    with Feeder(config) as feeder:
        for exposure in exposures:
            feeder.submit(exposure)
        with pytest.raises(ValueError, match="already submitted"):
            feeder.submit(exposures[0])
        summary = feeder.wait()

    assert summary.submitted == 10 and summary.written_ok == 6 and summary.failed == 4
    assert summary.duplicates == 0
    counts = {stage: entry["count"] for stage, entry in summary.stages.items()}
    assert counts == {
        "received": 10,
        "integrated": 6,
        "inferred": 6,
        "written": 6,
        "resent": 0,
        "failed": 4,
    }
    assert summary.stages["integrated"]["p50_ms"] > 0
    results = open_results(config.output_path)
    assert results.index.tolist() == list(range(10))  # every exposure exactly once
    failed = {
        int(i): e
        for i, s, e in zip(results.index, results.status, results.error, strict=True)
        if s != "ok"
    }
    reliability.record(
        "bad input",
        "frames of the wrong shape, with NaN, with negative counts, unreadable",
        tried=len(bad),
        accepted=summary.written_ok,
        lost=reliability.check_every_acknowledged_once(
            set(feeder.acknowledged), results.index.tolist()
        ),
        detail=f"{len(failed)} of {summary.submitted} exposures stored as failed with their "
        f"cause, {summary.written_ok} good ones written; one row per exposure",
    )
    assert set(failed) == bad
    assert "shape" in failed[2] and "NaN" in failed[4] and "negative" in failed[6]
    assert "truncated" in failed[8]
    ok = results.status == "ok"
    assert np.isfinite(results.samples[ok]).all() and results.samples.shape[1:] == (1000, 5)
    np.testing.assert_allclose(results.truth[0], list(exposures[0].truth.values()))
    assert (config.output_dir / "logs" / "bad-input" / "worker-0.log").exists()
    recent = {r.index: r for r in feeder.recent}  # the live view of the newest results
    assert sorted(recent) == list(range(10))
    assert "negative" in recent[6].error and "pitch_nm" in recent[0].describe()
    for row, index in enumerate(results.index):
        if results.status[row] == "ok":
            np.testing.assert_allclose(recent[index].mean, results.mean[row], rtol=1e-6)
            np.testing.assert_allclose(recent[index].quantiles, results.quantiles[row], rtol=1e-6)


def test_an_existing_results_file_stops_the_scan_before_it_starts(tmp_path):
    config = PipelineConfig(scan_id="exists", n_workers=1, output_dir=tmp_path)
    config.output_path.write_bytes(b"earlier results")
    with pytest.raises(FileExistsError):
        Feeder(config).start()
    assert config.output_path.read_bytes() == b"earlier results"


FEEDER = """
import sys, time
from pathlib import Path
from pipeline.config import PipelineConfig
from pipeline.sources import SimulatedDetector
from workers.feeder import Feeder

config = PipelineConfig(scan_id="killed", n_workers=1, output_dir=Path(sys.argv[1]))
feeder = Feeder(config).start()
for exposure in SimulatedDetector(config.integration, seed=3).scan("killed", 6).exposures():
    feeder.submit(exposure)
feeder.wait()
print(feeder.n_done, *feeder.pids, flush=True)
time.sleep(600)
"""


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(")")[-1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def test_children_exit_and_the_file_stays_readable_when_the_feeder_is_killed(tmp_path, reliability):
    feeder = subprocess.Popen(
        [sys.executable, "-c", FEEDER, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        numbers = [int(number) for number in feeder.stdout.readline().split()]
    finally:
        feeder.send_signal(signal.SIGKILL)
        feeder.wait()
    acknowledged, pids = numbers[:1], numbers[1:]  # the feeder's n_done, then its children
    assert len(pids) == 2
    killed_at = time.monotonic()
    while any(_running(pid) for pid in pids) and time.monotonic() < killed_at + 20:
        time.sleep(0.2)
    exited_after_s = time.monotonic() - killed_at
    assert not any(_running(pid) for pid in pids), "children outlived their feeder"
    results = open_results(tmp_path / "killed.h5")
    reliability.record(
        "fault",
        "SIGKILL of the feeder after its scan",
        tried=1,
        accepted=acknowledged[0],
        lost=reliability.check_every_acknowledged_once(
            set(range(acknowledged[0])),
            results.index.tolist(),  # it sent exposures 0, 1, ...
        ),
        detail=f"its {len(pids)} children (writer, worker) exited within "
        f"{exited_after_s:.1f} s; the file readable with {results.index.size} rows",
    )
    assert results.index.tolist() == list(range(6)) and (results.status == "ok").all()


def _line_outs(n: int, seed: int) -> list[tuple[Exposure, LineOut]]:
    """``n`` simulated line-outs, ready for :meth:`Feeder.submit_line_out`."""
    theta, counts = simulate(n, np.random.default_rng(seed))
    q = QGrid().q_nm
    return [
        (
            Exposure(
                "lineouts", i, float(i), None, truth=dict(zip(PARAMETER_NAMES, t, strict=True))
            ),
            LineOut(q, c, np.sqrt(np.maximum(c, 1.0))),
        )
        for i, (t, c) in enumerate(zip(theta, counts, strict=True))
    ]


def _worker_pids(feeder: Feeder) -> list[int]:
    return [pid for name, pid in feeder.children.items() if name.startswith("worker")]


def test_workers_killed_mid_scan_lose_no_exposure_and_write_none_twice(tmp_path, reliability):
    config = PipelineConfig(
        scan_id="killed-workers",
        n_workers=2,
        output_dir=tmp_path,
        inference=InferenceConfig(n_samples=50),
    )
    kills = {250: 0, 500: 1, 750: 0}  # at these exposures, SIGKILL this worker
    with Feeder(config) as feeder:
        for exposure, line_out in _line_outs(1000, seed=3):
            if exposure.index in kills:
                feeder.collect()
                os.kill(_worker_pids(feeder)[kills[exposure.index]], signal.SIGKILL)
            feeder.submit_line_out(exposure, line_out)
        summary = feeder.wait()
    assert summary.worker_restarts == 3 and summary.resent > 0
    assert summary.stages["resent"]["count"] == summary.resent
    assert summary.stages["written"]["count"] == 1000
    assert summary.stages["inferred"]["count"] >= 1000  # some computed twice
    assert summary.submitted == summary.written_ok == 1000 and summary.failed == 0
    results = open_results(config.output_path)
    reliability.record(
        "fault",
        f"SIGKILL of an inference worker, {len(kills)} times during {summary.submitted} exposures",
        tried=len(kills),
        accepted=feeder.n_done,
        lost=reliability.check_every_acknowledged_once(
            set(feeder.acknowledged), results.index.tolist()
        ),
        detail=f"{summary.worker_restarts} workers replaced, {summary.resent} exposures resent; "
        f"{summary.duplicates} duplicate acknowledgements, {summary.failed} failed",
    )
    assert sorted(results.index.tolist()) == list(range(1000))  # each exposure exactly once
    assert (results.status == "ok").all() and np.isfinite(results.samples).all()
    assert len(feeder.recent) == RECENT_RESULTS  # only the newest are kept for live views
    assert [r.index for r in feeder.recent] == list(feeder.acknowledged)[-RECENT_RESULTS:]
    log = (config.output_dir / "logs" / "killed-workers" / "worker-0.log").read_text()
    assert "replaced by the feeder" in log


def test_a_stalled_worker_is_replaced_and_the_scan_goes_on(tmp_path, reliability):
    config = PipelineConfig(
        scan_id="stalled-worker",
        n_workers=2,
        output_dir=tmp_path,
        inference=InferenceConfig(n_samples=50),
        transport=TransportConfig(worker_timeout_s=3.0, heartbeat_interval_s=0.5),
    )
    line_outs = _line_outs(200, seed=4)
    with Feeder(config) as feeder:
        stalled = _worker_pids(feeder)[1]
        os.kill(stalled, signal.SIGSTOP)  # alive, but it answers nothing
        try:
            for exposure, line_out in line_outs:
                feeder.submit_line_out(exposure, line_out)
            summary = feeder.wait()
        finally:
            if _running(stalled):
                os.kill(stalled, signal.SIGKILL)
    stored = open_results(config.output_path).index.tolist()
    reliability.record(
        "fault",
        "SIGSTOP of an inference worker (alive, answering nothing) before the scan",
        tried=1,
        accepted=feeder.n_done,
        lost=reliability.check_every_acknowledged_once(set(feeder.acknowledged), stored),
        detail=f"the stalled worker replaced {summary.worker_restarts} time(s) after the "
        f"{config.transport.worker_timeout_s:g} s timeout, {summary.resent} exposures resent; "
        f"{summary.written_ok} of {len(line_outs)} written",
    )
    assert summary.written_ok == 200 and summary.worker_restarts == 1
    assert sorted(stored) == list(range(200))


def test_malformed_and_oversized_messages_are_dropped_and_logged(tmp_path, caplog, reliability):
    import zmq

    from pipeline.transport import encode

    config = PipelineConfig(
        scan_id="malformed",
        n_workers=1,
        output_dir=tmp_path,
        inference=InferenceConfig(n_samples=50),
        transport=TransportConfig(max_message_bytes=2**20),
    )
    context = zmq.Context()
    hostile: list[list[bytes]] = []  # every message sent below

    def send(socket, frames: list[bytes]) -> None:
        hostile.append(frames)
        socket.send_multipart(frames)

    with caplog.at_level("WARNING"), Feeder(config) as feeder:
        intruder = context.socket(zmq.DEALER)  # as a worker would connect
        intruder.connect(feeder.endpoints.work)
        send(intruder, [b"not msgpack"])
        send(intruder, encode("ready", {"id": 9}))  # no pid, no credits
        to_writer = context.socket(zmq.PUSH)
        to_writer.connect(feeder.endpoints.results)
        send(to_writer, [b"\x81\xa4kind\xa6result"])  # a header without "proto"
        far = np.array([10**6, 10**6 + 1])  # exposures of no scan
        seven_bins = np.zeros((1, 7), np.float32)
        send(to_writer, encode("results", {}, index=far[:1], counts=seven_bins))
        send(to_writer, encode("results", {}, index=far, samples=np.zeros((1, 50, 5), "f4")))
        send(to_writer, [b"x" * (2**20 + 1)])  # oversized: ZeroMQ drops the sender
        to_feeder = context.socket(zmq.PUSH)  # acknowledgements whose columns disagree
        to_feeder.connect(feeder.endpoints.acks)
        columns = {name: np.zeros((1, 5), "f4") for name in ("mean", "sd")}
        send(
            to_feeder,
            encode(
                "acks",
                {"status": ["ok"], "error": []},
                index=far[:1],
                duplicate=np.zeros(1, "u1"),
                quantiles=np.zeros((1, 3, 5), "f4"),
                predictive_z=np.zeros(1, "f4"),
                **columns,
            ),
        )
        oversized = context.socket(zmq.DEALER)
        oversized.connect(feeder.endpoints.work)
        send(oversized, [b"x" * (2**20 + 1)])
        for exposure, line_out in _line_outs(20, seed=5):
            feeder.submit_line_out(exposure, line_out)
        summary = feeder.wait()
        for socket in (intruder, to_writer, oversized, to_feeder):
            socket.close(linger=0)
    context.term()
    writer_log = (config.output_dir / "logs" / "malformed" / "writer.log").read_text()
    stored = open_results(config.output_path).index.tolist()
    oversized_bytes = config.transport.max_message_bytes
    reliability.record(
        "hostile message",
        "not msgpack, ready without fields, header without proto, results of another shape "
        "or length, acks of columns of different lengths, 2 oversized (feeder, writer)",
        tried=len(hostile),
        accepted=feeder.n_done,
        lost=reliability.check_every_acknowledged_once(set(feeder.acknowledged), stored),
        detail=f"{feeder.malformed} malformed dropped and logged by the feeder, "
        f"{writer_log.count('dropped a malformed message')} by the writer; "
        f"{sum(sum(map(len, f)) > oversized_bytes for f in hostile)} oversized cost their "
        f"senders the connection; {summary.written_ok} of 20 exposures written",
    )
    assert summary.written_ok == 20 and feeder.malformed == 3
    assert caplog.text.count("dropped a malformed message on work") == 2
    assert caplog.text.count("dropped a malformed message on acks") == 1
    assert "a peer of the work socket disconnected" in caplog.text
    assert writer_log.count("dropped a malformed message") == 3
    assert "column 'counts': shape (1, 7), expected (1, 512)" in writer_log
    assert "writer: a sender disconnected" in writer_log
    assert sorted(stored) == list(range(20))


def _resident_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as handle:
        line = next(line for line in handle if line.startswith("VmRSS"))
    return int(line.split()[1]) / 1024


def test_a_producer_far_faster_than_the_workers_keeps_every_process_bounded(tmp_path, reliability):
    config = PipelineConfig(
        scan_id="fast-producer",
        n_workers=1,
        output_dir=tmp_path,
        inference=InferenceConfig(n_samples=2000),  # 10-20 ms per exposure
        transport=TransportConfig(high_water_mark=8),
    )
    line_outs = _line_outs(240, seed=6)  # handed over at once: far faster than inference
    resident: dict[int, list[float]] = {}
    with Feeder(config) as feeder:
        pids = [os.getpid(), *feeder.pids]
        largest_in_flight = 0
        for exposure, line_out in line_outs:
            feeder.submit_line_out(exposure, line_out)
            largest_in_flight = max(largest_in_flight, feeder.in_flight)
            if exposure.index % 30 == 29:
                for pid in pids:
                    resident.setdefault(pid, []).append(_resident_mb(pid))
        summary = feeder.wait()
    growth_mb = {pid: max(sizes[2:]) - sizes[1] for pid, sizes in resident.items()}
    reliability.record(
        "load",
        f"{len(line_outs)} exposures handed over at once, far faster than inference",
        tried=len(line_outs),
        accepted=feeder.n_done,
        lost=reliability.check_every_acknowledged_once(
            set(feeder.acknowledged), open_results(config.output_path).index.tolist()
        ),
        detail=f"at most {largest_in_flight} in flight (high-water mark "
        f"{config.transport.high_water_mark}, a worker's two batches {2 * CPU_MAX_BATCH}); "
        f"largest RSS growth of the {len(growth_mb)} "
        f"processes {max(growth_mb.values()):.1f} MB",
    )
    assert summary.written_ok == 240
    # what waits in memory is bounded, not by the scan's length: per worker the high-water
    # mark or the two batches it asked for, whichever is more
    assert largest_in_flight <= max(8, 2 * CPU_MAX_BATCH)
    for pid, sizes in resident.items():  # no process grows with the exposures handed over
        assert max(sizes[2:]) - sizes[1] < 25, (pid, sizes)


def test_a_worker_s_batches_fill_whatever_the_high_water_mark(tmp_path):
    """A worker asks for two of its largest batches: a GPU worker's batches of thousands
    must not be cut to the high-water mark (64 by default), or it runs at a fraction of its
    speed; what waits in memory stays bounded by those two batches."""
    config = PipelineConfig(
        scan_id="full-batches",
        n_workers=1,
        output_dir=tmp_path,
        inference=InferenceConfig(n_samples=100, max_batch=32, latency_budget_ms=10_000),
        transport=TransportConfig(high_water_mark=4),
    )
    with Feeder(config) as feeder:
        largest_in_flight = 0
        for exposure, line_out in _line_outs(160, seed=7):
            feeder.submit_line_out(exposure, line_out)
            largest_in_flight = max(largest_in_flight, feeder.in_flight)
        summary = feeder.wait()
    assert summary.written_ok == 160
    assert 32 < largest_in_flight <= 64


def test_a_worker_that_cannot_start_ends_the_scan_at_once(tmp_path, reliability):
    import shutil

    from pipeline.bundled import DEFAULT_MODEL
    from pipeline.model_card import card_path

    weights = tmp_path / "broken.safetensors"
    shutil.copy(DEFAULT_MODEL, weights)
    shutil.copy(card_path(DEFAULT_MODEL), card_path(weights))
    with open(weights, "ab") as handle:
        handle.write(b"\0")  # no longer the weights its card vouches for
    config = PipelineConfig(
        scan_id="broken-model",
        n_workers=1,
        output_dir=tmp_path,
        inference=InferenceConfig(model=weights),
    )
    started = time.monotonic()
    with pytest.raises(ScanError, match="worker-0 exited") as error, Feeder(config):
        pass
    reliability.record(
        "security",
        "model weights with a byte appended: no longer the SHA-256 in their model card",
        tried=1,
        detail="the worker refused them, naming the SHA-256 mismatch; the scan ended after "
        f"{time.monotonic() - started:.1f} s with its error, the worker not restarted",
    )
    assert "SHA-256" in str(error.value)  # the worker's own words, from its log
    assert "replaced" not in str(error.value)  # not started again and again


def test_a_scan_whose_writer_was_killed_is_resumed_without_duplicates_or_gaps(
    tmp_path, reliability
):
    import h5py

    config = PipelineConfig(
        scan_id="resumed",
        n_workers=1,
        output_dir=tmp_path,
        inference=InferenceConfig(n_samples=50),
        transport=TransportConfig(max_writer_restarts=0),  # the scan ends when it is killed
    )
    line_outs = _line_outs(150, seed=12)
    acknowledged: set[int] = set()  # by the writer before it was killed, and after resuming
    with (
        pytest.raises(ScanError, match="writer exited"),
        Feeder(config, on_result=lambda result: acknowledged.add(result.index)) as feeder,
    ):
        writer, killed = feeder.children["writer"], False
        for exposure, line_out in line_outs:
            feeder.submit_line_out(exposure, line_out)
            if feeder.n_done >= 40 and not killed:
                os.kill(writer, signal.SIGKILL)
                killed = True
        feeder.wait()
    acknowledged_before_kill = set(acknowledged)
    partial = open_results(config.output_path)  # readable as it was left (SWMR reader)
    assert 40 <= partial.index.size < 150
    assert np.unique(partial.index).size == partial.index.size

    with pytest.raises(FileExistsError, match="resume"):
        Feeder(config).start()
    with Feeder(
        config, resume=True, on_result=lambda result: acknowledged.add(result.index)
    ) as feeder:
        for exposure, line_out in line_outs:  # the whole scan again
            feeder.submit_line_out(exposure, line_out)
        summary = feeder.wait()
    assert summary.skipped == partial.index.size
    assert summary.written_ok == 150 - partial.index.size
    results = open_results(config.output_path)
    reliability.record(
        "fault",
        "SIGKILL of the writer mid-scan, then the scan resumed",
        tried=1,
        accepted=len(acknowledged_before_kill),
        **reliability.tally(config.output_path, acknowledged),
        detail=f"killed after {len(acknowledged_before_kill)} acknowledged; its file readable with "
        f"{partial.index.size} rows; the resumed scan skipped {summary.skipped} and wrote "
        f"{summary.written_ok}: {results.index.size} rows for {len(line_outs)} exposures",
    )
    assert acknowledged_before_kill <= set(partial.index.tolist())  # nothing lost by the kill
    assert results.index.tolist() == list(range(150))  # no duplicate, no gap
    assert (results.status == "ok").all() and np.isfinite(results.samples).all()
    np.testing.assert_array_equal(results.samples[partial.index], partial.samples)
    with h5py.File(config.output_path) as handle:  # a normal file again, with NXcanSAS groups
        assert sum(name.startswith("sasdata_") for name in handle["entry"]) == 150


def test_frames_that_waited_before_the_hand_over_count_their_wait(tmp_path):
    """A live source's frames that waited 3 s in the socket (the detector acquired them 0.1 s
    before they were taken): latencies, the received stage and the scan's time count from
    the acquisition, and the file keeps when each was taken beside its acquisition time."""
    config = PipelineConfig(
        scan_id="waited", n_workers=1, output_dir=tmp_path, inference=InferenceConfig(n_samples=20)
    )
    with Feeder(config) as feeder:
        taken = time.time() - 3.0
        for exposure, line_out in _line_outs(8, seed=4):
            exposure.received_at = taken + 0.01 * exposure.index
            exposure.timestamp = exposure.received_at - 0.1
            feeder.submit_line_out(exposure, line_out)
        summary = feeder.wait()
    assert summary.latency_p50_ms >= 3100 and summary.wall_s >= 3.1
    assert summary.stages["received"]["p50_ms"] >= 3100
    results = open_results(config.output_path)
    np.testing.assert_allclose(results.received_time, taken + 0.01 * np.arange(8))
    np.testing.assert_allclose(results.timestamp, results.received_time - 0.1)


def _writer_pid(feeder: Feeder) -> int:
    return feeder.children["writer"]


@pytest.mark.slow  # 26 s
def test_a_writer_killed_twice_is_started_again_and_the_scan_goes_on(tmp_path, reliability):
    """SIGKILL of the results writer, twice during a scan of 1,000 exposures (some of them
    failure records, which go straight to the writer): a new writer continues the file each
    time and gets every exposure not acknowledged again; every exposure is in the file once,
    and the file ends complete, with its NXcanSAS groups."""
    import h5py

    from pipeline.store import read_completion

    config = PipelineConfig(
        scan_id="writer-killed",
        n_workers=2,
        output_dir=tmp_path,
        inference=InferenceConfig(n_samples=50),
    )
    kills = (300, 650)
    unreadable = set(range(0, 1000, 97))  # failure records
    restarts = []
    acknowledged: set[int] = set()
    with Feeder(
        config,
        on_result=lambda result: acknowledged.add(result.index),
        on_writer_restart=restarts.append,
    ) as feeder:
        for exposure, line_out in _line_outs(1000, seed=21):
            if exposure.index in kills:
                feeder.collect()
                os.kill(_writer_pid(feeder), signal.SIGKILL)
            if exposure.index in unreadable:
                exposure.error = "unreadable frame"
                feeder.submit(exposure)
            else:
                feeder.submit_line_out(exposure, line_out)
        summary = feeder.wait()
        feeder.complete = True
    assert summary.writer_restarts == 2 and [r.restarts for r in restarts] == [1, 2]
    assert all(r.code == -signal.SIGKILL for r in restarts)
    assert summary.written_ok == 1000 - len(unreadable) and summary.failed == len(unreadable)
    results = open_results(config.output_path)
    reliability.record(
        "fault",
        f"SIGKILL of the results writer, {len(kills)} times during {summary.submitted} exposures",
        tried=len(kills),
        accepted=feeder.n_done,
        **reliability.tally(config.output_path, acknowledged),
        detail=f"{summary.writer_restarts} writers started again on the file, "
        f"{summary.resent} exposures re-sent, {summary.duplicates} duplicate acknowledgements",
    )
    assert sorted(results.index.tolist()) == list(range(1000))  # each exposure exactly once
    assert set(np.flatnonzero(results.status == "failed")) == unreadable
    completion = read_completion(config.output_path)
    assert completion is not None and completion.n_exposures == 1000
    with h5py.File(config.output_path) as handle:
        groups = sum(name.startswith("sasdata_") for name in handle["entry"])
    assert groups == 1000 - len(unreadable)
    assert nexus_validation_problems(config.output_path) == []
    log = (tmp_path / "logs" / "writer-killed" / "writer.log").read_text()
    assert log.count("started again by the feeder on the file") == 2


def test_a_writer_that_cannot_start_again_ends_the_scan(tmp_path):
    """The writer killed, and the file made unreadable meanwhile: the writer started again
    cannot continue it, and the scan ends with the reason from its log."""
    config = PipelineConfig(
        scan_id="no-restart",
        n_workers=1,
        output_dir=tmp_path,
        inference=InferenceConfig(n_samples=50),
    )
    with (
        pytest.raises(ScanError, match="writer started again exited with code") as error,
        Feeder(config) as feeder,
    ):
        for exposure, line_out in _line_outs(100, seed=22):
            if exposure.index == 40:
                feeder.collect()
                os.kill(_writer_pid(feeder), signal.SIGKILL)
                time.sleep(0.5)
                config.output_path.write_bytes(b"damaged")  # what the new writer finds
            feeder.submit_line_out(exposure, line_out)
        feeder.wait()
    assert "cannot resume" in str(error.value)  # the new writer's own words, from its log


def test_line_outs_a_grating_cannot_explain_are_flagged_in_the_file(tmp_path):
    from pipeline.physics.quality import Z_THRESHOLD, sphere_counts

    config = PipelineConfig(scan_id="flagged", n_workers=1, output_dir=tmp_path)
    line_outs = _line_outs(12, seed=13)
    spheres, _ = sphere_counts(3, np.random.default_rng(14), QGrid())
    q = QGrid().q_nm
    for index, counts in zip((3, 7, 11), spheres, strict=True):  # foreign samples among them
        line_outs[index] = (line_outs[index][0], LineOut(q, counts, np.sqrt(counts + 1)))
    with Feeder(config) as feeder:
        for exposure, line_out in line_outs:
            feeder.submit_line_out(exposure, line_out)
        feeder.wait()
    results = open_results(config.output_path)
    assert results.index[results.flagged].tolist() == [3, 7, 11]
    assert (results.predictive_z[results.flagged] > Z_THRESHOLD).all()
    recent = {r.index: r for r in feeder.recent}
    assert "FLAGGED" in recent[7].describe() and "FLAGGED" not in recent[6].describe()
    gratings = ~results.flagged  # both width solutions, as the exact posterior has them
    np.testing.assert_allclose(results.width_mode_weights.sum(axis=1), 1.0, rtol=1e-6)
    assert (np.abs(results.width_mode_weights[gratings, 0] - 0.5) < 0.1).all()


def test_a_scan_asked_for_the_first_sasdata_group_only_writes_one(tmp_path):
    config = PipelineConfig(
        scan_id="high-rate",
        n_workers=1,
        output_dir=tmp_path,
        store=StoreConfig(sasdata_groups="first"),
    )
    with Feeder(config) as feeder:
        for exposure, line_out in _line_outs(5, seed=4):
            feeder.submit_line_out(exposure, line_out)
        assert feeder.wait().written_ok == 5
    with h5py.File(config.output_path) as handle:
        assert [k for k in handle["entry"] if k.startswith("sasdata_")] == ["sasdata_000000"]
        assert handle["entry/line_out/I"].shape[0] == 5


def test_a_scan_that_stores_the_summaries_alone_has_the_summaries_of_every_draw(tmp_path):
    """``store.stored_samples``: the workers still draw ``n_samples`` per exposure and
    summarize them all; the file keeps the first K (0: none), and the scan resumes."""
    stored = {}
    for kept in (None, 0):  # (another number of draws: tests/test_store.py)
        config = PipelineConfig(
            scan_id=f"kept-{kept}",
            n_workers=1,
            output_dir=tmp_path,
            inference=InferenceConfig(n_samples=200, max_batch=1),  # the same draws each time
            store=StoreConfig(stored_samples=kept),
        )
        with Feeder(config) as feeder:
            for exposure, line_out in _line_outs(4, seed=8)[:3]:
                feeder.submit_line_out(exposure, line_out)
            assert feeder.wait().written_ok == 3
        with Feeder(config, resume=True) as feeder:
            for exposure, line_out in _line_outs(4, seed=8):
                feeder.submit_line_out(exposure, line_out)
            summary = feeder.wait()
        assert summary.skipped == 3 and summary.written_ok == 1
        stored[kept] = open_results(config.output_path)
    every, summaries_alone = stored[None], tmp_path / "kept-0.h5"
    assert every.samples.shape == (4, 200, 5)
    assert stored[0].samples.shape == (4, 0, 5)
    for name in ("mean", "sd", "quantiles", "predictive_z", "width_mode_weights"):
        np.testing.assert_array_equal(getattr(stored[0], name), getattr(every, name))
    folder = tmp_path / "png"  # show: the line-out without its band, no corner plot
    assert main(["show", str(summaries_alone), "--png", str(folder), "--exposure", "1"]) == 0
    assert (folder / "lineout_000001.png").exists() and not (folder / "corner_000001.png").exists()
