"""Reading ahead in a separate process: same exposures, same order, failures passed on."""

from __future__ import annotations

import glob
import itertools
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import h5py
import hdf5plugin
import numpy as np
import pytest
from conftest import SMALL_DETECTOR_PONI
from fabio.edfimage import EdfImage
from fabio.tifimage import TifImage

from pipeline.config import IntegrationConfig
from pipeline.exposure import Exposure
from pipeline.integration import LineOutIntegrator
from pipeline.physics import QGrid
from pipeline.scratch import shared_memory_folder
from pipeline.sources import FileSource
from pipeline.sources.readahead import ReadAhead, ReaderError


def write_frames(folder: Path, shapes: list[tuple[int, int]]) -> list[np.ndarray]:
    frames = []
    for n, shape in enumerate(shapes):
        frame = np.random.default_rng(n).integers(0, 60_000, shape).astype(np.uint16)
        EdfImage(data=frame, header={"count_time": "0.5"}).write(str(folder / f"f_{n}.edf"))
        frames.append(frame)
    return frames


class FailingSource:
    """The exposures of ``inner``, then a failure after ``after`` of them: an exception, or
    (``exit_code``) the process ending without a word."""

    def __init__(self, inner: FileSource, after: int, exit_code: int | None = None) -> None:
        self.inner, self.after, self.exit_code = inner, after, exit_code

    def exposures(self) -> Iterator[Exposure]:
        for n, exposure in enumerate(self.inner.exposures()):
            if n == self.after:
                if self.exit_code is not None:
                    os._exit(self.exit_code)
                raise OSError("disk went away")
            yield exposure


def test_frames_arrive_in_order_as_read_directly_failures_included(tmp_path):
    # a larger frame than the ones before needs a new slot file; a bad file stays an exposure
    frames = write_frames(tmp_path, [(30, 40), (30, 40), (64, 80), (30, 40), (30, 40)])
    (tmp_path / "f_2b.edf").write_bytes(b"not an image at all")
    direct = list(FileSource(tmp_path, "scan").exposures())
    source = ReadAhead(FileSource(tmp_path, "scan"), depth=2)
    ahead = list(source.exposures())
    assert [e.index for e in ahead] == [e.index for e in direct] == list(range(6))
    for a, d in zip(ahead, direct, strict=True):
        assert (a.error, a.metadata, a.timestamp) == (d.error, d.metadata, d.timestamp)
        if d.frame is None:
            assert a.frame is None
        else:
            assert a.frame.dtype == d.frame.dtype
            np.testing.assert_array_equal(a.frame, d.frame)
    assert [int(e.frame.sum()) for e in ahead if e.frame is not None] == [
        int(f.sum()) for f in frames
    ]
    assert ahead[3].metadata["source"].endswith("f_2b.edf") and "corrupt" in ahead[3].error
    assert source.statistics.summary() == "6 frames (5 read, 1 failed)"


def test_a_streaming_consumer_reads_frames_in_place_and_a_hoarding_one_gets_copies(tmp_path):
    frames = write_frames(tmp_path, [(30, 40)] * 8)
    in_place = 0
    for exposure, expected in zip(
        ReadAhead(FileSource(tmp_path, "scan"), depth=3).exposures(), frames, strict=True
    ):
        np.testing.assert_array_equal(exposure.frame, expected)
        in_place += not exposure.frame.flags.writeable  # a view of the slot, not a copy
    assert in_place == len(frames)  # each frame dropped before the next: no copy needed
    kept = list(ReadAhead(FileSource(tmp_path, "scan"), depth=3).exposures())
    assert sum(not e.frame.flags.writeable for e in kept) == 2  # depth - 1 views, then copies
    np.testing.assert_array_equal(np.stack([e.frame for e in kept]), np.stack(frames))


def test_a_slow_consumer_gets_every_frame_after_the_reader_has_finished(tmp_path):
    frames = write_frames(tmp_path, [(30, 40)] * 4)
    delivered = []
    for exposure in ReadAhead(FileSource(tmp_path, "scan"), depth=2).exposures():
        time.sleep(0.5)  # the reader sends its last frame and exits meanwhile
        delivered.append(exposure.frame)
    np.testing.assert_array_equal(np.stack(delivered), np.stack(frames))


def test_eiger_frames_through_the_reader(tmp_path):
    stack = np.random.default_rng(1).integers(0, 5, (7, 48, 64)).astype(np.uint32)
    with h5py.File(tmp_path / "scan_data_000001.h5", "w") as file:
        file.create_dataset(
            "entry/data/data", data=stack, chunks=(1, 48, 64), **hdf5plugin.Bitshuffle()
        )
    exposures = list(ReadAhead(FileSource(tmp_path, "scan"), depth=3).exposures())
    np.testing.assert_array_equal(np.stack([e.frame for e in exposures]), stack)


SLOT_FOLDER = shared_memory_folder() or tempfile.gettempdir()


def slot_folders(pid: int | None = None) -> set[str]:
    """The slot folders of process ``pid`` (this one by default), where other runs' do not
    come and go."""
    pid = os.getpid() if pid is None else pid
    return set(glob.glob(os.path.join(SLOT_FOLDER, f"beamline-inn-frames-{pid}-*")))


def test_stopping_early_stops_the_reader_and_removes_the_slots(tmp_path):
    write_frames(tmp_path, [(30, 40)] * 6)
    before = slot_folders()
    iterator = ReadAhead(FileSource(tmp_path, "scan"), depth=2).exposures()
    first = next(iterator)
    assert len(slot_folders() - before) == 1
    iterator.close()
    assert first.index == 0 and first.frame.shape == (30, 40)
    assert len(slot_folders() - before) == 1  # (the frame kept still looks into its slot)
    del first
    assert slot_folders() == before


def test_a_reader_started_early_is_stopped_by_its_with_block_even_unused(tmp_path):
    frames = write_frames(tmp_path, [(30, 40)] * 3)
    before = slot_folders()
    with ReadAhead(FileSource(tmp_path, "scan")) as source:
        source.start()  # e.g. while the inference workers start
        exposures = list(source.exposures())
        with pytest.raises(RuntimeError, match="once"):
            next(source.exposures())
    np.testing.assert_array_equal(np.stack([e.frame for e in exposures]), np.stack(frames))
    assert len(slot_folders() - before) == 1  # (its frames, kept, still look into the slots)
    del exposures
    assert slot_folders() == before
    with ReadAhead(FileSource(tmp_path, "scan")) as unused:
        unused.start()
        assert len(slot_folders() - before) == 1
    assert slot_folders() == before


@pytest.mark.parametrize("exit_code", [None, 3])
def test_a_failing_reader_is_reported_after_the_frames_it_delivered(
    tmp_path, exit_code, reliability
):
    write_frames(tmp_path, [(30, 40)] * 5)
    source = ReadAhead(FailingSource(FileSource(tmp_path, "scan"), 3, exit_code), depth=2)
    delivered = []
    with pytest.raises(ReaderError) as error:
        delivered.extend(e.index for e in source.exposures())
    assert delivered == [0, 1, 2]
    expected = "disk went away" if exit_code is None else "exit code 3"
    assert expected in str(error.value)
    how = "an OSError" if exit_code is None else f"os._exit({exit_code})"
    reliability.record(
        "fault",
        f"the read-ahead reader process failing after 3 of 5 frames: {how}",
        tried=1,
        detail=f"the {len(delivered)} frames read before it delivered, then a ReaderError "
        f"naming the cause ({expected!r})",
    )


def test_depth_must_be_positive():
    with pytest.raises(ValueError, match="depth"):
        ReadAhead(FileSource([], "scan"), depth=0)


#: The numeric dtypes fabio writes and reads back as they are in EDF and TIFF files (TIFF
#: turns float64 into float32).
DTYPES = ("uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64")
DTYPES += ("float32", "float64")


def test_frames_of_every_dtype_integrate_alike_read_ahead_or_not(tmp_path):
    # frames read ahead are read-only views of shared memory, which pyFAI's engine refused
    # for float32 (the one dtype it takes without converting it)
    poni = tmp_path / "small.poni"
    poni.write_text(SMALL_DETECTOR_PONI)
    counts = np.random.default_rng(2).poisson(20.0, (48, 64))
    paths = []
    for number, (dtype, (image, suffix)) in enumerate(
        itertools.product(DTYPES, ((EdfImage, "edf"), (TifImage, "tif")))
    ):
        paths.append(tmp_path / f"f_{number}.{suffix}")
        image(data=counts.astype(dtype)).write(str(paths[-1]))
    integrator = LineOutIntegrator(IntegrationConfig(poni=poni, azimuth_range_deg=None), QGrid())
    expected = integrator.integrate(counts.astype(np.float64)).counts
    read = {"direct": FileSource(paths, "scan"), "ahead": ReadAhead(FileSource(paths, "scan"), 3)}
    for how, source in read.items():
        dtypes = []
        for exposure in source.exposures():
            assert exposure.error is None, exposure.error
            assert exposure.frame.flags.writeable == (how == "direct")
            dtypes.append(str(exposure.frame.dtype))
            line_out = integrator.integrate(exposure.frame)
            np.testing.assert_array_equal(line_out.counts, expected, err_msg=f"{how} {dtypes[-1]}")
        assert set(dtypes) == set(DTYPES) and len(dtypes) == len(paths)


def test_slot_folders_left_by_a_sigkill_are_removed_at_the_next_start(tmp_path):
    write_frames(tmp_path, [(30, 40)] * 3)
    killed = subprocess.Popen(
        [sys.executable, "-c", READ_AND_WAIT, str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, the reader included
    )
    assert killed.stdout is not None and killed.stdout.readline().strip() == "reading"
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    left = slot_folders(killed.pid)
    assert len(left) == 1  # nothing could remove it
    live = tempfile.mkdtemp(prefix=f"beamline-inn-frames-{os.getpid()}-", dir=SLOT_FOLDER)
    try:
        with ReadAhead(FileSource(tmp_path, "scan")) as source:
            source.start()
            assert not slot_folders(killed.pid)  # its owner is gone
            assert os.path.isdir(live)  # its owner, this process, runs
    finally:
        os.rmdir(live)


#: A consumer that has started reading ahead and holds a frame when it is killed.
READ_AND_WAIT = """
import sys, time
from pipeline.sources import FileSource, ReadAhead
if __name__ == "__main__":
    exposures = ReadAhead(FileSource(sys.argv[1], "scan"), depth=2).exposures()
    first = next(exposures)
    print("reading", flush=True)
    time.sleep(60)
"""
