"""Maximum-likelihood training of :class:`~pipeline.model.posterior.PosteriorModel` on simulations.

Every training step simulates a fresh batch from the prior (parameters, expected counts,
Poisson noise), so the network never sees the same exposure twice and cannot over-fit a
finite pool; the simulation budget is ``steps * batch_size``. A fixed held-out set gives the
validation loss. Everything is seeded.

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
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline.model.posterior import Architecture, PosteriorModel
from pipeline.physics import GratingPrior, QGrid, expected_counts


@dataclass(frozen=True)
class TrainingConfig:
    """The training budget and optimiser settings (saved in the model card)."""

    steps: int = 12_000
    batch_size: int = 512
    learning_rate: float = 1e-3
    n_validation: int = 4096
    validation_every: int = 500
    gradient_clip: float = 10.0
    seed: int = 0
    threads: int | None = None
    architecture: Architecture = field(default_factory=Architecture)

    @property
    def n_simulations(self) -> int:
        """The simulation budget: one fresh simulation per training example."""
        return self.steps * self.batch_size


def simulate_batch(
    n: int, prior: GratingPrior, grid: QGrid, rng: np.random.Generator, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` prior draws and Poisson counts as float32 tensors."""
    theta = torch.from_numpy(prior.sample(n, rng)).float()
    return theta, torch.poisson(expected_counts(theta, grid), generator=generator)


def train(config: TrainingConfig, progress: bool = True) -> tuple[PosteriorModel, dict]:
    """Train a model from scratch; return it (in eval mode) and the loss history."""
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    prior, grid = GratingPrior(), QGrid()
    model = PosteriorModel(config.architecture, prior, grid)

    start = time.perf_counter()
    val_theta, val_counts = simulate_batch(config.n_validation, prior, grid, rng, generator)

    optimiser = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    warmup = max(1, config.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(  # linear warm-up, then cosine decay to zero
        optimiser,
        lambda step: (
            min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / config.steps))
        ),
    )
    history: dict[str, list] = {"step": [], "train_loss": [], "validation_loss": []}
    running = math.nan
    bar = tqdm(range(1, config.steps + 1), desc="training", disable=not progress, unit="step")
    for step in bar:
        model.train()
        theta, counts = simulate_batch(config.batch_size, prior, grid, rng, generator)
        loss = -model.log_prob(theta, counts).mean()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.gradient_clip)
        optimiser.step()
        schedule.step()
        running = loss.item() if math.isnan(running) else 0.98 * running + 0.02 * loss.item()
        if step % config.validation_every == 0 or step == config.steps:
            model.eval()
            with torch.no_grad():
                validation = -model.log_prob(val_theta, val_counts).mean().item()
            history["step"].append(step)
            history["train_loss"].append(running)
            history["validation_loss"].append(validation)
            bar.set_postfix(train=f"{running:.3f}", validation=f"{validation:.3f}")
    model.eval()
    history["n_simulations"] = config.n_simulations
    history["wall_s"] = time.perf_counter() - start
    history["config"] = dataclasses.asdict(config)
    return model, history
