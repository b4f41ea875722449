"""Private scratch folders that name the process that made them, and frames that lie in
their shared-memory slot files.

A run's temporary folders (the feeder's run directory of sockets and configuration, the
shared-memory slots of the read-ahead reader and of the integrator processes) are removed
when their process exits, but nothing runs after a SIGKILL. So each is named
``<prefix><pid>-<random>`` after its owner, and :func:`make_scratch_dir` first removes the
folders of the same prefix whose owner no longer runs: what a killed run left is removed by
the next run's start. A PID that another process
has taken since counts as alive (its folder stays until a later start); folders of other
users, and names without a PID, are never touched.

Example:
    >>> import os, subprocess, sys, tempfile
    >>> from pathlib import Path
    >>> folder = Path(tempfile.mkdtemp())
    >>> mine = make_scratch_dir("demo-", folder)
    >>> mine.name.startswith(f"demo-{os.getpid()}-")
    True
    >>> finished = subprocess.Popen([sys.executable, "-c", "pass"])
    >>> _ = finished.wait()  # its PID is now free: a run killed before it could clean up
    >>> (folder / f"demo-{finished.pid}-abcd").mkdir()
    >>> remove_stale_scratch_dirs("demo-", folder) == [folder / f"demo-{finished.pid}-abcd"]
    True
    >>> sorted(path.name for path in folder.iterdir()) == [mine.name]  # the live one stays
    True
    >>> import shutil; shutil.rmtree(folder)

A frame handed out as a view of a slot file keeps a :class:`SlotLease` as its base: the slot
is reused once the last view is gone, and :func:`slot_file_of` tells another process's
owner (the integrator pool) where the frame lies, so that it passes the file's name instead
of copying the frame.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import weakref
from collections.abc import Callable
from pathlib import Path

import numpy as np


def shared_memory_folder() -> str | None:
    """``/dev/shm`` where it exists (Linux), else ``None`` (the default temporary folder): where
    frames handed between processes wait in slot files."""
    return "/dev/shm" if os.path.isdir("/dev/shm") else None


def frame_view(buffer: np.ndarray, shape: tuple[int, ...], dtype: np.dtype | str) -> np.ndarray:
    """The first bytes of a slot file's ``buffer`` (mapped as bytes) seen as a frame of
    ``shape`` and ``dtype``."""
    dtype = np.dtype(dtype)
    return buffer[: int(np.prod(shape)) * dtype.itemsize].view(dtype).reshape(shape)


class SlotLease:
    """A frame's hold on the slot file ``path`` whose first bytes ``view`` is: numpy keeps
    the lease as the base of ``np.asarray(lease)`` (and of every view of that), and
    ``release`` is called once the last of them is gone.

    Example:
        >>> import numpy as np, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "slot-0.bin")
        >>> np.zeros(6, np.uint8).tofile(path)
        >>> released = []
        >>> view = frame_view(np.memmap(path, np.uint8, "r"), (2, 3), np.uint8)
        >>> frame = np.asarray(SlotLease(view, path, lambda: released.append(path)))
        >>> slot_file_of(frame) == path, slot_file_of(frame[1:]), slot_file_of(view)
        (True, None, None)
        >>> del frame, view
        >>> released == [path]
        True
        >>> shutil.rmtree(os.path.dirname(path))
    """

    def __init__(self, view: np.ndarray, path: str, release: Callable[[], None]) -> None:
        self.__array_interface__ = view.__array_interface__
        self.path = path
        self._view = view  # keeps the slot's mapping alive
        weakref.finalize(self, release)


def slot_file_of(frame: np.ndarray) -> str | None:
    """The slot file whose first bytes are the whole of ``frame`` (a frame handed out with a
    :class:`SlotLease`, as :class:`~pipeline.sources.ReadAhead` does), or ``None`` for any
    other array, a part of such a frame included."""
    lease = frame.base
    if not isinstance(lease, SlotLease):
        return None
    interface = lease.__array_interface__
    whole = (
        frame.__array_interface__["data"][0] == interface["data"][0]
        and frame.shape == interface["shape"]
        and frame.dtype.str == interface["typestr"]
        and frame.flags.c_contiguous
    )
    return lease.path if whole else None


def make_scratch_dir(prefix: str, folder: str | Path | None = None) -> Path:
    """A new private folder ``<prefix><pid>-<random>`` in ``folder`` (the temporary folder
    when ``None``), after removing those of ``prefix`` there whose owner no longer runs."""
    remove_stale_scratch_dirs(prefix, folder)
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=folder))


def remove_stale_scratch_dirs(prefix: str, folder: str | Path | None = None) -> list[Path]:
    """Remove the folders ``<prefix><pid>-...`` of this user in ``folder`` (the temporary
    folder when ``None``) whose process ``pid`` no longer runs; return those removed."""
    folder = Path(folder if folder is not None else tempfile.gettempdir())
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        pid = _owner_pid(entry.name, prefix)
        if pid is None or _is_running(pid):
            continue
        try:
            info = entry.stat(follow_symlinks=False)
        except OSError:
            continue  # removed meanwhile
        if stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid():
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(folder / entry.name)
    return removed


def _owner_pid(name: str, prefix: str) -> int | None:
    """The PID in a name ``<prefix><pid>-<random>``, or ``None`` for any other name."""
    if not name.startswith(prefix):
        return None
    pid, separator, _ = name[len(prefix) :].partition("-")
    if not (separator and pid.isdigit() and pid.isascii()):
        return None
    return int(pid) if int(pid) > 0 else None


def _is_running(pid: int) -> bool:
    """Whether a process ``pid`` exists (of any user); always ``True`` where signal 0 is no
    probe (Windows)."""
    if os.name != "posix":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except OverflowError:  # not a PID this system can have
        return False
    return True
