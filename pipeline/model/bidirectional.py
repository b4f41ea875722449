"""The talk's bi-directional INN: parameters forward to line-out features and a latent.

An unconditional invertible network maps the parameters ``x`` (5 prior-range logits,
zero-padded to ``D = dim y + dim z`` dimensions) to ``[y_hat, z]``: ``y_hat`` predicts fixed
features of the line-out and ``z`` (5 dimensions) carries what the line-out does not
determine. Training (Ardizzone et al. 2019, section 3.3) combines

- ``L_y``: mean squared error of ``y_hat`` against the simulated line-out's features;
- ``L_z``: maximum mean discrepancy (MMD) between the joint output ``[y_hat, z]`` (gradients
  of ``y_hat`` blocked, as in the paper) and ``[y, N(0, 1)]`` drawn independently, which makes
  ``z`` standard normal and independent of ``y``;
- ``L_x``: MMD between backward samples ``f^-1([y, z ~ N(0, 1)])`` and the batch's
  parameters (draws from the prior), ramped up over training as in the paper;
- a small penalty keeping the backward padding near zero.

MMDs use sums of inverse multiquadratic kernels ``c / (c + |a - b|^2)`` over several widths
``c`` (scaled with the dimension). Posterior samples for a line-out are
``f^-1([y_observed, z])`` with ``z ~ N(0, 1)``.

The line-out features ``y`` are ``log1p`` of the mean counts in groups of
:data:`POOL_BINS` neighbouring bins (64 values on the default grid) and the log of the total
count, standardised by fixed constants: the INN must predict them from the parameters, so they
have to be a fixed function of the line-out, not a learned embedding.

References:
    Ardizzone et al., "Analyzing inverse problems with invertible neural networks", ICLR 2019.
    Gretton et al., "A kernel two-sample test", JMLR 2012.

Example:
    >>> import numpy as np
    >>> from pipeline.model.posterior import Architecture
    >>> from pipeline.physics import simulate
    >>> inn = BidirectionalINN(Architecture(objective="bidirectional", n_blocks=2, hidden=16))
    >>> theta, counts = simulate(4, np.random.default_rng(0))
    >>> inn.sample(counts, 3).shape
    (4, 3, 5)
"""

from __future__ import annotations

import dataclasses
import functools
import operator

import torch

from pipeline.instrument import Instrument, default_instrument
from pipeline.model.cinn import ConditionalINN
from pipeline.model.posterior import Architecture, CountsSampler, ParameterTransform
from pipeline.physics import PARAMETER_NAMES, PARAMETER_UNITS

#: Neighbouring bins averaged into one line-out feature.
POOL_BINS = 8
#: Kernel widths of the MMDs, per dimension of the compared vectors.
KERNEL_WIDTHS = (0.05, 0.2, 1.0)
#: Loss weights (L_y, L_z, L_x, padding); L_x is ramped up as in the paper.
LOSS_WEIGHTS = (3.0, 300.0, 400.0, 3.0)
#: Noise added to the zero padding of the forward input (regularises the padded directions).
PADDING_NOISE = 1e-2


def line_out_features(counts: torch.Tensor, pool_bins: int = POOL_BINS) -> torch.Tensor:
    """Fixed features ``y`` of counts (exposures, n_points): pooled log counts and log total."""
    pooled = counts.reshape(counts.shape[0], -1, pool_bins).mean(-1)
    total = torch.log(counts.sum(-1, keepdim=True) + 1.0)
    return torch.cat([(torch.log1p(pooled) - 2.0) / 2.0, (total - 11.0) / 3.0], dim=-1)


def mmd_inverse_multiquadratic(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Biased MMD^2 estimate between samples ``a`` (n, d) and ``b`` (m, d), IMQ kernels."""
    dim = a.shape[-1]

    def kernel(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        distance = torch.cdist(u, v).square()
        # reduce, not sum(): its type includes the int 0 of an empty sum
        return functools.reduce(
            operator.add, (c * dim / (c * dim + distance) for c in KERNEL_WIDTHS)
        )

    return kernel(a, a).mean() + kernel(b, b).mean() - 2.0 * kernel(a, b).mean()


def reverse_ramp(progress: float) -> float:
    """Weight factor of L_x at ``progress`` (0..1) of training: 0.004 rising to 1 (the paper's)."""
    return min(1.0, 2.0 * 0.002 ** (1.0 - progress))


class BidirectionalINN(CountsSampler):
    """The bi-directional INN posterior model, with the interface of
    :class:`~pipeline.model.posterior.PosteriorModel` (``sample``, ``training_loss``,
    ``validation_loss``, ``prior``, ``grid``, ``parameter_names``)."""

    parameter_names: tuple[str, ...] = PARAMETER_NAMES
    parameter_units: tuple[str, ...] = PARAMETER_UNITS
    #: the instrument's observed bins (a buffer registered in __init__)
    observed: torch.Tensor

    def __init__(
        self,
        architecture: Architecture = Architecture(objective="bidirectional"),
        instrument: Instrument | None = None,
    ) -> None:
        super().__init__()
        instrument = instrument or default_instrument()
        grid = instrument.grid
        if grid.n_points % POOL_BINS:
            raise ValueError(f"the grid's {grid.n_points} bins do not pool by {POOL_BINS}")
        self.architecture = architecture
        self.instrument = instrument
        self.register_buffer("observed", torch.from_numpy(instrument.observed), persistent=False)
        self.transform = ParameterTransform(instrument.grating_prior)
        self.dim_x = len(PARAMETER_NAMES)
        self.dim_y = grid.n_points // POOL_BINS + 1
        self.dim_z = self.dim_x
        self.inn = ConditionalINN(
            self.dim_y + self.dim_z,
            0,
            architecture.n_blocks,
            architecture.hidden,
            architecture.clamp,
            architecture.seed,
            architecture.activation,
        )
        self.card: dict = {}

    def _no_condition(self, rows: int) -> torch.Tensor:
        return torch.empty(rows, 0, device=self.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Parameters in network coordinates (rows, 5) -> ``[y_hat, z]`` (rows, D)."""
        padding = torch.zeros(x.shape[0], self.dim_y + self.dim_z - self.dim_x, device=x.device)
        if self.training:
            padding = padding + PADDING_NOISE * torch.randn_like(padding)
        out, _ = self.inn(torch.cat([x, padding], dim=-1), self._no_condition(x.shape[0]))
        return out

    def inverse(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """``[y, z]`` -> padded parameters in network coordinates (rows, D)."""
        return self.inn.inverse(torch.cat([y, z], dim=-1), self._no_condition(y.shape[0]))

    def losses(
        self, theta: torch.Tensor, counts: torch.Tensor, progress: float = 1.0
    ) -> dict[str, torch.Tensor]:
        """The weighted terms ``y``, ``z``, ``x``, ``padding`` of the objective on a batch."""
        w_y, w_z, w_x, w_pad = LOSS_WEIGHTS
        x = self.transform.to_logits(theta)
        y = line_out_features(torch.where(self.observed, counts, 0.0))
        out = self(x)
        y_hat, z = out[:, : self.dim_y], out[:, self.dim_y :]
        loss_y = (y_hat - y).square().sum(-1).mean()
        loss_z = mmd_inverse_multiquadratic(
            torch.cat([y_hat.detach(), z], dim=-1),
            torch.cat([y, torch.randn_like(z)], dim=-1),
        )
        backward = self.inverse(y, torch.randn_like(z))
        loss_x = mmd_inverse_multiquadratic(backward[:, : self.dim_x], x)
        loss_pad = backward[:, self.dim_x :].square().sum(-1).mean()
        return {
            "y": w_y * loss_y,
            "z": w_z * loss_z,
            "x": w_x * reverse_ramp(progress) * loss_x,
            "padding": w_pad * loss_pad,
        }

    def training_loss(
        self, theta: torch.Tensor, counts: torch.Tensor, progress: float = 1.0
    ) -> torch.Tensor:
        """The weighted sum L_y + L_z + L_x + padding at ``progress`` (0..1) of training."""
        return functools.reduce(operator.add, self.losses(theta, counts, progress).values())

    def validation_loss(self, theta: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """The objective with L_x at full weight (comparable across steps)."""
        return self.training_loss(theta, counts, 1.0)

    def sample_tensor(
        self, counts: torch.Tensor, n_samples: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Posterior draws (exposures, n_samples, 5) for counts on the model's device."""
        shape = (counts.shape[0], n_samples, self.dim_z)
        z = torch.randn(shape, generator=generator, device=counts.device)
        return self._draws(counts, z, torch.ones(shape[:-1], device=counts.device))

    def _draws(self, counts: torch.Tensor, z: torch.Tensor, side: torch.Tensor) -> torch.Tensor:
        """The draws for latent ``z`` (exposures, n_samples, dim_z): the deterministic part of
        :meth:`sample_tensor`, which :meth:`compile_sampling` compiles. ``side`` is not used:
        in this model the latent ``z`` decides on which side of ``p/2`` the width falls."""
        n_samples = z.shape[1]
        y = line_out_features(torch.where(self.observed, counts, 0.0))
        y = y.repeat_interleave(n_samples, dim=0)
        x = self.inverse(y, z.reshape(-1, self.dim_z))[:, : self.dim_x]
        return self.transform.from_logits(x).reshape(counts.shape[0], n_samples, -1)

    def architecture_dict(self) -> dict:
        return dataclasses.asdict(self.architecture)
