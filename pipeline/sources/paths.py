"""Which files a scan's paths name: natural order, folders and globs expanded, each file once.

A scan is given as files, folders and glob patterns; :func:`expand_paths` turns them into the
list of files to read, in natural order (``scan_2`` before ``scan_10``,
:func:`natural_sort_key`), each file once however many names reach it. :func:`is_hdf5_file`
tells the HDF5 files (Eiger, NeXus) from the image files that fabio reads.

Example:
    >>> sorted(["scan_10.cbf", "scan_2.cbf"], key=natural_sort_key)
    ['scan_2.cbf', 'scan_10.cbf']
    >>> is_glob("/data/scan_*.cbf"), is_glob("/data/scan_1.cbf")
    (True, False)
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Sequence
from pathlib import Path

PathLike = str | os.PathLike[str]
"""A file name as text or path object."""

HDF5_SUFFIXES = frozenset({".h5", ".hdf5", ".hdf", ".nxs", ".nx5", ".cxi"})
"""File name endings that mark an HDF5 file even when its content is unreadable."""

_DIGITS = re.compile(r"(\d+)")
_GLOB_MAGIC = re.compile(r"[*?[]")


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


def is_glob(text: str) -> bool:
    """Whether ``text`` is a glob pattern (it has ``*``, ``?`` or ``[``)."""
    return _GLOB_MAGIC.search(text) is not None


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
        if is_glob(text):
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
    """Whether ``path`` may hold frames: a file, or a symbolic link whose target is missing
    (reading it says so)."""
    return os.path.isfile(path) or (os.path.islink(path) and not os.path.exists(path))


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
