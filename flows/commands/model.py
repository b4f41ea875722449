"""The commands of the model's life cycle: ``train`` and ``validate``
(:mod:`pipeline.model.training_run`, :mod:`pipeline.model.validation_run`), and
``reference``, the exact posterior of a few line-outs to compare a model with."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from flows.commands.arguments import Commands, positive_int

if TYPE_CHECKING:
    import numpy as np

    from pipeline.instrument import Instrument


def add_reference(commands: Commands) -> None:
    """``reference``: the exact posterior of line-outs."""
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
        "--samples", type=positive_int, default=10_000, help="samples per line-out"
    )
    reference.add_argument("--seed", type=int, default=0)
    reference.add_argument("--out", type=Path, help="write OUT.json (modes) and OUT.npz (samples)")
    reference.set_defaults(run=_reference)


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
        # the keys are line-out names, never numpy's allow_pickle (a bool) that mypy fears
        np.savez_compressed(args.out.with_suffix(".npz"), **all_samples)  # type: ignore[arg-type]
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
    from pipeline.physics import GRATING_PARAMETERS
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
            for label, m, sd in zip(GRATING_PARAMETERS, mode.mean, mode.sd, strict=True)
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


def add_validate(commands: Commands) -> None:
    """``validate``: a model's diagnostics."""
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
        "--simulations", type=positive_int, default=200, help="exposures for SBC/coverage"
    )
    validate.add_argument(
        "--reference", type=positive_int, default=20, help="exposures against the exact posterior"
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


def _validate(args: argparse.Namespace) -> int:
    from pipeline.model.validation_run import run_validation

    report = run_validation(
        args.model,
        args.out,
        instrument=args.instrument,
        simulations=args.simulations,
        reference=args.reference,
        seed=args.seed,
        reference_cache=args.reference_cache,
        update_card=args.update_card,
        log=_say,
    )
    print(report.text())
    return 0


def add_train(commands: Commands) -> None:
    """``train``: a model trained on simulations."""
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
        "--steps", type=positive_int, default=20_000, help="each step simulates a fresh batch"
    )
    train.add_argument("--batch-size", type=positive_int, default=512)
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
        type=positive_int,
        default=None,
        help="stop after this step (checkpoint saved); needs --checkpoint-dir",
    )
    train.set_defaults(run=_train)


def _train(args: argparse.Namespace) -> int:
    from pipeline.model import Architecture
    from pipeline.model.train import TrainingConfig
    from pipeline.model.training_run import run_training

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
    report = run_training(
        config,
        args.out,
        instrument=args.instrument,
        started_by={"command": "beamline-inn " + " ".join(sys.argv[1:])},
        device=args.device,
        checkpoint_dir=args.checkpoint_dir,
        stop_at_step=args.stop_at,
        progress_bar=not args.quiet,
        log=_say,
    )
    print(report.text())
    return 0


def _say(line: str) -> None:
    """Print a line of a job's progress at once (a progress bar shares the terminal)."""
    print(line, flush=True)
