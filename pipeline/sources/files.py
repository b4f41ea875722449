"""Detector frames from image files: EDF, CBF, TIFF and the other formats fabio reads.

A :class:`FileSource` takes single files, lists of paths, directories and glob patterns, sorts
the files naturally (``scan_2`` before ``scan_10``) and yields one
:class:`~pipeline.exposure.Exposure` per frame: a multi-frame EDF gives one exposure per frame,
and HDF5 files (Eiger/NeXus, see :mod:`pipeline.sources.eiger`) are handed to the HDF5 reader.
:func:`open_source` is the same as a one-line call, for command lines that take a mix of files
and globs.

A file or frame that cannot be read (missing, empty, truncated, corrupt, unknown format) still
becomes an exposure, with ``frame=None`` and ``error`` saying why; reading goes on with the next
frame or file. Checks beyond fabio's own: an EDF frame whose data block is cut short (fabio
pads it with zeros) and a trailing half-written EDF header are errors, and a CBF binary section
must be as long as its ``X-Binary-Size`` and match its ``Content-MD5``.

Timestamps come from the header where the format has one (EDF ``time_of_day``, or a date in
``date``/``time``; the date line of a Pilatus CBF/TIFF header; the TIFF date tag); dates without
a time zone are read as local time. Otherwise the timestamp is the file's modification time.
``metadata["timestamp_from"]`` says which.

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
    >>> source.frames_read, source.frames_failed
    (2, 0)
    >>> import shutil; shutil.rmtree(folder)
"""

from __future__ import annotations

import abc
import base64
import glob
import hashlib
import math
import os
import re
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np

from pipeline.exposure import Exposure
from pipeline.sources.identity import FileStamp, file_stamp

PathLike = str | os.PathLike[str]
"""A file name as text or path object."""

HDF5_SUFFIXES = frozenset({".h5", ".hdf5", ".hdf", ".nxs", ".nx5", ".cxi"})
"""File name endings that mark an HDF5 file even when its content is unreadable."""

_DIGITS = re.compile(r"(\d+)")
_GLOB_MAGIC = re.compile(r"[*?[]")
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
_CBF_BINARY_START = b"\x0c\x1a\x04\xd5"
_PILATUS_SPLIT = re.compile(r"\s*[,:=\s]\s*")

# Header keys (compared in lower case) that carry the useful values, and their metadata names.
# The first matching key wins; values are reduced to their leading number.
_HEADER_NUMBERS: dict[str, tuple[str, ...]] = {
    "exposure_time_s": ("exposure_time", "exposuretime", "acq_expo_time", "exptime"),
    "count_time_s": ("count_time", "counttime"),
    "frame_time_s": ("exposure_period", "frame_time", "acq_period"),
    "monitor": ("monitor", "mon", "i0", "intensity0", "monitor_counts"),
    "flux_photons_per_s": ("flux",),
    "transmission": ("filter_transmission", "transmission"),
}
_HEADER_TEXT: dict[str, tuple[str, ...]] = {"detector": ("detector",)}
_EPOCH_KEYS = ("time_of_day", "epoch", "timestamp")
_DATE_KEYS = ("date", "datetime", "time", "acquisition_date", "start_time")
_DATE_FORMATS = (
    "%Y/%b/%d %H:%M:%S.%f",
    "%Y/%b/%d %H:%M:%S",
    "%a %b %d %H:%M:%S %Y",
    "%a %b %d %H:%M:%S.%f %Y",
    "%Y:%m:%d %H:%M:%S",
    "%d-%b-%Y %H:%M:%S",
)


def natural_sort_key(name: PathLike) -> tuple[tuple[int | str, ...], str]:
    """A sort key that orders runs of digits by their value: ``scan_2`` before ``scan_10``.

    Text compares case-insensitively; names equal but for case (or leading zeros) follow in
    their plain order, so the order is total.

    Example:
        >>> sorted(["scan_10.cbf", "scan_2.cbf", "Scan_1.cbf"], key=natural_sort_key)
        ['Scan_1.cbf', 'scan_2.cbf', 'scan_10.cbf']
    """
    text = os.fspath(name)
    parts = _DIGITS.split(text)
    return tuple(int(part) if i % 2 else part.casefold() for i, part in enumerate(parts)), text


def natural_sorted(names: Sequence[PathLike]) -> list[Path]:
    """``names`` as paths in natural order (see :func:`natural_sort_key`)."""
    return sorted((Path(name) for name in names), key=natural_sort_key)


def expand_paths(paths: PathLike | Sequence[PathLike]) -> tuple[list[Path], list[str]]:
    """Files named by ``paths``, in natural order, each once; and the patterns that matched none.

    Each item is a file (kept even when it does not exist, so that reading it reports the
    missing file), a directory (its files, not recursive, hidden ones left out) or a glob
    pattern (``*``, ``?``, ``[...]``; ``**`` recurses). A file reached under several names
    (symbolic links, a ``**`` through a link loop) is read once, under the first item's name
    for it: its own, where that item finds it without a link, else the shortest; a symbolic
    link whose target is missing is kept, so that reading it reports the link.

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> for name in ("a_10.tif", "a_9.tif", "notes.txt"):
        ...     (folder / name).write_bytes(b"")
        0
        0
        0
        >>> files, unmatched = expand_paths([folder / "a_*.tif", folder / "b_*.tif"])
        >>> [f.name for f in files], [Path(u).name for u in unmatched]
        (['a_9.tif', 'a_10.tif'], ['b_*.tif'])
        >>> import shutil; shutil.rmtree(folder)
    """
    items = [paths] if isinstance(paths, str | os.PathLike) else list(paths)
    found: dict[str, Path] = {}
    unmatched: list[str] = []
    for item in items:
        text = os.fspath(item)
        if _GLOB_MAGIC.search(text):
            matches = [Path(m) for m in glob.glob(text, recursive=True) if _is_frame_file(m)]
            if not matches:
                unmatched.append(text)
        elif os.path.isdir(text):
            matches = [
                entry
                for entry in Path(text).iterdir()
                if _is_frame_file(entry) and not entry.name.startswith(".")
            ]
        else:
            matches = [Path(text)]
        for match in sorted(matches, key=_plainest_first):
            found.setdefault(os.path.realpath(match), match)
    return natural_sorted(list(found.values())), unmatched


def _plainest_first(path: Path) -> tuple[bool, int, tuple[tuple[int | str, ...], str]]:
    """Sort key of the names of one file: its own name (no link on the way) first, then the
    shortest, so that a file is stored under a name a user recognises."""
    through_links = os.path.realpath(path) != os.path.abspath(path)
    return through_links, len(path.parts), natural_sort_key(path)


def _is_frame_file(path: PathLike) -> bool:
    """A file, or a symbolic link whose target is missing (reading it says so)."""
    return os.path.isfile(path) or (os.path.islink(path) and not os.path.exists(path))


@dataclass
class DetectorFrame:
    """One frame as read from a file, before it takes its place in a scan.

    Attributes:
        data: the 2-D image in the detector's dtype, or ``None`` when it could not be read.
        timestamp: acquisition time, seconds since the epoch (header or file modification time).
        metadata: text values; ``source`` names the file (and frame) it came from.
        error: why the frame could not be read, or ``None``.
    """

    data: np.ndarray | None
    timestamp: float
    metadata: dict[str, str] = field(default_factory=dict)
    error: str | None = None

    def to_exposure(self, scan_id: str, index: int) -> Exposure:
        """This frame as exposure ``index`` of scan ``scan_id``."""
        return Exposure(
            scan_id=scan_id,
            index=index,
            timestamp=self.timestamp,
            frame=self.data,
            metadata=dict(self.metadata),
            error=self.error,
        )


def broken_link_error(path: PathLike) -> str:
    """The error of a symbolic link whose target does not exist."""
    return f"broken symbolic link: {path} points to {os.readlink(path)}, which does not exist"


def failed_frame(source: str, error: str, timestamp: float | None = None) -> DetectorFrame:
    """A frame that could not be read: no data, ``error`` says why, ``source`` where it was."""
    return DetectorFrame(
        data=None,
        timestamp=time.time() if timestamp is None else timestamp,
        metadata={"source": source},
        error=error,
    )


def is_hdf5_file(path: PathLike) -> bool:
    """Whether ``path`` is an HDF5 file: by its signature, or by its name when unreadable."""
    import h5py

    path = Path(path)
    try:
        if h5py.is_hdf5(path):
            return True
    except OSError:
        pass
    return path.suffix.lower() in HDF5_SUFFIXES


def _leading_number(value: object) -> str | None:
    """The first number in a header value (``"3.0000000 s"`` -> ``"3.0"``), as text."""
    match = _NUMBER.search(str(value))
    if match is None:
        return None
    number = float(match.group())
    if not math.isfinite(number):
        return None
    return repr(int(number)) if number.is_integer() and "." not in match.group() else repr(number)


def parse_header_time(value: object) -> float | None:
    """Seconds since the epoch from a header date (ISO 8601, Pilatus, ctime, TIFF styles).

    Dates without a time zone are local time. ``None`` when ``value`` is no such date.

    Example:
        >>> parse_header_time("2026-11-29T01:22:44.5+00:00")
        1795915364.5
        >>> parse_header_time("not a date") is None
        True
    """
    text = " ".join(str(value).replace("\x00", " ").split())
    if not text or not text[0].isalnum():
        return None
    moment: datetime | None = None
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        for pattern in _DATE_FORMATS:
            try:
                moment = datetime.strptime(text, pattern)
                break
            except ValueError:
                continue
    if moment is None:
        return None
    return moment.timestamp()


def _pilatus_header(text: str) -> dict[str, str]:
    """The ``# Key value`` lines of a Pilatus header as a dict; its date line under ``date``."""
    header: dict[str, str] = {}
    for line in text.replace("\r", "\n").split("\n"):
        line = line.strip().lstrip("#").strip().strip("\x00")
        if not line:
            continue
        if line[:4].isdigit() and parse_header_time(line) is not None:
            header["date"] = line
            continue
        parts = _PILATUS_SPLIT.split(line, maxsplit=1)
        if len(parts) == 2:
            header[parts[0]] = parts[1]
    return header


def header_metadata(header: Mapping[str, object]) -> tuple[dict[str, str], float | None, str]:
    """Useful values of a fabio header: metadata (exposure/count/frame time in s, monitor,
    flux, transmission, detector), the header timestamp (or ``None``) and which key gave it.

    Pilatus headers (the text inside a CBF, or split into keys by fabio's TIFF reader) are
    understood, including their date line.

    Example:
        >>> meta, stamp, key = header_metadata({"Exposure_time": "0.1 s", "Flux": "1.5e12"})
        >>> meta, stamp
        ({'exposure_time_s': '0.1', 'flux_photons_per_s': '1500000000000.0'}, None)
    """
    flat: dict[str, str] = {}
    for key, value in header.items():
        if isinstance(value, bytes):
            value = value.decode("latin-1", "replace")
        if not isinstance(value, str | int | float):
            continue
        flat.setdefault(str(key).strip().casefold(), str(value))
        # fabio's Pilatus TIFF reader splits a date line "# 2014-10-23T14:20:05.1" at its
        # first colon or blank: join it back.
        if re.fullmatch(r"\d{4}[-/]\S+", str(key).strip()):
            for joiner in (":", " "):
                candidate = f"{str(key).strip()}{joiner}{value}"
                if parse_header_time(candidate) is not None:
                    flat.setdefault("date", candidate)
                    break
    contents = flat.get("_array_data.header_contents")
    if contents:
        for key, value in _pilatus_header(contents).items():
            flat.setdefault(key.casefold(), value)

    metadata: dict[str, str] = {}
    for name, keys in _HEADER_NUMBERS.items():
        for key in keys:
            number = _leading_number(flat[key]) if key in flat else None
            if number is not None:
                metadata[name] = number
                break
    for name, keys in _HEADER_TEXT.items():
        for key in keys:
            if flat.get(key, "").strip():
                metadata[name] = flat[key].strip()
                break

    for key in _EPOCH_KEYS:
        if key in flat:
            stamp: float | None
            try:
                stamp = float(flat[key])
            except ValueError:
                continue
            if math.isfinite(stamp) and stamp > 0:
                return metadata, stamp, key
    for key in _DATE_KEYS:
        if key in flat:
            stamp = parse_header_time(flat[key])
            if stamp is not None:
                return metadata, stamp, key
    return metadata, None, ""


def _cbf_problem(path: Path) -> str | None:
    """Why the CBF file at ``path`` is incomplete or corrupt, or ``None`` when it looks whole:
    the binary section must hold ``X-Binary-Size`` bytes and match its ``Content-MD5``."""
    raw = path.read_bytes()
    start = raw.find(_CBF_BINARY_START)
    if start < 0:
        if b"--CIF-BINARY-FORMAT-SECTION--" in raw:
            return "truncated file: the CBF binary section ends before its data start"
        return "corrupt CBF file: no binary data section"
    head = raw[:start].decode("latin-1")
    size_match = re.search(r"X-Binary-Size:\s*(\d+)", head)
    if size_match is None:
        return "corrupt CBF file: the binary section has no X-Binary-Size"
    size = int(size_match.group(1))
    data = raw[start + len(_CBF_BINARY_START) : start + len(_CBF_BINARY_START) + size]
    if len(data) < size:
        return f"truncated file: the CBF binary section holds {len(data)} of {size} bytes"
    md5_match = re.search(r"Content-MD5:\s*(\S+)", head)
    if md5_match is not None:
        digest = base64.b64encode(hashlib.md5(data).digest()).decode("ascii")
        if digest != md5_match.group(1):
            return "corrupt data: the CBF binary section does not match its Content-MD5 checksum"
    return None


def _format_name(path: Path, magic: bytes) -> str:
    """A short name of the format for messages, from the magic bytes or the name."""
    if magic.startswith(b"###CBF") or path.suffix.lower() == ".cbf":
        return "CBF"
    if magic.lstrip().startswith(b"{") or ".edf" in path.name.lower():
        return "EDF"
    if magic[:4] in (b"II*\x00", b"MM\x00*") or path.suffix.lower() in (".tif", ".tiff"):
        return "TIFF"
    return path.suffix.lstrip(".").upper() or "image"


def header_frames_shape(
    path: PathLike, hdf5_dataset: str | None = None
) -> tuple[int, int, int] | None:
    """(frames, rows, columns) of one file's frames, from its header or HDF5 metadata: no
    pixel is decoded. ``None`` where the file cannot tell (reading it says why).

    Example:
        >>> import tempfile
        >>> from fabio.cbfimage import CbfImage
        >>> path = Path(tempfile.mkdtemp()) / "frame.cbf"
        >>> CbfImage(data=np.zeros((195, 487), np.int32)).write(str(path))
        >>> header_frames_shape(path)
        (1, 195, 487)
    """
    from pipeline.sources.eiger import hdf5_frames_shape

    path = Path(path)
    if is_hdf5_file(path):
        return hdf5_frames_shape(path, hdf5_dataset)
    try:
        with path.open("rb") as handle:
            magic = handle.read(4)
        if _format_name(path, magic) == "TIFF":  # fabio's header reader misreads Pilatus TIFFs
            from PIL import Image

            with Image.open(path) as image:
                columns, rows = image.size
                shape: tuple[int, ...] = (rows, columns)
                frames = int(getattr(image, "n_frames", 1))
        else:
            import fabio

            header = fabio.openheader(str(path))
            shape, frames = tuple(header.shape), int(header.nframes)
    except Exception:  # fabio and Pillow raise many types for a bad file: reading it says why
        return None
    if len(shape) != 2 or min(shape) < 1:
        return None
    return max(frames, 1), int(shape[0]), int(shape[1])


def read_fabio_file(path: PathLike) -> Iterator[DetectorFrame]:
    """The frames of one image file, read with fabio, one :class:`DetectorFrame` per frame.

    Never raises for a bad file: a file that cannot be opened gives one failed frame, a frame
    that cannot be read gives a failed frame in its place. Frames are decoded one at a time.
    ``metadata`` has ``source`` (``"path"`` or ``"path frame k"`` for multi-frame files,
    k from 0), ``format``, ``frame`` (k), ``n_frames`` and the header values of
    :func:`header_metadata`.
    """
    import fabio

    path = Path(path)
    source = str(path)
    try:
        stat = path.stat()
    except FileNotFoundError:
        why = broken_link_error(path) if path.is_symlink() else f"file not found: {path}"
        yield failed_frame(source, why)
        return
    except OSError as error:
        yield failed_frame(source, f"cannot access {path}: {error}")
        return
    if not path.is_file():
        yield failed_frame(source, f"not a file: {path}", stat.st_mtime)
        return
    if stat.st_size == 0:
        yield failed_frame(source, "empty file (0 bytes)", stat.st_mtime)
        return
    try:
        with path.open("rb") as handle:
            magic = handle.read(32)
    except OSError as error:
        yield failed_frame(source, f"cannot read {path}: {error}", stat.st_mtime)
        return
    kind = _format_name(path, magic)
    if kind == "CBF":
        try:
            problem = _cbf_problem(path)
        except OSError as error:
            problem = f"cannot read {path}: {error}"
        if problem is not None:
            yield failed_frame(source, problem, stat.st_mtime)
            return

    try:
        if kind == "CBF":  # its checksum was verified above: fabio need not compute it again
            image = fabio.cbfimage.CbfImage().read(str(path), check_MD5=False)
        else:
            image = fabio.open(str(path))
    except Exception as error:
        if "could not identify" in str(error) or "can't be read as format" in str(error):
            message = (
                f"unknown format: fabio recognises neither the content nor the name of {path.name}"
            )
        else:
            reason = str(error) or type(error).__name__
            message = f"corrupt or truncated {kind} file: {reason}"
        yield failed_frame(source, message, stat.st_mtime)
        return

    with image:
        n_frames = int(image.nframes)
        kind = type(image).__name__.removesuffix("Image").upper() or kind
        if n_frames < 1:
            yield failed_frame(
                source, f"no frames: fabio found no image in {kind} file", stat.st_mtime
            )
        for number in range(n_frames):
            frame_source = source if n_frames == 1 else f"{source} frame {number}"
            try:
                fabio_frame = image.get_frame(number) if n_frames > 1 else image
                data = fabio_frame.data
                header = fabio_frame.header
            except Exception as error:
                reason = str(error) or type(error).__name__
                yield failed_frame(
                    frame_source,
                    f"corrupt or truncated {kind} file: frame {number} unreadable: {reason}",
                    stat.st_mtime,
                )
                continue
            error_text: str | None = None
            if getattr(fabio_frame, "incomplete_data", False) is True:
                error_text = (
                    f"truncated file: the data block of frame {number} is shorter than its "
                    "header says"
                )
            elif data is None:
                error_text = f"corrupt or truncated {kind} file: no image data could be decoded"
            elif np.ndim(data) != 2:
                error_text = f"not a 2-D image: frame {number} has shape {np.shape(data)}"
            if error_text is not None:
                yield failed_frame(frame_source, error_text, stat.st_mtime)
                continue
            metadata, stamp, stamp_key = header_metadata(header)
            metadata = {
                "source": frame_source,
                "format": kind,
                "frame": str(number),
                "n_frames": str(n_frames),
                **metadata,
                "timestamp_from": f"header {stamp_key}" if stamp is not None else "file mtime",
            }
            yield DetectorFrame(
                data=np.asarray(data),
                timestamp=stamp if stamp is not None else stat.st_mtime,
                metadata=metadata,
            )
            if n_frames > 1 and hasattr(fabio_frame, "incomplete_data"):
                fabio_frame.data = None  # EDF frames cache their data: keep memory bounded
        if getattr(image, "incomplete_file", False) is True:
            last = image.get_frame(n_frames - 1) if n_frames > 1 else image
            if getattr(last, "incomplete_data", False) is not True:
                yield failed_frame(
                    f"{source} frame {n_frames}",
                    f"truncated file: an incomplete {kind} header follows frame {n_frames - 1}",
                    stat.st_mtime,
                )


def linked_data_files(path: PathLike) -> list[Path]:
    """The files that the HDF5 file at ``path`` points to through external links in
    ``/entry/data`` (an Eiger master's data files), resolved against its folder; ``[]`` when
    it is no such file or cannot be read."""
    from pipeline.sources.eiger import external_data_links

    try:
        return [target for _, target in external_data_links(path)]
    except (OSError, KeyError, ValueError):
        return []


class NumberedFrames(abc.ABC):
    """What the file sources share: frames numbered into exposures, and counted.

    Subclasses set :attr:`scan_id` and :attr:`first_index` (through ``__init__``) and give
    ``_frames()``; :meth:`exposures` numbers them from ``first_index`` and keeps
    :attr:`frames_read` and :attr:`frames_failed`.
    """

    def __init__(self, scan_id: str, first_index: int = 0) -> None:
        self.scan_id = scan_id
        self.first_index = first_index
        self.frames_read = 0
        self.frames_failed = 0

    @abc.abstractmethod
    def _frames(self) -> Iterator[DetectorFrame]:
        """The frames to number, in reading order."""

    def exposures(self) -> Iterator[Exposure]:
        """One exposure per frame, indices counting up from ``first_index``."""
        index = self.first_index
        for frame in self._frames():
            if frame.error is None:
                self.frames_read += 1
            else:
                self.frames_failed += 1
            yield frame.to_exposure(self.scan_id, index)
            index += 1


class FileSource(NumberedFrames):
    """Exposures from detector image files: fabio formats, and Eiger/NeXus HDF5.

    Each file is read with fabio, or with :func:`pipeline.sources.eiger.read_hdf5_file` when
    it is HDF5 (by content, or by a ``.h5``/``.nxs``/... name). HDF5 data files that a master
    file in the same list links to are skipped (their frames come through the master) and
    listed in :attr:`skipped_files`.

    Args:
        paths: files, directories or glob patterns (see :func:`expand_paths`); all files are
            read in natural order.
        scan_id: the scan the exposures belong to.
        first_index: the index of the first exposure.
        hdf5_dataset: for HDF5 files, the dataset of frames when it is not one of the Eiger
            places (``/entry/data/data`` or ``/entry/data/data_NNNNNN``) or a NeXus
            detector's ``data``: a 3-D stack gives one exposure per frame of its first axis.

    Attributes:
        files: the files to read, in reading order.
        unmatched_patterns: glob patterns that matched no file.
        skipped_files: HDF5 data files read through their master instead.
        frames_read: frames read so far.
        frames_failed: exposures so far with an error (frames or files that could not be read).
    """

    def __init__(
        self,
        paths: PathLike | Sequence[PathLike],
        scan_id: str,
        first_index: int = 0,
        hdf5_dataset: str | None = None,
    ) -> None:
        super().__init__(scan_id, first_index)
        self.hdf5_dataset = hdf5_dataset
        self.files, self.unmatched_patterns = expand_paths(paths)
        self.skipped_files: list[Path] = []

    def _files_to_read(self) -> list[tuple[Path, list[Path]]]:
        """The files read directly, each with the HDF5 data files it links to; sets
        :attr:`skipped_files` (data files read through their master)."""
        links = {path: linked_data_files(path) if is_hdf5_file(path) else [] for path in self.files}
        linked = {os.path.realpath(target) for targets in links.values() for target in targets}
        self.skipped_files = [path for path in self.files if os.path.realpath(path) in linked]
        return [(path, links[path]) for path in self.files if path not in self.skipped_files]

    def manifest(self) -> dict[str, FileStamp]:
        """The version of each file to be read (:func:`~pipeline.sources.identity.file_stamp`,
        an Eiger master with its data files), by its key: what a resumed scan compares with
        the frames its results file holds."""
        stamps = (file_stamp(path, linked) for path, linked in self._files_to_read())
        return {stamp.key: stamp for stamp in stamps}

    def frame_shape(self, max_files: int = 100) -> tuple[int, int] | None:
        """The shape, (rows, columns), of most frames in the headers of up to ``max_files``
        of the files (spread over the scan; HDF5: the datasets' shapes); ``None`` when no
        header tells. What a PONI without a detector takes as the detector's shape, so that
        an odd first frame fails alone rather than every frame after it."""
        files = [path for path, _ in self._files_to_read()]
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

    def _frames(self) -> Iterator[DetectorFrame]:
        """Each file's frames, each with its identity in ``metadata["frame_id"]``."""
        from pipeline.sources.eiger import read_hdf5_file

        for path, linked in self._files_to_read():
            stamp = file_stamp(path, linked)
            if os.path.islink(path) and not os.path.exists(path):
                frames: Iterator[DetectorFrame] = iter(
                    [failed_frame(str(path), broken_link_error(path))]
                )
            elif is_hdf5_file(path):
                frames = read_hdf5_file(path, dataset=self.hdf5_dataset)
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
        """Every file the scan is read from (an Eiger master's data files included)."""
        files, _ = expand_paths([self.path])
        linked = [target for path in files for target in linked_data_files(path)]
        return files + [path for path in linked if path.exists()]

    def last_modified(self) -> float:
        """The newest modification time of its files (s since the epoch; 0 when none)."""
        return max((path.stat().st_mtime for path in self.files()), default=0.0)


def find_scans(patterns: Sequence[PathLike]) -> list[ArchivedScan]:
    """The archived scans named by ``patterns`` (paths or glob patterns): each folder matched
    is one scan, each file another, except HDF5 data files whose master file is among the
    matches (an Eiger scan is its master file), each once (by real path). The scan id is the
    folder's name or the file's name without its suffix and a trailing ``_master``, letters,
    digits, ``.``, ``_`` and ``-`` kept (so results stay in their folder); scans in folders of
    the same name (``day1/sampleA``, ``day2/sampleA``) share it here, and
    ``flows.reprocess.name_scans`` tells them apart by their full paths.

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
            if _GLOB_MAGIC.search(text)
            else ([Path(text)] if os.path.exists(text) else [])
        )
        if not found:
            raise ValueError(f"no scan matches {text}")
        for path in found:
            matches.setdefault(os.path.realpath(path), path)
    linked = {
        os.path.realpath(target)
        for path in matches.values()
        if path.is_file() and is_hdf5_file(path)
        for target in linked_data_files(path)
    }
    scans = []
    for key, path in sorted(matches.items(), key=lambda item: natural_sort_key(item[1])):
        if key in linked or path.name.startswith("."):
            continue
        name = path.name if path.is_dir() else path.name.split(".")[0].removesuffix("_master")
        scans.append(ArchivedScan(scan_id_from(name), path))
    return scans


def open_source(paths: Sequence[str | Path], scan_id: str) -> Iterator[Exposure]:
    """Exposures from a mix of files, directories and glob patterns (fabio formats and HDF5),
    in natural order: ``FileSource(paths, scan_id).exposures()``.

    Example:
        >>> import tempfile
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
