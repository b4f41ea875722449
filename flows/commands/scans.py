"""The commands that reconstruct scans: ``demo``, ``reprocess``, ``reprocess-scans`` and
``online``, each a Prefect flow (``flows/scan.py``, ``flows/reprocess.py``,
``flows/online.py``) whose settings are checked before Prefect and the workers start.

Their runs carry the tags of :func:`flows.operator.run_tags`: ``beamline-inn``, the scan's
kind (``scan:demo``, ``scan:reprocess``, ``scan:online``) and ``beamline:NAME`` where the
environment variable ``BEAMLINE_INN_BEAMLINE`` names the beamline.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from flows.commands.arguments import (
    Commands,
    add_hdf5_dataset_option,
    add_scan_options,
    model_help,
    non_negative_int,
    positive_int,
    scan_config,
)
from flows.commands.console import use_prefect_api_for

if TYPE_CHECKING:
    from workers.feeder import ScanSummary


def add_demo(commands: Commands) -> None:
    """``demo``: a simulated scan through the whole pipeline."""
    demo = commands.add_parser(
        "demo",
        help="reconstruct a simulated scan end to end (Prefect flow, ZeroMQ workers, HDF5)",
    )
    demo.add_argument(
        "--frames", type=positive_int, default=64, help="exposures to simulate (default 64)"
    )
    demo.add_argument(
        "--workers", type=positive_int, default=2, help="inference worker processes (default 2)"
    )
    demo.add_argument(
        "--out", type=Path, default=Path("beamline-inn-results"), help="output folder"
    )
    demo.add_argument("--seed", type=int, default=0, help="seed of the simulated scan")
    demo.add_argument("--model", type=Path, default=None, metavar="NAME|FILE", help=model_help())
    demo.add_argument(
        "--instrument",
        type=Path,
        default=None,
        metavar="FILE",
        help="instrument file (beamline-inn instrument): simulate its geometry, sector and "
        "prior; the model (default: the bundled one for it) must have been trained for it "
        "(default: the model's instrument)",
    )
    demo.set_defaults(run=_demo)


def _demo(args: argparse.Namespace) -> int:
    use_prefect_api_for(args.command)
    from prefect import tags

    from flows.operator import run_tags
    from flows.scan import run_demo, simulated_instrument, simulated_integration
    from pipeline.config import InferenceConfig, ScanSettings
    from pipeline.preflight import check_settings, settings_for_model

    # the model (one trained for --instrument), and the simulated detector's geometry (the
    # instrument's) against its instrument, before the flow
    model, instrument = simulated_instrument(args.model, args.instrument)
    demo = ScanSettings(
        output_dir=args.out,
        n_workers=args.workers,
        integration=simulated_integration(instrument, args.out),
        inference=InferenceConfig(model=model),
    )
    check_settings(settings_for_model(demo))
    with tags(*run_tags("scan:demo")):
        return run_demo(
            n_frames=args.frames,
            n_workers=args.workers,
            output_dir=args.out,
            seed=args.seed,
            model=args.model,
            instrument=args.instrument,
        )


def _print_summary(summary: ScanSummary) -> int:
    """Print a scan's summary, as the flows return it; the exit code: 1 if an exposure failed, else 0."""
    from flows.scan import recovery_lines
    from workers.feeder.metrics import stage_table

    print(f"results:    {summary.output_path}")
    print(
        f"exposures:  {summary.submitted} ({summary.written_ok} written, {summary.failed} failed)"
    )
    for index, error in sorted(summary.failures.items())[:20]:
        print(f"    {index}: {error}")
    print(f"scan time:  {summary.wall_s:.1f} s ({summary.exposures_per_s:.1f} exposures/s)")
    print("stages:     " + stage_table(summary.stages).replace("\n", "\n            "))
    for line in recovery_lines(summary):
        print(line)
    if summary.skipped:
        print(f"resumed:    {summary.skipped} exposures were already in the file")
    if summary.redone:
        print(
            f"redone:     {summary.redone} rows of the file (failed ones retried, or of "
            "files changed since)"
        )
    if summary.removed:
        print(
            f"removed:    {summary.removed} rows of the file come from files no longer "
            "among the scan's (kept)"
        )
    if summary.remote_workers:
        print(f"remote:     {summary.remote_workers} workers on other nodes took part")
    return 0 if summary.failed == 0 else 1


def add_reprocess(commands: Commands) -> None:
    """``reprocess``: one archived scan."""
    reprocess = commands.add_parser(
        "reprocess",
        help="reconstruct archived frames: EDF, CBF, TIFF files and globs, Eiger HDF5",
        description="Reconstruct archived detector frames into OUT/SCAN_ID.h5. Frames that "
        "cannot be read or integrated are recorded as failed exposures; the scan goes on.",
    )
    reprocess.add_argument("paths", nargs="+", metavar="PATH", help="files or glob patterns")
    add_hdf5_dataset_option(reprocess)
    add_scan_options(reprocess)
    reprocess.add_argument(
        "--read-ahead",
        type=non_negative_int,
        default=4,
        metavar="N",
        help="frames a reader process decodes ahead of integration (0: no reader process)",
    )
    reprocess.add_argument(
        "--resume",
        action="store_true",
        help="complete an existing results file of this scan (e.g. of a run that was killed, "
        "or of a folder that got new files): frames already in it are skipped, by identity",
    )
    reprocess.add_argument(
        "--retry-failed",
        action="store_true",
        help="resume, and process the frames of failed rows again (e.g. after fixing a file)",
    )
    reprocess.set_defaults(run=_reprocess)


def _reprocess(args: argparse.Namespace) -> int:
    use_prefect_api_for(args.command)
    from prefect import tags

    from flows.operator import run_tags
    from flows.scan import reprocess_scan, summary_of
    from pipeline.config import scan_id_from
    from pipeline.preflight import check_setup
    from pipeline.source_specs import ArchivedFiles
    from pipeline.sources.opening import archived_files

    config = scan_config(args, scan_id_from(Path(args.paths[0]).name.split(".")[0]))
    files = ArchivedFiles(
        paths=[str(path) for path in args.paths],
        hdf5_dataset=args.hdf5_dataset,
        read_ahead=args.read_ahead,
    )
    config = config.model_copy(update={"source": files})
    # bad patterns stop here; a PONI without a detector takes the headers' shape, so that the
    # geometry is checked here too
    checked = archived_files(config)
    resume = args.resume or args.retry_failed
    check_setup(checked.config, resume, checked.manifest, args.retry_failed)
    with tags(*run_tags("scan:reprocess")):
        state = reprocess_scan(
            config, resume=resume, retry_failed=args.retry_failed, return_state=True
        )
    return _print_summary(summary_of(state))


def add_reprocess_scans(commands: Commands) -> None:
    """``reprocess-scans``: many archived scans over Dask."""
    batch = commands.add_parser(
        "reprocess-scans",
        help="reconstruct many archived scans (folders, Eiger masters, globs) over Dask, one "
        "file each; complete ones skipped, unfinished ones resumed",
        description="Reconstruct each archived scan (a folder of frames, or an Eiger master "
        "file) into OUT/SCAN_ID.h5, one Dask task per scan (the reprocess-scans flow). Scans "
        "whose results are complete are skipped; unfinished results files are resumed.",
    )
    batch.add_argument("scans", nargs="+", metavar="SCAN", help="folders, files or globs")
    add_scan_options(batch, scan_id=False)
    batch.add_argument("--dask", metavar="ADDRESS", help="an existing Dask scheduler, tcp://...")
    batch.add_argument(
        "--dask-workers",
        type=positive_int,
        default=1,
        help="without --dask: processes of the local Dask cluster, scans at once (default 1)",
    )
    batch.add_argument(
        "--settle",
        type=float,
        default=60.0,
        metavar="S",
        help="leave scans alone whose files changed in the last S seconds (retried later)",
    )
    batch.add_argument(
        "--retry-failed",
        action="store_true",
        help="process the frames of failed rows again, also in complete scans",
    )
    batch.add_argument(
        "--read-ahead",
        type=non_negative_int,
        default=0,
        metavar="N",
        help="frames decoded ahead per scan by a reader process (default 0)",
    )
    batch.set_defaults(run=_reprocess_scans)


def _reprocess_scans(args: argparse.Namespace) -> int:
    use_prefect_api_for(args.command)
    from prefect import tags

    from flows.operator import run_tags
    from flows.reprocess import DaskCluster, name_scans, plan, reprocess_scans
    from pipeline.sources import find_scans

    settings = scan_config(args, "scan").settings
    scans = name_scans(find_scans(args.scans), settings)  # bad patterns stop here
    plan(scans, settings, args.retry_failed)  # and results of another configuration
    print(f"{len(scans)} scans: {', '.join(scan.scan_id for scan in scans)}", flush=True)
    try:
        with tags(*run_tags("scan:reprocess")):
            outcome = reprocess_scans(
                scans=args.scans,
                retry_failed=args.retry_failed,
                expert=settings,
                cluster=DaskCluster(address=args.dask, n_workers=args.dask_workers),
                settle_s=args.settle,
                read_ahead=args.read_ahead,
            )
    except RuntimeError as error:  # some scans failed; the others are written
        print(f"beamline-inn reprocess-scans: {error}", file=sys.stderr)
        return 1
    for scan_id, result in outcome.items():
        if isinstance(result, str):
            print(f"{scan_id}: skipped ({result})")
        else:
            print(
                f"{scan_id}: {result.written_ok} written, {result.failed} failed, "
                f"{result.skipped} already there -> {result.output_path}"
            )
    return 0


def add_online(commands: Commands) -> None:
    """``online``: a detector's stream or a folder being written, live."""
    online = commands.add_parser(
        "online",
        help="reconstruct frames live: a DECTRIS detector's stream, or a folder being written",
        description="Receive one series from a DECTRIS SIMPLON stream (--stream), or the frames "
        "a detector writes into a folder (--watch), and reconstruct them into OUT/SCAN_ID.h5 "
        "while they arrive.",
    )
    origin = online.add_mutually_exclusive_group(required=True)
    origin.add_argument("--stream", help="the detector's stream, tcp://HOST:PORT")
    origin.add_argument("--watch", type=Path, help="a folder the detector writes files into")
    online.add_argument("--protocol", choices=("dectris-v1", "dectris-v2"), default="dectris-v1")
    online.add_argument(
        "--pattern", default="*", help="with --watch: the files to take (glob, default *)"
    )
    add_hdf5_dataset_option(online, "with --watch: ")
    online.add_argument(
        "--idle-timeout",
        type=float,
        default=30.0,
        help="end after this many seconds without a message or a new frame (default 30)",
    )
    add_scan_options(online)
    online.set_defaults(run=_online)


def _online(args: argparse.Namespace) -> int:
    use_prefect_api_for(args.command)
    from prefect import tags

    from flows.online import SourceOptions, is_pattern, live_source, online_reconstruction
    from flows.operator import run_tags
    from flows.scan import summary_of
    from pipeline.preflight import check_setup

    if args.stream is not None and args.hdf5_dataset is not None:
        raise ValueError("--hdf5-dataset is for the HDF5 files of --watch, not a --stream")
    if not is_pattern(args.pattern):
        raise ValueError(f"--pattern {args.pattern!r} has no wildcard (*, ? or [...])")
    config = scan_config(args, time.strftime("online-%Y%m%d-%H%M%S"))
    check_setup(config)  # an existing results file of this scan id stops here
    source = args.stream if args.watch is None else str(args.watch / args.pattern)
    options = SourceOptions(
        protocol=args.protocol, idle_timeout_s=args.idle_timeout, hdf5_dataset=args.hdf5_dataset
    )
    live_source(source, options)  # a bad stream address stops here too
    with tags(*run_tags("scan:online")):
        state = online_reconstruction(
            scan_id=config.scan_id,
            source=source,
            expert=config.settings,
            source_options=options,
            return_state=True,
        )
    summary = summary_of(state)
    print(f"source:     {summary.source}")
    return _print_summary(summary)
