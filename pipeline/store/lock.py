"""One writer per results file: a lock that the kernel releases when its holder dies.

The lock is an ``fcntl.flock`` on a hidden file beside the results file
(``OUT/.SCAN_ID.h5.lock``), which names the holder's process id. Processes that inherit the
lock's file descriptor (the scan's writer process) hold it with the run that took it, so the
results file stays locked until the last of them exits, however it exits: a run killed with
SIGKILL leaves no stale lock. A second run on the same file is refused at once with
:class:`ResultsBusy`; nothing of the first run's file is touched.

The lock file itself stays (removing it would race with a run opening it).

Example:
    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "scan.h5"
    >>> with ResultsLock(path) as lock:
    ...     try:
    ...         ResultsLock(path).acquire()
    ...     except ResultsBusy as busy:
    ...         print("refused:", "another run" in str(busy))
    refused: True
    >>> ResultsLock(path).acquire().release()
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path


class ResultsBusy(OSError):
    """Another run writes this results file."""


def lock_path(results: Path) -> Path:
    """The lock file of a results file: hidden, beside it."""
    results = Path(results)
    return results.with_name(f".{results.name}.lock")


class ResultsLock:
    """An exclusive lock on a results file (a context manager; see the module)."""

    def __init__(self, results: Path) -> None:
        self.results = Path(results)
        self.path = lock_path(self.results)
        self._fd: int | None = None

    def acquire(self) -> ResultsLock:
        """Take the lock; :class:`ResultsBusy`, naming the holder, when another run has it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ResultsBusy(
                f"{self.results} is being written by another run (process {holder}): wait "
                "for it to end, or stop it, before resuming or writing this scan again"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def check(self) -> None:
        """:class:`ResultsBusy` when another run holds the lock now (nothing is kept)."""
        self.acquire().release()

    @property
    def fd(self) -> int:
        """The locked file descriptor, for a child process that holds the lock too."""
        if self._fd is None:
            raise RuntimeError("the lock is not held")
        return self._fd

    def release(self) -> None:
        """Let go of the lock (children that inherited it keep it until they exit)."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    def __enter__(self) -> ResultsLock:
        return self.acquire()

    def __exit__(self, *exc_info: object) -> None:
        self.release()
