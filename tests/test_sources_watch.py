"""The directory watcher: files written slowly, in halves, appended HDF5, stop conditions."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import h5py
import hdf5plugin
import numpy as np
import pytest
from fabio.cbfimage import CbfImage
from fabio.edfimage import EdfImage

from pipeline.sources.hdf5 import chunk_written
from pipeline.sources.watch import DirectoryWatcher

POLL_S = 0.03


def edf_bytes(tmp_path: Path, value: int) -> bytes:
    scratch = tmp_path.parent / f"scratch_{tmp_path.name}_{value}.edf"
    EdfImage(data=np.full((16, 20), value, np.uint16)).write(str(scratch))
    return scratch.read_bytes()


def cbf_bytes(tmp_path: Path, value: int) -> bytes:
    scratch = tmp_path.parent / f"scratch_{tmp_path.name}_{value}.cbf"
    CbfImage(data=np.full((16, 20), value, np.int32)).write(str(scratch))
    return scratch.read_bytes()


class Writer(threading.Thread):
    """Runs ``steps`` (callables, or pauses in seconds) in order, in a thread."""

    def __init__(self, steps: list[Callable[[], None] | float]) -> None:
        super().__init__(daemon=True)
        self.steps = steps
        self.finished_at: float | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for step in self.steps:
                if callable(step):
                    step()
                else:
                    time.sleep(step)
        except BaseException as error:  # reported by the test
            self.error = error
        self.finished_at = time.monotonic()


def write(path: Path, data: bytes, mode: str = "wb") -> Callable[[], None]:
    def step() -> None:
        with open(path, mode) as handle:
            handle.write(data)

    return step


def collect(watcher: DirectoryWatcher) -> list:
    return [(time.monotonic(), exposure) for exposure in watcher.exposures()]


def test_files_written_slowly_and_in_halves_are_taken_once_complete_in_natural_order(tmp_path):
    frames = {n: edf_bytes(tmp_path, n) for n in (1, 2, 9, 10)}
    half_cbf = cbf_bytes(tmp_path, 3)
    cut = len(half_cbf) // 2
    writer = Writer(
        [
            write(tmp_path / "scan_1.edf", frames[1]),
            0.15,
            write(tmp_path / "scan_2.edf", frames[2]),
            0.1,
            write(tmp_path / "scan_3.cbf", half_cbf[:cut]),  # written in two halves
            0.4,
            write(tmp_path / "scan_3.cbf", half_cbf[cut:], "ab"),
            0.1,
            write(tmp_path / "scan_10.edf", frames[10]),  # 10 first, 9 right after
            write(tmp_path / "scan_9.edf", frames[9]),
            0.1,
            write(tmp_path / "notes.txt", b"not an image"),
        ]
    )
    watcher = DirectoryWatcher(
        tmp_path, "live", "scan_*", poll_interval_s=POLL_S, idle_timeout_s=0.5, settle_timeout_s=5
    )

    writer.start()
    exposures = [e for _, e in collect(watcher)]
    writer.join()

    assert writer.error is None
    assert [e.error for e in exposures] == [None] * 5
    assert [int(e.frame[0, 0]) for e in exposures] == [1, 2, 3, 9, 10]
    assert [e.index for e in exposures] == [0, 1, 2, 3, 4]
    assert len({e.metadata["source"] for e in exposures}) == 5
    assert watcher.statistics.summary() == "5 frames (5 read, 0 failed)"
    assert watcher.stop_reason == "idle" and watcher.ended_cleanly


@pytest.mark.parametrize("decode_frames", [True, False])
def test_appended_hdf5_frames_are_taken_while_the_file_grows(tmp_path, decode_frames):
    """Decoded, or (``decode_frames=False``: for integrator processes) as their chunks'
    compressed bytes, checked whole."""
    path = tmp_path / "run_data_000001.h5"
    frames = np.random.default_rng(0).integers(0, 5000, (6, 8, 12)).astype(np.uint16)

    def create() -> None:
        with h5py.File(path, "w", locking=False) as handle:
            handle.create_dataset(
                "entry/data/data",
                shape=(0, 8, 12),
                maxshape=(None, 8, 12),
                chunks=(1, 8, 12),
                dtype=np.uint16,
                **hdf5plugin.Bitshuffle(cname="lz4"),
            )

    def append(k: int) -> Callable[[], None]:
        def step() -> None:
            for _ in range(100):  # the watcher may have the file open for a moment
                try:
                    with h5py.File(path, "a", locking=False) as handle:
                        dataset = handle["entry/data/data"]
                        dataset.resize(k + 1, axis=0)
                        dataset[k] = frames[k]
                    return
                except OSError:
                    time.sleep(0.005)
            raise RuntimeError("could not open the file for appending")

        return step

    with h5py.File(tmp_path / "run_master.h5", "w") as master:  # skipped, data files are read
        master["entry/data/data_000001"] = h5py.ExternalLink(path.name, "/entry/data/data")
        master["entry/instrument/detector/count_time"] = 0.5
    steps: list = [create]
    for k in range(6):
        steps += [append(k), 0.15]
    writer = Writer(steps)
    watcher = DirectoryWatcher(
        tmp_path,
        "live",
        "*.h5",
        poll_interval_s=POLL_S,
        idle_timeout_s=0.6,
        settle_timeout_s=5,
        decode_frames=decode_frames,
    )

    writer.start()
    timed = collect(watcher)
    writer.join()

    assert writer.error is None
    exposures = [e for _, e in timed]
    assert [e.error for e in exposures] == [None] * 6
    for k, exposure in enumerate(exposures):
        assert (exposure.encoded is None) == decode_frames
        np.testing.assert_array_equal(exposure.image(), frames[k])
        assert exposure.metadata["source"] == f"{path}:/entry/data/data frame {k}"
        assert exposure.metadata["count_time_s"] == "0.5"  # from the master
    assert timed[0][0] < writer.finished_at  # the first frame came before the last was written
    assert [p.name for p in watcher.skipped_files] == ["run_master.h5"]


def test_a_file_that_stays_broken_becomes_an_error_and_later_files_still_come(
    tmp_path, reliability
):
    (tmp_path / "f_1.edf").write_bytes(np.random.default_rng(1).bytes(3000))
    (tmp_path / "f_2.edf").write_bytes(edf_bytes(tmp_path, 2))
    watcher = DirectoryWatcher(
        tmp_path, "s", "f_*.edf", poll_interval_s=POLL_S, idle_timeout_s=0.5, settle_timeout_s=0.2
    )

    exposures = list(watcher.exposures())

    assert [e.frame is None for e in exposures] == [True, False]
    assert exposures[0].error.startswith("corrupt or truncated EDF file")
    assert watcher.statistics.summary() == "2 frames (1 read, 1 failed)"
    reliability.record(
        "bad input",
        "a watched file of garbage that never becomes a readable EDF",
        tried=1,
        detail=f"after the {watcher.settle_timeout_s:g} s settle timeout a failed exposure "
        "('corrupt or truncated EDF file'); the 1 later file still read",
    )


def test_hdf5_frames_of_a_nexus_detector_or_another_dataset_are_found(tmp_path):
    """Without ``hdf5_dataset`` the data of a file's one NeXus detector; with it, frames at
    any path, one exposure per frame; a file with neither says which option to give."""
    import h5py

    stack = np.arange(2 * 4 * 6, dtype=np.uint16).reshape(2, 4, 6)
    with h5py.File(tmp_path / "a_nexus.nxs", "w") as handle:
        for group, nx_class in (("entry", "NXentry"), ("entry/instrument", "NXinstrument")):
            handle.require_group(group).attrs["NX_class"] = nx_class
        handle.require_group("entry/instrument/pilatus").attrs["NX_class"] = "NXdetector"
        handle["entry/instrument/pilatus/data"] = stack
    with h5py.File(tmp_path / "b_other.h5", "w") as handle:
        handle["measurement/pilatus"] = stack + 1

    def watch(dataset: str | None) -> list:
        watcher = DirectoryWatcher(
            tmp_path, "s", poll_interval_s=POLL_S, idle_timeout_s=0.3, hdf5_dataset=dataset
        )
        return list(watcher.exposures())

    found = watch(None)
    assert [e.error is None for e in found] == [True, True, False]
    assert (found[1].frame == stack[1]).all()
    assert "give --hdf5-dataset" in found[2].error and "b_other.h5" in found[2].error
    named = [e for e in watch("/measurement/pilatus") if e.error is None]
    assert len(named) == 2 and (named[1].frame == stack[1] + 1).all()


def test_an_incomplete_file_at_the_end_is_reported_when_watching_stops(tmp_path):
    whole = cbf_bytes(tmp_path, 5)
    (tmp_path / "g_1.cbf").write_bytes(whole)
    (tmp_path / "g_2.cbf").write_bytes(whole[: len(whole) // 2])
    watcher = DirectoryWatcher(
        tmp_path, "s", "*.cbf", poll_interval_s=POLL_S, idle_timeout_s=0.3, settle_timeout_s=30
    )

    exposures = list(watcher.exposures())

    assert [e.error is None for e in exposures] == [True, False]
    assert exposures[1].error.startswith("truncated file")
    assert watcher.stop_reason == "idle"


@pytest.mark.parametrize("kind", ["max_frames", "event", "callable"])
def test_stop_conditions(tmp_path, kind):
    for n in range(1, 5):
        (tmp_path / f"h_{n}.edf").write_bytes(edf_bytes(tmp_path, n))
    late = Writer([1.5, write(tmp_path / "h_5.edf", edf_bytes(tmp_path, 5))])
    event = threading.Event()
    seen: list = []
    stop = {"max_frames": None, "event": event, "callable": lambda: len(seen) >= 1}[kind]
    watcher = DirectoryWatcher(
        tmp_path,
        "s",
        "*.edf",
        poll_interval_s=POLL_S,
        idle_timeout_s=3.0,
        max_frames=2 if kind == "max_frames" else None,
        stop_when=stop,
    )

    started = time.monotonic()
    late.start()
    for exposure in watcher.exposures():
        seen.append(exposure)
        event.set()
    elapsed = time.monotonic() - started
    late.join()

    # Stopping ends the watching at the next poll; what is there by then is still yielded.
    assert elapsed < 1.2  # before h_5.edf appears
    expected = {"max_frames": [1, 2], "event": [1, 2, 3, 4], "callable": [1, 2, 3, 4]}[kind]
    assert [int(e.frame[0, 0]) for e in seen] == expected
    assert watcher.stop_reason == ("max_frames" if kind == "max_frames" else "stop")


def test_without_an_idle_timeout_watching_goes_on_until_stopped(tmp_path):
    (tmp_path / "h_1.edf").write_bytes(edf_bytes(tmp_path, 1))
    watcher = DirectoryWatcher(tmp_path, "s", "*.edf", poll_interval_s=POLL_S, idle_timeout_s=None)
    stopper = threading.Timer(0.6, watcher.stop)

    started = time.monotonic()
    stopper.start()
    exposures = list(watcher.exposures())
    elapsed = time.monotonic() - started

    assert [int(e.frame[0, 0]) for e in exposures] == [1]
    assert 0.6 <= elapsed < 5  # not ended before the stop, nor long after it
    assert watcher.stop_reason == "stop" and not watcher.ended_cleanly


SWMR_WRITER = """
import sys, time
import h5py, hdf5plugin, numpy as np
path, n_frames = sys.argv[1], int(sys.argv[2])
with h5py.File(path, "w", libver="latest") as handle:
    dataset = handle.create_dataset(
        "entry/data/data", shape=(0, 8, 12), maxshape=(None, 8, 12), chunks=(1, 8, 12),
        dtype=np.uint16, **hdf5plugin.Bitshuffle(cname="lz4"))
    handle.swmr_mode = True
    for k in range(n_frames):
        dataset.resize(k + 1, axis=0)
        dataset[k] = np.full((8, 12), k + 1, np.uint16)
        dataset.flush()
        time.sleep(0.2)
"""


def test_frames_of_a_swmr_writer_in_another_process_are_taken_while_it_writes(tmp_path):
    path = tmp_path / "swmr_data_000001.h5"
    writer = subprocess.Popen([sys.executable, "-c", SWMR_WRITER, str(path), "5"])
    watcher = DirectoryWatcher(
        tmp_path, "live", "*.h5", poll_interval_s=POLL_S, idle_timeout_s=20, max_frames=5
    )
    try:
        running = []
        exposures = []
        for exposure in watcher.exposures():
            running.append(writer.poll() is None)
            exposures.append(exposure)
    finally:
        writer.wait(timeout=20)

    assert writer.returncode == 0
    assert [e.error for e in exposures] == [None] * 5
    assert [int(e.frame[0, 0]) for e in exposures] == [1, 2, 3, 4, 5]
    assert running[:2] == [True, True]  # taken while the writer still had the file open
    assert watcher.stop_reason == "max_frames"


def test_hdf5_frames_whose_chunks_are_not_written_are_not_taken(tmp_path):
    path = tmp_path / "pre_data_000001.h5"
    with h5py.File(path, "w") as handle:  # room for 3 frames, only the first one written
        dataset = handle.create_dataset(
            "entry/data/data",
            shape=(3, 8, 12),
            chunks=(1, 8, 12),
            dtype=np.uint16,
            **hdf5plugin.LZ4(),
        )
        dataset[0] = 7
        assert chunk_written(dataset, 0) and not chunk_written(dataset, 1)
    watcher = DirectoryWatcher(
        tmp_path, "s", "*.h5", poll_interval_s=POLL_S, idle_timeout_s=0.3, settle_timeout_s=30
    )

    exposures = list(watcher.exposures())

    assert len(exposures) == 3 and int(exposures[0].frame[0, 0]) == 7
    assert [e.frame is None for e in exposures] == [False, True, True]
    assert exposures[2].error == (
        "incomplete file: frame 2 of /entry/data/data was not written when watching stopped"
    )


def test_a_compressed_chunk_that_is_not_whole_is_held_back_then_fails(tmp_path):
    """Left compressed, a frame's chunk must still be whole (its blocks add up) to be taken:
    one cut short waits while the file may be written, then fails alone, in the words of a
    chunk that does not decode."""
    frames = np.random.default_rng(1).integers(0, 5000, (3, 64, 64)).astype(np.uint32)
    path = tmp_path / "cut_data_000001.h5"
    with h5py.File(path, "w") as handle:
        dataset = handle.create_dataset(
            "entry/data/data",
            shape=(3, 64, 64),
            chunks=(1, 64, 64),
            dtype=np.uint32,
            **hdf5plugin.Bitshuffle(cname="lz4"),
        )
        dataset[0] = frames[0]
        dataset[2] = frames[2]
        whole = dataset.id.read_direct_chunk((0, 0, 0))[1]
        dataset.id.write_direct_chunk((1, 0, 0), whole[:-100])  # frame 1 cut short
    watcher = DirectoryWatcher(
        tmp_path,
        "s",
        "*.h5",
        poll_interval_s=POLL_S,
        idle_timeout_s=2.0,
        settle_timeout_s=0.5,
        decode_frames=False,
    )

    timed = collect(watcher)

    exposures = [exposure for _, exposure in timed]
    assert [e.error is None for e in exposures] == [True, False, True]
    assert timed[1][0] - timed[0][0] >= 0.5  # held back until settled
    np.testing.assert_array_equal(exposures[0].image(), frames[0])
    np.testing.assert_array_equal(exposures[2].image(), frames[2])
    assert exposures[1].encoded is None and exposures[1].frame is None
    assert exposures[1].error.startswith(
        "unreadable chunk: frame 1 of /entry/data/data could not be read or decompressed "
        "(bitshuffle-LZ4 data"
    )


def test_frames_appended_to_a_multi_frame_edf_later_come_once_each(tmp_path):
    scratch = tmp_path.parent / f"scratch_{tmp_path.name}_multi.edf"
    edf = EdfImage(data=np.full((16, 20), 1, np.uint16))
    edf.append_frame(data=np.full((16, 20), 2, np.uint16))
    edf.write(str(scratch))
    both = scratch.read_bytes()
    first = both[: len(both) // 2]  # the two frames have equal blocks
    writer = Writer(
        [
            write(tmp_path / "multi.edf", first),
            0.3,
            write(tmp_path / "multi.edf", both[len(first) :], "ab"),
            0.1,
            write(tmp_path / "next.edf", edf_bytes(tmp_path, 3)),
        ]
    )
    watcher = DirectoryWatcher(
        tmp_path, "s", "*.edf", poll_interval_s=POLL_S, idle_timeout_s=0.4, settle_timeout_s=5
    )

    writer.start()
    exposures = list(watcher.exposures())
    writer.join()

    assert [e.error for e in exposures] == [None] * 3
    assert [int(e.frame[0, 0]) for e in exposures] == [1, 2, 3]
    assert [e.metadata["source"] for e in exposures] == [
        str(tmp_path / "multi.edf"),
        str(tmp_path / "multi.edf frame 1"),
        str(tmp_path / "next.edf"),
    ]
