"""The scan flows of one scan: a simulated scan (``reconstruct-scan``, the demo) and archived
frames (``reprocess-scan``), and :func:`reconstruct`, which every scan flow runs (the live
flow, :mod:`flows.online`, and the batch reprocessing, :mod:`flows.reprocess`, too): it
reconstructs the source its configuration names (``config.source``).

The flows are thin: :class:`workers.feeder.Feeder` starts the writer and inference workers;
for archived and simulated frames each task integrates and sends one batch of frames (never
one task per exposure: a Prefect task costs 10-27 ms here), for a live stream one task takes
the whole series and sends each frame on as it arrives. A :class:`flows.monitor.ScanMonitor`
shows progress, recent exposures, plots and alerts in the UI, rate-limited.

Without ``PREFECT_API_URL`` the flows run on Prefect's ephemeral local server.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import chain, islice
from pathlib import Path

import numpy as np
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext
from prefect.exceptions import MissingContextError
from prefect.runtime import flow_run
from prefect.states import Cancelled, Completed, Failed, State

from flows.monitor import ScanMonitor, scan_key
from pipeline.config import InferenceConfig, IntegrationConfig, PipelineConfig
from pipeline.exposure import Exposure
from pipeline.instrument import Instrument, default_instrument, load_instrument
from pipeline.integration import DEFAULT_PONI
from pipeline.live import LiveFigure, LivePage, LivePageSettings, LiveScanView, ScanCounts
from pipeline.model.checkpoint import card_instrument, model_for_instrument, read_card
from pipeline.physics import GRATING_PARAMETERS
from pipeline.preflight import settings_for_model
from pipeline.source_specs import SimulatedFrames
from pipeline.sources.base import Source
from pipeline.sources.handoff import Handoff
from pipeline.sources.opening import OpenedSource, opened
from pipeline.store import open_results
from pipeline.store.nxcansas import SASDATA_GROUP_S
from pipeline.store.results import written_indices
from workers.feeder import Feeder, ScanError, ScanSummary
from workers.feeder.metrics import stage_table

log = logging.getLogger(__name__)

#: A live scan waiting for its next frame hears from the source at least this often
#: (seconds): the watchers are told the counts, the feeder looks after its workers.
IDLE_WAIT_S = 0.5
#: While exposures wait for their acknowledgement, the feeder waits this long for one
#: before it looks again for a new frame (milliseconds).
ACK_WAIT_MS = 20
#: A results file that will take at least this long (seconds) to finish when the scan ends
#: is announced in the run's log (:func:`finishing_notice`).
FINISHING_NOTICE_S = 5.0


@task(name="integrate-and-send", cache_policy=NO_CACHE)
def submit_batch(feeder: Feeder, exposures: Iterator[Exposure]) -> int:
    """Integrate a batch of frames and send the line-outs to the workers.

    The frames are taken one at a time, so that each is dropped once integrated (a source
    that reads ahead hands its buffer back then).
    """
    for exposure in exposures:
        feeder.submit(exposure)
    return feeder.collect()


@task(name="receive-integrate-send", cache_policy=NO_CACHE)
def submit_stream(feeder: Feeder, source: Source, watchers: ScanWatchers) -> int:
    """Integrate and send each frame of a live stream as it arrives (one task per series).

    The source is read by a thread of its own (:class:`~pipeline.sources.handoff.Handoff`):
    while it waits for the next frame, the writer's acknowledgements are taken as they come,
    so that the newest exposure shows at once (and its latency ends when it was written, not
    when the next frame came), and the watchers hear of the scan at least every
    :data:`IDLE_WAIT_S` seconds (a silent feed shows)."""
    with Handoff(source) as frames:
        while not frames.ended:
            unacknowledged = feeder.n_done < feeder.n_submitted
            exposure = frames.next(timeout_s=0 if unacknowledged else IDLE_WAIT_S)
            if exposure is not None:
                watchers.view.offer(exposure)
                feeder.submit(exposure)
                del exposure  # a frame read ahead goes back to its buffer
                feeder.collect()
            else:
                feeder.collect(ACK_WAIT_MS if unacknowledged else 0)
            watchers.progress(feeder.n_done, feeder.n_submitted)
    return feeder.n_submitted


@task(name="wait-for-results", cache_policy=NO_CACHE)
def wait_for_results(feeder: Feeder, watchers: ScanWatchers) -> ScanSummary:
    """Wait until the writer has acknowledged every exposure."""
    return feeder.wait(on_progress=watchers.progress)


def summary_markdown(summary: ScanSummary, note: str = "") -> str:
    """The scan's summary artifact: counts (quality flags included), rate, latency, stages,
    failures, output path."""
    lines = [
        f"# Scan `{summary.scan_id}`",
        "",
        "| exposures | written | failed | flagged | wall time | rate | latency p50 / p99 |",
        "|---|---|---|---|---|---|---|",
        f"| {summary.submitted} | {summary.written_ok} | {summary.failed} | {summary.flagged} "
        f"| {summary.wall_s:.1f} s "
        f"| {summary.exposures_per_s:.1f} /s | {summary.latency_p50_ms:.0f} / "
        f"{summary.latency_p99_ms:.0f} ms |",
        "",
        f"Results: `{summary.output_path}`",
    ]
    if note:
        lines += ["", note]
    lines += ["", "## Stages", "", "```", stage_table(summary.stages), "```"]
    if summary.worker_restarts or summary.writer_restarts or summary.resent:
        lines += [
            "",
            f"Workers replaced: {summary.worker_restarts}; results writer started again: "
            f"{summary.writer_restarts}; exposures re-sent: {summary.resent} "
            f"({summary.duplicates} computed twice, written once).",
        ]
    if summary.remote_workers:
        lines += ["", f"Remote workers: {summary.remote_workers} (on other nodes)."]
    if summary.skipped:
        lines += ["", f"Resumed: {summary.skipped} exposures were already in the file."]
    if summary.redone or summary.removed:
        lines += [
            "",
            f"Redone: {summary.redone} rows (failed ones retried, or of files changed since); "
            f"kept from files no longer in the scan: {summary.removed}.",
        ]
    if summary.failures:
        lines += ["", "## Failed exposures", ""]
        lines += [f"- {index}: {error}" for index, error in sorted(summary.failures.items())]
    return "\n".join(lines)


class ScanFailed(Exception):
    """A scan that ran to its end with more failed exposures than its configuration allows
    (``max_failed_fraction``): its run ends *Failed*, with the counts as the state's message;
    :attr:`summary` is the whole summary."""

    def __init__(self, summary: ScanSummary, max_failed_fraction: float) -> None:
        super().__init__(
            f"{summary.counts()}: more than {max_failed_fraction:.0%} of the exposures failed"
        )
        self.summary = summary


class ScanCancelled(ScanError):
    """A scan that SIGTERM stopped (Prefect cancelling its run, ``systemctl stop``; see
    :func:`stop_on_sigterm`) once every frame it had taken was written: its run ends
    *Cancelled*, with the counts as the state's message. It is raised where the run's result
    is taken (calling the flow, :func:`summary_of`), so that a command says the scan stopped
    and exits non-zero; :attr:`summary` is the whole summary."""

    def __init__(self, summary: ScanSummary) -> None:
        super().__init__(f"{summary.counts()}: cancelled, every frame taken was written")
        self.summary = summary


def final_state(summary: ScanSummary, max_failed_fraction: float) -> State:
    """The state a scan flow's run ends in: *Completed* with the counts as its message,
    *Failed* (its data a :class:`ScanFailed`) when more than ``max_failed_fraction`` of the
    exposures failed, or *Cancelled* (its data a :class:`ScanCancelled`) when SIGTERM stopped
    the scan, whatever failed (Prefect accepts no other end for a run being cancelled), so
    that the UI, automations and the command's exit code agree.

    >>> summary = ScanSummary("s", "s.h5", 13, 10, 3, 0, 0, 0, 0, 0, 1.0, 13.0, 40.0, 90.0)
    >>> final_state(summary, 0.0).message
    '13 exposures: 10 written, 3 failed, 0 flagged: more than 0% of the exposures failed'
    >>> state = final_state(summary, 0.5)
    >>> state.type.value, state.message
    ('COMPLETED', '13 exposures: 10 written, 3 failed, 0 flagged')
    >>> state = final_state(dataclasses.replace(summary, cancelled=True), 0.0)
    >>> state.type.value, state.message
    ('CANCELLED', '13 exposures: 10 written, 3 failed, 0 flagged: cancelled, every frame taken was written')
    """
    if summary.cancelled:
        cancelled = ScanCancelled(summary)
        return Cancelled(message=str(cancelled), data=cancelled)
    if summary.failed_fraction > max_failed_fraction:
        failed = ScanFailed(summary, max_failed_fraction)
        return Failed(message=str(failed), data=failed)
    return Completed(message=summary.counts(), data=summary)


def summary_of(state: State) -> ScanSummary:
    """The summary of a scan flow's final state (``return_state=True``), a failed scan's
    too (:class:`ScanFailed`); a cancelled scan's :class:`ScanCancelled` (with its summary)
    is raised, and so is the error of a run that failed before it had a summary."""
    result = state.result(raise_on_failure=False)
    if isinstance(result, ScanFailed):
        return result.summary
    if isinstance(result, BaseException):
        raise result
    if not isinstance(result, ScanSummary):
        raise TypeError(f"a scan flow's state holds {type(result).__name__}, not a ScanSummary")
    return result


def default_scan_id(prefix: str) -> str:
    """``PREFIX-YYYYmmdd-HHMMSS`` of the flow run's scheduled start (UTC): the scan id of a
    run started without one, and its run name, the same in both."""
    started = flow_run.scheduled_start_time
    return f"{prefix}-{started.strftime('%Y%m%d-%H%M%S')}"


def run_name(prefix: str, scan_id: Callable[[dict], str | None]) -> Callable[[], str]:
    """A ``flow_run_name`` for a scan flow: the scan id that ``scan_id`` finds in the run's
    parameters, else :func:`default_scan_id`, so that runs can be searched by scan id."""

    def name() -> str:
        return scan_id(flow_run.parameters) or default_scan_id(prefix)

    return name


def _scan_id_of(config: PipelineConfig | dict) -> str:
    """The scan id of a run's ``config`` parameter (a dict when started through the API)."""
    return config["scan_id"] if isinstance(config, dict) else config.scan_id


class ScanInterrupted(KeyboardInterrupt):
    """Ctrl-C during a scan, raised once its processes have stopped and the writer has closed
    its file (every exposure acknowledged is in it); the message says how many there are."""


@contextlib.contextmanager
def _abandoned_when_interrupted(monitor: ScanMonitor) -> Iterator[None]:
    """Inside the feeder's ``with``: on Ctrl-C or SIGTERM (an exception that is no
    ``Exception``: the process is ending) the monitor stops (:meth:`ScanMonitor.abandon`)
    before the feeder stops the writer, so that no plot starts reading the file the writer
    closes."""
    try:
        yield
    except BaseException as error:
        if not isinstance(error, Exception):
            monitor.abandon()
        raise


def reconstruct(
    config: PipelineConfig, batch_size: int = 16, resume: bool = False, retry_failed: bool = False
) -> ScanSummary:
    """Reconstruct the frames of ``config.source`` (simulated, files, a watched folder, a
    detector's stream) into ``config.output_path``: what the demo, reprocessing and the live
    flow all run. Return the scan's summary.

    The line-outs are on the model's grid (:func:`~pipeline.preflight.settings_for_model`);
    the source is opened as :func:`~pipeline.sources.opening.opened` says (a stream
    connected before the processes start, archived files' detector shape and manifest, a
    reader process), and a geometry that does not match the model stops the scan before any
    process starts (:class:`~workers.feeder.Feeder`). Frames that exist already go through
    the feeder in tasks of ``batch_size``; a live source's whole series in one task. SIGTERM
    (Prefect cancelling the run, ``systemctl stop``) stops the source: every frame taken is
    written, and the summary says the scan was cancelled (:func:`stop_on_sigterm`).

    ``resume`` continues an existing results file, by frame identity (an archived scan's
    files are compared with it; ``retry_failed``: failed rows are processed again; see
    :mod:`pipeline.store.resume`). When the source ended cleanly (it gave all it had, not a
    run cancelled halfway), the file is marked complete with its number of exposures (by the
    writer as it closes it: :meth:`pipeline.store.ResultsWriter.close`), so that
    reprocessing skips it. Ctrl-C (``KeyboardInterrupt``) comes out as
    :class:`ScanInterrupted` once the feeder has stopped its processes; on it the monitor
    stops without a summary.
    """
    config = settings_for_model(config)
    live = config.source is not None and config.source.live
    with opened(config) as scan, stop_on_sigterm(scan.source.stop) as cancelled:
        return _feed(scan, None if live else batch_size, resume, retry_failed, cancelled)


@dataclass(frozen=True)
class ScanWatchers:
    """Who watches a scan: the Prefect monitor, told the progress (as the feeder reports
    it, and at least every :data:`IDLE_WAIT_S` seconds of a live scan; never per exposure),
    and the live page's view, offered the frames for its thumbnail."""

    monitor: ScanMonitor
    view: LiveScanView

    def progress(self, done: int, submitted: int) -> None:
        """``done`` of ``submitted`` exposures acknowledged (the feeder's ``on_progress``)."""
        self.monitor.update(done, submitted)


def scan_counts(feeder: Feeder) -> ScanCounts:
    """The feeder's counts as the live page shows them (only reads: safe from its thread)."""
    failed = len(feeder.failures)
    return ScanCounts(feeder.n_submitted, feeder.n_done - failed, failed, feeder.flagged)


@contextlib.contextmanager
def live_page(view: LiveScanView, config: PipelineConfig) -> Iterator[None]:
    """The scan's live page (:mod:`pipeline.live`) while inside, where
    :class:`~pipeline.live.LivePageSettings` (the environment) asks for one: its address is
    logged to the run's log and linked from the run (a link artifact). A page that cannot
    listen (its port taken) is a warning: the scan runs without it."""
    settings = LivePageSettings.from_environment()
    if settings is None:
        yield
        return
    figure = LiveFigure(view, config.integration, config.grid.grid())
    try:
        page = LivePage(view, figure, settings)
    except OSError as error:  # its port is taken (another scan's?): the scan goes on
        _run_logger().warning("scan %s runs without a live page: %s", config.scan_id, error)
        yield
        return
    with page:
        _run_logger().info("live page of scan %s: %s", config.scan_id, page.url)
        with contextlib.suppress(Exception):  # the API is down: the scan goes on
            create_link_artifact(
                page.url.partition("?")[0],
                link_text=f"Live page of scan {config.scan_id}",
                key=f"live-page-{scan_key(config.scan_id)}",
                description="While the scan runs: counts, alarms, the newest frame, line-out "
                "and exposures" + (" (the page asks for its token)" if settings.token else ""),
            )
        yield


def _feed(
    scan: OpenedSource,
    batch_size: int | None,
    resume: bool,
    retry_failed: bool,
    cancelled: threading.Event,
) -> ScanSummary:
    """Feed the source's exposures through a :class:`Feeder` in tasks of ``batch_size``
    frames (or, when ``None``, one task for a live source), watched by a
    :class:`ScanMonitor`."""
    config, source = scan.config, scan.source
    monitor = ScanMonitor(config.scan_id, config.output_path, scan.expected_frames)
    view = LiveScanView(config.scan_id, config.output_path, live=batch_size is None)
    try:
        with (
            live_page(view, config),
            Feeder(
                config,
                resume=resume,
                on_result=monitor.record,
                on_writer_restart=monitor.writer_restarted,
                manifest=scan.manifest,
                retry_failed=retry_failed,
            ) as feeder,
            _abandoned_when_interrupted(monitor),
        ):
            view.follow(lambda: scan_counts(feeder))
            watchers = ScanWatchers(monitor, view)
            if batch_size is None:
                submit_stream(feeder, source, watchers)
            else:
                exposures = view.sampled(source.exposures())
                while (first := next(exposures, None)) is not None:
                    submit_batch(feeder, chain([first], islice(exposures, batch_size - 1)))
                    del first
                    watchers.progress(feeder.n_done, feeder.n_submitted)
            summary = wait_for_results(feeder, watchers)
            feeder.complete = complete = source.ended_cleanly
            view.finish()
            groups = summary.written_ok + summary.skipped  # (a resumed file's rows too)
            if (notice := finishing_notice(config, groups)) is not None:
                _run_logger().info(notice)
    except Exception as error:
        monitor.finish(
            f"# Scan `{config.scan_id}` failed\n\n{type(error).__name__}: {error}\n\n"
            f"Exposures written before: see `{config.output_path}`.",
            failed=True,
        )
        raise
    except BaseException as error:  # Ctrl-C, SIGTERM: the feeder has stopped its processes
        monitor.abandon()  # (if the feeder had not started yet)
        monitor.join()  # no drawing under way when the process ends
        if not isinstance(error, KeyboardInterrupt):
            raise
        path = config.output_path
        written = len(written_indices(path)) if path.exists() else 0
        raise ScanInterrupted(f"after {written} exposures were written to {path}") from error
    statistics = source.statistics.summary()
    note = f"Source: {statistics}."
    if cancelled.is_set():
        note = "Cancelled: every frame taken was written. " + note
    monitor.finish(summary_markdown(summary, note))
    return dataclasses.replace(
        summary, complete=complete, source=statistics, cancelled=cancelled.is_set()
    )


@contextlib.contextmanager
def stop_on_sigterm(stop: Callable[[], None]) -> Iterator[threading.Event]:
    """While inside, SIGTERM (Prefect's cancellation, ``systemctl stop``) calls ``stop`` and
    sets the event it yields, instead of interrupting whatever runs. On leaving, a SIGTERM
    that came is logged to the run's log; in a Prefect flow run that is all: the scan's
    summary says it was cancelled and the run ends *Cancelled* (:func:`final_state`), where
    Prefect's own handler would end it *Crashed*. Outside a flow run the signal goes on to
    the handler that was there before (the default one: exit with 128 + SIGTERM). Outside
    the main thread, where signals cannot be caught, it changes nothing."""
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
    if not requested.is_set():
        return
    _run_logger().info("stopped on SIGTERM after writing every frame taken")
    if FlowRunContext.get() is not None:
        return
    if callable(previous):
        previous(signal.SIGTERM, None)
    elif previous == signal.SIG_DFL:
        raise SystemExit(128 + signal.SIGTERM)


def finishing_notice(config: PipelineConfig, written: int) -> str | None:
    """What the run's log says when the scan's results file will take
    :data:`FINISHING_NOTICE_S` or more to finish with ``written`` exposures in it (the writer
    adds a NXcanSAS ``SASdata`` group per exposure when the scan ends:
    :data:`~pipeline.store.nxcansas.SASDATA_GROUP_S` each); ``None`` for less, or when it
    adds only the first (``store.sasdata_groups: first``).

    Example:
        >>> from pipeline.config import PipelineConfig
        >>> print(finishing_notice(PipelineConfig(scan_id="s1"), 100_000))
        ... # doctest: +NORMALIZE_WHITESPACE
        scan s1: writing 100,000 NXcanSAS SASdata groups, about 33 s
        (--sasdata-groups first, or store.sasdata_groups: first, writes one)
        >>> finishing_notice(PipelineConfig(scan_id="s1"), 1_000) is None
        True
    """
    seconds = written * SASDATA_GROUP_S
    if config.store.sasdata_groups != "every" or seconds < FINISHING_NOTICE_S:
        return None
    return (
        f"scan {config.scan_id}: writing {written:,} NXcanSAS SASdata groups, about "
        f"{seconds:.0f} s (--sasdata-groups first, or store.sasdata_groups: first, writes one)"
    )


def _run_logger() -> logging.Logger | logging.LoggerAdapter:
    """The flow run's logger (its lines appear in the UI), or this module's outside a run."""
    try:
        return get_run_logger()
    except MissingContextError:
        return log


def simulated_instrument(
    model: Path | None, instrument: Path | None
) -> tuple[Path | None, Instrument]:
    """The model and the instrument of a simulated scan: without ``instrument``, ``model``
    (a file or a bundled model's name; ``None``: the default model) and its instrument; with
    the instrument file ``instrument``, the model trained for it (``model``, by default the
    bundled one for it) and that instrument. :class:`~pipeline.model.ModelFileError` (one
    line) when the model was trained for another instrument (another SHA-256).

    >>> model, instrument = simulated_instrument(None, None)
    >>> model, instrument.name
    (None, 'default')
    """
    if instrument is None:
        return model, card_instrument(read_card(model))
    chosen = load_instrument(instrument)
    return model_for_instrument(chosen, model), chosen


def simulated_integration(instrument: Instrument, folder: Path) -> IntegrationConfig:
    """The integration settings of a scan simulated for ``instrument``: its sector and its
    PONI, written to ``folder/NAME-SHA.poni`` (the instrument's name and the first 12
    digits of its SHA-256: the file the scans' configuration names, kept beside their
    results) unless it is the bundled PONI, which the settings name by default.

    >>> simulated_integration(default_instrument(), Path("unused")) == IntegrationConfig()
    True
    """
    poni = None
    if instrument.poni is not None and instrument.poni != DEFAULT_PONI.read_text():
        poni = Path(folder) / f"{instrument.name}-{instrument.sha256()[:12]}.poni"
        poni.parent.mkdir(parents=True, exist_ok=True)
        poni.write_text(instrument.poni)
    return IntegrationConfig(poni=poni, azimuth_range_deg=instrument.azimuth_range_deg)


@flow(
    name="reconstruct-scan",
    flow_run_name=run_name("sim", lambda parameters: parameters.get("scan_id")),
)
def reconstruct_simulated_scan(
    n_frames: int = 64,
    n_workers: int = 2,
    output_dir: Path = Path("beamline-inn-results"),
    seed: int = 0,
    scan_id: str | None = None,
    n_samples: int = 1000,
    batch_size: int = 16,
    model: Path | None = None,
    instrument: Path | None = None,
) -> State:
    """Simulate ``n_frames`` exposures and reconstruct them into ``OUTPUT_DIR/SCAN_ID.h5``
    with ``model`` (a file or a bundled model's name; the default model when ``None``), on its
    instrument's q grid. The frames are simulated for the model's instrument, or the
    instrument file ``instrument``, which must be the model's (:func:`simulated_instrument`):
    with its geometry and sector (:func:`simulated_integration`) and its prior. The run is
    named by the scan id, and ends as :func:`final_state` says."""
    scan_id = scan_id or default_scan_id("sim")
    model, simulated = simulated_instrument(model, instrument)
    config = PipelineConfig(
        scan_id=scan_id,
        output_dir=output_dir,
        n_workers=n_workers,
        integration=simulated_integration(simulated, output_dir),
        inference=InferenceConfig(n_samples=n_samples, model=model),
        source=SimulatedFrames(n_frames=n_frames, seed=seed, instrument=instrument),
    )
    return final_state(reconstruct(config, batch_size), config.max_failed_fraction)


@flow(
    name="reprocess-scan",
    flow_run_name=run_name("reprocess", lambda parameters: _scan_id_of(parameters["config"])),
)
def reprocess_scan(
    config: PipelineConfig,
    batch_size: int = 16,
    resume: bool = False,
    retry_failed: bool = False,
) -> State:
    """Reconstruct archived frames (``config.source``: files, lists and globs of EDF, CBF,
    TIFF, Eiger HDF5) into ``config.output_path`` (``beamline-inn reprocess``); unreadable
    frames are recorded as failed exposures. With ``resume``, an existing results file of the
    scan (say, of a run that was killed) is completed: frames already in it are not computed
    again, new files and files changed since are (by frame identity,
    :mod:`pipeline.store.resume`), and with ``retry_failed`` failed rows too.

    A reader process decodes up to ``read_ahead`` frames (of the source's settings) ahead of
    integration (0: frames are read in this process), so that decoding and integrating
    overlap; pyFAI's engine then leaves it a core (``openmp_threads``: one fewer than the
    cores, unless configured). See :func:`reconstruct`; the run is named by the scan id, and
    ends as :func:`final_state` says.
    """
    summary = reconstruct(config, batch_size, resume, retry_failed)
    return final_state(summary, config.max_failed_fraction)


def posterior_vs_truth(path: Path, n_rows: int = 5) -> str:
    """A small table of posterior medians [5%, 95%] against the true values."""
    results = open_results(path)
    columns = [results.parameter_names.index(name) for name in GRATING_PARAMETERS]
    lines = ["exposure  " + "  ".join(f"{name:>34}" for name in GRATING_PARAMETERS)]
    for row in np.flatnonzero(results.status == "ok")[:n_rows]:
        cells = []
        for name, column in zip(GRATING_PARAMETERS, columns, strict=True):
            low, median, high = results.quantiles[row, :, column]
            truth = results.truth[row, column]
            mirror = ""
            if name == "width_nm":  # w and p - w are equally likely: show both
                mirror = f"|{results.truth[row, 0] - truth:.1f}"
            cells.append(f"{median:7.2f} [{low:7.2f},{high:7.2f}] true {truth:.1f}{mirror}")
        lines.append(f"{results.index[row]:>8}  " + "  ".join(f"{c:>34}" for c in cells))
    return "\n".join(lines)


def recovery_lines(summary: ScanSummary) -> list[str]:
    """A summary's lines on what was recovered from: workers replaced, the results writer
    started again, exposures re-sent (none when nothing was lost)."""
    lines = []
    if summary.worker_restarts or summary.writer_restarts or summary.resent:
        lines.append(
            f"workers:    {summary.worker_restarts} replaced, {summary.resent} exposures "
            f"re-sent ({summary.duplicates} computed twice, written once)"
        )
    if summary.writer_restarts:
        lines.append(
            f"writer:     started again {summary.writer_restarts} times on the file "
            "(it exited during the scan; every exposure is in the file once)"
        )
    return lines


def run_demo(
    n_frames: int,
    n_workers: int,
    output_dir: Path,
    seed: int,
    model: Path | None,
    instrument: Path | None = None,
) -> int:
    """``beamline-inn demo``: run the flow, then print where the results are and a summary.
    A model trained for another instrument than the file ``instrument`` stops it before the
    flow starts (:func:`simulated_instrument`)."""
    model, simulated = simulated_instrument(model, instrument)
    state = reconstruct_simulated_scan(
        n_frames=n_frames,
        n_workers=n_workers,
        output_dir=output_dir,
        seed=seed,
        model=model,
        instrument=instrument,
        return_state=True,
    )
    summary = summary_of(state)
    print()
    print(f"results:    {summary.output_path}")
    if simulated != default_instrument():
        print(f"instrument: {simulated.describe()}")
    print(
        f"exposures:  {summary.submitted} ({summary.written_ok} written, {summary.failed} failed)"
    )
    print(
        f"scan time:  {summary.wall_s:.1f} s from first frame to last write "
        f"({summary.exposures_per_s:.1f} exposures/s)"
    )
    print(f"latency:    p50 {summary.latency_p50_ms:.0f} ms, p99 {summary.latency_p99_ms:.0f} ms")
    print("stages:     " + stage_table(summary.stages).replace("\n", "\n            "))
    for line in recovery_lines(summary):
        print(line)
    print("posterior median [5%, 95%] against the truth (width: w|p-w, both are solutions):")
    print(posterior_vs_truth(Path(summary.output_path)))
    return 0 if summary.failed == 0 else 1
