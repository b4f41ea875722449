"""``train-model`` and ``validate-model``: the model's life cycle as flows, thin over
:mod:`pipeline.model.train` and :mod:`pipeline.model.validation` (the same calls as
``beamline-inn train`` and ``beamline-inn validate``).

Training shows its progress (a progress artifact, updated at each validation) and ends with
a markdown artifact: the loss history, the calibration of the new model on fresh
simulations, and where its weights and card are. Validation shows how many exact posteriors
are done and ends with the diagnostics and the coverage and SBC figures as artifacts. Neither
retries: a failure there is a bug or a bad parameter, which a retry would only repeat.
"""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Annotated

from prefect import flow
from prefect.artifacts import (
    create_image_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    update_progress_artifact,
)
from pydantic import Field

from pipeline.instrument import default_instrument, load_instrument
from pipeline.model import load, save
from pipeline.model.checkpoint import DEFAULT_MODEL, card_path
from pipeline.model.train import TrainingConfig, train
from pipeline.model.validation import (
    reference_diagnostics,
    simulation_diagnostics,
    write_figures,
)

SHOWN = ("pitch_nm", "width_nm", "sigma_nm")


@flow(name="train-model")
def train_model(
    out: Path,
    training: TrainingConfig | None = None,
    checkpoint_dir: Path | None = None,
    device: str = "cpu",
    instrument: Path | None = None,
) -> dict:
    """Train a model on fresh simulations and write ``out`` (.safetensors) and its card,
    with its calibration on 200 simulations; with ``checkpoint_dir``, resumable (a run
    cancelled or crashed goes on from its last checkpoint when started again). ``training``:
    the budget and architecture (default: those of the shipped model); ``instrument``: the
    instrument file (``beamline-inn instrument``) to train for (default: the default one)."""
    training = training or TrainingConfig()
    described = load_instrument(instrument) if instrument is not None else default_instrument()
    progress = create_progress_artifact(
        0.0, key="training-progress", description=f"Training {Path(out).name}"
    )
    last_update = 0.0

    def on_validation(step: int, train_loss: float, validation_loss: float) -> None:
        nonlocal last_update
        if time.monotonic() - last_update >= 5.0 or step == training.steps:
            update_progress_artifact(progress, 100.0 * step / training.steps)
            last_update = time.monotonic()

    model, history = train(
        training,
        progress=False,
        checkpoint_dir=checkpoint_dir,
        device=device,
        on_validation=on_validation,
        instrument=described,
    )
    report, _ = simulation_diagnostics(model)
    path = save(
        model,
        Path(out),
        name=described.name,
        training={"flow": "train-model", **history},
        diagnostics={"simulation": report},
    )
    lines = [
        f"# Model `{path.name}`",
        "",
        f"{training.steps} steps on {training.n_simulations} simulations in "
        f"{history['wall_s']:.0f} s on {history['device']}; weights `{path}`, card "
        f"`{card_path(path)}` (SHA-256 {model.card['weights_sha256'][:16]}...).",
        "",
        f"Instrument {described.describe()} (SHA-256 {described.sha256()[:16]}...).",
        "",
        "| step | training loss | validation loss |",
        "|---|---|---|",
        *(
            f"| {step} | {train_loss:.3f} | {validation_loss:.3f} |"
            for step, train_loss, validation_loss in zip(
                history["step"], history["train_loss"], history["validation_loss"], strict=True
            )
        ),
        "",
        "Calibration error on 200 fresh simulations (0: perfectly calibrated):",
        "",
        "| " + " | ".join(SHOWN) + " |",
        "|---|---|---|",
        "| " + " | ".join(f"{report['calibration_error'][name]:.3f}" for name in SHOWN) + " |",
    ]
    create_markdown_artifact("\n".join(lines), key="trained-model", description=path.name)
    return {"model": str(path), "card": str(card_path(path)), "history": history}


@flow(name="validate-model")
def validate_model(
    model: Path | None = None,
    out: Path = Path("validation"),
    simulations: Annotated[int, Field(ge=10)] = 200,
    reference: Annotated[int, Field(ge=1)] = 20,
    seed: int = 2024,
    reference_cache: Path | None = None,
    update_card: bool = False,
) -> dict:
    """Calibration (SBC, coverage) on ``simulations`` exposures and the distance to the exact
    posterior on ``reference`` exposures (about 10 s each), written to ``out`` as
    ``validation.json`` and PNGs; with ``update_card``, stored in the model's card."""
    posterior = load(model, device="cpu")
    progress = create_progress_artifact(
        0.0, key="validation-progress", description="exact posteriors computed"
    )
    simulation, simulation_arrays = simulation_diagnostics(posterior, simulations, seed=seed)

    def on_reference(done: int, total: int) -> None:
        update_progress_artifact(progress, 100.0 * done / total)

    exact, exact_arrays = reference_diagnostics(
        posterior, reference, seed=seed + 1, progress=on_reference, cache_dir=reference_cache
    )
    diagnostics = {"simulation": simulation, "reference": exact}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "validation.json").write_text(json.dumps(diagnostics, indent=2) + "\n")
    figures = write_figures(simulation_arrays, exact_arrays, out)
    if update_card:
        card_file = card_path(Path(model) if model else DEFAULT_MODEL)
        card = json.loads(card_file.read_text())
        card["diagnostics"] = diagnostics
        card_file.write_text(json.dumps(card, indent=2) + "\n")
    rows = {
        "calibration error": simulation["calibration_error"],
        "SBC KS p-value": simulation["sbc_ks_p"],
        "sd / exact sd (median)": exact["sd_ratio_median"],
        "abs(bias) / exact sd (median)": exact["bias_in_exact_sd_median"],
    }
    lines = [
        f"# Validation of `{model or 'the shipped model'}`",
        "",
        f"{simulations} simulated exposures, {reference} against the exact posterior; "
        f"report `{out / 'validation.json'}`.",
        "",
        "| | " + " | ".join(SHOWN) + " |",
        "|---|---|---|---|",
        *(
            f"| {what} | " + " | ".join(f"{values[name]:.3g}" for name in SHOWN) + " |"
            for what, values in rows.items()
        ),
        "",
        f"Width mode weight error (max): {exact['mode_weight_error_max']}; C2ST (median): "
        f"{exact['c2st_median']:.3f} (0.5: indistinguishable from exact).",
    ]
    create_markdown_artifact("\n".join(lines), key="model-validation", description=str(out))
    for name in ("coverage", "sbc"):
        png = (out / f"{name}.png").read_bytes()
        create_image_artifact(
            "data:image/png;base64," + base64.b64encode(png).decode(),
            key=f"validation-{name}",
            description=f"{name}.png",
        )
    return {"report": str(out / "validation.json"), "figures": figures, **diagnostics}
