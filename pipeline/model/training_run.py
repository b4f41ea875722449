"""Training as one job: train a model for an instrument, check its calibration on fresh
simulations, write its weights and card, and report what was done.

:func:`run_training` is what ``beamline-inn train`` and the ``train-model`` flow both call;
its :class:`TrainingReport` renders itself as the command's text and as the flow's markdown
artifact.

Example (a training stopped early, as ``--stop-at`` leaves it):
    >>> report = TrainingReport(
    ...     instrument="default", instrument_sha256="0" * 64, config=TrainingConfig(steps=100),
    ...     history={"wall_s": 12.0}, saved=None, checkpoint_dir=Path("state"), stopped_at=40)
    >>> print(report.text())
    stopped at step 40 of 100; the state is in state: run the same command without --stop-at to resume
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from pipeline.bundled import DEFAULT_MODEL
from pipeline.instrument import default_instrument, load_instrument
from pipeline.model.bidirectional import BidirectionalINN
from pipeline.model.checkpoint import save
from pipeline.model.posterior import PosteriorModel
from pipeline.model.train import TrainingConfig, train
from pipeline.model.validation import simulation_diagnostics
from pipeline.model_card import card_path
from pipeline.physics import GRATING_PARAMETERS


@dataclass(frozen=True)
class SavedModel:
    """The model files a completed training wrote, and the new model's calibration."""

    #: the weights file (.safetensors)
    weights: Path
    #: its model card (JSON)
    card: Path
    #: SHA-256 of the weights file, as the card holds it
    weights_sha256: str
    #: median |coverage - credibility| per parameter on 200 fresh simulations (0: calibrated)
    calibration_error: Mapping[str, float]


@dataclass(frozen=True)
class TrainingReport:
    """What a training did: the instrument, the budget, the loss history and either the
    model it wrote (``saved``) or the step it stopped at (``stopped_at``, its state in
    ``checkpoint_dir``)."""

    #: the instrument trained for, in one line (:meth:`Instrument.describe`)
    instrument: str
    #: the instrument's SHA-256 (its identity)
    instrument_sha256: str
    #: the configuration trained with (budget, optimiser, architecture)
    config: TrainingConfig
    #: :func:`~pipeline.model.train.train`'s history (losses per validation step, ``wall_s``
    #: in seconds, ``device``), as the card holds it
    history: Mapping[str, Any]
    #: the model files; ``None`` when the training stopped early
    saved: SavedModel | None
    #: the training state's folder, if any
    checkpoint_dir: Path | None = None
    #: the step the training stopped at (``stop_at_step``), when it did not complete
    stopped_at: int | None = None

    @property
    def wall_s(self) -> float:
        """Training time in seconds, over every session of a resumed training."""
        return float(self.history["wall_s"])

    def text(self) -> str:
        """The outcome in a few lines, as ``beamline-inn train`` prints it."""
        if self.saved is None:
            return (
                f"stopped at step {self.stopped_at} of {self.config.steps}; the state is in "
                f"{self.checkpoint_dir}: run the same command without --stop-at to resume"
            )
        calibration = ", ".join(f"{k}={v:.3f}" for k, v in self.saved.calibration_error.items())
        return (
            f"trained in {self.wall_s:.0f} s; validation loss "
            f"{self.history['validation_loss'][-1]:.3f}\n"
            f"model written to {self.saved.weights} (card {self.saved.card})\n"
            f"calibration error: {calibration}"
        )

    def markdown(self) -> str:
        """The outcome as a markdown page: files, instrument, loss history, calibration."""
        if self.saved is None:
            return f"# Training stopped\n\n{self.text()}\n"
        saved = self.saved
        losses = zip(
            self.history["step"],
            self.history["train_loss"],
            self.history["validation_loss"],
            strict=True,
        )
        return "\n".join(
            [
                f"# Model `{saved.weights.name}`",
                "",
                f"{self.config.steps} steps on {self.config.n_simulations} simulations in "
                f"{self.wall_s:.0f} s on {self.history['device']}; weights `{saved.weights}`, "
                f"card `{saved.card}` (SHA-256 {saved.weights_sha256[:16]}...).",
                "",
                f"Instrument {self.instrument} (SHA-256 {self.instrument_sha256[:16]}...).",
                "",
                "| step | training loss | validation loss |",
                "|---|---|---|",
                *(f"| {step} | {mine:.3f} | {held_out:.3f} |" for step, mine, held_out in losses),
                "",
                "Calibration error on 200 fresh simulations (0: perfectly calibrated):",
                "",
                "| " + " | ".join(GRATING_PARAMETERS) + " |",
                "|---|---|---|",
                "| "
                + " | ".join(f"{saved.calibration_error[n]:.3f}" for n in GRATING_PARAMETERS)
                + " |",
            ]
        )


def run_training(
    config: TrainingConfig,
    out: Path | None = None,
    *,
    instrument: Path | None = None,
    started_by: Mapping[str, str],
    device: str = "cpu",
    checkpoint_dir: Path | None = None,
    stop_at_step: int | None = None,
    progress_bar: bool = True,
    on_validation: Callable[[int, float, float], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> TrainingReport:
    """Train a model of ``config`` for ``instrument`` (an instrument file; the default
    instrument when ``None``), then measure its calibration on 200 fresh simulations and
    write it to ``out`` with its card (default: the package's default model, or with
    ``instrument`` ``NAME.safetensors`` in the working folder, NAME the instrument's).

    ``started_by`` (e.g. ``{"command": ...}`` or ``{"flow": ...}``) comes first in the card's
    ``training`` entry, the history after it. With ``checkpoint_dir`` the training resumes
    from the state saved there and saves its own; ``stop_at_step`` (which needs
    ``checkpoint_dir``: ``ValueError`` otherwise, before anything starts) ends it early, and
    nothing is written but the state. ``progress_bar``: a progress bar on the terminal;
    ``on_validation(step, train_loss, validation_loss)`` at each validation;
    ``log(line)`` gets what the training is about to do, before it starts.
    """
    if stop_at_step and not checkpoint_dir:
        raise ValueError("--stop-at needs --checkpoint-dir, or the work would be lost")
    described = load_instrument(instrument) if instrument is not None else default_instrument()
    if out is None:
        out = Path(f"{described.name}.safetensors") if instrument is not None else DEFAULT_MODEL
    if log is not None:
        log(
            f"training for {described.describe()}\non {config.n_simulations} simulations "
            f"for {config.steps} steps (seed {config.seed})"
        )
    model, history = train(
        config,
        progress=progress_bar,
        checkpoint_dir=checkpoint_dir,
        stop_at_step=stop_at_step,
        device=device,
        on_validation=on_validation,
        instrument=described,
    )
    saved = None
    if history["completed"]:
        # given no model, train returns the one build_model made for config.architecture
        trained = cast(PosteriorModel | BidirectionalINN, model)
        saved = _calibrate_and_save(trained, out, {**started_by, **history})
    return TrainingReport(
        instrument=described.describe(),
        instrument_sha256=described.sha256(),
        config=config,
        history=history,
        saved=saved,
        checkpoint_dir=checkpoint_dir,
        stopped_at=None if saved else stop_at_step,
    )


def _calibrate_and_save(
    model: PosteriorModel | BidirectionalINN, out: Path, training: dict[str, Any]
) -> SavedModel:
    """Measure ``model``'s calibration on 200 fresh simulations and write it to ``out``
    with its card (``training``: the card's training entry)."""
    calibration, _ = simulation_diagnostics(model)
    path = save(
        model,
        out,
        name=model.instrument.name,
        training=training,
        diagnostics={"simulation": calibration},
    )
    return SavedModel(
        weights=path,
        card=card_path(path),
        weights_sha256=model.card["weights_sha256"],
        calibration_error=calibration["calibration_error"],
    )
