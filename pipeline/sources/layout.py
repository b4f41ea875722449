"""The Eiger master and data files of a scan: which file each frame is read from.

The DECTRIS file writer writes a series as one **master** file (the detector description, and
in ``/entry/data`` one external link per **data** file: ``data_000001`` to
``x_data_000001.h5``, ...) and the data files, which hold the frames. A scan named by files,
folders and globs (``x_master.h5`` beside its ``x_data_*.h5``, say) therefore names most
frames twice: through the master's links and in their data file. :func:`scan_files` is the
one rule for archived files (:class:`~pipeline.sources.FileSource`,
:class:`~pipeline.sources.EigerSource`, :func:`~pipeline.sources.find_scans`):

- a master is read directly, with the data files it links to (:func:`linked_data_files`),
  so that its frames come in the series' order, with its metadata, and a missing data file
  is reported frame by frame;
- a data file that a master among the files links to is read through that master, not again;
- every other file is read directly: a data file whose master is not among the files, image
  files, NeXus files.

A link names its data file as HDF5 finds it (:func:`link_target`): an absolute name as it is,
a relative one (what the DECTRIS writer writes) in the folder of the master's real file, so
that a master reached through a symbolic link to it still finds the data files beside the file
it points to. Files are compared by their real paths, so a data file is recognised under any
name the scan gives it: through a symbolically linked folder, a relative link, an absolute one.

A folder being written (:class:`~pipeline.sources.DirectoryWatcher`) is read the other way
round: its frames are taken from the data files as they grow, before the master can be read
whole, so there a master (a file with :func:`data_file_links`) is skipped and its data files
are read, with its detector description (:func:`master_file_for`).

Example:
    >>> import tempfile
    >>> import h5py
    >>> import numpy as np
    >>> folder = Path(tempfile.mkdtemp())
    >>> for n in (1, 2):
    ...     with h5py.File(folder / f"x_data_00000{n}.h5", "w") as data_file:
    ...         data_file["entry/data/data"] = np.zeros((2, 4, 6), np.uint16)
    >>> with h5py.File(folder / "x_master.h5", "w") as master:
    ...     for n in (1, 2):
    ...         master[f"entry/data/data_00000{n}"] = h5py.ExternalLink(
    ...             f"x_data_00000{n}.h5", "/entry/data/data")
    >>> files = scan_files(sorted(folder.iterdir()))
    >>> [(f.path.name, [d.name for d in f.data_files]) for f in files.read]
    [('x_master.h5', ['x_data_000001.h5', 'x_data_000002.h5'])]
    >>> [path.name for path in files.through_master]
    ['x_data_000001.h5', 'x_data_000002.h5']
    >>> [f.path.name for f in scan_files([folder / "x_data_000002.h5"]).read]
    ['x_data_000002.h5']
    >>> import shutil; shutil.rmtree(folder)
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py

from pipeline.sources.hdf5 import DATA_GROUP, open_hdf5
from pipeline.sources.paths import PathLike, is_hdf5_file, natural_sort_key

_DATA_FILE_NAME = re.compile(r"(.+)_data_\d+(\.[^.]+)$")


def link_target(master: PathLike, filename: str) -> Path:
    """The file that an external link of the file ``master`` names as ``filename``, where
    HDF5 finds it: an absolute name as it is, a relative one in the folder of the master's
    real file (symbolic links resolved, as HDF5 resolves a linked master file)."""
    target = Path(filename)
    return target if target.is_absolute() else Path(os.path.realpath(master)).parent / target


def data_file_links(handle: h5py.File) -> list[tuple[str, Path]]:
    """The external links of an open file's ``/entry/data`` group, in natural order: pairs of
    the link's HDF5 path and the data file it names (:func:`link_target`); ``[]`` for a file
    that is no master."""
    group = handle.get(DATA_GROUP)
    if not isinstance(group, h5py.Group):
        return []
    links: list[tuple[str, Path]] = []
    for name in sorted(group.keys(), key=natural_sort_key):
        link = group.get(name, getlink=True)
        if isinstance(link, h5py.ExternalLink):
            links.append((f"{DATA_GROUP}/{name}", link_target(handle.filename, link.filename)))
    return links


def linked_data_files(path: PathLike) -> list[Path]:
    """The data files that the file at ``path`` links to, when it is an Eiger master
    (:func:`data_file_links`); ``[]`` for any other file, or one that cannot be read."""
    if not is_hdf5_file(path):
        return []
    try:
        with open_hdf5(path) as handle:
            return [target for _, target in data_file_links(handle)]
    except (OSError, RuntimeError, KeyError, ValueError):
        return []


def master_file_for(path: PathLike) -> Path | None:
    """The master file of an Eiger data file by the DECTRIS names (``x_data_000003.h5`` ->
    ``x_master.h5`` in the same folder) when it exists, else ``None``: where a data file read
    on its own finds its detector description."""
    path = Path(path)
    match = _DATA_FILE_NAME.fullmatch(path.name)
    if match is None:
        return None
    master = path.with_name(f"{match.group(1)}_master{match.group(2)}")
    return master if master.is_file() else None


@dataclass(frozen=True)
class FileToRead:
    """A file read directly, and the data files it links to (a master's; none otherwise)."""

    path: Path
    data_files: tuple[Path, ...] = ()


@dataclass(frozen=True)
class ScanFiles:
    """A scan's files by how their frames are read (see the module docstring).

    Attributes:
        read: the files read directly, in the order given, each with its data files.
        through_master: the data files read through a master among the files, in the order
            given.
    """

    read: tuple[FileToRead, ...]
    through_master: tuple[Path, ...]


def scan_files(files: Sequence[Path]) -> ScanFiles:
    """The rule of the module docstring applied to ``files``: which are read directly (with
    the data files they link to) and which data files are read through their master."""
    links = [(path, linked_data_files(path)) for path in files]
    linked = {os.path.realpath(target) for _, targets in links for target in targets}
    return ScanFiles(
        read=tuple(
            FileToRead(path, tuple(targets))
            for path, targets in links
            if os.path.realpath(path) not in linked
        ),
        through_master=tuple(path for path in files if os.path.realpath(path) in linked),
    )
