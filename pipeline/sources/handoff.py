"""A live source's exposures taken by a thread of their own (:class:`Handoff`), so that the
thread that feeds them on is free while the source waits for its next frame: it can take
the writer's acknowledgements of the frames already sent as they come, instead of when the
next frame arrives (minutes later, at the end of a series). Without it, the newest exposure
of a run that went quiet would show neither in a live view nor in the scan's latency, which
would count the wait for the next frame.

At most ``depth`` exposures wait between the two threads (the frames are handed over, not
copied). :meth:`Source.stop <pipeline.sources.base.Source.stop>` works as before; leaving the
``with`` stops the source if it has not ended, and waits for the thread.

Example:
    >>> from pipeline.config import IntegrationConfig
    >>> from pipeline.sources import SimulatedDetector
    >>> scan = SimulatedDetector(IntegrationConfig(), seed=0).scan("doc", 3)
    >>> taken = []
    >>> with Handoff(scan) as handoff:
    ...     while not handoff.ended:
    ...         exposure = handoff.next(timeout_s=0.1)
    ...         if exposure is not None:
    ...             taken.append(exposure.index)
    >>> taken, scan.ended_cleanly
    ([0, 1, 2], True)
"""

from __future__ import annotations

import queue
import threading
from types import TracebackType

from pipeline.exposure import Exposure
from pipeline.sources.base import Source

#: How long the source's thread waits, at most, before it looks again whether the
#: :class:`Handoff` was left (seconds).
_PUT_TIMEOUT_S = 0.1


class _End:
    """The source's iteration ended (``error``: with this exception)."""

    def __init__(self, error: BaseException | None = None) -> None:
        self.error = error


class Handoff:
    """The exposures of ``source`` taken by a thread of its own and handed over one at a time
    with :meth:`next` (see the module docstring).

    Args:
        source: a source whose :meth:`~pipeline.sources.base.Source.exposures` may wait long
            for the next frame (a detector's stream, a watched folder).
        depth: exposures that may wait to be taken (the source's thread waits beyond it).
    """

    def __init__(self, source: Source, depth: int = 2) -> None:
        self.source = source
        self._waiting: queue.Queue[Exposure | _End] = queue.Queue(maxsize=depth)
        self._leaving = threading.Event()
        self._ended = False
        self._thread = threading.Thread(target=self._take, name="source", daemon=True)

    def __enter__(self) -> Handoff:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._leaving.set()
        if not self._ended:
            self.source.stop()
        self._thread.join()

    @property
    def ended(self) -> bool:
        """The source gave its last exposure, and :meth:`next` gave it on."""
        return self._ended

    def next(self, timeout_s: float) -> Exposure | None:
        """The next exposure, or ``None`` when none came within ``timeout_s`` (0: only one
        already waiting) or the source has ended (:attr:`ended`); an exception the source
        raised is raised here."""
        if self._ended:
            return None
        try:
            taken = (
                self._waiting.get(timeout=timeout_s)
                if timeout_s > 0
                else self._waiting.get_nowait()
            )
        except queue.Empty:
            return None
        if isinstance(taken, _End):
            self._ended = True
            if taken.error is not None:
                raise taken.error
            return None
        return taken

    def _take(self) -> None:
        """The source's thread: iterate the source, hand over each exposure."""
        try:
            for exposure in self.source.exposures():
                if not self._hand_over(exposure):
                    return
                del exposure  # a frame read ahead goes back to its buffer once used
        except BaseException as error:  # raised again in the thread that takes them
            self._hand_over(_End(error))
            return
        self._hand_over(_End())

    def _hand_over(self, item: Exposure | _End) -> bool:
        """Put ``item`` in the queue, waiting while it is full; ``False`` once the
        :class:`Handoff` was left (nobody takes it any more)."""
        while not self._leaving.is_set():
            try:
                self._waiting.put(item, timeout=_PUT_TIMEOUT_S)
                return True
            except queue.Full:
                continue
        return False
