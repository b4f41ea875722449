"""Detector frames from image files through fabio: EDF, CBF, TIFF and the other formats it reads.

:func:`read_fabio_file` gives one :class:`~pipeline.sources.base.DetectorFrame` per frame: a
multi-frame EDF gives one per frame. A file or frame that cannot be read (missing, empty,
truncated, corrupt, unknown format) still gives a frame, with ``data=None`` and ``error``
saying why. Checks beyond fabio's own: an EDF frame whose data block is cut short (fabio
pads it with zeros) and a trailing half-written EDF header are errors, and a CBF binary
section must be as long as its ``X-Binary-Size`` and match its ``Content-MD5``.

Timestamps come from the header where the format has one (EDF ``time_of_day``, or a date in
``date``/``time``; the date line of a Pilatus CBF/TIFF header; the TIFF date tag); dates without
a time zone are read as local time. Otherwise the timestamp is the file's modification time.
``metadata["timestamp_from"]`` says which. :func:`header_metadata` reads the useful header
values, with units in their names; :func:`image_frames_shape` the frames' shape without
decoding a pixel.

Example:
    >>> import tempfile
    >>> from fabio.edfimage import EdfImage
    >>> path = Path(tempfile.mkdtemp()) / "frame.edf"
    >>> EdfImage(data=np.full((4, 5), 7, np.uint16), header={"count_time": "0.5"}).write(str(path))
    >>> [(int(f.data[0, 0]), f.metadata["count_time_s"], f.error) for f in read_fabio_file(path)]
    [(7, '0.5', None)]
    >>> image_frames_shape(path)
    (1, 4, 5)
    >>> import shutil; shutil.rmtree(path.parent)
"""

from __future__ import annotations

import base64
import hashlib
import math
import re
from collections.abc import Iterator, Mapping
from datetime import datetime
from pathlib import Path

import numpy as np

from pipeline.sources.base import DetectorFrame, broken_link_error, failed_frame
from pipeline.sources.paths import PathLike

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


def image_frames_shape(path: PathLike) -> tuple[int, int, int] | None:
    """(frames, rows, columns) of an image file's frames, from its header: no pixel is
    decoded. ``None`` where the file cannot tell (reading it says why).

    Example:
        >>> import tempfile
        >>> from fabio.cbfimage import CbfImage
        >>> path = Path(tempfile.mkdtemp()) / "frame.cbf"
        >>> CbfImage(data=np.zeros((195, 487), np.int32)).write(str(path))
        >>> image_frames_shape(path)
        (1, 195, 487)
        >>> import shutil; shutil.rmtree(path.parent)
    """
    path = Path(path)
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
