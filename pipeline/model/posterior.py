"""The posterior model: line-out counts in, posterior samples of the grating parameters out.

:class:`PosteriorModel` joins three pieces:

1. :class:`ParameterTransform` maps the physical parameters (pitch, width, sigma, photons,
   background) to unbounded network coordinates: each is expressed as a fraction of its prior
   range (width as the duty cycle w / p, photons as log10), then passed through a logit.
   Samples mapped back therefore always lie inside the prior's support.
2. :class:`~pipeline.model.cinn.ConditioningNet` embeds the line-out once per exposure.
3. :class:`~pipeline.model.cinn.ConditionalINN` turns standard normal draws into
   network coordinates given that embedding.

Example:
    >>> import numpy as np
    >>> from pipeline.physics import simulate
    >>> model = PosteriorModel(Architecture(n_blocks=2, hidden=16, condition_dim=8, condition_hidden=16))
    >>> _, counts = simulate(2, np.random.default_rng(0))
    >>> model.sample(counts, 10).shape
    (2, 10, 5)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pipeline.model.cinn import ConditionalINN, ConditioningNet, ZukoRealNVP
from pipeline.physics import PARAMETER_NAMES, PARAMETER_UNITS, GratingPrior, QGrid


@dataclass(frozen=True)
class Architecture:
    """Hyper-parameters of :class:`PosteriorModel` (saved in the model card)."""

    n_blocks: int = 8
    hidden: int = 128
    condition_dim: int = 64
    condition_hidden: int = 256
    clamp: float = 2.0
    seed: int = 0
    #: "own": :class:`~pipeline.model.cinn.ConditionalINN` (the talk's two-sided blocks);
    #: "zuko-realnvp": :class:`~pipeline.model.cinn.ZukoRealNVP`.
    flow: str = "own"


class ParameterTransform(nn.Module):
    """Physical parameters (..., 5) <-> network coordinates (..., 5) through prior-range logits."""

    EPS = 1e-6
    #: Standard deviation of a logit of a uniform variable (pi / sqrt(3)), rounded.
    SCALE = 1.8

    def __init__(self, prior: GratingPrior) -> None:
        super().__init__()
        bounds = [
            prior.pitch_nm,
            prior.duty,
            prior.sigma_nm,
            prior.log10_n_photons,
            prior.background,
        ]
        self.register_buffer("low", torch.tensor([b[0] for b in bounds], dtype=torch.float32))
        self.register_buffer(
            "span", torch.tensor([b[1] - b[0] for b in bounds], dtype=torch.float32)
        )

    def to_network(self, theta: torch.Tensor) -> torch.Tensor:
        natural = torch.stack(
            [
                theta[..., 0],
                theta[..., 1] / theta[..., 0],
                theta[..., 2],
                torch.log10(theta[..., 3]),
                theta[..., 4],
            ],
            dim=-1,
        )
        unit = ((natural - self.low) / self.span).clamp(self.EPS, 1.0 - self.EPS)
        return torch.logit(unit) / self.SCALE

    def to_physical(self, u: torch.Tensor) -> torch.Tensor:
        natural = torch.sigmoid(u * self.SCALE) * self.span + self.low
        pitch = natural[..., 0]
        return torch.stack(
            [
                pitch,
                natural[..., 1] * pitch,
                natural[..., 2],
                10.0 ** natural[..., 3],
                natural[..., 4],
            ],
            dim=-1,
        )


class PosteriorModel(nn.Module):
    """q(parameters | line-out counts) for the grating model on a fixed q grid."""

    parameter_names: tuple[str, ...] = PARAMETER_NAMES
    parameter_units: tuple[str, ...] = PARAMETER_UNITS

    def __init__(
        self,
        architecture: Architecture = Architecture(),
        prior: GratingPrior = GratingPrior(),
        grid: QGrid = QGrid(),
    ) -> None:
        super().__init__()
        self.architecture = architecture
        self.prior = prior
        self.grid = grid
        self.transform = ParameterTransform(prior)
        self.conditioning = ConditioningNet(
            grid.n_points, architecture.condition_hidden, architecture.condition_dim
        )
        if architecture.flow == "own":
            self.flow: nn.Module = ConditionalINN(
                len(PARAMETER_NAMES),
                architecture.condition_dim,
                architecture.n_blocks,
                architecture.hidden,
                architecture.clamp,
                architecture.seed,
            )
        elif architecture.flow == "zuko-realnvp":
            self.flow = ZukoRealNVP(
                len(PARAMETER_NAMES),
                architecture.condition_dim,
                architecture.n_blocks,
                architecture.hidden,
            )
        else:
            raise ValueError(f"unknown flow {architecture.flow!r}: 'own' or 'zuko-realnvp'")
        self.card: dict = {}

    @property
    def device(self) -> torch.device:
        return self.transform.low.device

    def log_prob(self, theta: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """log q(u(theta) | counts) in network coordinates (the training objective), per row."""
        return self.flow.log_prob(self.transform.to_network(theta), self.conditioning(counts))

    def sample_tensor(
        self, counts: torch.Tensor, n_samples: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Posterior draws (exposures, n_samples, 5) for counts (exposures, n_points) on the model's device."""
        condition = self.conditioning(counts).repeat_interleave(n_samples, dim=0)
        z = torch.randn(
            condition.shape[0], len(PARAMETER_NAMES), generator=generator, device=counts.device
        )
        theta = self.transform.to_physical(self.flow.inverse(z, condition))
        return theta.reshape(counts.shape[0], n_samples, -1)

    def sample(self, counts: np.ndarray, n_samples: int, seed: int | None = None) -> np.ndarray:
        """Posterior draws for a float array of counts (exposures, n_points).

        Returns a float32 array (exposures, n_samples, parameters) in :attr:`parameter_names` order.
        """
        counts = np.asarray(counts, dtype=np.float32)
        if counts.ndim != 2 or counts.shape[1] != self.grid.n_points:
            raise ValueError(
                f"counts must have shape (exposures, {self.grid.n_points}), got {counts.shape}"
            )
        if not np.isfinite(counts).all() or (counts < 0).any():
            raise ValueError("counts must be finite and non-negative")
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(seed)
        with torch.inference_mode():
            tensor = torch.from_numpy(counts).to(self.device)
            return self.sample_tensor(tensor, n_samples, generator).cpu().numpy()

    def architecture_dict(self) -> dict:
        return dataclasses.asdict(self.architecture)
