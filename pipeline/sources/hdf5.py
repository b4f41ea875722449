"""Eiger and NeXus HDF5 files: how they are laid out, opened, and where their frames are.

Layouts (DECTRIS file writer, NeXus):

- a **master** file: ``/entry/data/data_000001``, ``data_000002``, ... (external links to the
  data files, natural order; which files they are, and which of a scan's files are read
  through their master, is :mod:`pipeline.sources.layout`'s rule) and the detector
  description in ``/entry/instrument/detector``;
- a **data** file: the frames in ``/entry/data/data`` (frames, rows, columns), with
  ``image_nr_low``/``image_nr_high`` attributes (1-based image numbers in the series);
- a **NeXus** file without those: the ``data`` of its one ``NXentry/NXinstrument/NXdetector``
  (found by the groups' ``NX_class``);
- any other file (or several NeXus detectors): the frames' dataset is named
  (``--hdf5-dataset``), a 3-D stack (one exposure per frame of its first axis) or a 2-D image.

:func:`open_hdf5` opens a file that may still be being written; compression filters
(bitshuffle-LZ4, LZ4, ... through ``hdf5plugin``) are registered as this module is imported,
before any file is opened. :func:`read_frame` reads one frame (one chunk in Eiger files), so
memory stays at one frame; :func:`read_encoded_frame` reads an Eiger chunk's compressed bytes
as they are (:func:`chunk_packing` says whether a dataset's chunks can be read so), for an
integrator process to decode.

Detector metadata (:func:`read_detector_metadata`; text, units in the names):
``count_time_s``, ``frame_time_s``, ``x_pixel_size_m``, ``y_pixel_size_m``,
``beam_center_x_pixel``, ``beam_center_y_pixel``, ``detector_distance_m``,
``incident_wavelength_angstrom``, ``photon_energy_eV``, ``threshold_energy_eV``,
``sensor_thickness_m``, ``sensor_material``, ``description``, ``nimages``, ``ntrigger``,
``data_collection_date`` (those present), converted from the file's ``units`` attribute.

Example:
    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "s_data_000001.h5"
    >>> with h5py.File(path, "w") as data_file:
    ...     data_file["entry/data/data"] = np.ones((2, 4, 6), np.uint16)
    ...     data_file["entry/instrument/detector/count_time"] = 100.0
    ...     data_file["entry/instrument/detector/count_time"].attrs["units"] = "ms"
    >>> with open_hdf5(path) as handle:
    ...     frame_datasets(handle), read_detector_metadata(handle)
    (['/entry/data/data'], {'count_time_s': '0.1'})
    >>> hdf5_frames_shape(path)
    (2, 4, 6)
    >>> import shutil; shutil.rmtree(path.parent)
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401  (registers the compression filters before a file is opened)
import numpy as np

from pipeline.sources.compression import Compression, EncodedFrame
from pipeline.sources.paths import PathLike, natural_sort_key

#: HDF5 filter ids whose chunks :class:`~pipeline.sources.compression.EncodedFrame` decodes:
#: bitshuffle (with LZ4, its compression 2) and LZ4.
BITSHUFFLE_FILTER, LZ4_FILTER = 32008, 32004

DATA_GROUP = "/entry/data"
"""Where a master file links its data files (``data_000001``, ...)."""
DATA_DATASET = "/entry/data/data"
"""The frames of a data file."""
DETECTOR_GROUP = "/entry/instrument/detector"
"""The detector description (NXdetector) of a master file."""
PIXEL_MASK_PATHS = (f"{DETECTOR_GROUP}/pixel_mask", f"{DETECTOR_GROUP}/detectorSpecific/pixel_mask")
"""Where the pixel mask may be, NeXus place first."""

_LINK_NAME = re.compile(r"data_\d+")
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


def open_frame_dataset(handle: h5py.File, ref: str) -> h5py.Dataset:
    """The frame dataset at ``ref`` of an open file (following external links).

    Raises:
        KeyError, OSError: when it (or its linked file) cannot be opened.
        ValueError: when it is a group or has no frame shape.
    """
    node = handle[ref]
    if not isinstance(node, h5py.Dataset):
        raise ValueError(f"{ref} is a group, not a dataset")
    frame_count(node)
    return node


def hdf5_frames_shape(path: PathLike, dataset: str | None = None) -> tuple[int, int, int] | None:
    """(frames, rows, columns) of one HDF5 file's frames (a master's data files together, a
    data or NeXus file, or ``dataset``), from the datasets' shapes: no frame is read. ``None``
    where the file or its frames cannot be found (reading it says why)."""
    try:
        with open_hdf5(path) as handle:
            refs, _ = with_nexus_detector(handle, frame_datasets(handle, dataset))
            if not refs:
                return None
            shapes = [open_frame_dataset(handle, ref).shape for ref in refs]
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


def chunk_packing(dataset: h5py.Dataset) -> EncodedFrame | None:
    """How each frame of a stack is stored, as an :class:`EncodedFrame` without its bytes,
    where one chunk holds exactly one frame and its one filter is bitshuffle-LZ4 or LZ4
    (Eiger data files); ``None`` for any other layout (:func:`read_frame` reads those).
    Looked at once per dataset; :func:`read_encoded_frame` reads each frame's bytes.

    Example:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "s_data_000001.h5"
        >>> with h5py.File(path, "w") as data_file:
        ...     frames = data_file.create_dataset(
        ...         "entry/data/data", data=np.arange(48, dtype=np.uint32).reshape(2, 4, 6),
        ...         chunks=(1, 4, 6), **hdf5plugin.Bitshuffle(cname="lz4"))
        ...     encoded = read_encoded_frame(frames, 1, chunk_packing(frames))
        >>> encoded.compression, encoded.shape, int(encoded.decode()[0, 0])
        ('bslz4', (4, 6), 24)
        >>> import shutil; shutil.rmtree(path.parent)
    """
    if dataset.ndim != 3 or dataset.chunks != (1, *dataset.shape[1:]):
        return None
    plist = dataset.id.get_create_plist()
    if plist.get_nfilters() != 1:
        return None
    code, _, values, _ = plist.get_filter(0)
    compression: Compression
    if code == BITSHUFFLE_FILTER and len(values) > 4 and values[4] == 2:
        compression, element_bytes = "bslz4", dataset.dtype.itemsize
    elif code == LZ4_FILTER:
        compression, element_bytes = "lz4", 1
    else:
        return None
    shape = tuple(int(n) for n in dataset.shape[1:])
    return EncodedFrame(b"", shape, dataset.dtype.str, compression, element_bytes, "hdf5")


def read_encoded_frame(
    dataset: h5py.Dataset, number: int, packing: EncodedFrame
) -> EncodedFrame | None:
    """Frame ``number`` as its chunk's bytes, still compressed, as :func:`chunk_packing`
    described the dataset (``packing``); ``None`` where the filter was skipped for this chunk
    (its bytes are the frame's own: :func:`read_frame` reads it)."""
    mask, chunk = dataset.id.read_direct_chunk((number, 0, 0))
    return None if mask else packing.with_data(chunk)


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
