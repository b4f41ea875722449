"""Detector frames from Eiger/NeXus HDF5 files: master files with external links to data files,
or the data files themselves.

Layouts read (DECTRIS file writer, NeXus):

- a **master** file: ``/entry/data/data_000001``, ``data_000002``, ... (external links to the
  data files, natural order) and the detector description in ``/entry/instrument/detector``;
- a **data** file: the frames in ``/entry/data/data`` (frames, rows, columns), with
  ``image_nr_low``/``image_nr_high`` attributes (1-based image numbers in the series); the
  detector description comes from the sibling master (``<prefix>_master.h5`` next to
  ``<prefix>_data_NNNNNN.h5``) when there is one;
- a **NeXus** file without those: the ``data`` of its one ``NXentry/NXinstrument/NXdetector``
  (found by the groups' ``NX_class``);
- any other file (or several NeXus detectors): pass ``dataset="/path/to/frames"``
  (``--hdf5-dataset`` of ``beamline-inn reprocess``), a 3-D stack (one exposure per frame of
  its first axis) or a 2-D image. A file where none is found gives one failed frame whose
  error names the option and lists the file's 3-D datasets.

Compressed data (bitshuffle-LZ4, LZ4, ... through ``hdf5plugin``, imported here before any file
is opened) is read one frame at a time, so memory stays at one frame (Eiger chunks are one
frame). A frame whose chunk cannot be read or decoded becomes an exposure with ``error`` set and
reading goes on; a missing (or unreadable) data file gives one failed exposure per frame it
should hold: exactly ``nimages x ntrigger`` minus the frames of the other files when the master
has those numbers, else as many as the first readable data file holds (an estimate, said so in
the message), else one.

Metadata (text, units in the names): ``count_time_s``, ``frame_time_s``, ``x_pixel_size_m``,
``y_pixel_size_m``, ``beam_center_x_pixel``, ``beam_center_y_pixel``, ``detector_distance_m``,
``incident_wavelength_angstrom``, ``photon_energy_eV``, ``threshold_energy_eV``,
``sensor_thickness_m``, ``sensor_material``, ``description``, ``nimages``, ``ntrigger``,
``data_collection_date`` (those present), converted from the file's ``units`` attribute. The
pixel mask is not applied: :meth:`EigerSource.pixel_mask` and :func:`read_pixel_mask` return it
for the integration.

Timestamps: the series start (``detectorSpecific/data_collection_date`` or
``/entry/start_time``) plus ``(image_nr - 1) * frame_time``; without a start time, the data
file's modification time.

Example:
    >>> import tempfile
    >>> import h5py
    >>> folder = Path(tempfile.mkdtemp())
    >>> with h5py.File(folder / "s_data_000001.h5", "w") as data_file:
    ...     _ = data_file.create_dataset(
    ...         "entry/data/data", data=np.ones((2, 4, 6), np.uint16), chunks=(1, 4, 6),
    ...         **hdf5plugin.Bitshuffle(cname="lz4"))
    >>> with h5py.File(folder / "s_master.h5", "w") as master:
    ...     master["entry/data/data_000001"] = h5py.ExternalLink(
    ...         "s_data_000001.h5", "/entry/data/data")
    ...     master["entry/instrument/detector/count_time"] = 0.1
    >>> source = EigerSource(folder / "s_master.h5", scan_id="scan-3")
    >>> [(e.index, e.frame.shape, e.metadata["count_time_s"]) for e in source.exposures()]
    [(0, (4, 6), '0.1'), (1, (4, 6), '0.1')]
    >>> exposure = next(iter(source.exposures()))
    >>> exposure.metadata["source"].endswith("s_master.h5:/entry/data/data_000001 frame 0")
    True
    >>> import shutil; shutil.rmtree(folder)
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401  (registers the compression filters before a file is opened)
import numpy as np

from pipeline.sources.files import (
    DetectorFrame,
    NumberedFrames,
    PathLike,
    expand_paths,
    failed_frame,
    natural_sort_key,
    parse_header_time,
)

DATA_GROUP = "/entry/data"
"""Where a master file links its data files (``data_000001``, ...)."""
DATA_DATASET = "/entry/data/data"
"""The frames of a data file."""
DETECTOR_GROUP = "/entry/instrument/detector"
"""The detector description (NXdetector) of a master file."""
PIXEL_MASK_PATHS = (f"{DETECTOR_GROUP}/pixel_mask", f"{DETECTOR_GROUP}/detectorSpecific/pixel_mask")
"""Where the pixel mask may be, NeXus place first."""

_LINK_NAME = re.compile(r"data_\d+")
_DATA_FILE_NAME = re.compile(r"(.+)_data_\d+(\.[^.]+)$")
_LENGTH_M = {
    "m": 1.0,
    "meter": 1.0,
    "mm": 1e-3,
    "um": 1e-6,
    "µm": 1e-6,
    "micron": 1e-6,
    "nm": 1e-9,
    "angstrom": 1e-10,
    "a": 1e-10,
    "å": 1e-10,
}
_TIME_S = {"s": 1.0, "second": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
_ENERGY_EV = {"ev": 1.0, "kev": 1e3}
_PIXELS = {"pixel": 1.0, "pixels": 1.0}

# metadata name, path, units table, the unit of the name (also the unit when none is stored)
_NUMBERS: tuple[tuple[str, str, dict[str, float], str], ...] = (
    ("count_time_s", f"{DETECTOR_GROUP}/count_time", _TIME_S, "s"),
    ("frame_time_s", f"{DETECTOR_GROUP}/frame_time", _TIME_S, "s"),
    ("x_pixel_size_m", f"{DETECTOR_GROUP}/x_pixel_size", _LENGTH_M, "m"),
    ("y_pixel_size_m", f"{DETECTOR_GROUP}/y_pixel_size", _LENGTH_M, "m"),
    ("beam_center_x_pixel", f"{DETECTOR_GROUP}/beam_center_x", _PIXELS, "pixel"),
    ("beam_center_y_pixel", f"{DETECTOR_GROUP}/beam_center_y", _PIXELS, "pixel"),
    ("detector_distance_m", f"{DETECTOR_GROUP}/detector_distance", _LENGTH_M, "m"),
    (
        "incident_wavelength_angstrom",
        "/entry/instrument/beam/incident_wavelength",
        _LENGTH_M,
        "angstrom",
    ),
    ("photon_energy_eV", f"{DETECTOR_GROUP}/detectorSpecific/photon_energy", _ENERGY_EV, "ev"),
    ("threshold_energy_eV", f"{DETECTOR_GROUP}/threshold_energy", _ENERGY_EV, "ev"),
    ("sensor_thickness_m", f"{DETECTOR_GROUP}/sensor_thickness", _LENGTH_M, "m"),
)
_TEXTS = (
    ("description", f"{DETECTOR_GROUP}/description"),
    ("sensor_material", f"{DETECTOR_GROUP}/sensor_material"),
    ("detector_number", f"{DETECTOR_GROUP}/detector_number"),
    ("nimages", f"{DETECTOR_GROUP}/detectorSpecific/nimages"),
    ("ntrigger", f"{DETECTOR_GROUP}/detectorSpecific/ntrigger"),
    ("data_collection_date", f"{DETECTOR_GROUP}/detectorSpecific/data_collection_date"),
    ("start_time", "/entry/start_time"),
)


def open_hdf5(path: PathLike) -> h5py.File:
    """Open an HDF5 file for reading while another process may still write it: without file
    locking (a writer's lock must not keep the reader out), and in SWMR mode when the file is
    being written by a SWMR writer (a plain reader is refused then).

    Raises:
        OSError: when the file cannot be opened either way (the first error; h5py's
            RuntimeError for a corrupt superblock, found by fuzzing, becomes an OSError too).
    """
    try:
        return h5py.File(path, "r", locking=False)
    except (OSError, RuntimeError) as error:
        try:
            return h5py.File(path, "r", locking=False, swmr=True)
        except (OSError, RuntimeError):
            pass
        if isinstance(error, OSError):
            raise error from None
        raise OSError(f"corrupt data or not an HDF5 file: {error}") from None


def _scalar(node: object) -> object | None:
    """The value of a scalar (or one-element) dataset, text decoded; ``None`` otherwise."""
    if not isinstance(node, h5py.Dataset) or node.size != 1 or node.ndim > 1:
        return None
    value = node[()]
    if isinstance(value, np.ndarray):
        value = value.reshape(-1)[0]
    if isinstance(value, bytes | np.bytes_):
        return bytes(value).decode("utf-8", "replace").strip("\x00 ")
    if isinstance(value, np.generic):
        return value.item()
    return value


def _number_text(value: float) -> str:
    """A number as short text (12 significant digits): integers without a point."""
    value = float(f"{float(value):.12g}")
    return str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)


def read_detector_metadata(handle: h5py.File | h5py.Group) -> dict[str, str]:
    """The detector description of an open master file as text metadata (see the module
    docstring for the names); values in other units than the name's are converted, values in
    unknown units are left out."""
    metadata: dict[str, str] = {}
    for name, path, units_table, unit in _NUMBERS:
        try:
            node = handle.get(path)
            value = _scalar(node)
        except (OSError, KeyError, ValueError):
            continue
        if value is None or isinstance(value, str):
            continue
        try:
            number = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            continue
        units = node.attrs.get("units")
        if isinstance(units, bytes | np.bytes_):
            units = bytes(units).decode("utf-8", "replace")
        scale = units_table.get(unit if units is None else str(units).strip().casefold())
        if scale is None or not math.isfinite(number):
            continue
        metadata[name] = _number_text(number * scale / units_table[unit])
    for name, path in _TEXTS:
        try:
            value = _scalar(handle.get(path))
        except (OSError, KeyError, ValueError):
            continue
        if value is not None and str(value).strip():
            metadata[name] = _number_text(value) if isinstance(value, float) else str(value)
    return metadata


def master_file_for(path: PathLike) -> Path | None:
    """The master file of an Eiger data file (``x_data_000003.h5`` -> ``x_master.h5`` in the
    same folder) when it exists, else ``None``."""
    path = Path(path)
    match = _DATA_FILE_NAME.fullmatch(path.name)
    if match is None:
        return None
    master = path.with_name(f"{match.group(1)}_master{match.group(2)}")
    return master if master.is_file() else None


def external_data_links(path: PathLike) -> list[tuple[str, Path]]:
    """The external links of a master file's ``/entry/data`` group, in natural order: pairs of
    the link's HDF5 path and the data file it points to (relative names resolved against the
    master's folder). ``[]`` for a file without such links."""
    path = Path(path)
    links: list[tuple[str, Path]] = []
    with open_hdf5(path) as handle:
        group = handle.get(DATA_GROUP)
        if not isinstance(group, h5py.Group):
            return links
        for name in sorted(group.keys(), key=natural_sort_key):
            link = group.get(name, getlink=True)
            if isinstance(link, h5py.ExternalLink):
                target = Path(link.filename)
                links.append(
                    (
                        f"{DATA_GROUP}/{name}",
                        target if target.is_absolute() else path.parent / target,
                    )
                )
    return links


def frame_datasets(handle: h5py.File, dataset: str | None = None) -> list[str]:
    """The HDF5 paths of the frame datasets of an open file, in reading order: ``dataset``
    when given, else ``/entry/data/data`` or the master's ``/entry/data/data_NNNNNN`` links."""
    if dataset is not None:
        return [dataset]
    group = handle.get(DATA_GROUP, getlink=False)
    if not isinstance(group, h5py.Group):
        return []
    names = list(group.keys())
    if "data" in names:
        return [DATA_DATASET]
    return [
        f"{DATA_GROUP}/{n}" for n in sorted(names, key=natural_sort_key) if _LINK_NAME.fullmatch(n)
    ]


def with_nexus_detector(handle: h5py.File, refs: list[str]) -> tuple[list[str], str | None]:
    """``refs`` (of :func:`frame_datasets`), or where there are none the ``data`` of the
    file's one NeXus detector; and why the file has no frames (``None`` when it has)."""
    if refs:
        return refs, None
    detectors = nexus_detector_data(handle)
    name = Path(handle.filename).name
    if len(detectors) == 1:
        return detectors, None
    if detectors:
        return [], (
            f"which detector frames? the NeXus detectors of {name} hold several "
            f"({', '.join(detectors)})"
        )
    return [], (
        f"no detector frames: neither {DATA_DATASET} nor {DATA_GROUP}/data_NNNNNN (Eiger) nor "
        f"an NXdetector's data (NeXus) in {name}"
    )


def _nx_class(node: h5py.Group) -> str:
    """The NeXus class (``NX_class`` attribute) of a group, ``""`` when it has none."""
    value = node.attrs.get("NX_class", "")
    return (
        bytes(value).decode("utf-8", "replace")
        if isinstance(value, bytes | np.bytes_)
        else str(value)
    )


def _members(group: h5py.Group, nx_class: str) -> list[h5py.Group]:
    """The subgroups of ``group`` of NeXus class ``nx_class``, in natural order of names."""
    members = []
    for name in sorted(group, key=natural_sort_key):
        node = group.get(name)  # None for a dangling link
        if isinstance(node, h5py.Group) and _nx_class(node) == nx_class:
            members.append(node)
    return members


def nexus_detector_data(handle: h5py.File) -> list[str]:
    """The paths of the ``data`` datasets (2-D or 3-D) of the NeXus detectors of an open file:
    ``NXentry/NXinstrument/NXdetector/data`` by the groups' ``NX_class``, in natural order;
    ``[]`` where there is none or the file's groups cannot be read."""
    found: list[str] = []
    try:
        for entry in _members(handle, "NXentry"):
            for instrument in _members(entry, "NXinstrument"):
                for detector in _members(instrument, "NXdetector"):
                    node = detector.get("data")
                    if isinstance(node, h5py.Dataset) and node.ndim in (2, 3):
                        found.append(f"{detector.name}/data")
    except (OSError, RuntimeError, KeyError, ValueError):
        return []
    return found


def stacked_datasets(handle: h5py.File, limit: int = 10) -> str:
    """The 3-D datasets of an open file (external links not followed) as text for a message:
    ``/path (frames, rows, columns) dtype``, at most ``limit`` of them."""
    found: list[str] = []

    def visit(name: str, node: object) -> None:
        if isinstance(node, h5py.Dataset) and node.ndim == 3:
            found.append(f"/{name} {node.shape} {node.dtype}")

    try:
        handle.visititems(visit)
    except (OSError, RuntimeError, KeyError, ValueError) as error:
        return f"its datasets cannot be listed: {error}"
    if not found:
        return "the file holds no 3-D dataset"
    more = f" and {len(found) - limit} more" if len(found) > limit else ""
    return f"its 3-D datasets: {', '.join(found[:limit])}{more}"


def frame_count(dataset: h5py.Dataset) -> int:
    """Frames in a dataset: the first axis of a 3-D stack, 1 for a 2-D image.

    Raises:
        ValueError: for any other shape.
    """
    if dataset.ndim == 3:
        return int(dataset.shape[0])
    if dataset.ndim == 2:
        return 1
    raise ValueError(
        f"expected frames (frames, rows, columns) or one image, found shape {dataset.shape}"
    )


def hdf5_frames_shape(path: PathLike, dataset: str | None = None) -> tuple[int, int, int] | None:
    """(frames, rows, columns) of one HDF5 file's frames (a master's data files together, a
    data or NeXus file, or ``dataset``), from the datasets' shapes: no frame is read. ``None``
    where the file or its frames cannot be found (reading it says why)."""
    try:
        with open_hdf5(path) as handle:
            refs, _ = with_nexus_detector(handle, frame_datasets(handle, dataset))
            if not refs:
                return None
            shapes = [_open_dataset(handle, ref).shape for ref in refs]
    except (OSError, RuntimeError, KeyError, ValueError):
        return None
    frames = sum(shape[0] if len(shape) == 3 else 1 for shape in shapes)
    return frames, int(shapes[0][-2]), int(shapes[0][-1])


def read_frame(dataset: h5py.Dataset, number: int) -> np.ndarray:
    """Frame ``number`` (from 0) of a dataset as an array in the dataset's dtype; reads (and
    decompresses) only the chunks of that frame."""
    if dataset.ndim == 2:
        return np.asarray(dataset[()])
    return np.asarray(dataset[number])


def chunk_written(dataset: h5py.Dataset, number: int) -> bool:
    """Whether the chunk holding frame ``number`` is allocated in the file (for a dataset that is
    being appended). Contiguous datasets count as written when the frame is within the shape."""
    if number >= frame_count(dataset):
        return False
    if dataset.chunks is None:
        return True
    chunks, shape = dataset.chunks, dataset.shape
    stacked = dataset.ndim == 3
    head = ((number // chunks[0]) * chunks[0],) if stacked else ()
    image_chunks, image_shape = chunks[len(head) :], shape[len(head) :]
    # the frame's first and last tile (one and the same chunk in Eiger files)
    last_tile = tuple((n - 1) // c * c for n, c in zip(image_shape, image_chunks, strict=True))
    corners = [head + (0,) * len(last_tile), head + last_tile]
    for coordinate in corners:
        try:
            info = dataset.id.get_chunk_info_by_coord(coordinate)
        except (OSError, ValueError, KeyError):
            return False
        if info.byte_offset is None or info.size == 0:
            return False
    return True


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


def read_hdf5_file(path: PathLike, dataset: str | None = None) -> Iterator[DetectorFrame]:
    """The frames of one Eiger/NeXus HDF5 file (master or data file), one at a time.

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
                counts[ref] = frame_count(_open_dataset(handle, ref))
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
                    node = _open_dataset(handle, ref)
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
            for number in range(counts[ref] or 0):
                yield hdf5_frame(
                    path,
                    ref,
                    node,
                    number,
                    metadata,
                    series_position=series_position,
                    data_file=data_file,
                )
                series_position += 1
            del node


def _open_dataset(handle: h5py.File, ref: str) -> h5py.Dataset:
    """The dataset at ``ref`` (following external links).

    Raises:
        KeyError, OSError: when it (or its linked file) cannot be opened.
        ValueError: when it is a group or has no frame shape.
    """
    node = handle[ref]
    if not isinstance(node, h5py.Dataset):
        raise ValueError(f"{ref} is a group, not a dataset")
    frame_count(node)
    return node


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
) -> DetectorFrame:
    """Frame ``number`` of an open frame dataset (``ref`` in the file at ``path``) with its
    metadata (see :func:`read_hdf5_file`); a failed frame when its chunk cannot be read.

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
        data = read_frame(dataset, number)
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
    return DetectorFrame(data=data, timestamp=timestamp, metadata=meta)


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
        target = Path(link_file)
        if not target.is_absolute():
            target = path.parent / target
        if not target.exists():
            return f"missing data file: {link_file} (external link {ref} of {path.name})"
        return f"unreadable data file: {link_file} (external link {ref} of {path.name}): {error}"
    return f"unreadable dataset {ref} in {path.name}: {error}"


class EigerSource(NumberedFrames):
    """Exposures from Eiger/NeXus HDF5 files, master or data files, read frame by frame.

    Args:
        paths: files, directories or glob patterns (see
            :func:`pipeline.sources.files.expand_paths`), read in natural order. Data files that
            a master in the list links to are read through the master only.
        scan_id: the scan the exposures belong to.
        first_index: the index of the first exposure.
        dataset: the frames' dataset when it is not an Eiger place (``/entry/data/data`` or
            ``/entry/data/data_NNNNNN``) or a NeXus detector's ``data``.

    Attributes:
        files: the files to read, in reading order (data files read through a master left out).
        unmatched_patterns: glob patterns that matched no file.
        frames_read: frames read so far.
        frames_failed: exposures so far with an error.
    """

    def __init__(
        self,
        paths: PathLike | Sequence[PathLike],
        scan_id: str,
        first_index: int = 0,
        dataset: str | None = None,
    ) -> None:
        super().__init__(scan_id, first_index)
        self.dataset = dataset
        files, self.unmatched_patterns = expand_paths(paths)
        linked: set[str] = set()
        for path in files:
            try:
                linked.update(os.path.abspath(target) for _, target in external_data_links(path))
            except (OSError, KeyError, ValueError):
                continue
        self.files = [path for path in files if os.path.abspath(path) not in linked]

    def _frames(self) -> Iterator[DetectorFrame]:
        for path in self.files:
            yield from read_hdf5_file(path, dataset=self.dataset)

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
