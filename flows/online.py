"""``online-reconstruction``: the long-running flow of a beamtime, one live series per run.

It takes frames from a DECTRIS detector's stream or from a folder a detector writes into,
starts the writer and the local inference workers (remote workers on other nodes attach on
``transport.remote_work``), and runs until the series ends (its end message, or the idle
timeout) or the run is cancelled.

The stream is connected before the processes start (a detector, or ALBA's simulator, may
drop what it cannot send), so the first images can wait in the socket for the seconds the
workers take to start. That wait is reported, not hidden: a stream's exposures are timed
by the detector's own acquisition times (:class:`~pipeline.sources.DectrisStream`), the
scan's latencies and rate count from them, and the ``received`` stage says how long frames
waited before the hand-over; the results file keeps when each was taken from the socket
(``exposures/received_time``).

Cancelling (from the UI: Prefect's runner sends SIGTERM to the flow's process) is a clean
stop: the source stops taking frames, every frame already taken is integrated, inferred and
written, the results file is closed, the summary artifact is made, and only then does the
run end as *Cancelled*. The writer and workers are not in the flow's process group, so the
signal reaches only the flow, which stops them in order; should the runner's grace period
(30 s) run out, they still finish what they hold once the flow's process is gone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Literal

from prefect import flow, get_run_logger
from prefect.exceptions import MissingContextError
from pydantic import BaseModel, ConfigDict, Field

from flows.scan import reconstruct
from pipeline.config import SCAN_ID_PATTERN, ScanSettings
from pipeline.preflight import settings_for_model
from pipeline.sources import DirectoryWatcher
from pipeline.sources.dectris import DectrisStream
from workers.feeder import ScanSummary

log = logging.getLogger(__name__)


class DectrisStreamSource(BaseModel):
    """A DECTRIS detector's SIMPLON stream (ZeroMQ PUSH; the pipeline connects with PULL)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["dectris-stream"] = "dectris-stream"
    #: the detector's stream endpoint, e.g. ``tcp://10.0.0.5:9999``
    stream: str = Field(pattern=r"^(tcp|ipc|inproc)://.+")
    protocol: Literal["dectris-v1", "dectris-v2"] = "dectris-v1"
    #: end the series after this long without a message once it started (frames kept)
    idle_timeout_s: float = Field(30.0, gt=0)
    #: larger message parts are refused (the connection dropped, the image then missing), so
    #: a rogue sender cannot exhaust memory; an Eiger2 16M image, 32-bit, is 72 MiB unpacked
    max_message_bytes: int = Field(256 * 2**20, ge=2**16)


class WatchedFolder(BaseModel):
    """A folder a detector writes frames into (EDF, CBF, TIFF, Eiger HDF5), taken as each file
    is complete."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["folder"] = "folder"
    directory: Path
    pattern: str = "*"
    #: the frames' dataset in HDF5 files where it is neither an Eiger data file's nor a NeXus
    #: detector's ``data`` (a 3-D stack: one exposure per frame)
    hdf5_dataset: str | None = None
    #: stop after this long without a new frame; ``None``: until cancelled
    idle_timeout_s: float | None = Field(30.0, gt=0)
    poll_interval_s: float = Field(0.5, gt=0)


LiveSource = Annotated[DectrisStreamSource | WatchedFolder, Field(discriminator="kind")]


@contextlib.contextmanager
def stop_on_sigterm(stop: Callable[[], None]) -> Iterator[threading.Event]:
    """While inside, SIGTERM (Prefect's cancellation, ``systemctl stop``) calls ``stop`` and
    sets the event it yields, instead of interrupting whatever runs; on leaving, a SIGTERM
    that came is handed to the handler that was there before (in a Prefect flow run,
    Prefect's, which ends the run as *Cancelled*). Outside the main thread, where signals
    cannot be caught, it changes nothing."""
    requested = threading.Event()

    def handler(signum: int, frame: object) -> None:
        requested.set()
        stop()

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield requested
        return
    try:
        yield requested
    finally:
        signal.signal(signal.SIGTERM, previous)
    if requested.is_set():
        _run_logger().info("stopped on SIGTERM after writing every frame taken")
        if callable(previous):
            previous(signal.SIGTERM, None)
        elif previous == signal.SIG_DFL:
            raise SystemExit(128 + signal.SIGTERM)


def _run_logger() -> logging.Logger | logging.LoggerAdapter:
    """The flow run's logger (its lines appear in the UI), or this module's outside a run."""
    try:
        return get_run_logger()
    except MissingContextError:
        return log


@flow(name="online-reconstruction")
def online_reconstruction(
    settings: ScanSettings,
    source: LiveSource,
    scan_id: Annotated[str, Field(pattern=SCAN_ID_PATTERN)] | None = None,
) -> ScanSummary:
    """Reconstruct one live series into ``settings.output_dir/SCAN_ID.h5`` (default scan id:
    ``online-YYYYmmdd-HHMMSS``), watched in the UI; ends with the series or on cancellation
    (see the module docstring). The line-outs are on the grid of the settings' model
    (:func:`~pipeline.preflight.settings_for_model`)."""
    settings = settings_for_model(settings)
    config = settings.for_scan(scan_id or time.strftime("online-%Y%m%d-%H%M%S"))
    if isinstance(source, DectrisStreamSource):
        protocols: dict[str, Literal["v1", "v2"]] = {"dectris-v1": "v1", "dectris-v2": "v2"}
        protocol = protocols[source.protocol]
        with (
            DectrisStream(
                source.stream,
                config.scan_id,
                protocol=protocol,
                idle_timeout_s=source.idle_timeout_s,
                max_message_bytes=source.max_message_bytes,
            ) as stream,
            stop_on_sigterm(stream.stop) as cancelled,
        ):
            summary = reconstruct(
                config,
                stream.exposures(),
                batch_size=None,
                source_ended=lambda: not cancelled.is_set() and stream.statistics.end_received,
                note=lambda: _stream_note(stream, cancelled),
            )
        return dataclasses.replace(summary, stream=stream.statistics.summary())
    stop = threading.Event()
    watcher = DirectoryWatcher(
        source.directory,
        config.scan_id,
        source.pattern,
        poll_interval_s=source.poll_interval_s,
        idle_timeout_s=source.idle_timeout_s,
        stop=stop,
        hdf5_dataset=source.hdf5_dataset,
    )
    with stop_on_sigterm(stop.set) as cancelled:
        return reconstruct(
            config,
            watcher.exposures(),
            batch_size=None,
            source_ended=lambda: not cancelled.is_set(),
            note=lambda: "Cancelled: every frame taken was written." if cancelled.is_set() else "",
        )


def _stream_note(stream: DectrisStream, cancelled: threading.Event) -> str:
    note = f"Stream: {stream.statistics.summary()}"
    if cancelled.is_set():
        note = "Cancelled: every frame taken was written. " + note
    return note
