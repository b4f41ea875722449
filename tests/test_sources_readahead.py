"""Reading ahead in a separate process: same exposures, same order, failures passed on."""

from __future__ import annotations

import glob
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import h5py
import hdf5plugin
import numpy as np
import pytest
from fabio.edfimage import EdfImage

from pipeline.exposure import Exposure
from pipeline.sources import FileSource
from pipeline.sources.readahead import ReadAhead, ReaderError, _shared_memory_folder


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
    assert (source.frames_read, source.frames_failed) == (5, 1)


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


def slot_folders() -> set[str]:
    return set(
        glob.glob(
            os.path.join(_shared_memory_folder() or tempfile.gettempdir(), "beamline-inn-frames-*")
        )
    )


def test_stopping_early_stops_the_reader_and_removes_the_slots(tmp_path):
    write_frames(tmp_path, [(30, 40)] * 6)
    before = slot_folders()
    iterator = ReadAhead(FileSource(tmp_path, "scan"), depth=2).exposures()
    first = next(iterator)
    assert len(slot_folders() - before) == 1
    iterator.close()
    assert first.index == 0 and first.frame.shape == (30, 40)
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
