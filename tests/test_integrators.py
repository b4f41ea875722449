"""Integration in processes of their own (``n_integrators``): the pool's line-outs are the
feeder's engine's, each frame once, and a killed integrator loses nothing."""

import gc
import os
import signal

import h5py
import numpy as np
import pytest

from pipeline.config import IntegrationConfig, PipelineConfig, TransportConfig
from pipeline.integration import FrameError, LineOutIntegrator
from pipeline.integration.pool import MAX_TRIES, IntegratorError, IntegratorPool
from pipeline.physics import QGrid
from pipeline.source_specs import ArchivedFiles
from pipeline.sources import FileSource, ReadAhead, SimulatedDetector
from pipeline.sources.opening import opened
from pipeline.store import open_results
from workers.feeder import Feeder, ScanError

SECTOR = IntegrationConfig(azimuth_range_deg=(-5.0, 5.0))


@pytest.fixture(scope="module")
def frames() -> list[np.ndarray]:
    simulated = SimulatedDetector(SECTOR, seed=3).scan("pool", 4).exposures()
    return [exposure.frame for exposure in simulated]


def _integrate_all(pool: IntegratorPool, frames: list[np.ndarray]) -> dict:
    done = []
    for key, frame in enumerate(frames):
        while not pool.has_room:
            done.extend(pool.wait_all(timeout_s=60))
        pool.submit(key, frame, normalization=2.0, source=f"frame-{key}")
    done.extend(pool.wait_all(timeout_s=60))
    assert sorted(result.key for result in done) == list(range(len(frames)))  # each once
    return {result.key: result for result in done}


def test_the_pool_gives_the_line_outs_and_errors_of_the_feeder_s_own_engine(frames):
    spoiled = frames[1].astype(np.float32)
    spoiled[5, 5] = np.nan
    given = [frames[0], spoiled, frames[2], frames[3][:50], frames[0]]
    own = LineOutIntegrator(SECTOR, QGrid())
    with IntegratorPool(SECTOR, QGrid(), processes=2) as pool:
        pool.wait_ready(timeout_s=60)
        done = _integrate_all(pool, given)
    for key, frame in enumerate(given):
        try:
            expected = own.integrate(frame, 2.0, source=f"frame-{key}")
        except FrameError as error:
            assert done[key].line_out is None and done[key].error == str(error)
            continue
        line_out = done[key].line_out
        assert line_out is not None and line_out.normalization == 2.0
        np.testing.assert_array_equal(line_out.counts, expected.counts)
        np.testing.assert_array_equal(line_out.counts_sd, expected.counts_sd)
    assert "NaN" in done[1].error and "shape" in done[3].error


def _stop(pid: int) -> None:
    os.kill(pid, signal.SIGSTOP)


def test_a_killed_integrator_is_replaced_and_its_frames_are_integrated_once(frames):
    with IntegratorPool(SECTOR, QGrid(), processes=2) as pool:
        pool.wait_ready(timeout_s=60)
        stopped = pool.pids[0]
        _stop(stopped)  # it holds its frames until killed
        for key in range(4):  # the least busy first: 2 to each
            pool.submit(key, frames[key])
        os.kill(stopped, signal.SIGKILL)
        done = {result.key: result for result in pool.wait_all(timeout_s=60)}
        assert pool.restarts == 1 and stopped not in pool.pids and len(pool.pids) == 2
    assert sorted(done) == [0, 1, 2, 3]
    assert all(result.line_out is not None for result in done.values())


def test_frames_read_ahead_are_integrated_where_the_reader_put_them_and_kept_till_done(
    frames, tmp_path
):
    """A frame in a read-ahead slot is not copied: its process reads it in the reader's slot,
    which stays leased until the frame is integrated, a process killed under it included (a
    slot handed back early would hold a later frame by then)."""
    distinct = [frame * (1 + number // len(frames)) for number, frame in enumerate(frames * 3)]
    with h5py.File(tmp_path / "stack.h5", "w") as handle:
        handle["frames"] = np.stack(distinct)
    source = FileSource([tmp_path / "stack.h5"], "read-ahead", hdf5_dataset="/frames")
    done = []
    with ReadAhead(source, depth=2 * 2 + 2) as reader, IntegratorPool(SECTOR, QGrid(), 2) as pool:
        pool.wait_ready(timeout_s=60)
        stopped = pool.pids[0]
        _stop(stopped)  # it holds its 2 frames, in the reader's slots, until killed
        for exposure in reader.exposures():
            while not pool.has_room:
                done.extend(pool.wait_any(0.1))
            pool.submit(exposure.index, exposure.frame)
            if exposure.index == len(distinct) - 3:
                os.kill(stopped, signal.SIGKILL)
        done.extend(pool.wait_all(timeout_s=60))
        assert pool.restarts == 1 and pool.copied_bytes == 0
    own = LineOutIntegrator(SECTOR, QGrid())
    assert sorted(result.key for result in done) == list(range(len(distinct)))
    for result in done:
        assert result.line_out is not None, result.error
        expected = own.integrate(distinct[result.key], 1.0)
        np.testing.assert_array_equal(result.line_out.counts, expected.counts)


def test_frames_kept_after_their_reader_is_dropped_are_still_integrated_where_they_lie(
    frames, tmp_path
):
    """A consumer may drop the reader and keep its frames: their slot files stay until the
    last frame is gone, so an integrator process can still read them there."""
    with h5py.File(tmp_path / "stack.h5", "w") as handle:
        handle["frames"] = np.stack(frames)
    source = FileSource([tmp_path / "stack.h5"], "kept", hdf5_dataset="/frames")
    kept = [exposure.frame for exposure in ReadAhead(source, depth=len(frames) + 1).exposures()]
    gc.collect()  # (the reader is gone)
    with IntegratorPool(SECTOR, QGrid(), 2, slots=len(frames)) as pool:
        pool.wait_ready(timeout_s=60)
        done = _integrate_all(pool, kept)
        assert pool.copied_bytes == 0
    own = LineOutIntegrator(SECTOR, QGrid())
    for key, frame in enumerate(frames):
        line_out = done[key].line_out
        assert line_out is not None, done[key].error
        np.testing.assert_array_equal(line_out.counts, own.integrate(frame, 2.0).counts)


def test_an_idle_integrator_killed_is_replaced(frames):
    with IntegratorPool(SECTOR, QGrid(), processes=2) as pool:
        pool.wait_ready(timeout_s=60)
        killed = pool.pids[1]
        os.kill(killed, signal.SIGKILL)
        while pool.restarts == 0:
            pool.wait_any(0.1)
        pool.wait_ready(timeout_s=60)
        assert killed not in pool.pids
        assert len(_integrate_all(pool, frames)) == len(frames)


def test_a_frame_its_integrator_dies_under_twice_fails_and_the_next_goes_on(frames):
    with IntegratorPool(SECTOR, QGrid(), processes=1, slots=2) as pool:
        pool.wait_ready(timeout_s=60)
        for attempt in range(MAX_TRIES):
            pid = pool.pids[0]
            _stop(pid)  # (a replacement is still starting: stopped before it integrates)
            if attempt == 0:
                pool.submit(0, frames[0])
                pool.submit(1, frames[1])
            os.kill(pid, signal.SIGKILL)
            done = []
            while pool.restarts == attempt:
                done.extend(pool.collect())
        done.extend(pool.wait_all(timeout_s=60))
        assert pool.restarts == MAX_TRIES
    by_key = {result.key: result for result in done}
    assert sorted(by_key) == [0, 1]
    assert by_key[0].line_out is None and "died under this frame 2 times" in by_key[0].error
    assert by_key[1].line_out is not None


def test_an_integrator_that_cannot_build_its_engine_ends_the_pool_saying_why(tmp_path):
    poni = tmp_path / "broken.poni"
    poni.write_text("Distance: 5\nPoni1: 0.1\nPoni2: 0.1\nWavelength: -1e-10\nDetector: Eiger4M\n")
    pool = IntegratorPool(IntegrationConfig(poni=poni), QGrid(), processes=1)
    with pool, pytest.raises(IntegratorError, match="wavelength"):
        pool.wait_ready(timeout_s=60)


def test_a_scan_through_integrator_processes_stores_what_the_feeder_s_engine_does(tmp_path):
    exposures = list(
        SimulatedDetector(PipelineConfig(scan_id="x").integration, seed=5).scan("x", 12).exposures()
    )
    exposures[3].frame = exposures[3].frame[:10]
    exposures[7].frame, exposures[7].error = None, "truncated file"
    stored = {}
    for integrators in (1, 2):
        config = PipelineConfig(
            scan_id=f"integrators-{integrators}",
            n_workers=1,
            n_integrators=integrators,
            output_dir=tmp_path,
        )
        with Feeder(config) as feeder:
            pool = feeder.integration.pool
            assert (pool is not None) == (integrators == 2)
            if pool is not None:
                _stop(stopped := pool.pids[0])  # killed below with frames in its slots
            for exposure in exposures[:6]:
                feeder.submit(exposure)
            if pool is not None:
                os.kill(stopped, signal.SIGKILL)
            for exposure in exposures[6:]:
                feeder.submit(exposure)
            summary = feeder.wait()
        assert pool is None or pool.restarts == 1
        assert summary.written_ok == 10 and set(summary.failures) == {3, 7}
        assert summary.stages["integrated"]["count"] == 10
        stored[integrators] = open_results(config.output_path)
    one, two = stored[1], stored[2]
    assert two.index.tolist() == list(range(12))  # every exposure once
    np.testing.assert_array_equal(one.counts, two.counts)
    assert one.error.tolist() == two.error.tolist()


def test_a_scan_of_files_read_ahead_copies_no_frame_into_its_integrators(tmp_path):
    """Archived frames read ahead go to the integrator processes where the reader put them,
    even reading only one frame ahead (the reader gets a slot for each frame the processes
    hold), and the file holds what the feeder's own engine stores."""
    integration = PipelineConfig(scan_id="x").integration
    frames = [e.frame for e in SimulatedDetector(integration, seed=6).scan("x", 8).exposures()]
    with h5py.File(tmp_path / "stack.h5", "w") as handle:
        handle["frames"] = np.stack(frames)
    stored = {}
    for integrators, read_ahead in ((1, 0), (2, 1)):
        spec = ArchivedFiles(
            paths=[str(tmp_path / "stack.h5")], hdf5_dataset="/frames", read_ahead=read_ahead
        )
        config = PipelineConfig(
            scan_id=f"files-{integrators}",
            source=spec,
            n_workers=1,
            n_integrators=integrators,
            output_dir=tmp_path,
        )
        with opened(config) as scan, Feeder(scan.config) as feeder:
            for exposure in scan.source.exposures():
                feeder.submit(exposure)
            summary = feeder.wait()
            pool = feeder.integration.pool
            assert (pool is not None) == (integrators == 2)
            assert pool is None or pool.copied_bytes == 0
            assert scan.config.integration.openmp_threads is None  # (the pool's: 1 each)
        assert summary.written_ok == len(frames)
        stored[integrators] = open_results(config.output_path)
    np.testing.assert_array_equal(stored[1].counts, stored[2].counts)


def test_a_scan_whose_integrators_all_hang_stops_saying_so(tmp_path):
    config = PipelineConfig(
        scan_id="hung",
        n_workers=1,
        n_integrators=2,
        output_dir=tmp_path,
        transport=TransportConfig(result_timeout_s=3.0),
    )
    exposures = SimulatedDetector(config.integration, seed=5).scan("hung", 5).exposures()
    with Feeder(config) as feeder:
        pool = feeder.integration.pool
        assert pool is not None
        pool.wait_ready(timeout_s=60)
        for pid in pool.pids:
            _stop(pid)
        with pytest.raises(ScanError, match="no integrator process finished a frame in 3"):
            for exposure in exposures:  # 2 slots each: the fifth finds none
                feeder.submit(exposure)
        for pid in pool.pids:
            os.kill(pid, signal.SIGCONT)
