"""An exposure on its way in: placed in the results file, then a line-out or a failure.

:class:`Integration` owns the scan's pyFAI integrator (one per process, built and checked
against the model's instrument before any frame: :func:`~pipeline.preflight.checked_integrator`),
and, where the scan has more than one engine (``n_integrators``,
:func:`~pipeline.integration.pool.integrator_processes`), the
:class:`~pipeline.integration.pool.IntegratorPool` of integrator processes that integrate its
frames instead, in any order (and decode those a stream left compressed): their line-outs are
taken with :meth:`Integration.take_finished`.
It places each exposure against a resumed scan's plan (:meth:`~pipeline.store.resume.ResumePlan.place`:
``None`` for a row the file holds already) and turns it into a line-out, or into an
:class:`Unusable` (a frame the source could not read, or one that cannot be integrated),
whose failure record goes straight to the writer, so the file has a row for every exposure.
Where the frames' shape comes only with the first frame, the geometry it completes is
checked then. :func:`line_out_message` and :func:`failure_message` are the messages that
take either on.

Example:
    >>> from pipeline.exposure import Exposure
    >>> unreadable = Exposure("doc", 7, 0.0, None, error="truncated file")
    >>> record = failure_message(unreadable, "read", unreadable.error)
    >>> record.index, record.stage, record.error
    (7, 'read', 'truncated file')
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.config import PipelineConfig
from pipeline.exposure import Exposure, LineOut
from pipeline.integration import FrameError, NoPixelInRange, exposure_normalization
from pipeline.integration.pool import IntegratorPool, integrator_processes
from pipeline.preflight import GeometryMismatch, check_model_geometry, checked_integrator
from pipeline.sources.compression import EncodedFrame, FormatError
from pipeline.store.resume import ResumePlan
from pipeline.transport.messages import Failure, FrameMessage, LineOutMessage
from pipeline.transport.wire import ALLOWED_DTYPES
from workers.feeder.metrics import ScanMetrics
from workers.feeder.reports import ScanError


def about(exposure: Exposure) -> dict[str, Any]:
    """What every message about ``exposure`` says of it: the fields of
    :class:`~pipeline.transport.messages.ExposureMessage` but the normalization, which is
    not known before integration (a plain dict: this is on every exposure's path)."""
    return {
        "index": exposure.index,
        "scan_id": exposure.scan_id,
        "timestamp": exposure.timestamp,
        "received_time": math.nan if exposure.received_at is None else exposure.received_at,
        "truth": exposure.truth,
        "source": exposure.metadata.get("source", ""),
        "frame_id": exposure.metadata.get("frame_id", ""),
    }


def line_out_message(exposure: Exposure, line_out: LineOut) -> LineOutMessage:
    """The message that takes an exposure's line-out to a worker."""
    return LineOutMessage(
        **about(exposure),
        normalization=line_out.normalization,
        counts=line_out.counts,
        counts_sd=line_out.counts_sd,
    )


def frame_message(
    exposure: Exposure, frame: np.ndarray | EncodedFrame, normalization: float
) -> FrameMessage:
    """The message that takes an exposure's ``frame`` (compressed where the source left it
    so) to a worker that integrates it; a pixel type the wire does not carry (float16) goes
    as float32, which holds its values."""
    if isinstance(frame, np.ndarray) and frame.dtype.newbyteorder("<").str not in ALLOWED_DTYPES:
        frame = frame.astype(np.float32)
    return FrameMessage.of({**about(exposure), "normalization": normalization}, frame)


def failure_message(exposure: Exposure, stage: str, error: str) -> Failure:
    """The failure record of an exposure that never reached a worker."""
    return Failure(**about(exposure), stage=stage, error=error)


@dataclass(frozen=True)
class Unusable:
    """An exposure that gives no line-out: at which ``stage`` (``read``, ``integration``)
    and why."""

    stage: str
    error: str


#: What :meth:`Integration.begin` makes of an exposure: its line-out, why it has none, or
#: where the workers integrate, the message that takes its frame to them.
Outcome = LineOut | Unusable | FrameMessage


class Integration:
    """Places and integrates the exposures of one scan (``config``), counting the
    ``integrated`` stage in ``metrics``. :class:`ScanError` (one line) when the geometry
    does not match the model's instrument.

    With more than one engine (:func:`~pipeline.integration.pool.integrator_processes`),
    :meth:`start` starts the integrator processes, :meth:`begin` hands them a frame (its
    compressed bytes where the source left it ``encoded``), and :meth:`take_finished` returns
    what they integrated. Where the frames' shape comes only with the first frame, that frame
    is integrated here (which completes and checks the geometry) and the processes start
    after it."""

    def __init__(self, config: PipelineConfig, metrics: ScanMetrics) -> None:
        self.config = config
        self.metrics = metrics
        #: a resumed scan's plan (set when the scan starts), ``None`` for a new file
        self.plan: ResumePlan | None = None
        #: exposures whose row the resumed file holds already
        self.skipped = 0
        try:  # a geometry the model was not trained for stops here, before any process
            self.integrator = checked_integrator(config)
        except GeometryMismatch as error:
            raise ScanError(str(error)) from None
        #: whether the inference workers integrate the frames (``integrate_on_workers``)
        self.on_workers = config.integrate_on_workers
        if self.on_workers and self.integrator.shape is None:
            raise ScanError(
                "integrate_on_workers needs the frames' shape before the first frame: the "
                f"PONI {config.integration.poni} names no detector (give detector_shape, or a "
                "PONI that names the detector)"
            )
        #: pyFAI engines integrating at once (1: this process's own)
        self.processes = integrator_processes(config)
        self.pool: IntegratorPool | None = None
        self._integrating: dict[int, Exposure] = {}  # by index, without their frames
        self._finished: list[tuple[Exposure, LineOut | Unusable]] = []

    def start(self, timeout_s: float | None = None) -> None:
        """Start the integrator processes (for more than one engine, once the frames' shape
        is known), waiting up to ``timeout_s`` for their engines (``None``: not waiting)."""
        if self.processes < 2 or self.pool is not None or self.integrator.shape is None:
            return
        integration = self.config.integration.model_copy(
            update={"detector_shape": self.integrator.shape}
        )
        self.pool = IntegratorPool(integration, self.integrator.grid, self.processes).start()
        if timeout_s is not None:
            self.pool.wait_ready(timeout_s)

    def close(self) -> None:
        """Stop the integrator processes; frames they had not integrated are dropped."""
        if self.pool is not None:
            self.pool.close()

    @property
    def has_room(self) -> bool:
        """Whether :meth:`begin` can take another frame now."""
        return self.pool is None or self.pool.has_room

    @property
    def pending(self) -> int:
        """Frames handed to the integrator processes and not yet taken back."""
        return len(self._integrating) + len(self._finished)

    def fds(self) -> list[int]:
        """The integrator processes' pipes, to wake for (then :meth:`collect`)."""
        return self.pool.fds() if self.pool is not None else []

    def begin(self, exposure: Exposure) -> Outcome | None:
        """The exposure's line-out or why there is none, or ``None`` when an integrator
        process took its frame (see :meth:`take_finished`; wait for :attr:`has_room` first);
        where the workers integrate, the message of its frame (:meth:`for_worker`)."""
        if self.on_workers:
            return self.for_worker(exposure)
        frame = exposure.frame if exposure.frame is not None else exposure.encoded
        if self.pool is None or exposure.error is not None or frame is None:
            result = self.line_out(exposure)
            self.start()  # where the first frame gave the shape
            return result
        try:
            normalization = exposure_normalization(exposure, self.config.integration)
        except FrameError as error:
            return Unusable("integration", str(error))
        self.pool.submit(exposure.index, frame, normalization, exposure.metadata.get("source"))
        self._integrating[exposure.index] = dataclasses.replace(exposure, frame=None, encoded=None)
        return None

    def for_worker(self, exposure: Exposure) -> FrameMessage | Unusable:
        """The message that takes the exposure's frame to a worker that integrates it, or
        why it cannot go: a frame the source could not read, a normalization missing from
        its metadata, a frame whose shape or pixel type the geometry refuses, or one larger
        than a worker takes (``transport.max_message_bytes``, with room for the header)."""
        frame = exposure.frame if exposure.frame is not None else exposure.encoded
        if exposure.error is not None or frame is None:
            return Unusable("read", exposure.error or "the source delivered no frame")
        try:
            normalization = exposure_normalization(exposure, self.config.integration)
            if isinstance(frame, np.ndarray):
                self.integrator.validate_layout(frame)
            elif len(frame.shape) != 2:
                raise FrameError(f"frame shape {frame.shape} is not a 2-D image")
        except FrameError as error:
            return Unusable("integration", str(error))
        message = frame_message(exposure, frame, normalization)
        size, limit = message.image.nbytes, self.config.transport.max_message_bytes - 2**16
        if size > limit:
            return Unusable(
                "integration",
                f"the frame is {size} bytes, more than a worker takes ({limit}: "
                "transport.max_message_bytes less 64 kB): raise it, or leave the frames "
                "compressed",
            )
        return message

    def collect(self) -> None:
        """Take in what the integrator processes have integrated (without waiting)."""
        if self.pool is None:
            return
        for done in self.pool.collect():
            exposure = self._integrating.pop(done.key)
            if done.line_out is None:
                self._finished.append((exposure, Unusable(done.stage, str(done.error))))
            else:
                self.metrics.record("integrated", done.seconds)
                self._finished.append((exposure, done.line_out))

    def take_finished(self) -> list[tuple[Exposure, LineOut | Unusable]]:
        """The exposures integrated by the processes since the last call, with their
        line-outs or why there is none."""
        self.collect()
        finished, self._finished = self._finished, []
        return finished

    def place(self, exposure: Exposure) -> Exposure | None:
        """``exposure`` with its index in the results file (a resumed scan's plan numbers
        new frames after the file's rows); ``None`` when its row is in the file already."""
        placed = self.plan.place(exposure) if self.plan is not None else exposure
        if placed is None:
            self.skipped += 1
        return placed

    def line_out(self, exposure: Exposure) -> LineOut | Unusable:
        """The exposure's line-out (its frame decoded first where the source left it
        compressed), or why there is none."""
        start = time.perf_counter()
        try:
            frame = exposure.image() if exposure.error is None else None
        except FormatError as error:
            return Unusable("read", str(error))
        if frame is None:
            return Unusable("read", exposure.error or "the source delivered no frame")
        shape_was_open = self.integrator.shape is None
        try:
            normalization = exposure_normalization(exposure, self.config.integration)
            line_out = self.integrator.integrate(
                frame, normalization, source=exposure.metadata.get("source")
            )
        except NoPixelInRange:  # the first frame made a geometry with no pixel on the grid
            self._check_first_geometry()
            raise
        except FrameError as error:
            if shape_was_open and self.integrator.shape is not None:
                self._check_first_geometry()
            return Unusable("integration", str(error))
        if shape_was_open:
            self._check_first_geometry()
        self.metrics.record("integrated", time.perf_counter() - start)
        return line_out

    def _check_first_geometry(self) -> None:
        """:class:`ScanError` (one line) when the geometry that the first frame completed
        does not match the model's instrument (:func:`~pipeline.preflight.check_geometry`).

        Why here: a PONI that names no detector, with no mask, dark, flat or
        ``detector_shape`` (:func:`~pipeline.integration.frame_shape_is_open`; ``online``
        with a v1 PONI), leaves the frames' shape, and so the pixels of each q bin, unknown
        until the first frame, when the integrator is built; the preflight and
        :meth:`__init__` could not count them. The scan stops at that frame, before any
        line-out of this geometry reaches a model that was not trained for it."""
        try:
            check_model_geometry(self.integrator, self.config)
        except GeometryMismatch as error:
            raise ScanError(str(error)) from None
