"""An exposure's identity: where its frame lies, and which version of that file it was.

A frame read from a file is identified by its *content address*, not by its place in a list
of files: the file's real path (symbolic links resolved), the frame's number within the file,
and the file's size and modification time (with an Eiger master, those of its data files
too). It travels as :class:`FrameId` text in ``Exposure.metadata["frame_id"]`` and is stored
with each row of the results file, so that a resumed scan knows which frames it holds:

- the same location and stamp: the frame is in the file already (skipped);
- the same location, another stamp: the file changed since (its rows are redone);
- a location the file does not hold: a new frame (processed);
- a row whose file is no longer among the scan's files: reported, kept.

Example:
    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> _ = (folder / "f_1.tif").write_bytes(b"12345")
    >>> stamp = file_stamp(folder / "f_1.tif")
    >>> stamp.size_bytes
    5
    >>> frame = FrameId.parse(stamp.frame_id(3))
    >>> frame.location == stamp.location(3), frame.frame, frame.stamp == stamp.stamp
    (True, 3, True)
    >>> FrameId.parse("") is None
    True
    >>> import shutil; shutil.rmtree(folder)
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

#: Bytes of the BLAKE2b digest of a file's real path (32 hexadecimal digits).
PATH_DIGEST_BYTES = 16


def path_key(path: str | os.PathLike[str]) -> str:
    """The digest of ``path``'s real path (links resolved): equal for every name of a file.

    >>> path_key("/tmp/../tmp/x") == path_key("/tmp/x")
    True
    """
    real = os.path.realpath(os.fspath(path))
    return hashlib.blake2b(
        real.encode(errors="surrogateescape"), digest_size=PATH_DIGEST_BYTES
    ).hexdigest()


@dataclass(frozen=True)
class FileStamp:
    """One version of a file: its key (:func:`path_key`), size in bytes and modification time
    in nanoseconds; -1 for both when the file cannot be reached (a dangling link)."""

    key: str
    size_bytes: int
    mtime_ns: int

    @property
    def stamp(self) -> tuple[int, int]:
        """(size, modification time): what changes when the file is rewritten."""
        return self.size_bytes, self.mtime_ns

    def location(self, frame: int) -> str:
        """Where frame number ``frame`` (from 0, in reading order) of this file lies."""
        return f"{self.key}:{frame}"

    def frame_id(self, frame: int) -> str:
        """The :class:`FrameId` text of frame ``frame`` of this version of the file."""
        return f"{self.location(frame)}:{self.size_bytes}:{self.mtime_ns}"


def file_stamp(path: str | os.PathLike[str], linked: Iterable[Path] = ()) -> FileStamp:
    """The :class:`FileStamp` of ``path``; ``linked`` files (an Eiger master's data files)
    add their sizes, and the newest modification time counts."""
    size, mtime = -1, -1
    for name in (Path(path), *linked):
        try:
            status = name.stat()
        except OSError:
            continue
        size = max(size, 0) + status.st_size
        mtime = max(mtime, status.st_mtime_ns)
    return FileStamp(path_key(path), size, mtime)


@dataclass(frozen=True)
class FrameId:
    """A frame's identity, parsed from its text ``KEY:FRAME:SIZE:MTIME_NS``."""

    key: str
    frame: int
    size_bytes: int
    mtime_ns: int

    @property
    def location(self) -> str:
        """Where the frame lies (file and frame number), whatever the file's version."""
        return f"{self.key}:{self.frame}"

    @property
    def stamp(self) -> tuple[int, int]:
        """The file's (size, modification time) when the frame was read."""
        return self.size_bytes, self.mtime_ns

    @classmethod
    def parse(cls, text: str) -> FrameId | None:
        """The identity in ``text``; ``None`` for text that is none (a simulated or streamed
        frame has no file)."""
        parts = text.split(":")
        if len(parts) != 4:
            return None
        try:
            return cls(parts[0], int(parts[1]), int(parts[2]), int(parts[3]))
        except ValueError:
            return None
