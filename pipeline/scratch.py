"""Private scratch folders that name the process that made them.

A run's temporary folders (the feeder's run directory of sockets and configuration, the
shared-memory slots of the read-ahead reader and of the integrator processes) are removed when their process exits, but nothing
runs after a SIGKILL. So each is named ``<prefix><pid>-<random>`` after its owner, and
:func:`make_scratch_dir` first removes the folders of the same prefix whose owner no longer
runs: what a killed run left is removed by the next run's start. A PID that another process
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
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
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
