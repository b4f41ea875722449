"""Training of the posterior models on simulations: maximum likelihood
(:class:`~pipeline.model.posterior.PosteriorModel`) or the bi-directional objective
(:class:`~pipeline.model.bidirectional.BidirectionalINN`), as ``Architecture.objective`` says.

Every training step simulates a fresh batch from the prior (parameters, expected counts,
Poisson noise), so the network never sees the same exposure twice and cannot over-fit a
finite pool; the simulation budget is ``steps * batch_size``. A fixed held-out set gives the
validation loss. Everything is seeded.

With a ``checkpoint_dir``, the full training state (weights, optimiser moments, schedule,
random generators, loss history) is written there every ``checkpoint_every`` steps as
safetensors + JSON (no pickle), and a later call with the same configuration resumes from it:
an interrupted run resumed to the end gives the same weights as an uninterrupted one.

Example:
    >>> config = TrainingConfig(steps=2, batch_size=8, n_validation=16,
    ...                         architecture=Architecture(n_blocks=1, hidden=8, condition_dim=4,
    ...                                                   condition_hidden=8))
    >>> model, history = train(config, progress=False)
    >>> len(history["validation_loss"]) >= 1
    True
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from pipeline.instrument import Instrument, default_instrument
from pipeline.model.build import build_model
from pipeline.model.posterior import Architecture, CountsSampler


@dataclass(frozen=True)
class TrainingConfig:
    """The training budget and optimiser settings (saved in the model card)."""

    steps: int = 20_000
    batch_size: int = 512
    learning_rate: float = 1e-3
    n_validation: int = 4096
    validation_every: int = 500
    gradient_clip: float = 10.0
    seed: int = 0
    threads: int | None = None
    checkpoint_every: int = 1000
    architecture: Architecture = field(default_factory=Architecture)

    @property
    def n_simulations(self) -> int:
        """The simulation budget: one fresh simulation per training example."""
        return self.steps * self.batch_size


def simulate_batch(
    n: int, instrument: Instrument, rng: np.random.Generator, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` prior draws and Poisson counts of ``instrument`` as float32 tensors on
    ``generator``'s device (its masked bins hold counts too, which the models ignore)."""
    theta = torch.from_numpy(instrument.grating_prior.sample(n, rng)).float()
    theta = theta.to(generator.device)
    return theta, torch.poisson(instrument.expected_counts(theta), generator=generator)


STATE_TENSORS = "training-state.safetensors"
STATE_JSON = "training-state.json"


def _save_state(
    directory: Path,
    config: TrainingConfig,
    step: int,
    model: torch.nn.Module,
    optimiser: torch.optim.Optimizer,
    rng: np.random.Generator,
    generator: torch.Generator,
    history: dict,
    instrument_sha256: str,
) -> None:
    """Write the whole training state; files are replaced atomically."""
    directory.mkdir(parents=True, exist_ok=True)
    optimiser_state = optimiser.state_dict()
    tensors = {f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
    for index, state in optimiser_state["state"].items():
        for key, value in state.items():
            tensors[f"optimiser.{index}.{key}"] = torch.as_tensor(value).contiguous()
    tensors["generator"] = generator.get_state()
    meta = {
        "config": dataclasses.asdict(config),
        "step": step,
        "param_groups": optimiser_state["param_groups"],
        "numpy_rng": rng.bit_generator.state,
        "history": history,
        "instrument_sha256": instrument_sha256,
    }
    for name, write in (
        (STATE_TENSORS, lambda path: save_file(tensors, str(path))),
        (STATE_JSON, lambda path: path.write_text(json.dumps(meta))),
    ):
        partial = directory / (name + ".partial")
        write(partial)
        os.replace(partial, directory / name)


def _load_state(
    directory: Path,
    config: TrainingConfig,
    model: torch.nn.Module,
    optimiser: torch.optim.Optimizer,
    rng: np.random.Generator,
    generator: torch.Generator,
    instrument_sha256: str,
) -> tuple[int, dict]:
    """Restore a saved state into the given objects; return (step, history)."""
    meta = json.loads((directory / STATE_JSON).read_text())
    if meta["config"] != json.loads(json.dumps(dataclasses.asdict(config))):
        raise ValueError(f"{directory} holds the state of a run with another configuration")
    if meta.get("instrument_sha256", default_instrument().sha256()) != instrument_sha256:
        raise ValueError(f"{directory} holds the state of a run for another instrument")
    tensors = load_file(str(directory / STATE_TENSORS))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optimiser."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    optimiser.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    generator.set_state(tensors["generator"])
    rng.bit_generator.state = meta["numpy_rng"]
    return meta["step"], meta["history"]


def train(
    config: TrainingConfig,
    progress: bool = True,
    checkpoint_dir: Path | None = None,
    stop_at_step: int | None = None,
    device: str = "cpu",
    model: CountsSampler | None = None,
    on_validation: Callable[[int, float, float], None] | None = None,
    instrument: Instrument | None = None,
) -> tuple[CountsSampler, dict]:
    """Train a model (resuming from ``checkpoint_dir`` when it holds a state of this
    configuration); return it on the CPU in eval mode with the loss history.

    ``stop_at_step`` ends this call early, after saving a checkpoint, so that long training
    can be split over several sessions. On ``device="cuda"`` the simulations run on the GPU
    too (same seeds, different random streams: results are reproducible per device).
    ``model`` replaces the one ``config.architecture`` describes (benchmarks train peer models
    on the same simulations this way). ``on_validation(step, train_loss,
    validation_loss)`` is called at each validation (every ``validation_every`` steps), e.g.
    to show progress in a flow. ``instrument`` (the default one when ``None``) gives the
    grid, prior, masked bins and background weights of the simulations.
    """
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    instrument = instrument or default_instrument()
    if model is None:
        model = build_model(config.architecture, instrument)
    model = model.to(device)

    start = time.perf_counter()
    val_theta, val_counts = simulate_batch(config.n_validation, instrument, rng, generator)
    optimiser = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    warmup = max(1, config.steps // 20)

    def factor(step: int) -> float:  # linear warm-up, then cosine decay to zero
        return min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / config.steps))

    history: dict = {"step": [], "train_loss": [], "validation_loss": [], "wall_s": 0.0}
    first = 1
    if checkpoint_dir is not None and (Path(checkpoint_dir) / STATE_JSON).is_file():
        done, history = _load_state(
            Path(checkpoint_dir), config, model, optimiser, rng, generator, instrument.sha256()
        )
        first = done + 1
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, factor, last_epoch=first - 2)
    last = min(config.steps, stop_at_step or config.steps)
    running = history.get("running_train_loss", math.nan)
    bar = tqdm(
        range(first, last + 1),
        desc="training",
        disable=not progress,
        unit="step",
        initial=first - 1,
        total=config.steps,
    )
    wall_before = history["wall_s"]
    for step in bar:
        model.train()
        theta, counts = simulate_batch(config.batch_size, instrument, rng, generator)
        loss = model.training_loss(theta, counts, progress=step / config.steps)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.gradient_clip)
        optimiser.step()
        schedule.step()
        running = loss.item() if math.isnan(running) else 0.98 * running + 0.02 * loss.item()
        if step % config.validation_every == 0 or step == config.steps:
            model.eval()
            with torch.no_grad():
                validation = model.validation_loss(val_theta, val_counts).item()
            history["step"].append(step)
            history["train_loss"].append(running)
            history["validation_loss"].append(validation)
            bar.set_postfix(train=f"{running:.3f}", validation=f"{validation:.3f}")
            if on_validation is not None:
                on_validation(step, running, validation)
        if checkpoint_dir is not None and (step % config.checkpoint_every == 0 or step == last):
            history["wall_s"] = wall_before + time.perf_counter() - start
            history["running_train_loss"] = running
            _save_state(
                Path(checkpoint_dir),
                config,
                step,
                model,
                optimiser,
                rng,
                generator,
                history,
                instrument.sha256(),
            )
    model.cpu().eval()
    history["device"] = str(torch.device(device))
    history["wall_s"] = wall_before + time.perf_counter() - start
    history["n_simulations"] = config.n_simulations
    history["config"] = dataclasses.asdict(config)
    history["completed"] = last == config.steps
    history["instrument_sha256"] = instrument.sha256()
    return model, history
