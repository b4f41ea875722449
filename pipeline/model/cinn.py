"""A conditional invertible neural network (cINN) in the form of the talk in ``shared/seed``.

Each :class:`CouplingBlock` permutes its input with a fixed random permutation, splits it into
``u1, u2`` and applies the two affine couplings

    v1 = u1 * exp(s2(u2, c)) + t2(u2, c)
    v2 = u2 * exp(s1(v1, c)) + t1(v1, c)

whose inverse is explicit. Scales are soft-clamped, ``s -> (2 clamp / pi) atan(s / clamp)``,
which keeps the Jacobian bounded. ``c`` is an embedding of the line-out computed once per
exposure by :class:`ConditioningNet`. Maximum-likelihood training maps parameters to a
standard normal latent ``z``; sampling runs the blocks backwards from ``z ~ N(0, 1)``.

References:
    Ardizzone et al., "Analyzing inverse problems with invertible neural networks", ICLR 2019.
    Ardizzone et al., "Guided image generation with conditional invertible neural networks", 2019.

Example:
    >>> import torch
    >>> flow = ConditionalINN(dim=5, condition_dim=8, n_blocks=2, hidden=16, seed=0)
    >>> u, c = torch.randn(3, 5), torch.randn(3, 8)
    >>> z, log_det = flow(u, c)
    >>> torch.allclose(flow.inverse(z, c), u, atol=1e-5)
    True
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

#: Activations of the coupling subnets. ReLU costs a quarter of SiLU on a CPU (12 against 50 us
#: for 1,000 x 128 values on one thread here), which matters when sampling.
ACTIVATIONS: dict[str, type[nn.Module]] = {"silu": nn.SiLU, "relu": nn.ReLU}


def mlp(
    n_in: int, hidden: int, n_out: int, n_layers: int = 2, activation: str = "silu"
) -> nn.Sequential:
    """``n_layers`` hidden layers of ``hidden`` units, then a linear output layer."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}: one of {sorted(ACTIVATIONS)}")
    layers: list[nn.Module] = []
    width = n_in
    for _ in range(n_layers):
        layers += [nn.Linear(width, hidden), ACTIVATIONS[activation]()]
        width = hidden
    layers.append(nn.Linear(width, n_out))
    return nn.Sequential(*layers)


class CouplingBlock(nn.Module):
    """Permutation followed by the talk's two-sided affine coupling, conditioned on ``c``."""

    # buffers (registered in __init__)
    permutation: torch.Tensor
    inverse_permutation: torch.Tensor

    def __init__(
        self,
        dim: int,
        condition_dim: int,
        hidden: int,
        clamp: float,
        generator: torch.Generator,
        activation: str = "silu",
    ) -> None:
        super().__init__()
        self.split = dim // 2
        self.clamp = clamp
        permutation = torch.randperm(dim, generator=generator)
        self.register_buffer("permutation", permutation)
        self.register_buffer("inverse_permutation", torch.argsort(permutation))
        d1, d2 = self.split, dim - self.split
        self.net2 = mlp(d2 + condition_dim, hidden, 2 * d1, activation=activation)  # from u2
        self.net1 = mlp(d1 + condition_dim, hidden, 2 * d2, activation=activation)  # from v1
        for net in (self.net1, self.net2):  # start as the identity map
            last = cast(nn.Linear, net[-1])
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)

    def _scale_shift(
        self, net: nn.Sequential, x: torch.Tensor, c: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Features first: x is (d, ...) and every layer is W @ h on (features, rows), so the
        # halves, s and t are contiguous row blocks; with 1,000 samples of one exposure this
        # runs about twice as fast on a CPU as the rows-first layout and module calls.
        # The first layer acts on cat([x, c]); its condition part is computed on c as given
        # and broadcast, so a condition shared by many rows (sampling) is multiplied once.
        # the layers of an mlp(): Linear, activation, (Linear, activation)*, Linear
        first, activation, last = cast(nn.Linear, net[0]), net[1], cast(nn.Linear, net[-1])
        d, rows = x.shape[0], x.shape[1:]
        condition = F.linear(c, first.weight[:, d:], first.bias)
        width = condition.shape[-1]
        if condition.numel() == width:  # one condition for all rows: a bias of the product
            hidden = torch.addmm(condition.reshape(width, 1), first.weight[:, :d], x.reshape(d, -1))
        else:
            hidden = (first.weight[:, :d] @ x.reshape(d, -1)).reshape(width, *rows)
            hidden = (hidden + condition.movedim(-1, 0)).reshape(width, -1)
        for layer in cast("Iterable[nn.Linear]", net[2:-1:2]):
            hidden = torch.addmm(layer.bias[:, None], layer.weight, activation(hidden))
        out = torch.addmm(last.bias[:, None], last.weight, activation(hidden))
        s, t = out.reshape(-1, *rows).chunk(2, dim=0)
        return (2.0 * self.clamp / math.pi) * torch.atan(s / self.clamp), t

    def forward(self, u: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Map ``u`` (dim, ...) to ``v``, features first; return ``v`` and log|det dv/du|.

        ``c`` (..., condition_dim) broadcasts against the trailing dimensions of ``u``.
        """
        u = torch.index_select(u, 0, self.permutation)
        u1, u2 = u[: self.split], u[self.split :]
        s2, t2 = self._scale_shift(self.net2, u2, c)
        v1 = u1 * torch.exp(s2) + t2
        s1, t1 = self._scale_shift(self.net1, v1, c)
        v2 = u2 * torch.exp(s1) + t1
        return torch.cat([v1, v2], dim=0), s2.sum(0) + s1.sum(0)

    def inverse(self, v: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Map ``v`` (dim, ...) back to ``u``, features first."""
        v1, v2 = v[: self.split], v[self.split :]
        s1, t1 = self._scale_shift(self.net1, v1, c)
        u2 = (v2 - t1) * torch.exp(-s1)
        s2, t2 = self._scale_shift(self.net2, u2, c)
        u1 = (v1 - t2) * torch.exp(-s2)
        return torch.index_select(torch.cat([u1, u2], dim=0), 0, self.inverse_permutation)


class ConditionalAffine(nn.Module):
    """A per-exposure affine map ``u = mu(c) + L(c) v`` with ``L`` lower triangular.

    ``mu``, the log-diagonal (soft-clamped to +-:attr:`LOG_SCALE_LIMIT`) and the off-diagonal
    of ``L`` are one linear function of the condition, zero at initialisation (the identity).
    Placed after the coupling blocks when sampling, it gives each exposure its own Gaussian
    (location, scales, linear correlations) at the cost of a few element-wise operations per
    sample, which it would otherwise take the blocks' per-sample networks to express; the
    blocks are left to model the departures from a Gaussian.

    Example:
        >>> affine = ConditionalAffine(dim=3, condition_dim=4)
        >>> v, c = torch.randn(5, 3), torch.randn(5, 4)
        >>> u = affine(v, c)
        >>> torch.allclose(affine.inverse(u, c)[0], v)
        True
    """

    LOG_SCALE_LIMIT = 6.0

    # buffers (registered in __init__): the indices of L's off-diagonal
    rows: torch.Tensor
    columns: torch.Tensor

    def __init__(self, dim: int, condition_dim: int) -> None:
        super().__init__()
        self.dim = dim
        rows, columns = torch.tril_indices(dim, dim, offset=-1)
        self.register_buffer("rows", rows)
        self.register_buffer("columns", columns)
        self.head = nn.Linear(condition_dim, 2 * dim + rows.numel())
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def _location_and_factor(
        self, c: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``mu`` (..., dim), ``L`` (..., dim, dim) and log diag L (..., dim) for ``c``."""
        d = self.dim
        out = self.head(c)
        location, raw_log_scale, off_diagonal = out[..., :d], out[..., d : 2 * d], out[..., 2 * d :]
        limit = self.LOG_SCALE_LIMIT
        log_scale = limit * torch.tanh(raw_log_scale / limit)
        factor = torch.diag_embed(torch.exp(log_scale))
        factor[..., self.rows, self.columns] = off_diagonal
        return location, factor, log_scale

    def forward(self, v: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """``mu + L v`` for ``v`` (..., dim); ``c`` broadcasts against its leading dimensions."""
        location, factor, _ = self._location_and_factor(c)
        return location + (v.unsqueeze(-2) * factor).sum(-1)

    def inverse(self, u: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``L^-1 (u - mu)`` and log|det dv/du| = -sum log diag L, per row."""
        location, factor, log_scale = self._location_and_factor(c)
        residual = (u - location).unsqueeze(-1)
        factor = factor.expand(*residual.shape[:-2], self.dim, self.dim)
        v = torch.linalg.solve_triangular(factor, residual, upper=False)[..., 0]
        return v, -log_scale.sum(-1).expand(v.shape[:-1])


class ConditionalINN(nn.Module):
    """A stack of :class:`CouplingBlock` s sharing one condition vector.

    With ``conditional_affine``, a :class:`ConditionalAffine` is the last step of sampling
    (and the first of the forward map).
    """

    def __init__(
        self,
        dim: int,
        condition_dim: int,
        n_blocks: int,
        hidden: int,
        clamp: float = 2.0,
        seed: int = 0,
        activation: str = "silu",
        conditional_affine: bool = False,
    ) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.blocks = nn.ModuleList(
            CouplingBlock(dim, condition_dim, hidden, clamp, generator, activation)
            for _ in range(n_blocks)
        )
        self.affine = ConditionalAffine(dim, condition_dim) if conditional_affine else None

    def forward(self, u: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Parameters (in network coordinates) to latent ``z``, with log|det dz/du|."""
        log_det = torch.zeros(u.shape[:-1], dtype=u.dtype, device=u.device)
        if self.affine is not None:
            u, log_det = self.affine.inverse(u, c)
        u = u.movedim(-1, 0)  # the blocks work features first
        for block in self.blocks:
            u, block_log_det = block(u, c)
            log_det = log_det + block_log_det
        return u.movedim(0, -1), log_det

    def inverse(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Latent ``z`` to parameters (in network coordinates)."""
        z = z.movedim(-1, 0).contiguous()  # the blocks work features first
        for block in reversed(self.blocks):
            z = cast(CouplingBlock, block).inverse(z, c)
        z = z.movedim(0, -1)
        return z if self.affine is None else self.affine(z, c)

    def log_prob(self, u: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """log q(u | c) under a standard normal latent."""
        z, log_det = self(u, c)
        return -0.5 * (z**2).sum(-1) - 0.5 * z.shape[-1] * math.log(2 * math.pi) + log_det


class ConditioningNet(nn.Module):
    """Embeds a line-out of counts (exposures, n_points) into a condition vector.

    Inputs are ``log1p(counts)`` (which spans 1e3..1e6 photons evenly) and the log of the
    total count; both are standardised by fixed constants so the network starts well scaled.
    """

    def __init__(self, n_points: int, hidden: int, condition_dim: int) -> None:
        super().__init__()
        self.net = mlp(n_points + 1, hidden, condition_dim, n_layers=3)

    def forward(self, counts: torch.Tensor) -> torch.Tensor:
        shape = torch.log1p(counts)
        total = torch.log(counts.sum(-1, keepdim=True) + 1.0)
        return self.net(torch.cat([(shape - 2.0) / 2.0, (total - 11.0) / 3.0], dim=-1))


class ZukoRealNVP(nn.Module):
    """zuko's conditional RealNVP behind the interface of :class:`ConditionalINN`.

    Each of its ``n_blocks`` transforms is a one-sided affine coupling (alternating masks) whose
    hyper-network sees the untouched half and the condition. Measured against the own block in
    ``benchmarks/flow_libraries.py``.
    """

    def __init__(self, dim: int, condition_dim: int, n_blocks: int, hidden: int) -> None:
        super().__init__()
        import zuko

        self.flow = zuko.flows.RealNVP(
            dim, condition_dim, transforms=n_blocks, hidden_features=(hidden, hidden)
        )

    def forward(self, u: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Parameters (network coordinates) to latent ``z``, with log|det dz/du|."""
        return self.flow(c).transform.call_and_ladj(u)

    def inverse(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Latent ``z`` to parameters (network coordinates); ``c`` broadcasts against ``z``."""
        return self.flow(c.expand(*z.shape[:-1], c.shape[-1])).transform.inv(z)

    def log_prob(self, u: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """log q(u | c) under zuko's standard normal base."""
        return self.flow(c).log_prob(u)
