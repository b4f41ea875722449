"""Detector frames from Eiger/NeXus HDF5 files: master files with external links to data files,
or the data files themselves (the layouts: :mod:`pipeline.sources.hdf5`).

:func:`read_hdf5_file` gives the frames of one file, one
:class:`~pipeline.sources.base.DetectorFrame` at a time (one frame, one Eiger chunk, in
memory); :class:`EigerSource` the exposures of a scan's HDF5 files, each frame once (a data
file whose master is among the files is read through it: :mod:`pipeline.sources.layout`).

A frame whose chunk cannot be read or decoded becomes an exposure with ``error`` set and
reading goes on; a missing (or unreadable) data file gives one failed exposure per frame it
should hold: exactly ``nimages x ntrigger`` minus the frames of the other files when the master
has those numbers, else as many as the first readable data file holds (an estimate, said so in
the message), else one. A file where no frames are found gives one failed frame whose error
names the ``--hdf5-dataset`` option and lists the file's 3-D datasets.

Metadata: the detector description
(:func:`~pipeline.sources.hdf5.read_detector_metadata`) of the file, or of the sibling master
of a data file read on its own (``<prefix>_master.h5`` next to ``<prefix>_data_NNNNNN.h5``).
The pixel mask is not applied: :meth:`EigerSource.pixel_mask` and :func:`read_pixel_mask`
return it for the integration.

Timestamps: the series start (``detectorSpecific/data_collection_date`` or
``/entry/start_time``) plus ``(image_nr - 1) * frame_time``; without a start time, the data
file's modification time.

Example:
    >>> import tempfile
    >>> import hdf5plugin
    >>> folder = Path(tempfile.mkdtemp())
    >>> with h5py.File(folder / "s_data_000001.h5", "w") as data_file:
    ...     _ = data_file.create_dataset(
    ...         "entry/data/data", data=np.ones((2, 4, 6), np.uint16), chunks=(1, 4, 6),
    ...         **hdf5plugin.Bitshuffle(cname="lz4"))
    >>> with h5py.File(folder / "s_master.h5", "w") as master:
    ...     master["entry/data/data_000001"] = h5py.ExternalLink(
    ...         "s_data_000001.h5", "/entry/data/data")
    ...     master["entry/instrument/detector/count_time"] = 0.1
    >>> source = EigerSource(folder, scan_id="scan-3")
    >>> [path.name for path in source.files], [path.name for path in source.skipped_files]
    (['s_master.h5'], ['s_data_000001.h5'])
    >>> exposures = list(source.exposures())
    >>> [(e.index, e.frame.shape, e.metadata["count_time_s"]) for e in exposures]
    [(0, (4, 6), '0.1'), (1, (4, 6), '0.1')]
    >>> exposures[0].metadata["source"].endswith("s_master.h5:/entry/data/data_000001 frame 0")
    True
    >>> source.ended_cleanly, source.statistics.summary()
    (True, '2 frames (2 read, 0 failed)')
    >>> import shutil; shutil.rmtree(folder)
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Generator, Iterator, Sequence
from pathlib import Path

import h5py
import numpy as np

from pipeline.sources.base import DetectorFrame, NumberedFrames, failed_frame
from pipeline.sources.compression import EncodedFrame
from pipeline.sources.hdf5 import (
    PIXEL_MASK_PATHS,
    chunk_packing,
    frame_count,
    frame_datasets,
    open_frame_dataset,
    open_hdf5,
    read_detector_metadata,
    read_encoded_frame,
    read_frame,
    stacked_datasets,
    with_nexus_detector,
)
from pipeline.sources.images import parse_header_time
from pipeline.sources.layout import link_target, master_file_for, scan_files
from pipeline.sources.paths import PathLike, expand_paths


def read_pixel_mask(path: PathLike) -> np.ndarray | None:
    """The detector's pixel mask from a master file (or the master of a data file): non-zero
    marks a pixel to leave out (DECTRIS bits: 1 gap, 2 dead, 4 cold, 8 hot, 16 noisy, ...).
    ``None`` when there is none. It is returned as stored, never applied to frames here."""
    candidates = [Path(path)]
    master = master_file_for(path)
    if master is not None:
        candidates.append(master)
    for candidate in candidates:
        try:
            with open_hdf5(candidate) as handle:
                for mask_path in PIXEL_MASK_PATHS:
                    node = handle.get(mask_path)
                    if isinstance(node, h5py.Dataset) and node.ndim == 2:
                        return np.asarray(node[()])
        except OSError:
            continue
    return None


def _series_timing(metadata: dict[str, str]) -> tuple[float | None, float | None]:
    """Series start (seconds since the epoch) and frame time (s) from detector metadata."""
    start = None
    for key in ("data_collection_date", "start_time"):
        if key in metadata:
            start = parse_header_time(metadata[key])
            if start is not None:
                break
    frame_time = float(metadata["frame_time_s"]) if "frame_time_s" in metadata else None
    return start, frame_time


def _missing_counts(
    refs: list[str], counts: dict[str, int | None], metadata: dict[str, str]
) -> dict[str, tuple[int, str]]:
    """How many frames each unreadable dataset of ``refs`` stood for, and how that is known."""
    missing = [ref for ref in refs if counts[ref] is None]
    known = [n for n in counts.values() if n is not None]
    result: dict[str, tuple[int, str]] = {}
    total = None
    if "nimages" in metadata and "ntrigger" in metadata:
        try:
            total = int(metadata["nimages"]) * int(metadata["ntrigger"])
        except ValueError:
            total = None
    per_file = max(known) if known else None
    remaining = None if total is None else max(total - sum(known), 0)
    for position, ref in enumerate(missing):
        if remaining is not None and per_file is not None:
            last = position == len(missing) - 1
            n = remaining if last else min(per_file, remaining)
            remaining -= n
            how = "from nimages x ntrigger in the master"
        elif remaining is not None and len(missing) == 1:
            n, how = remaining, "from nimages x ntrigger in the master"
        elif per_file is not None:
            n, how = per_file, "estimated from the other data files"
        else:
            n, how = 1, "frame count unknown"
        result[ref] = (max(n, 1), how)
    return result


def read_hdf5_file(
    path: PathLike, dataset: str | None = None, decode: bool = True
) -> Iterator[DetectorFrame]:
    """The frames of one Eiger/NeXus HDF5 file (master or data file), one at a time; with
    ``decode`` false, a frame whose chunk an integrator process can decode comes as its
    compressed bytes (:func:`~pipeline.sources.hdf5.chunk_packing`).

    Never raises for a bad file: unreadable files, datasets and chunks give failed frames (see
    the module docstring). ``metadata`` has ``source``
    (``"file:/entry/data/data_000001 frame 12"``, frames from 0 within the dataset),
    ``format`` (``HDF5``), ``dataset``, ``frame``, ``image_nr`` (1-based in the series, when
    known), ``data_file`` (the linked file of a master), ``timestamp_from`` and the detector
    metadata of :func:`read_detector_metadata`.
    """
    path = Path(path)
    source = str(path)
    try:
        mtime = path.stat().st_mtime
    except FileNotFoundError:
        yield failed_frame(source, f"file not found: {path}")
        return
    except OSError as error:
        yield failed_frame(source, f"cannot access {path}: {error}")
        return
    try:
        handle = open_hdf5(path)
    except OSError as error:
        text = str(error)
        if "truncated file" in text:
            message = f"truncated file: {text}"
        elif "signature" in text:
            message = f"corrupt data or not an HDF5 file: {text}"
        else:
            message = f"cannot open HDF5 file: {text}"
        yield failed_frame(source, message, mtime)
        return

    with handle:
        refs, problem = with_nexus_detector(handle, frame_datasets(handle, dataset))
        if dataset is not None and handle.get(dataset, getlink=True) is None:
            problem = f"no detector frames: no dataset {dataset} in {path.name}"
        if problem is not None:
            yield failed_frame(
                source,
                f"{problem}; name the frames' dataset with --hdf5-dataset PATH "
                f"({stacked_datasets(handle)})",
                mtime,
            )
            return
        metadata = read_detector_metadata(handle)
        if not metadata:
            master = master_file_for(path)
            if master is not None:
                try:
                    with open_hdf5(master) as master_handle:
                        metadata = read_detector_metadata(master_handle)
                except OSError:
                    metadata = {}
        # First the frame counts (each linked file opened and closed again, so that a scan of
        # many data files does not hold them all open), then the frames.
        problems: dict[str, str] = {}
        counts: dict[str, int | None] = {}
        for ref in refs:
            try:
                counts[ref] = frame_count(open_frame_dataset(handle, ref))
            except (KeyError, OSError, ValueError) as error:
                counts[ref] = None
                problems[ref] = _dataset_problem(handle, path, ref, error)
        lost = _missing_counts(refs, counts, metadata)

        series_position = 0  # 0-based frame number in the series
        for ref in refs:
            data_file = _link_file(handle, ref)
            node = None
            if ref not in problems:
                try:
                    node = open_frame_dataset(handle, ref)
                except (KeyError, OSError, ValueError) as error:
                    problems[ref] = _dataset_problem(handle, path, ref, error)
            if node is None:
                n_lost, how = lost.get(ref, (counts[ref] or 1, "frame count of an earlier look"))
                start, frame_time = _series_timing(metadata)
                for number in range(n_lost):
                    image_nr = series_position + number + 1
                    frame = failed_frame(
                        f"{source}:{ref} frame {number}",
                        f"{problems[ref]}; frame {number} of {n_lost} lost ({how})",
                        mtime if start is None else start + (image_nr - 1) * (frame_time or 0.0),
                    )
                    frame.metadata.update(
                        format="HDF5",
                        dataset=ref,
                        frame=str(number),
                        image_nr=str(image_nr),
                        **_data_file(data_file),
                    )
                    yield frame
                series_position += n_lost
                continue
            packing = None
            if not decode:
                with contextlib.suppress(OSError, ValueError):  # then read_frame says why
                    packing = chunk_packing(node)
            for number in range(counts[ref] or 0):
                yield hdf5_frame(
                    path,
                    ref,
                    node,
                    number,
                    metadata,
                    series_position=series_position,
                    data_file=data_file,
                    packing=packing,
                )
                series_position += 1
            del node


def _data_file(name: str | None) -> dict[str, str]:
    return {} if name is None else {"data_file": name}


def hdf5_frame(
    path: PathLike,
    ref: str,
    dataset: h5py.Dataset,
    number: int,
    metadata: dict[str, str],
    series_position: int | None = None,
    data_file: str | None = None,
    packing: EncodedFrame | None = None,
) -> DetectorFrame:
    """Frame ``number`` of an open frame dataset (``ref`` in the file at ``path``) with its
    metadata (see :func:`read_hdf5_file`); a failed frame when its chunk cannot be read.
    With the dataset's ``packing`` (:func:`~pipeline.sources.hdf5.chunk_packing`), the frame
    comes as its chunk's compressed bytes (``encoded``).

    Args:
        path: the file the dataset was opened from (a master or a data file), for ``source``.
        ref: the dataset's path in that file.
        dataset: the open dataset.
        number: the frame, from 0 within the dataset.
        metadata: the detector metadata (:func:`read_detector_metadata`).
        series_position: the frame's 0-based place in the series when the dataset has no
            ``image_nr_low`` attribute (default: ``number``).
        data_file: the linked data file's name, for the metadata.
    """
    start, frame_time = _series_timing(metadata)
    low = dataset.attrs.get("image_nr_low")
    if low is not None and np.ndim(low) == 0:
        image_nr = int(low) + number
    else:
        image_nr = (number if series_position is None else series_position) + 1
    if start is not None:
        timestamp = start + (image_nr - 1) * (frame_time or 0.0)
        stamp_from = "series start + (image_nr - 1) x frame_time"
    else:
        timestamp = _file_mtime(dataset, 0.0)
        stamp_from = "file mtime"
    frame_source = f"{path}:{ref} frame {number}"
    meta = {
        "source": frame_source,
        "format": "HDF5",
        "dataset": ref,
        **_data_file(data_file),
        "frame": str(number),
        "image_nr": str(image_nr),
        **metadata,
        "timestamp_from": stamp_from,
    }
    try:
        encoded = None if packing is None else read_encoded_frame(dataset, number, packing)
        data = read_frame(dataset, number) if encoded is None else None
    except Exception as error:
        return DetectorFrame(
            data=None,
            timestamp=timestamp,
            metadata=meta,
            error=(
                f"unreadable chunk: frame {number} of {ref} could not be read or "
                f"decompressed ({error})"
            ),
        )
    return DetectorFrame(data=data, timestamp=timestamp, metadata=meta, encoded=encoded)


def _link_file(handle: h5py.File, ref: str) -> str | None:
    """The file an external link at ``ref`` points to, as written in the link, or ``None``."""
    try:
        link = handle.get(ref, getlink=True)
    except (KeyError, OSError, ValueError):
        return None
    return link.filename if isinstance(link, h5py.ExternalLink) else None


def _file_mtime(dataset: h5py.Dataset, default: float) -> float:
    """Modification time of the file that holds ``dataset`` (a linked data file)."""
    try:
        return os.stat(dataset.file.filename).st_mtime
    except OSError:
        return default


def _dataset_problem(handle: h5py.File, path: Path, ref: str, error: Exception) -> str:
    """A clear message for a frame dataset that cannot be opened."""
    link_file = _link_file(handle, ref)
    if link_file is not None:
        if not link_target(path, link_file).exists():
            return f"missing data file: {link_file} (external link {ref} of {path.name})"
        return f"unreadable data file: {link_file} (external link {ref} of {path.name}): {error}"
    return f"unreadable dataset {ref} in {path.name}: {error}"


class EigerSource(NumberedFrames):
    """Exposures from Eiger/NeXus HDF5 files, master or data files, read frame by frame.

    Args:
        paths: files, directories or glob patterns (see
            :func:`pipeline.sources.paths.expand_paths`), read in natural order. Data files that
            a master in the list links to are read through the master only
            (:func:`pipeline.sources.layout.scan_files`).
        scan_id: the scan the exposures belong to.
        first_index: the index of the first exposure.
        dataset: the frames' dataset when it is not an Eiger place (``/entry/data/data`` or
            ``/entry/data/data_NNNNNN``) or a NeXus detector's ``data``.
        decode_frames: decode each frame here (``True``), or give the frames of bitshuffle-LZ4
            and LZ4 chunks as their compressed bytes (``Exposure.encoded``) for integrator
            processes to decode (``False``).

    Attributes:
        files: the files to read, in reading order (data files read through a master left out).
        skipped_files: the data files read through their master instead.
        unmatched_patterns: glob patterns that matched no file.
        statistics: the exposures given so far, and how many failed.
        ended_cleanly: whether the latest iteration read the last frame, not stopped.
    """

    def __init__(
        self,
        paths: PathLike | Sequence[PathLike],
        scan_id: str,
        first_index: int = 0,
        dataset: str | None = None,
        decode_frames: bool = True,
    ) -> None:
        super().__init__(scan_id, first_index)
        self.dataset = dataset
        self.decode_frames = decode_frames
        files, self.unmatched_patterns = expand_paths(paths)
        layout = scan_files(files)
        self.files = [file.path for file in layout.read]
        self.skipped_files = list(layout.through_master)

    def _frames(self) -> Generator[DetectorFrame, None, None]:
        """Each file's frames, in order."""
        for path in self.files:
            yield from read_hdf5_file(path, dataset=self.dataset, decode=self.decode_frames)

    def pixel_mask(self) -> np.ndarray | None:
        """The pixel mask of the first file that has one (its own or its master's); non-zero
        marks a bad pixel. Not applied to the frames: the integration decides."""
        for path in self.files:
            mask = read_pixel_mask(path)
            if mask is not None:
                return mask
        return None

    def detector_metadata(self) -> dict[str, str]:
        """The detector description of the first file that has one (its own or its master's)."""
        for path in self.files:
            for candidate in (path, master_file_for(path)):
                if candidate is None:
                    continue
                try:
                    with open_hdf5(candidate) as handle:
                        metadata = read_detector_metadata(handle)
                except OSError:
                    continue
                if metadata:
                    return metadata
        return {}
