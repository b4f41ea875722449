"""A scan's detector files: image files (EDF, CBF, TIFF, ... through fabio) and Eiger/NeXus
HDF5, named by files, folders and globs.

A :class:`FileSource` takes single files, lists of paths, directories and glob patterns, sorts
the files naturally (``scan_2`` before ``scan_10``, :func:`~pipeline.sources.paths.expand_paths`)
and yields one :class:`~pipeline.exposure.Exposure` per frame: image files through
:mod:`pipeline.sources.images` (a multi-frame EDF gives one exposure per frame), HDF5 files
through :mod:`pipeline.sources.eiger`, each Eiger frame once
(:func:`~pipeline.sources.layout.scan_files`). A file or frame that cannot be read still
becomes an exposure, with ``frame=None`` and ``error`` saying why; reading goes on with the
next frame or file. :func:`open_source` is the same as a one-line call, for command lines that
take a mix of files and globs.

:func:`find_scans` and :class:`ArchivedScan` are the archived scans that paths and globs name:
folders of frames, and single files (an Eiger master with its data files).

Example:
    >>> import tempfile
    >>> import numpy as np
    >>> from fabio.edfimage import EdfImage
    >>> folder = Path(tempfile.mkdtemp())
    >>> for n in (10, 2):
    ...     EdfImage(data=np.full((4, 5), n, np.uint16), header={"count_time": "0.5"}).write(
    ...         str(folder / f"scan_{n}.edf")
    ...     )
    >>> source = FileSource([folder / "scan_*.edf"], scan_id="scan-1")
    >>> [(e.index, int(e.frame[0, 0]), e.metadata["count_time_s"]) for e in source.exposures()]
    [(0, 2, '0.5'), (1, 10, '0.5')]
    >>> source.ended_cleanly, source.statistics.summary()
    (True, '2 frames (2 read, 0 failed)')
    >>> import shutil; shutil.rmtree(folder)
"""

from __future__ import annotations

import glob
import math
import os
from collections import Counter
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.exposure import Exposure
from pipeline.sources.base import DetectorFrame, NumberedFrames, broken_link_error, failed_frame
from pipeline.sources.eiger import read_hdf5_file
from pipeline.sources.hdf5 import hdf5_frames_shape
from pipeline.sources.identity import FileStamp, file_stamp
from pipeline.sources.images import image_frames_shape, read_fabio_file
from pipeline.sources.layout import FileToRead, scan_files
from pipeline.sources.paths import (
    PathLike,
    expand_paths,
    is_glob,
    is_hdf5_file,
    natural_sort_key,
)


def header_frames_shape(
    path: PathLike, hdf5_dataset: str | None = None
) -> tuple[int, int, int] | None:
    """(frames, rows, columns) of one file's frames, from its header or HDF5 metadata: no
    pixel is decoded (:func:`~pipeline.sources.images.image_frames_shape`,
    :func:`~pipeline.sources.hdf5.hdf5_frames_shape`). ``None`` where the file cannot tell
    (reading it says why)."""
    if is_hdf5_file(path):
        return hdf5_frames_shape(path, hdf5_dataset)
    return image_frames_shape(path)


class FileSource(NumberedFrames):
    """Exposures from detector files: fabio's image formats, and Eiger/NeXus HDF5.

    Each file is read with :func:`~pipeline.sources.images.read_fabio_file`, or with
    :func:`~pipeline.sources.eiger.read_hdf5_file` when it is HDF5 (by content, or by a
    ``.h5``/``.nxs``/... name). HDF5 data files that a master file in the same list links to
    are read through the master (:func:`~pipeline.sources.layout.scan_files`) and listed in
    :attr:`skipped_files`.

    Args:
        paths: files, directories or glob patterns (see
            :func:`~pipeline.sources.paths.expand_paths`); all files are read in natural
            order.
        scan_id: the scan the exposures belong to.
        first_index: the index of the first exposure.
        hdf5_dataset: for HDF5 files, the dataset of frames when it is not one of the Eiger
            places (``/entry/data/data`` or ``/entry/data/data_NNNNNN``) or a NeXus
            detector's ``data``: a 3-D stack gives one exposure per frame of its first axis.
        decode_frames: decode each frame here (``True``), or give the frames of HDF5
            bitshuffle-LZ4 and LZ4 chunks as their compressed bytes (``Exposure.encoded``)
            for integrator processes to decode (``False``; other files are decoded here).

    Attributes:
        files: the files named, in natural order (data files read through a master included).
        unmatched_patterns: glob patterns that matched no file.
        skipped_files: HDF5 data files read through their master instead (known once the
            files were looked at: by :meth:`manifest`, :meth:`frame_shape` or reading).
        statistics: the exposures given so far, and how many failed (frames or files that
            could not be read).
        ended_cleanly: whether the latest iteration read the last frame, not stopped.
    """

    def __init__(
        self,
        paths: PathLike | Sequence[PathLike],
        scan_id: str,
        first_index: int = 0,
        hdf5_dataset: str | None = None,
        decode_frames: bool = True,
    ) -> None:
        super().__init__(scan_id, first_index)
        self.hdf5_dataset = hdf5_dataset
        self.decode_frames = decode_frames
        self.files, self.unmatched_patterns = expand_paths(paths)
        self.skipped_files: list[Path] = []

    def _files_to_read(self) -> tuple[FileToRead, ...]:
        """The files read directly, each with the HDF5 data files it links to; sets
        :attr:`skipped_files` (data files read through their master)."""
        layout = scan_files(self.files)
        self.skipped_files = list(layout.through_master)
        return layout.read

    def manifest(self) -> dict[str, FileStamp]:
        """The version of each file to be read (:func:`~pipeline.sources.identity.file_stamp`,
        an Eiger master with its data files), by its key: what a resumed scan compares with
        the frames its results file holds."""
        stamps = (file_stamp(file.path, file.data_files) for file in self._files_to_read())
        return {stamp.key: stamp for stamp in stamps}

    def frame_shape(self, max_files: int = 100) -> tuple[int, int] | None:
        """The shape, (rows, columns), of most frames in the headers of up to ``max_files``
        of the files (spread over the scan; HDF5: the datasets' shapes); ``None`` when no
        header tells. What a PONI without a detector takes as the detector's shape, so that
        an odd first frame fails alone rather than every frame after it."""
        files = [file.path for file in self._files_to_read()]
        step = max(1, math.ceil(len(files) / max_files))
        shapes: Counter[tuple[int, int]] = Counter()
        for path in files[::step]:
            found = header_frames_shape(path, self.hdf5_dataset)
            if found is not None:
                frames, rows, columns = found
                shapes[rows, columns] += frames
        if not shapes:
            return None
        return shapes.most_common(1)[0][0]

    def _frames(self) -> Generator[DetectorFrame, None, None]:
        """Each file's frames, each with its identity in ``metadata["frame_id"]``."""
        for file in self._files_to_read():
            path = file.path
            stamp = file_stamp(path, file.data_files)
            if os.path.islink(path) and not os.path.exists(path):
                frames: Iterator[DetectorFrame] = iter(
                    [failed_frame(str(path), broken_link_error(path))]
                )
            elif is_hdf5_file(path):
                frames = read_hdf5_file(path, dataset=self.hdf5_dataset, decode=self.decode_frames)
            else:
                frames = read_fabio_file(path)
            for number, frame in enumerate(frames):
                frame.metadata["frame_id"] = stamp.frame_id(number)
                yield frame


@dataclass(frozen=True)
class ArchivedScan:
    """One archived scan: a folder of frame files, or one file (an Eiger master file with its
    data files, or a multi-frame file); its results go to ``SCAN_ID.h5``."""

    scan_id: str
    path: Path

    def files(self) -> list[Path]:
        """Every file the scan is read from, each read file followed by the data files it
        links to that exist (an Eiger master's)."""
        files, _ = expand_paths([self.path])
        return [
            name
            for file in scan_files(files).read
            for name in (file.path, *(path for path in file.data_files if path.exists()))
        ]

    def last_modified(self) -> float:
        """The newest modification time of its files (s since the epoch; 0 when none)."""
        return max((path.stat().st_mtime for path in self.files()), default=0.0)


def find_scans(patterns: Sequence[PathLike]) -> list[ArchivedScan]:
    """The archived scans named by ``patterns`` (paths or glob patterns): each folder matched
    is one scan, each file another, except HDF5 data files whose master file is among the
    matches (an Eiger scan is its master file: :func:`~pipeline.sources.layout.scan_files`),
    each once (by real path). The scan id is the folder's name or the file's name without its
    suffix and a trailing ``_master``, letters, digits, ``.``, ``_`` and ``-`` kept (so
    results stay in their folder); scans in folders of the same name (``day1/sampleA``,
    ``day2/sampleA``) share it here, and ``flows.reprocess.name_scans`` tells them apart by
    their full paths.

    ``ValueError`` when a pattern matches nothing.

    Example:
        >>> import tempfile
        >>> root = Path(tempfile.mkdtemp())
        >>> for name in ("night 1", "night_2"):
        ...     (root / name).mkdir()
        >>> [(scan.scan_id, scan.path.name) for scan in find_scans([root / "night*"])]
        [('night_1', 'night 1'), ('night_2', 'night_2')]
        >>> import shutil; shutil.rmtree(root)
    """
    from pipeline.config import scan_id_from

    matches: dict[str, Path] = {}
    for pattern in patterns:
        text = os.fspath(pattern)
        found = (
            [Path(m) for m in glob.glob(text, recursive=True)]
            if is_glob(text)
            else ([Path(text)] if os.path.exists(text) else [])
        )
        if not found:
            raise ValueError(f"no scan matches {text}")
        for path in found:
            matches.setdefault(os.path.realpath(path), path)
    through_master = {
        os.path.realpath(path)
        for path in scan_files([path for path in matches.values() if path.is_file()]).through_master
    }
    scans = []
    for key, path in sorted(matches.items(), key=lambda item: natural_sort_key(item[1])):
        if key in through_master or path.name.startswith("."):
            continue
        name = path.name if path.is_dir() else path.name.split(".")[0].removesuffix("_master")
        scans.append(ArchivedScan(scan_id_from(name), path))
    return scans


def open_source(paths: Sequence[str | Path], scan_id: str) -> Iterator[Exposure]:
    """Exposures from a mix of files, directories and glob patterns (fabio formats and HDF5),
    in natural order: ``FileSource(paths, scan_id).exposures()``.

    Example:
        >>> import tempfile
        >>> import numpy as np
        >>> from fabio.cbfimage import CbfImage
        >>> folder = Path(tempfile.mkdtemp())
        >>> CbfImage(data=np.ones((3, 4), np.int32)).write(str(folder / "f_1.cbf"))
        >>> _ = (folder / "f_2.cbf").write_bytes(b"###CBF: VERSION 1.5\\nnothing else")
        >>> for exposure in open_source([str(folder / "f_*.cbf")], "scan-2"):
        ...     print(exposure.index, exposure.frame is not None, exposure.error)
        0 True None
        1 False corrupt CBF file: no binary data section
        >>> import shutil; shutil.rmtree(folder)
    """
    return FileSource(list(paths), scan_id).exposures()
