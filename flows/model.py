"""``train-model`` and ``validate-model``: the model's life cycle as flows, thin over
:func:`pipeline.model.training_run.run_training` and
:func:`pipeline.model.validation_run.run_validation` (which ``beamline-inn train`` and
``beamline-inn validate`` call too).

Training shows its progress (a progress artifact, updated at each validation) and ends with
a markdown artifact: the loss history, the calibration of the new model on fresh
simulations, and where its weights and card are. Validation shows how many exact posteriors
are done and ends with the diagnostics and the coverage and SBC figures as artifacts. What
the library says as it goes goes to the flow run's log. Neither retries: a failure there is
a bug or a bad parameter, which a retry would only repeat.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any
from uuid import UUID

from prefect import flow, get_run_logger
from prefect.artifacts import (
    create_image_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    update_progress_artifact,
)
from pydantic import Field

from pipeline.model.train import TrainingConfig
from pipeline.model.training_run import run_training
from pipeline.model.validation_run import run_validation


def _progress(key: str, description: str) -> Callable[[float], None]:
    """A progress artifact of this flow run at 0%, and what sets its percentage."""
    artifact = create_progress_artifact(0.0, key=key, description=description)
    # Prefect's async_dispatch types the result as the id or a coroutine: in a sync flow
    # (these are) it is the id
    assert isinstance(artifact, UUID)

    def update(percent: float) -> None:
        update_progress_artifact(artifact, percent)

    return update


@flow(name="train-model")
def train_model(
    out: Path,
    training: TrainingConfig | None = None,
    checkpoint_dir: Path | None = None,
    device: str = "cpu",
    instrument: Path | None = None,
) -> dict[str, Any]:
    """Train a model on fresh simulations and write ``out`` (.safetensors) and its card,
    with its calibration on 200 simulations; with ``checkpoint_dir``, resumable (a run
    cancelled or crashed goes on from its last checkpoint when started again). ``training``:
    the budget and architecture (default: those of the shipped model); ``instrument``: the
    instrument file (``beamline-inn instrument``) to train for (default: the default one)."""
    training = training or TrainingConfig()
    progress = _progress("training-progress", f"Training {Path(out).name}")
    last_update = 0.0

    def on_validation(step: int, train_loss: float, validation_loss: float) -> None:
        nonlocal last_update
        if time.monotonic() - last_update >= 5.0 or step == training.steps:
            progress(100.0 * step / training.steps)
            last_update = time.monotonic()

    report = run_training(
        training,
        Path(out),
        instrument=instrument,
        started_by={"flow": "train-model"},
        device=device,
        checkpoint_dir=checkpoint_dir,
        progress_bar=False,
        on_validation=on_validation,
        log=get_run_logger().info,
    )
    assert report.saved is not None  # no stop_at_step: a training here runs to its end
    create_markdown_artifact(
        report.markdown(), key="trained-model", description=report.saved.weights.name
    )
    return {
        "model": str(report.saved.weights),
        "card": str(report.saved.card),
        "history": report.history,
    }


@flow(name="validate-model")
def validate_model(
    model: Path | None = None,
    out: Path = Path("validation"),
    simulations: Annotated[int, Field(ge=10)] = 200,
    reference: Annotated[int, Field(ge=1)] = 20,
    seed: int = 2024,
    reference_cache: Path | None = None,
    update_card: bool = False,
    instrument: Path | None = None,
) -> dict[str, Any]:
    """Calibration (SBC, coverage) on ``simulations`` exposures and the distance to the exact
    posterior on ``reference`` exposures (about 10 s each), written to ``out`` as
    ``validation.json`` and PNGs; with ``update_card``, stored in the model's card.
    ``model``: a file or a bundled model's name (default: the default model, or with
    ``instrument``, an instrument file, the bundled model for it, which must have been
    trained for it)."""
    progress = _progress("validation-progress", "exact posteriors computed")
    report = run_validation(
        model,
        Path(out),
        instrument=instrument,
        simulations=simulations,
        reference=reference,
        seed=seed,
        reference_cache=reference_cache,
        update_card=update_card,
        on_reference=lambda done, total: progress(100.0 * done / total),
        log=get_run_logger().info,
    )
    create_markdown_artifact(report.markdown(), key="model-validation", description=str(out))
    for name in ("coverage", "sbc"):
        png = report.figures[name].read_bytes()
        create_image_artifact(
            "data:image/png;base64," + base64.b64encode(png).decode(),
            key=f"validation-{name}",
            description=f"{name}.png",
        )
    return {
        "report": str(report.report_path),
        "figures": [str(path) for path in report.figures.values()],
        **report.diagnostics,
    }
