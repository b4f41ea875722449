"""``reprocess-scans``: archived scans reconstructed in a batch, fanned out over Dask.

Each scan (a folder of frames or an Eiger master file, :func:`pipeline.sources.find_scans`)
gets one results file, ``output_dir/SCAN_ID.h5``, which records the scan's full path: the
scan id is the folder's name, or, when that name's file belongs to another scan (say
``day1/sampleA`` before ``day2/sampleA``), the name and a digest of the path
(``sampleA-1f3c9a2e``). The flow is idempotent: a scan whose file is complete and holds every
frame of its files as they are now is skipped; any other with a file is resumed by frame
identity (new and changed files processed, nothing stored twice, failed rows redone with
``retry_failed``; :mod:`pipeline.store.resume`); the others are reconstructed, one Prefect
task per scan, through prefect-dask's ``DaskTaskRunner`` in a subflow
(``reprocess-scans-on-dask``): a local cluster by default, an existing Dask scheduler when
``cluster.address`` is set.

A scan whose files changed within ``settle_s`` is still being written (copied, or the
detector is still on it): its task fails with :class:`ScanNotSettled` and is retried later,
twice at most. Other errors are not retried: they would fail the same way.

The run form (the nightly deployment's *Custom run*) starts with what an operator chooses
(:mod:`flows.operator`): the scans, the PONI file, the mask, the model, the output folder
and whether to retry failed rows; then ``expert``, the settings of everything else, which
those fields override, and the cluster and timing options.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

from prefect import flow, task, unmapped
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import TaskRun
from prefect.states import State
from prefect.tasks import Task
from pydantic import BaseModel, ConfigDict, Field

from flows.operator import operator_settings
from flows.scan import reconstruct
from pipeline.config import ScanSettings, scan_id_from
from pipeline.preflight import settings_for_model
from pipeline.source_specs import ArchivedFiles
from pipeline.sources import ArchivedScan, FileSource, find_scans
from pipeline.sources.identity import path_key
from pipeline.store import read_completion
from pipeline.store.results import stored_scan_source
from pipeline.store.resume import plan_output
from workers.feeder import ScanSummary

#: Seconds between the tries of a scan that is still being written.
RETRY_DELAY_S = 60


class DaskCluster(BaseModel):
    """Where the scans run: an existing Dask scheduler, or a cluster started for the run."""

    # the docstrings under the fields are their descriptions in the UI's run form
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    address: str | None = None
    """An existing Dask scheduler, e.g. tcp://10.0.0.7:8786. Empty: a local cluster."""
    n_workers: int = Field(1, ge=1)
    """A local cluster's worker processes, each reprocessing one scan at a time (each scan
    also starts its own inference workers and writer)."""


class ScanNotSettled(RuntimeError):
    """A scan's files changed too recently: they may still be being written."""


def _retry_if_unsettled(task: Task, task_run: TaskRun, state: State) -> bool:
    try:
        state.result()
    except ScanNotSettled:
        return True
    except Exception:
        return False
    return False


@task(
    name="reprocess-one-scan",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=RETRY_DELAY_S,
    retry_condition_fn=_retry_if_unsettled,
)
def reprocess_one_scan(
    scan: ArchivedScan,
    settings: ScanSettings,
    settle_s: float,
    read_ahead: int,
    batch_size: int,
    retry_failed: bool = False,
) -> ScanSummary:
    """Reconstruct ``scan`` (resuming its results file); its summary."""
    age_s = time.time() - scan.last_modified()
    if age_s < settle_s:
        raise ScanNotSettled(
            f"{scan.path} changed {age_s:.0f} s ago (less than settle_s = {settle_s:g} s): it "
            "may still be being written"
        )
    files = ArchivedFiles(paths=[str(scan.path)], read_ahead=read_ahead)
    config = settings.for_scan(scan.scan_id, os.path.realpath(scan.path), files)
    resume = config.output_path.exists()
    with _ctrl_c_stops_this_scan():
        return reconstruct(config, batch_size, resume, retry_failed)


@contextlib.contextmanager
def _ctrl_c_stops_this_scan() -> Iterator[None]:
    """Ctrl-C stops the scan of this task as it stops ``reprocess``, in a local cluster's
    worker process too.

    The terminal's SIGINT reaches the whole process group, the local Dask cluster's worker
    processes included. There it would raise ``KeyboardInterrupt`` in the process's main
    thread (the worker's event loop), while the scan goes on in this task's thread until the
    cluster, closing, kills the process 4 s later. While the task runs, SIGINT raises
    ``KeyboardInterrupt`` in this thread instead: the scan stops its processes, its file keeps
    every acknowledged exposure and the task ends. Outside a Dask worker, or where the
    worker's loop is not the main thread (signal handlers can only be set there), nothing
    changes."""
    from distributed import get_worker

    try:
        loop = get_worker().loop
    except ValueError:  # not in a Dask worker
        yield
        return
    scan_thread = ctypes.c_ulong(threading.get_ident())

    def interrupt_scan(signum: int, frame: object) -> None:
        # the exception is raised in the scan's thread at its next Python instruction (its
        # waits on sockets are short polls), as a signal raises it in a main thread
        ctypes.pythonapi.PyThreadState_SetAsyncExc(scan_thread, ctypes.py_object(KeyboardInterrupt))

    def on_sigint(handler: signal.Handlers | object) -> None:
        with contextlib.suppress(ValueError):  # the loop is not in the main thread
            signal.signal(signal.SIGINT, handler)  # type: ignore[arg-type]

    loop.add_callback(on_sigint, interrupt_scan)
    try:
        yield
    except KeyboardInterrupt:
        # The scan stopped on Ctrl-C with its file closed, which the command says in one
        # line. The exception ends this worker process: asyncio lets it out of the worker's
        # loop, and on its way Dask logs it and multiprocessing prints it, four tracebacks of
        # one Ctrl-C. What the dying process writes from here on goes nowhere.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stderr.fileno())
        os.close(devnull)
        raise
    finally:
        loop.add_callback(on_sigint, signal.default_int_handler)


@flow(name="reprocess-scans-on-dask")
def reprocess_on_dask(
    scans: list[ArchivedScan],
    settings: ScanSettings,
    settle_s: float,
    read_ahead: int,
    batch_size: int,
    retry_failed: bool = False,
) -> dict[str, ScanSummary | str]:
    """One task per scan on the flow's Dask task runner; per scan its summary, or the error
    that failed it (the other scans go on)."""
    futures = reprocess_one_scan.map(
        scans,
        settings=unmapped(settings),
        settle_s=unmapped(settle_s),
        read_ahead=unmapped(read_ahead),
        batch_size=unmapped(batch_size),
        retry_failed=unmapped(retry_failed),
    )
    outcome: dict[str, ScanSummary | str] = {}
    for scan, future in zip(scans, futures, strict=True):
        try:
            outcome[scan.scan_id] = future.result()
        except Exception as error:
            outcome[scan.scan_id] = f"{type(error).__name__}: {error}"
    return outcome


def name_scans(scans: list[ArchivedScan], settings: ScanSettings) -> list[ArchivedScan]:
    """``scans`` with scan ids that name their own results files: a scan keeps its folder's
    name unless that name's file belongs to another scan (the ``scan_source`` it records)
    or an earlier scan of the list takes the name; then it is the name and a digest of its
    full path (``sampleA-1f3c9a2e``), the same on every run."""
    claimed: dict[str, str] = {}  # scan id -> the real path of the scan whose file it names
    for scan_id in {scan.scan_id for scan in scans}:
        path = settings.for_scan(scan_id).output_path
        owner = stored_scan_source(path) if path.exists() else None
        if owner is not None:
            claimed[scan_id] = owner
    named = []
    for scan in scans:
        real = os.path.realpath(scan.path)
        if claimed.setdefault(scan.scan_id, real) != real:
            scan_id = scan_id_from(f"{scan.scan_id}-{path_key(real)[:8]}")
            scan = dataclasses.replace(scan, scan_id=scan_id)
        named.append(scan)
    return named


def plan(
    scans: list[ArchivedScan], settings: ScanSettings, retry_failed: bool = False
) -> tuple[list[ArchivedScan], dict]:
    """Split ``scans`` (named by :func:`name_scans`) into those to reconstruct or resume and
    those complete already, whose files hold every frame of their files as they are now
    (by scan id, why skipped). ``ValueError`` when a file was made with another
    configuration or model: the analyst chooses another output folder rather than lose or
    mix results."""
    to_run, skipped = [], {}
    for scan in scans:
        config = settings.for_scan(scan.scan_id, scan_source=os.path.realpath(scan.path))
        if not config.output_path.exists():
            to_run.append(scan)
            continue
        manifest = FileSource([scan.path], scan.scan_id).manifest()
        resume = plan_output(config, True, manifest, retry_failed)
        completion = read_completion(config.output_path)
        if completion is None or resume is None or not resume.up_to_date(manifest):
            to_run.append(scan)
            continue
        skipped[scan.scan_id] = (
            f"complete: {completion.n_exposures} exposures in {config.output_path}"
        )
    return to_run, skipped


@flow(name="reprocess-scans")
def reprocess_scans(
    *,
    scans: list[str],
    poni: Path | None = None,
    mask: Path | None = None,
    model: str | None = None,
    output_dir: Path | None = None,
    retry_failed: bool = False,
    expert: ScanSettings | None = None,
    cluster: DaskCluster = DaskCluster(),
    settle_s: Annotated[float, Field(ge=0)] = 60.0,
    read_ahead: Annotated[int, Field(ge=0)] = 0,
    batch_size: Annotated[int, Field(ge=1)] = 16,
) -> dict[str, ScanSummary | str]:
    """Reconstruct archived scans into OUTPUT_DIR, one results file per scan named by the
    scan's folder, skipping the complete ones and resuming the others; fails, after all
    scans are done, when one of them failed.

    Args:
        scans: The scans: folders of frames, Eiger master files, or patterns of them, e.g.
            /data/archive/2026-12-05/*.
        poni: The detector's geometry: a PONI file, as pyFAI-calib2 writes it. Empty: the
            expert settings' (by default the bundled Eiger 4M at 5 m, 8 keV).
        mask: A mask image (EDF, TIFF or .npy; non-zero pixels are masked). Empty: the expert
            settings' (by default none).
        model: A model file, or the name of a bundled model (default, pilatus1m-5m-sector).
            Empty: the expert settings' (by default the default model).
        output_dir: The folder of the results files. Empty: the expert settings' (by default
            beamline-inn-results).
        retry_failed: Process the frames of failed rows again, in complete scans too.
        expert: Everything else, for experts: integration, inference, transport, storage. A
            field filled above wins over the same field here. Empty: the defaults.
        cluster: Where the scans run: a local Dask cluster, or an existing scheduler.
        settle_s: Leave a scan alone whose files changed in the last this many seconds (it
            may still be being written): it is tried again later, twice at most.
        read_ahead: Frames decoded ahead by a reader process per scan (0: read in the task).
            The workers of an existing cluster must then allow child processes (Dask's
            distributed.worker.daemon: false).
        batch_size: Exposures per Prefect task of a scan (each task feeds them through the
            pipeline).
    """
    import dask.config
    from prefect_dask import DaskTaskRunner

    settings = settings_for_model(
        operator_settings(expert, poni=poni, mask=mask, model=model, output_dir=output_dir)
    )
    found = name_scans(find_scans(scans), settings)
    to_run, skipped = plan(found, settings, retry_failed)
    outcome: dict[str, ScanSummary | str] = dict(skipped)
    if to_run:
        if cluster.address is not None:
            runner = DaskTaskRunner(address=cluster.address)
        else:
            workers = min(cluster.n_workers, len(to_run))
            runner = DaskTaskRunner(
                cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True}
            )
        with (
            dask.config.set({"distributed.worker.daemon": False}),  # a task starts processes
            _dask_says_only_warnings(),
        ):
            # (prefect-dask types its runner as a TaskRunner of its own futures, which
            # Prefect's invariant TaskRunner[PrefectFuture] does not accept)
            dask_flow = reprocess_on_dask.with_options(task_runner=runner)  # type: ignore[arg-type]
            outcome |= dask_flow(to_run, settings, settle_s, read_ahead, batch_size, retry_failed)
    rows = [_row(scan, outcome[scan.scan_id], settings) for scan in found]
    create_table_artifact(
        rows, key="reprocessed-scans", description=f"{len(found)} scans into {settings.output_dir}"
    )
    failed = {
        scan_id: why
        for scan_id, why in outcome.items()
        if isinstance(why, str) and scan_id not in skipped
    }
    if failed:
        raise RuntimeError(
            f"{len(failed)} of {len(found)} scans failed: "
            + "; ".join(f"{scan_id}: {why}" for scan_id, why in failed.items())
        )
    return outcome


@contextlib.contextmanager
def _dask_says_only_warnings() -> Iterator[None]:
    """Dask's scheduler and nannies (in this process) log at INFO level by default, about 20
    lines of addresses and comms per run; only their warnings and errors reach the terminal
    and the run's log while the scans run."""
    logger = logging.getLogger("distributed")
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)


def _row(
    scan: ArchivedScan, outcome: ScanSummary | str, settings: ScanSettings
) -> dict[str, object]:
    path = settings.for_scan(scan.scan_id).output_path
    if isinstance(outcome, str):
        state = "skipped" if outcome.startswith("complete:") else "failed"
        return {
            "scan": scan.scan_id,
            "source": str(scan.path),
            "outcome": state,
            "exposures": "",
            "failed exposures": "",
            "results": str(path),
            "note": outcome,
        }
    return {
        "scan": scan.scan_id,
        "source": str(scan.path),
        "outcome": "written",
        "exposures": outcome.submitted + outcome.skipped,
        "failed exposures": outcome.failed,
        "results": str(Path(outcome.output_path)),
        "note": f"resumed: {outcome.skipped} were already written" if outcome.skipped else "",
    }
