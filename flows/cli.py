"""The ``beamline-inn`` command line.

Commands that need Prefect import it only when they run, so ``beamline-inn train`` starts fast.
"""

from __future__ import annotations

import argparse
import atexit
import functools
import gc
import os
import signal
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

    from pipeline.instrument import Instrument


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


def _train(args: argparse.Namespace) -> int:
    from pipeline.instrument import default_instrument, load_instrument
    from pipeline.model import Architecture, save
    from pipeline.model.checkpoint import DEFAULT_MODEL
    from pipeline.model.train import TrainingConfig, train
    from pipeline.model.validation import simulation_diagnostics

    if args.stop_at and not args.checkpoint_dir:
        raise ValueError("--stop-at needs --checkpoint-dir, or the work would be lost")
    instrument = load_instrument(args.instrument) if args.instrument else default_instrument()
    out = args.out or (Path(f"{instrument.name}.safetensors") if args.instrument else DEFAULT_MODEL)

    config = TrainingConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        seed=args.seed,
        threads=args.threads,
        architecture=Architecture(
            n_blocks=args.blocks,
            hidden=args.hidden,
            seed=args.seed,
            activation=args.activation,
            conditional_affine=args.conditional_affine,
            centred_nuisances=args.centred_nuisances,
            flow=args.flow,
            objective=args.objective,
        ),
    )
    print(
        f"training for {instrument.describe()}\n"
        f"on {config.n_simulations} simulations for {config.steps} steps (seed {config.seed})"
    )
    model, history = train(
        config,
        progress=not args.quiet,
        checkpoint_dir=args.checkpoint_dir,
        stop_at_step=args.stop_at,
        device=args.device,
        instrument=instrument,
    )
    if not history["completed"]:
        print(
            f"stopped at step {args.stop_at} of {config.steps}; the state is in "
            f"{args.checkpoint_dir}: run the same command "
            "without --stop-at to resume"
        )
        return 0
    print(
        f"trained in {history['wall_s']:.0f} s; validation loss {history['validation_loss'][-1]:.3f}"
    )
    report, _ = simulation_diagnostics(model)
    path = save(
        model,
        out,
        name=instrument.name,
        training={
            "command": "beamline-inn " + " ".join(sys.argv[1:]),
            **history,
        },
        diagnostics={"simulation": report},
    )
    print(f"model written to {path} (card {path.with_suffix('.json')})")
    print(
        "calibration error: "
        + ", ".join(f"{k}={v:.3f}" for k, v in report["calibration_error"].items())
    )
    return 0


def _validate(args: argparse.Namespace) -> int:
    import json

    from pipeline.instrument import load_instrument
    from pipeline.model import load
    from pipeline.model.checkpoint import card_path, model_for_instrument, resolve_model
    from pipeline.model.validation import (
        reference_diagnostics,
        simulation_diagnostics,
        write_figures,
    )

    if args.instrument is not None:
        instrument = load_instrument(args.instrument)
        path = model_for_instrument(instrument, args.model)
    else:
        path = resolve_model(args.model)
    model = load(path, device="cpu")
    print(f"validating {path} for {model.instrument.describe()}")
    print(f"on {args.simulations} simulated exposures ...")
    simulation, simulation_arrays = simulation_diagnostics(model, args.simulations, seed=args.seed)
    print(f"... and against the exact posterior on {args.reference} exposures (about 10 s each)")

    def report(done: int, total: int) -> None:
        print(f"    reference {done}/{total}", flush=True)

    reference, reference_arrays = reference_diagnostics(
        model, args.reference, seed=args.seed + 1, progress=report, cache_dir=args.reference_cache
    )
    diagnostics = {"simulation": simulation, "reference": reference}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "validation.json").write_text(json.dumps(diagnostics, indent=2) + "\n")
    figures = write_figures(simulation_arrays, reference_arrays, args.out)
    print(f"report: {args.out / 'validation.json'}; figures: {', '.join(figures)}")
    names = ("pitch_nm", "width_nm", "sigma_nm")
    print(
        "calibration error:  "
        + "  ".join(f"{n} {simulation['calibration_error'][n]:.3f}" for n in names)
    )
    print("SBC KS p:           " + "  ".join(f"{n} {simulation['sbc_ks_p'][n]:.3g}" for n in names))
    print(
        "sd ratio (median):  "
        + "  ".join(f"{n} {reference['sd_ratio_median'][n]:.2f}" for n in names)
    )
    print(
        "|bias| / exact sd:  "
        + "  ".join(f"{n} {reference['bias_in_exact_sd_median'][n]:.2f}" for n in names)
    )
    print(
        f"mode weight error:  max {reference['mode_weight_error_max']}, C2ST median {reference['c2st_median']:.3f}"
    )
    if args.update_card:
        card_file = card_path(path)
        card = json.loads(card_file.read_text())
        card["diagnostics"] = diagnostics
        card_file.write_text(json.dumps(card, indent=2) + "\n")
        print(f"diagnostics written into {card_file}")
    return 0


def _instrument(args: argparse.Namespace) -> int:
    from pipeline.integration.instrument import derive_instrument, read_prior

    derived = derive_instrument(
        args.poni,
        (args.q_range[0], args.q_range[1]),
        args.bins,
        None if args.full_ring else (args.sector[0], args.sector[1]),
        mask=args.mask,
        resolution_nm=args.resolution,
        prior=read_prior(args.prior) if args.prior else None,
        name=args.name or args.out.stem.removesuffix(".instrument"),
    )
    print(derived.summary(set_resolution="give --resolution to set it"))
    path = derived.instrument.save(args.out)
    print(f"written: {path}")
    print(f"next: beamline-inn train --instrument {path}")
    return 0


def _reference(args: argparse.Namespace) -> int:
    import json

    import numpy as np

    from pipeline.instrument import default_instrument, load_instrument
    from pipeline.store import open_results
    from pipeline.store.inputs import RESULTS_SUFFIXES, read_line_outs

    given = load_instrument(args.instrument) if args.instrument else None
    report, all_samples = [], {}
    for path in args.counts:
        stored = open_results(path).instrument if path.suffix in RESULTS_SUFFIXES else None
        instrument = given or stored or default_instrument()
        line_outs = read_line_outs(
            [path], args.exposure, args.n_photons, args.background, instrument.n_points
        )
        for name, counts, n_photons, background in line_outs:
            report_row, all_samples[name] = _exact_posterior_report(
                name, counts, n_photons, background, instrument, args
            )
            report.append(report_row)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
        np.savez_compressed(args.out.with_suffix(".npz"), **all_samples)
        print(
            f"written: {args.out.with_suffix('.json')} and {args.out.with_suffix('.npz')} (samples)"
        )
    return 0


def _exact_posterior_report(
    name: str,
    counts: np.ndarray,
    n_photons: float,
    background: float,
    instrument: Instrument,
    args: argparse.Namespace,
) -> tuple[dict, np.ndarray]:
    """The exact posterior of one line-out of ``instrument``, printed; its report row and
    samples."""
    from pipeline.physics.reference import mirror_weight, reference_posterior

    posterior = reference_posterior(
        counts,
        n_photons,
        background,
        instrument.grating_prior,
        instrument.grid,
        n_samples=args.samples,
        seed=args.seed,
        background_weights=instrument.weights,
        observed=instrument.observed,
    )
    print(
        f"{name}: N_ph = {n_photons:.4g}, b = {background:.3g}; {len(posterior.modes)} mode(s), "
        f"{posterior.n_evaluations} likelihood evaluations, {posterior.wall_s:.1f} s"
    )
    for mode in posterior.modes:
        cells = "  ".join(
            f"{label} {m:9.3f} ± {sd:.3g}"
            for label, m, sd in zip(
                ("pitch_nm", "width_nm", "sigma_nm"), mode.mean, mode.sd, strict=True
            )
        )
        print(f"    weight {mode.weight:.3f}   {cells}")
    row = {
        "name": name,
        "instrument": instrument.name,
        "n_photons": n_photons,
        "background": background,
        "wall_s": posterior.wall_s,
        "n_evaluations": posterior.n_evaluations,
        "mirror_weight": mirror_weight(posterior.samples),
        "modes": [
            {
                "weight": m.weight,
                "mean": dict(zip(posterior.parameter_names, m.mean.tolist(), strict=True)),
                "sd": dict(zip(posterior.parameter_names, m.sd.tolist(), strict=True)),
            }
            for m in posterior.modes
        ],
    }
    return row, posterior.samples


def _demo(args: argparse.Namespace) -> int:
    _use_prefect_api(args)
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
    return run_demo(
        n_frames=args.frames,
        n_workers=args.workers,
        output_dir=args.out,
        seed=args.seed,
        model=args.model,
        instrument=args.instrument,
    )


def _scan_config(args: argparse.Namespace, scan_id: str):
    """The :class:`PipelineConfig` of a ``reprocess``, ``reprocess-scans`` or ``online``
    command, on its model's q grid (:func:`pipeline.preflight.settings_for_model`); its
    settings (geometry, mask, dark, flat, model, the geometry against the model's instrument,
    output folder, CURVE keys) are checked here, before Prefect and the workers start
    (:func:`pipeline.preflight.check_settings`)."""
    from pipeline.config import (
        InferenceConfig,
        IntegrationConfig,
        PipelineConfig,
        StoreConfig,
        TransportConfig,
    )
    from pipeline.preflight import check_settings, settings_for_model

    config = PipelineConfig(
        scan_id=getattr(args, "scan_id", None) or scan_id,
        output_dir=args.out,
        n_workers=args.workers,
        integration=IntegrationConfig(
            poni=args.poni,
            mask=args.mask,
            dark=args.dark,
            flat=args.flat,
            azimuth_range_deg=None if args.full_ring else tuple(args.sector),
            normalization_keys=tuple(args.normalize_by),
        ),
        inference=InferenceConfig(n_samples=args.samples, model=args.model),
        store=StoreConfig(samples_compression=args.samples_compression),
        transport=TransportConfig(
            remote_work=args.remote_work,
            curve_secret_key=args.curve_key,
            curve_authorized_keys=args.authorized_keys,
        ),
    )
    config = settings_for_model(config)
    check_settings(config)
    return config


def _print_summary(summary: dict) -> int:
    from flows.scan import recovery_lines
    from workers.metrics import stage_table

    print(f"results:    {summary['output_path']}")
    print(
        f"exposures:  {summary['submitted']} ({summary['written_ok']} written, "
        f"{summary['failed']} failed)"
    )
    for index, error in sorted(summary["failures"].items())[:20]:
        print(f"    {index}: {error}")
    print(f"scan time:  {summary['wall_s']:.1f} s ({summary['exposures_per_s']:.1f} exposures/s)")
    print("stages:     " + stage_table(summary["stages"]).replace("\n", "\n            "))
    for line in recovery_lines(summary):
        print(line)
    if summary["skipped"]:
        print(f"resumed:    {summary['skipped']} exposures were already in the file")
    if summary["redone"]:
        print(
            f"redone:     {summary['redone']} rows of the file (failed ones retried, or of "
            "files changed since)"
        )
    if summary["removed"]:
        print(
            f"removed:    {summary['removed']} rows of the file come from files no longer "
            "among the scan's (kept)"
        )
    if summary["remote_workers"]:
        print(f"remote:     {summary['remote_workers']} workers on other nodes took part")
    return 0 if summary["failed"] == 0 else 1


def _reprocess(args: argparse.Namespace) -> int:
    _use_prefect_api(args)
    from flows.scan import archived_frames, reprocess_scan, with_detector_shape
    from pipeline.config import scan_id_from
    from pipeline.preflight import check_setup

    config = _scan_config(args, scan_id_from(Path(args.paths[0]).name.split(".")[0]))
    paths = [str(path) for path in args.paths]
    source = archived_frames(paths, config.scan_id, args.hdf5_dataset)  # bad patterns stop here
    # a PONI without a detector: the headers' shape, so that the geometry is checked here too
    config = with_detector_shape(config, source)
    resume = args.resume or args.retry_failed
    check_setup(config, resume, source.manifest(), args.retry_failed)
    summary = reprocess_scan(
        config,
        paths,
        read_ahead=args.read_ahead,
        resume=resume,
        retry_failed=args.retry_failed,
        hdf5_dataset=args.hdf5_dataset,
    )
    return _print_summary(summary)


def _reprocess_scans(args: argparse.Namespace) -> int:
    _use_prefect_api(args)
    from flows.reprocess import DaskCluster, name_scans, plan, reprocess_scans
    from pipeline.sources import find_scans

    settings = _scan_config(args, "scan").settings
    scans = name_scans(find_scans(args.scans), settings)  # bad patterns stop here
    plan(scans, settings, args.retry_failed)  # and results of another configuration
    print(f"{len(scans)} scans: {', '.join(scan.scan_id for scan in scans)}", flush=True)
    try:
        outcome = reprocess_scans(
            args.scans,
            settings,
            DaskCluster(address=args.dask, n_workers=args.dask_workers),
            settle_s=args.settle,
            read_ahead=args.read_ahead,
            retry_failed=args.retry_failed,
        )
    except RuntimeError as error:  # some scans failed; the others are written
        print(f"beamline-inn reprocess-scans: {error}", file=sys.stderr)
        return 1
    for scan_id, result in outcome.items():
        if isinstance(result, str):
            print(f"{scan_id}: skipped ({result})")
        else:
            print(
                f"{scan_id}: {result['written_ok']} written, {result['failed']} failed, "
                f"{result['skipped']} already there -> {result['output_path']}"
            )
    return 0


def _online(args: argparse.Namespace) -> int:
    _use_prefect_api(args)
    from flows.online import DectrisStreamSource, WatchedFolder, online_reconstruction
    from pipeline.preflight import check_setup

    if args.stream is not None and args.hdf5_dataset is not None:
        raise ValueError("--hdf5-dataset is for the HDF5 files of --watch, not a --stream")
    config = _scan_config(args, time.strftime("online-%Y%m%d-%H%M%S"))
    check_setup(config)  # an existing results file of this scan id stops here
    if args.watch is not None:
        source = WatchedFolder(
            directory=args.watch,
            pattern=args.pattern,
            hdf5_dataset=args.hdf5_dataset,
            idle_timeout_s=args.idle_timeout,
        )
    else:
        source = DectrisStreamSource(
            stream=args.stream, protocol=args.protocol, idle_timeout_s=args.idle_timeout
        )
    summary = online_reconstruction(config.settings, source, config.scan_id)
    if "stream" in summary:
        print(f"stream:     {summary['stream']}")
    return _print_summary(summary)


def _add_hdf5_dataset_option(command: argparse.ArgumentParser, when: str = "") -> None:
    command.add_argument(
        "--hdf5-dataset",
        metavar="PATH",
        help=f"{when}the frames' dataset in HDF5 files (3-D: one exposure per frame) where it "
        "is not an Eiger place (/entry/data/data, /entry/data/data_NNNNNN) or a NeXus "
        "detector's data",
    )


def _add_scan_options(command: argparse.ArgumentParser, scan_id: bool = True) -> None:
    """Options shared by ``reprocess`` and ``online``: geometry, corrections, output."""
    command.add_argument("--poni", type=Path, required=True, help="pyFAI geometry (PONI v1/v2)")
    command.add_argument("--mask", type=Path, help="mask image (EDF, TIFF, .npy; non-zero masked)")
    command.add_argument("--dark", type=Path, help="dark-current image subtracted from each frame")
    command.add_argument("--flat", type=Path, help="flat-field image (relative efficiency)")
    sector = command.add_mutually_exclusive_group()
    sector.add_argument(
        "--sector",
        type=float,
        nargs=2,
        metavar=("A", "B"),
        default=(-5.0, 5.0),
        help="azimuthal sector in pyFAI's chi, degrees (default -5 5)",
    )
    sector.add_argument("--full-ring", action="store_true", help="integrate the full ring")
    command.add_argument(
        "--normalize-by",
        action="append",
        default=[],
        metavar="KEY",
        help="frame metadata (e.g. monitor, transmission) to normalise by; repeatable",
    )
    command.add_argument("--out", type=Path, required=True, help="output folder")
    if scan_id:
        command.add_argument("--scan-id", help="name of the scan and its results file")
    command.add_argument(
        "--workers",
        type=_non_negative_int,
        default=2,
        help="local inference workers (default 2; 0 with --remote-work: remote workers only)",
    )
    command.add_argument(
        "--remote-work",
        metavar="URL",
        help="also take inference workers from other nodes (beamline-inn worker --connect) on "
        "this tcp:// address, e.g. tcp://*:5555",
    )
    command.add_argument(
        "--curve-key", type=Path, metavar="FILE", help="this feeder's .key_secret (CURVE)"
    )
    command.add_argument(
        "--authorized-keys",
        type=Path,
        metavar="DIR",
        help="folder of the public .key files of the workers allowed to connect (CURVE)",
    )
    command.add_argument(
        "--samples", type=_positive_int, default=1000, help="posterior samples per exposure"
    )
    command.add_argument("--model", type=Path, metavar="NAME|FILE", help=_model_help())
    command.add_argument(
        "--samples-compression",
        choices=("none", "gzip", "bitshuffle-lz4"),
        default="none",
        help="compression of the posterior samples in the results file: none (default; any "
        "HDF5 reader), gzip (smaller, the writer slower) or bitshuffle-lz4 (readers need the "
        "bitshuffle plugin, e.g. `import hdf5plugin`)",
    )


def _index_ranges(indices: Iterable[int], most: int = 8) -> str:
    """Exposure indices as ranges, e.g. ``exposures 0-10, 12, 14-63`` (the first ``most``)."""
    runs: list[list[int]] = []
    for index in sorted({int(i) for i in indices}):
        if runs and index == runs[-1][1] + 1:
            runs[-1][1] = index
        else:
            runs.append([index, index])
    if not runs:
        return "no exposures"
    text = ", ".join(f"{low}-{high}" if high > low else f"{low}" for low, high in runs[:most])
    return f"exposures {text}{', ...' if len(runs) > most else ''}"


def _show(args: argparse.Namespace) -> int:
    from pipeline.store import open_results
    from pipeline.store.views import summary_table, write_plots

    results = open_results(args.results)  # ValueError for a file that is not one
    if args.exposure is not None and args.exposure not in results.index:
        raise ValueError(
            f"exposure {args.exposure} is not in {args.results} ({_index_ranges(results.index)})"
        )
    ok = results.status == "ok"
    print(
        f"scan {results.scan_id}: {results.index.size} exposures, {int(ok.sum())} with a "
        f"posterior, {int((~ok).sum())} failed, {int(results.flagged.sum())} flagged "
        f"(not explained by a grating)"
    )
    print(summary_table(results, None if args.exposure is None else [args.exposure]))
    if args.png is not None:
        for path in write_plots(results, args.png, args.exposure):
            print(f"wrote {path}")
    return 0


def _salvage(args: argparse.Namespace) -> int:
    from pipeline.store.salvage import salvage

    saved = salvage(args.damaged, args.out)
    print(f"saved {saved.rows:,} of {saved.of:,} rows of {args.damaged} into {args.out}")
    if saved.rows < saved.of:
        print(
            f"the others lay in the lost part of the file: to redo them, put the saved file in "
            f"the damaged one's place (mv {args.out} {args.damaged}) and run its scan again "
            "with --resume"
        )
    return 0


def _serve(args: argparse.Namespace) -> int:
    _use_prefect_api(args)
    from prefect import serve
    from prefect.settings import PREFECT_API_URL

    from flows.deployments import load_deployments

    deployments = load_deployments(args.deployments)  # a bad file stops here
    if not PREFECT_API_URL.value():
        raise ValueError(
            "serve needs a Prefect server that outlives it: start one (prefect server start) and "
            "set PREFECT_API_URL, e.g. http://127.0.0.1:4200/api (see deploy/README.md)"
        )
    for deployment in deployments:
        schedule = f" on {deployment.schedules[0].schedule.cron}" if deployment.schedules else ""
        print(f"serving {deployment.flow_name}/{deployment.name}{schedule}", flush=True)
    serve(*deployments, limit=args.limit)
    return 0


def _keys(args: argparse.Namespace) -> int:
    from pipeline.transport.security import create_keypair

    for name in args.names:
        public, secret = create_keypair(args.dir, name)
        print(f"{name}: public {public}  secret {secret}")
    print(
        "Give each worker its NAME.key_secret and the feeder's .key; put the workers' .key files "
        "in the folder passed to --authorized-keys (see deploy/README.md)."
    )
    return 0


def _worker(args: argparse.Namespace) -> int:
    from workers.remote import RemoteWorker

    worker = RemoteWorker(
        args.connect,
        secret_key=args.key,
        server_key=args.server_key,
        threads=args.threads,
        device=args.device,
        log=lambda line: print(line, flush=True),
    )
    try:
        worker.serve(once=args.once)
    finally:
        worker.close()
    return 0


def _model_help() -> str:
    """The help of a scan command's ``--model``."""
    from pipeline.model.checkpoint import BUNDLED_MODELS

    return (
        f"model file or bundled model's name ({', '.join(BUNDLED_MODELS)}); without it, the "
        "default model. The line-outs are on its instrument's q grid, and a geometry (PONI, "
        "mask, sector) that does not match its instrument is refused before the scan starts"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="beamline-inn",
        description="Streaming SAXS reconstruction: detector frames to posterior samples.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser(
        "demo",
        help="reconstruct a simulated scan end to end (Prefect flow, ZeroMQ workers, HDF5)",
    )
    demo.add_argument(
        "--frames", type=_positive_int, default=64, help="exposures to simulate (default 64)"
    )
    demo.add_argument(
        "--workers", type=_positive_int, default=2, help="inference worker processes (default 2)"
    )
    demo.add_argument(
        "--out", type=Path, default=Path("beamline-inn-results"), help="output folder"
    )
    demo.add_argument("--seed", type=int, default=0, help="seed of the simulated scan")
    demo.add_argument("--model", type=Path, default=None, metavar="NAME|FILE", help=_model_help())
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

    reprocess = commands.add_parser(
        "reprocess",
        help="reconstruct archived frames: EDF, CBF, TIFF files and globs, Eiger HDF5",
        description="Reconstruct archived detector frames into OUT/SCAN_ID.h5. Frames that "
        "cannot be read or integrated are recorded as failed exposures; the scan goes on.",
    )
    reprocess.add_argument("paths", nargs="+", metavar="PATH", help="files or glob patterns")
    _add_hdf5_dataset_option(reprocess)
    _add_scan_options(reprocess)
    reprocess.add_argument(
        "--read-ahead",
        type=_non_negative_int,
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

    batch = commands.add_parser(
        "reprocess-scans",
        help="reconstruct many archived scans (folders, Eiger masters, globs) over Dask, one "
        "file each; complete ones skipped, unfinished ones resumed",
        description="Reconstruct each archived scan (a folder of frames, or an Eiger master "
        "file) into OUT/SCAN_ID.h5, one Dask task per scan (the reprocess-scans flow). Scans "
        "whose results are complete are skipped; unfinished results files are resumed.",
    )
    batch.add_argument("scans", nargs="+", metavar="SCAN", help="folders, files or globs")
    _add_scan_options(batch, scan_id=False)
    batch.add_argument("--dask", metavar="ADDRESS", help="an existing Dask scheduler, tcp://...")
    batch.add_argument(
        "--dask-workers",
        type=_positive_int,
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
        type=_non_negative_int,
        default=0,
        metavar="N",
        help="frames decoded ahead per scan by a reader process (default 0)",
    )
    batch.set_defaults(run=_reprocess_scans)

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
    _add_hdf5_dataset_option(online, "with --watch: ")
    online.add_argument(
        "--idle-timeout",
        type=float,
        default=30.0,
        help="end after this many seconds without a message or a new frame (default 30)",
    )
    _add_scan_options(online)
    online.set_defaults(run=_online)

    worker = commands.add_parser(
        "worker",
        help="serve inference to feeders on another node (scan after scan)",
        description="Connect to a feeder's --remote-work address and draw posterior samples "
        "for its scans: the feeder sends the configuration and the model.",
    )
    worker.add_argument("--connect", required=True, metavar="URL", help="tcp://FEEDER-HOST:PORT")
    worker.add_argument("--key", type=Path, metavar="FILE", help="this worker's .key_secret")
    worker.add_argument(
        "--server-key", type=Path, metavar="FILE", help="the feeder's public .key file"
    )
    worker.add_argument("--threads", type=_positive_int, help="torch threads (default: cores)")
    worker.add_argument("--device", default="auto", help="torch device (default auto: CUDA if any)")
    worker.add_argument("--once", action="store_true", help="exit after one scan")
    worker.set_defaults(run=_worker)

    show = commands.add_parser(
        "show",
        help="summarise a results file; with --png, plot traces, a line-out and a posterior",
    )
    show.add_argument("results", type=Path, help="a results file (SCAN_ID.h5)")
    show.add_argument("--exposure", type=int, help="only this exposure (and plot it)")
    show.add_argument("--png", type=Path, metavar="DIR", help="write PNG plots into DIR")
    show.set_defaults(run=_show)

    salvage = commands.add_parser(
        "salvage",
        help="copy the intact rows of a truncated or damaged results file into a new one",
    )
    salvage.add_argument("damaged", type=Path, help="the damaged results file (SCAN_ID.h5)")
    salvage.add_argument("--out", type=Path, required=True, help="the new results file")
    salvage.set_defaults(run=_salvage)

    serve = commands.add_parser(
        "serve",
        help="serve the deployments of a YAML file (online, nightly reprocessing, ...) to a "
        "Prefect server",
    )
    serve.add_argument("deployments", type=Path, help="e.g. deploy/deployments.yaml")
    serve.add_argument(
        "--limit", type=_positive_int, default=None, help="flow runs at once (default: no limit)"
    )
    serve.set_defaults(run=_serve)

    keys = commands.add_parser(
        "keys",
        help="create CURVE key pairs for a feeder and its remote workers",
        description="Write DIR/NAME.key (public) and DIR/NAME.key_secret (secret, mode 0600) for "
        "each NAME.",
    )
    keys.add_argument("names", nargs="+", metavar="NAME", help="e.g. feeder gpu-node-1")
    keys.add_argument("--dir", type=Path, default=Path("keys"), help="folder (default ./keys)")
    keys.set_defaults(run=_keys)

    reference = commands.add_parser(
        "reference",
        help="the exact posterior (staged grids) of a few line-outs, for comparison",
        description="Exact posterior of (pitch, width, sigma) given counts and known N_ph and b. "
        "COUNTS: .npy or text files with one line-out per row (the instrument's bins, 512 for "
        "the default), or a results .h5 file (its recorded truth supplies N_ph and b for "
        "simulated exposures, and its instrument the grid, masked bins and background "
        "weights).",
    )
    reference.add_argument("counts", nargs="+", type=Path, metavar="COUNTS")
    reference.add_argument(
        "--instrument",
        type=Path,
        default=None,
        help="instrument file of the line-outs (default: the one a results file holds, else "
        "the default instrument)",
    )
    reference.add_argument("--n-photons", type=float, help="known total photons N_ph")
    reference.add_argument("--background", type=float, help="known background per bin b")
    reference.add_argument(
        "--exposure",
        type=int,
        action="append",
        help="exposure index in a results file (repeatable)",
    )
    reference.add_argument(
        "--samples", type=_positive_int, default=10_000, help="samples per line-out"
    )
    reference.add_argument("--seed", type=int, default=0)
    reference.add_argument("--out", type=Path, help="write OUT.json (modes) and OUT.npz (samples)")
    reference.set_defaults(run=_reference)

    instrument = commands.add_parser(
        "instrument",
        help="derive an instrument file (q grid, masked bins, pixels and background weight "
        "per bin) from a PONI geometry, for beamline-inn train --instrument",
        description="Count with pyFAI, as the pipeline integrates, the unmasked pixels of each "
        "q bin in the sector or ring: bins without a pixel (module gaps, the mask) are masked, "
        "the background weights are the pixels per bin over their mean. A q range the "
        "geometry does not reach, or more than half of the bins masked, is refused.",
    )
    instrument.add_argument("--poni", type=Path, required=True, help="the PONI file")
    instrument.add_argument(
        "--mask", type=Path, help="mask image (non-zero = masked), besides the detector's gaps"
    )
    region = instrument.add_mutually_exclusive_group()
    region.add_argument(
        "--sector",
        type=float,
        nargs=2,
        default=(-5.0, 5.0),
        metavar=("LOW", "HIGH"),
        help="azimuthal sector in pyFAI's chi, degrees (default -5 5)",
    )
    region.add_argument("--full-ring", action="store_true", help="the full ring, no sector")
    instrument.add_argument(
        "--q-range",
        type=float,
        nargs=2,
        required=True,
        metavar=("QMIN", "QMAX"),
        help="centres of the first and last q bin, 1/nm",
    )
    instrument.add_argument("--bins", type=_positive_int, required=True, help="q bins (>= 8)")
    instrument.add_argument(
        "--resolution",
        type=float,
        metavar="DQ",
        help="Gaussian sd of the resolution, 1/nm (default: estimated from the pixel size, "
        "distance and wavelength: a lower bound)",
    )
    instrument.add_argument(
        "--prior",
        type=Path,
        metavar="FILE",
        help="JSON of prior ranges (pitch_nm, duty, sigma_nm, log10_n_photons, background: "
        "[low, high] each; any subset, the others default)",
    )
    instrument.add_argument(
        "--name",
        help="the instrument's name (default: the output file's name less .json, .instrument)",
    )
    instrument.add_argument(
        "--out", type=Path, required=True, metavar="FILE.json", help="instrument file to write"
    )
    instrument.set_defaults(run=_instrument)

    validate = commands.add_parser(
        "validate", help="diagnostics of a model: calibration, and distance to the exact posterior"
    )
    validate.add_argument(
        "--model",
        type=Path,
        default=None,
        help="model file or bundled model's name (default: the default model, or with "
        "--instrument the bundled model for it, else NAME.safetensors here)",
    )
    validate.add_argument(
        "--instrument",
        type=Path,
        default=None,
        help="instrument file (beamline-inn instrument): validate on its simulations; the "
        "model must have been trained for it",
    )
    validate.add_argument(
        "--out", type=Path, default=Path("validation"), help="folder for JSON and PNGs"
    )
    validate.add_argument(
        "--simulations", type=_positive_int, default=200, help="exposures for SBC/coverage"
    )
    validate.add_argument(
        "--reference", type=_positive_int, default=20, help="exposures against the exact posterior"
    )
    validate.add_argument("--seed", type=int, default=2024)
    validate.add_argument(
        "--reference-cache",
        type=Path,
        default=None,
        help="keep exact posteriors here and reuse them (to compare several models)",
    )
    validate.add_argument(
        "--update-card", action="store_true", help="store the diagnostics in the model card"
    )
    validate.set_defaults(run=_validate)

    train = commands.add_parser("train", help="train the posterior model on simulations")
    train.add_argument(
        "--instrument",
        type=Path,
        default=None,
        help="instrument file (beamline-inn instrument) to train for (default: the default "
        "instrument)",
    )
    train.add_argument(
        "--out",
        type=Path,
        default=None,
        help="weights file to write (default: the package's default model, or with "
        "--instrument NAME.safetensors here, NAME the instrument's)",
    )
    train.add_argument(
        "--steps", type=_positive_int, default=20_000, help="each step simulates a fresh batch"
    )
    train.add_argument("--batch-size", type=_positive_int, default=512)
    train.add_argument("--learning-rate", type=float, default=1e-3)
    train.add_argument("--blocks", type=int, default=8, help="coupling blocks")
    train.add_argument("--hidden", type=int, default=64, help="hidden units per coupling subnet")
    train.add_argument(
        "--activation", choices=("silu", "relu"), default="silu", help="of the coupling subnets"
    )
    train.add_argument(
        "--conditional-affine",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="a per-exposure affine map (location, triangular scale) after the coupling blocks",
    )
    train.add_argument(
        "--centred-nuisances",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="standardise photons and background on their classical estimates",
    )
    train.add_argument(
        "--flow",
        choices=("own", "zuko-realnvp"),
        default="own",
        help="coupling-flow implementation",
    )
    train.add_argument(
        "--objective",
        choices=("maximum-likelihood", "bidirectional"),
        default="maximum-likelihood",
        help="the cINN's maximum likelihood, or the talk's bi-directional INN (L_y, L_z, L_x)",
    )
    train.add_argument(
        "--device", default="cpu", help="torch device to train on (cpu, cuda); default cpu"
    )
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.add_argument(
        "--checkpoint-dir",
        type=Path,
        default=None,
        help="save the training state here every 1000 steps and resume from it if present",
    )
    train.add_argument(
        "--stop-at",
        type=_positive_int,
        default=None,
        help="stop after this step (checkpoint saved); needs --checkpoint-dir",
    )
    train.set_defaults(run=_train)
    return parser


def _use_prefect_api(args: argparse.Namespace) -> None:
    """The first call of each command that runs flows (:func:`flows.api.use_prefect_api`):
    a ``PREFECT_API_URL`` that does not answer stops the command here (exit code 2, one
    line); without one, the flows get a local Prefect API server of this process's own, in
    a session of its own, so that Ctrl-C reaches only the command. ``serve`` needs a server
    that outlives it, so it gets no local one. A scan that stops (:class:`ScanError`) is
    said once, by :func:`main`: Prefect's console reports of it are left out
    (:class:`_ScanErrorsOffTheConsole`)."""
    import logging

    from flows.api import use_prefect_api

    use_prefect_api(start_local=args.command != "serve")
    from prefect.logging.configuration import ensure_logging_setup

    ensure_logging_setup()  # Prefect's console handler, which its first flow would make
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _ScanErrorsOffTheConsole) for f in handler.filters):
            handler.addFilter(_ScanErrorsOffTheConsole())


class _ScanErrorsOffTheConsole:
    """A filter for the console's log handler: Prefect's reports of a task or flow run that
    failed with a :class:`~workers.scan.ScanError` (two with a traceback, and the error
    repeated in each run's final state) are dropped; the command prints the error once, with
    how to resume, and Prefect's API (the UI) still gets the reports."""

    def filter(self, record: object) -> bool:
        import logging

        from workers.scan import ScanError

        if not isinstance(record, logging.LogRecord):
            return True
        if not record.name.startswith(("prefect.task_runs", "prefect.flow_runs")):
            return True
        error = record.exc_info[1] if record.exc_info else None
        return not (isinstance(error, ScanError) or "ScanError" in record.getMessage())


#: The exit code of a command whose scan could not go on (:class:`~workers.scan.ScanError`).
SCAN_STOPPED = 3


def _scan_error() -> type[Exception]:
    """:class:`~workers.scan.ScanError`, imported only when an error is matched against it
    (the command line starts without the pipeline's modules)."""
    from workers.scan import ScanError

    return ScanError


#: After "stopped on Ctrl-C ..." or "the scan stopped": how to finish the work, by command.
_AFTER_CTRL_C = {
    "demo": "; a demo is not resumed: run it again",
    "reprocess": "; resume with --resume",
    "reprocess-scans": "; run it again to resume the unfinished scans",
    "online": "; reprocess the saved frames with --resume to complete it",
    "train": "; with --checkpoint-dir, the same command resumes from the last checkpoint",
}


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds like Ctrl-C: child processes are stopped, files closed


#: A SIGINT this soon after the first is the same Ctrl-C, delivered twice: to the process
#: group and again by a wrapper that forwards it (``timeout``, a shell script's trap).
SAME_CTRL_C_S = 0.5


def _stop_on_ctrl_c(command: str, signum: int, frame: object) -> None:
    """The first Ctrl-C unwinds the command (``KeyboardInterrupt``): the scan's processes are
    stopped and its file closed; the next one exits at once."""
    first = time.monotonic()
    signal.signal(signal.SIGINT, functools.partial(_exit_at_once, command, first))
    raise KeyboardInterrupt


def _exit_at_once(command: str, first: float, signum: int, frame: object) -> None:
    """A second Ctrl-C (not within :data:`SAME_CTRL_C_S` of the first): exit now. The writer
    and workers, in sessions of their own, see this process gone and stop by themselves
    (every acknowledged exposure is in the file); the local Prefect API server, if any, is
    killed."""
    from flows.api import kill_local_server

    if time.monotonic() - first < SAME_CTRL_C_S:
        return

    kill_local_server()
    line = f"beamline-inn {command}: stopped at once on a second Ctrl-C\n"
    os.write(sys.stderr.fileno(), line.encode())
    os._exit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    from flows.api import command_environment

    args = build_parser().parse_args(argv)
    main_thread = threading.current_thread() is threading.main_thread()
    on_ctrl_c = functools.partial(_stop_on_ctrl_c, args.command)
    if main_thread:
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
        previous_sigint = signal.signal(signal.SIGINT, on_ctrl_c)
    try:
        with command_environment():
            return args.run(args)
    except (ValueError, OSError) as error:  # bad input, missing or existing files: say so plainly
        print(f"beamline-inn {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:  # a ScanInterrupted says what was written
        # the process ends next: its last garbage collection, over every object (torch's,
        # Prefect's), takes 1-2 s and is left out (the scan's threads have ended by now)
        atexit.register(gc.freeze)
        detail = f" {interrupt}" if str(interrupt) else ""
        after = _AFTER_CTRL_C.get(args.command, "")
        print(f"beamline-inn {args.command}: stopped on Ctrl-C{detail}{after}", file=sys.stderr)
        return 128 + signal.SIGINT
    except _scan_error() as error:  # the scan could not go on: what was acknowledged is written
        after = _AFTER_CTRL_C.get(args.command, "")
        print(f"beamline-inn {args.command}: the scan stopped: {error}", file=sys.stderr)
        print(
            f"beamline-inn {args.command}: the exposures acknowledged before it stopped were "
            f"written to the results file (unless the reason above is the file itself){after}",
            file=sys.stderr,
        )
        return SCAN_STOPPED
    finally:
        if main_thread and signal.getsignal(signal.SIGINT) is on_ctrl_c:  # no Ctrl-C came:
            signal.signal(signal.SIGINT, previous_sigint)  # an in-process caller's, back


if __name__ == "__main__":
    sys.exit(main())
