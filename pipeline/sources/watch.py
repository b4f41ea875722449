"""Exposures from a directory that a detector is writing into, as its files become complete.

A :class:`DirectoryWatcher` polls a directory (portable, no extra dependency) for files that
match a glob pattern, and yields each frame once, when it is complete, in natural file order.

When a frame counts as complete:

- **Image files** (EDF, CBF, TIFF, ... through fabio): the file's size and modification time
  are the same at two polls in a row (``poll_interval_s`` apart) *and* the whole file reads
  without error (the checks of :func:`pipeline.sources.images.read_fabio_file`: no short EDF
  block, CBF size and checksum). Then its frames are yielded; when the file grows again later
  (frames appended to a multi-frame EDF), its new frames follow the same way.
- **HDF5 data files** (Eiger ``/entry/data/data``, appended frame by frame): frame *i* is taken
  when it lies within the dataset's current shape, its chunk is allocated in the file and
  decodes, and either a later chunk is allocated too (the writer has moved past it: detectors
  and SWMR writers write chunks in order) or the file has been unchanged since the previous
  poll. Frames are so taken while the file is still growing. With ``decode_frames=False`` (a
  scan whose integrator processes decode), a frame stored as one bitshuffle-LZ4 or LZ4 chunk
  (the Eiger layout) comes as the chunk's bytes (``Exposure.encoded``), and "decodes" is
  :meth:`~pipeline.sources.compression.EncodedFrame.check` instead: its headers and the sizes
  of all its blocks add up (about 1 ms for an Eiger 4M frame, against 9-23 ms to decode it);
  a chunk damaged inside a block then fails where it is decoded. A contiguous (unchunked) dataset
  has no such marks: its frames are taken once the file is unchanged. Files being written by a
  SWMR writer are opened in SWMR mode. Master files (links to data files,
  :func:`pipeline.sources.layout.data_file_links`) are not read, the data files are, as they
  grow (their frames would come twice otherwise: :mod:`pipeline.sources.layout`); masters are
  listed in :attr:`DirectoryWatcher.skipped_files`, and their detector description still
  reaches the frames' metadata through :func:`pipeline.sources.layout.master_file_for`.

A file that stays unreadable while unchanged for ``settle_timeout_s`` becomes an exposure with
``error`` set (truncated, corrupt, unknown format, ...) and is not looked at again. Files are
taken in natural order (``scan_2`` before ``scan_10``): a file that is not complete yet holds
back the files after it; a file that appears later but sorts earlier is yielded when complete.
Frames are counted per file and dataset, so none is yielded twice: a file rewritten with the
same number of frames gives nothing new. Files whose frames are all taken are only read again
when their size or modification time change, so a poll costs one ``stat`` per such file.

Watching stops after ``idle_timeout_s`` without a new file, a changed file or a new frame;
when ``max_frames`` exposures have been yielded (both end it cleanly:
:attr:`~DirectoryWatcher.ended_cleanly`); or when :meth:`~DirectoryWatcher.stop` is called or
``stop_when`` (a ``threading.Event`` or a function returning ``True``, asked before each poll)
says so. Except after ``max_frames``, a last look then yields what is complete and reports the
files that are still incomplete as failed exposures, so that nothing seen is lost.

Example:
    >>> import tempfile
    >>> import numpy as np
    >>> from fabio.edfimage import EdfImage
    >>> folder = Path(tempfile.mkdtemp())
    >>> EdfImage(data=np.zeros((4, 5), np.uint16)).write(str(folder / "frame_1.edf"))
    >>> watcher = DirectoryWatcher(
    ...     folder, "scan-4", "*.edf", poll_interval_s=0.01, idle_timeout_s=0.1
    ... )
    >>> [(e.index, e.metadata["source"].endswith("frame_1.edf")) for e in watcher.exposures()]
    [(0, True)]
    >>> watcher.stop_reason, watcher.ended_cleanly, watcher.statistics.summary()
    ('idle', True, '1 frame (1 read, 0 failed)')
    >>> import shutil; shutil.rmtree(folder)
"""

from __future__ import annotations

import dataclasses
import glob
import os
import threading
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import h5py

from pipeline.exposure import Exposure
from pipeline.sources.base import DetectorFrame, FrameCounts, failed_frame
from pipeline.sources.compression import FormatError
from pipeline.sources.eiger import hdf5_frame
from pipeline.sources.hdf5 import (
    chunk_packing,
    chunk_written,
    frame_count,
    frame_datasets,
    open_hdf5,
    read_detector_metadata,
    with_nexus_detector,
)
from pipeline.sources.images import read_fabio_file
from pipeline.sources.layout import data_file_links, master_file_for
from pipeline.sources.paths import PathLike, is_hdf5_file, natural_sort_key


@dataclass
class _WatchedFile:
    """What the watcher knows about one file."""

    path: Path
    signature: tuple[int, int] | None = None  # (size in bytes, mtime in ns) at the last poll
    stable: bool = False  # same signature at the last two polls
    failing_since: float | None = None  # monotonic time of the first failed read while stable
    done: bool = False  # finished: all its frames (or its error) yielded, or skipped
    next_frame: dict[str, int] = field(default_factory=dict)  # next frame per dataset ("" image)
    caught_up_at: tuple[int, int] | None = None  # signature when all its frames were taken
    metadata: dict[str, str] | None = None  # HDF5: detector metadata, read once


class DirectoryWatcher:
    """Watches a directory for detector files being written and yields their frames once each.

    Args:
        directory: the folder to watch (it may not exist yet).
        scan_id: the scan the exposures belong to.
        pattern: glob pattern of the files, relative to ``directory`` (``**`` recurses).
        poll_interval_s: seconds between two looks at the directory.
        idle_timeout_s: stop after this many seconds without a new file, a file change or a
            new frame; ``None`` watches until ``max_frames``, ``stop_when`` or :meth:`stop`
            (a live scan's source stopped on SIGTERM).
        max_frames: stop once this many exposures (read or failed) have been yielded.
        stop_when: a ``threading.Event`` (set it to stop) or a function returning ``True`` to
            stop; as :meth:`stop`, but owned by the caller.
        settle_timeout_s: how long a file may stay unchanged yet unreadable before it is
            reported as failed.
        first_index: the index of the first exposure.
        hdf5_dataset: the frames' dataset in HDF5 files, when neither ``/entry/data/data``
            (Eiger data files) nor the ``data`` of the file's one NeXus NXdetector.
        decode_frames: ``False``: HDF5 frames stored as one bitshuffle-LZ4 or LZ4 chunk each
            come still compressed (``Exposure.encoded``), for whoever integrates them to
            decode.

    Attributes:
        statistics: the exposures given so far, and how many failed.
        ended_cleanly: whether watching ended on ``idle_timeout_s`` or ``max_frames`` (not
            stopped), after the last look; ``False`` until then.
        skipped_files: HDF5 master files seen (their data files are read instead).
        stop_reason: why watching stopped (``"idle"``, ``"max_frames"``, ``"stop"``: by
            :meth:`stop` or ``stop_when``), or ``None`` while watching.
    """

    def __init__(
        self,
        directory: PathLike,
        scan_id: str,
        pattern: str = "*",
        poll_interval_s: float = 0.5,
        idle_timeout_s: float | None = 60.0,
        max_frames: int | None = None,
        stop_when: threading.Event | Callable[[], bool] | None = None,
        settle_timeout_s: float = 10.0,
        first_index: int = 0,
        hdf5_dataset: str | None = None,
        decode_frames: bool = True,
    ) -> None:
        if poll_interval_s <= 0:
            raise ValueError("poll_interval_s must be positive")
        self.directory = Path(directory)
        self.scan_id = scan_id
        self.pattern = pattern
        self.poll_interval_s = poll_interval_s
        self.idle_timeout_s = idle_timeout_s
        self.max_frames = max_frames
        self.stop_when = stop_when
        self.settle_timeout_s = settle_timeout_s
        self.first_index = first_index
        self.hdf5_dataset = hdf5_dataset
        self.decode_frames = decode_frames
        self.statistics = FrameCounts()
        self.ended_cleanly = False
        self.skipped_files: list[Path] = []
        self.stop_reason: str | None = None
        self._files: dict[str, _WatchedFile] = {}
        self._stop_requested = threading.Event()

    # -- the loop ---------------------------------------------------------------------------

    def exposures(self) -> Iterator[Exposure]:
        """Frames as they become complete, indices counting up from ``first_index``."""
        self.ended_cleanly = False
        index = self.first_index
        last_activity = time.monotonic()
        while True:
            if self._stopping():
                self.stop_reason = "stop"
                self._look()  # one poll interval after the previous look, as always
                break
            activity = self._look()
            for frame in self._ready_frames(final=False):
                activity = True
                yield self._count(frame).to_exposure(self.scan_id, index)
                index += 1
                if self.max_frames is not None and index - self.first_index >= self.max_frames:
                    self.stop_reason = "max_frames"
                    self.ended_cleanly = True
                    return
            now = time.monotonic()
            if activity:
                last_activity = now
            elif self.idle_timeout_s is not None and now - last_activity >= self.idle_timeout_s:
                self.stop_reason = "idle"
                break
            self._sleep()
        # The last look: whatever is complete now, and an error for whatever is not.
        for frame in self._ready_frames(final=True):
            yield self._count(frame).to_exposure(self.scan_id, index)
            index += 1
            if self.max_frames is not None and index - self.first_index >= self.max_frames:
                break
        self.ended_cleanly = self.stop_reason != "stop"

    def stop(self) -> None:
        """End watching at the next poll (from any thread or a signal handler): the frames
        complete by then still come, the files still incomplete as failed exposures."""
        self._stop_requested.set()

    def _count(self, frame: DetectorFrame) -> DetectorFrame:
        self.statistics.count(frame.error)
        return frame

    def _stopping(self) -> bool:
        """Whether :meth:`stop` was called or ``stop_when`` says so."""
        if self._stop_requested.is_set():
            return True
        if isinstance(self.stop_when, threading.Event):
            return self.stop_when.is_set()
        return self.stop_when is not None and bool(self.stop_when())

    def _sleep(self) -> None:
        """Wait ``poll_interval_s``; less when ``stop_when`` (an event) or else :meth:`stop`
        says to stop (with both, :meth:`stop` is seen at the next poll)."""
        if isinstance(self.stop_when, threading.Event):
            self.stop_when.wait(self.poll_interval_s)
        else:
            self._stop_requested.wait(self.poll_interval_s)

    def _look(self) -> bool:
        """Find new files and note which changed; ``True`` when anything is new or changed."""
        activity = False
        if self.directory.is_dir():
            names = glob.glob(self.pattern, root_dir=self.directory, recursive=True)
        else:
            names = []
        for name in names:
            path = self.directory / name
            key = os.path.normpath(str(path))
            if key not in self._files:
                if not path.is_file():
                    continue
                self._files[key] = _WatchedFile(path)
                activity = True
        for key, watched in list(self._files.items()):
            if watched.done:
                continue
            try:
                stat = watched.path.stat()
            except OSError:
                # Vanished (a temporary file renamed, or deleted): forget it when nothing was
                # taken from it yet, else it is finished.
                if any(watched.next_frame.values()):
                    watched.done = True
                else:
                    del self._files[key]
                activity = True
                continue
            signature = (stat.st_size, stat.st_mtime_ns)
            if signature != watched.signature:
                watched.signature = signature
                watched.stable = False
                watched.failing_since = None
                activity = True
            else:
                watched.stable = True
        return activity

    def _ready_frames(self, final: bool) -> Iterator[DetectorFrame]:
        """Complete frames of the files in natural order, up to the first file that is not
        complete; with ``final``, everything, incomplete files reported as failed."""
        for watched in sorted(self._files.values(), key=lambda w: natural_sort_key(w.path)):
            if watched.done:
                continue
            if watched.caught_up_at is not None and watched.caught_up_at == watched.signature:
                watched.done = final  # unchanged since all its frames were taken
                continue
            if is_hdf5_file(watched.path):
                complete = yield from self._hdf5_frames(watched, final)
            else:
                complete = yield from self._image_frames(watched, final)
            if not complete and not final:
                return

    # -- image files ------------------------------------------------------------------------

    def _image_frames(
        self, watched: _WatchedFile, final: bool
    ) -> Generator[DetectorFrame, None, bool]:
        """The frames of an image file not taken yet, once the file is complete; returns
        whether the file holds nothing back. A file that grows again later (frames appended to
        a multi-frame EDF) is read again for its new frames."""
        if not watched.stable and not final:
            return False
        frames = list(read_fabio_file(watched.path))
        new = frames[watched.next_frame.get("", 0) :]
        failed = any(frame.error is not None for frame in new)
        if failed and not final and not self._settled(watched):
            return False
        if failed and final and not watched.stable:
            for frame in new:
                if frame.error is not None:
                    frame.error += " (the file was still changing when watching stopped)"
        watched.next_frame[""] = len(frames)
        watched.caught_up_at = watched.signature
        watched.done = failed or final  # a file reported broken is not looked at again
        yield from new
        return True

    def _settled(self, watched: _WatchedFile) -> bool:
        """Whether a stable file has failed to read for ``settle_timeout_s``."""
        now = time.monotonic()
        if watched.failing_since is None:
            watched.failing_since = now
        return now - watched.failing_since >= self.settle_timeout_s

    # -- HDF5 files -------------------------------------------------------------------------

    def _hdf5_frames(
        self, watched: _WatchedFile, final: bool
    ) -> Generator[DetectorFrame, None, bool]:
        """The newly complete frames of an HDF5 file; returns whether the file holds nothing
        back (all frames written so far are taken and it is unchanged, or it is finished)."""
        path = watched.path
        try:
            handle = open_hdf5(path)
        except OSError as error:
            return (
                yield from self._hdf5_problem(watched, final, f"cannot open HDF5 file: {error}")
            )
        with handle:
            if self.hdf5_dataset is None and data_file_links(handle):
                watched.done = True  # a master file: its data files are read instead
                self.skipped_files.append(path)
                return True
            refs, problem = with_nexus_detector(handle, frame_datasets(handle, self.hdf5_dataset))
            frames: list[DetectorFrame] = []
            if problem is not None:
                problem += "; give --hdf5-dataset for the frames' dataset"
                caught_up = False
            else:
                caught_up, frames, problem = self._new_hdf5_frames(watched, handle, refs, final)
        # The file is closed before the frames go out, so that a writer in this process can
        # open it meanwhile.
        if problem is not None:
            yield from frames
            return (yield from self._hdf5_problem(watched, final, problem))
        yield from frames
        if final:
            watched.done = True
        if caught_up and watched.stable:
            watched.caught_up_at = watched.signature
        return caught_up and watched.stable

    def _detector_metadata(self, watched: _WatchedFile, handle: h5py.File) -> dict[str, str]:
        """The detector description of an HDF5 file or of its master, read once."""
        if not watched.metadata:
            watched.metadata = read_detector_metadata(handle)
            master = master_file_for(watched.path)
            if not watched.metadata and master is not None:
                try:
                    with open_hdf5(master) as master_handle:
                        watched.metadata = read_detector_metadata(master_handle)
                except OSError:
                    watched.metadata = {}
        return watched.metadata

    def _new_hdf5_frames(
        self, watched: _WatchedFile, handle: h5py.File, refs: list[str], final: bool
    ) -> tuple[bool, list[DetectorFrame], str | None]:
        """The complete frames of an open HDF5 file not taken yet: whether all written frames
        are taken, the frames, and why the file cannot be read (or ``None``)."""
        path = watched.path
        frames: list[DetectorFrame] = []
        caught_up = True
        for ref in refs:
            try:
                dataset = handle[ref]
                n_frames = frame_count(dataset)
            except (KeyError, OSError, ValueError) as error:
                return False, frames, f"unreadable dataset {ref} in {path.name}: {error}"
            number = watched.next_frame.get(ref, 0)
            chunk_frames = dataset.chunks[0] if dataset.chunks and dataset.ndim == 3 else 1
            packing = None if self.decode_frames else chunk_packing(dataset)
            while number < n_frames:
                written = chunk_written(dataset, number)
                next_chunk = (number // chunk_frames + 1) * chunk_frames
                later = dataset.chunks is not None and chunk_written(dataset, next_chunk)
                if not final and not (written and (later or watched.stable)):
                    caught_up = False
                    break
                frame = _checked(
                    hdf5_frame(
                        path,
                        ref,
                        dataset,
                        number,
                        self._detector_metadata(watched, handle),
                        packing=packing,
                    )
                )
                if not written:
                    frame = DetectorFrame(
                        data=None,
                        timestamp=frame.timestamp,
                        metadata=frame.metadata,
                        error=(
                            f"incomplete file: frame {number} of {ref} was not written "
                            "when watching stopped"
                        ),
                    )
                elif (
                    frame.error is not None
                    and not final
                    and not (watched.stable and self._settled(watched))
                ):
                    caught_up = False  # maybe still being written: try again
                    break
                if frame.error is None:
                    watched.failing_since = None
                watched.next_frame[ref] = number = number + 1
                frames.append(frame)
        return caught_up, frames, None

    def _hdf5_problem(
        self, watched: _WatchedFile, final: bool, message: str
    ) -> Generator[DetectorFrame, None, bool]:
        """A whole HDF5 file that cannot be read (yet): wait while it may still be written,
        else report it; returns whether the file is finished."""
        if not final and not (watched.stable and self._settled(watched)):
            return False
        watched.done = True
        if any(watched.next_frame.values()):
            message += f" (after {sum(watched.next_frame.values())} frames were read)"
        yield failed_frame(str(watched.path), message)
        return True


def _checked(frame: DetectorFrame) -> DetectorFrame:
    """``frame``, failed where it comes as compressed bytes that are not whole (a chunk
    still being written: :meth:`~pipeline.sources.compression.EncodedFrame.check`), in the
    words of a chunk that does not decode."""
    if frame.encoded is None:
        return frame
    try:
        frame.encoded.check()
    except FormatError as error:
        where = f"frame {frame.metadata['frame']} of {frame.metadata['dataset']}"
        error_text = f"unreadable chunk: {where} could not be read or decompressed ({error})"
        return dataclasses.replace(frame, encoded=None, error=error_text)
    return frame
