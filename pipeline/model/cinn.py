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

import torch
import torch.nn.functional as F
from torch import nn


def mlp(n_in: int, hidden: int, n_out: int, n_layers: int = 2) -> nn.Sequential:
    """``n_layers`` hidden layers of ``hidden`` units with SiLU, then a linear output layer."""
    layers: list[nn.Module] = []
    width = n_in
    for _ in range(n_layers):
        layers += [nn.Linear(width, hidden), nn.SiLU()]
        width = hidden
    layers.append(nn.Linear(width, n_out))
    return nn.Sequential(*layers)


class CouplingBlock(nn.Module):
    """Permutation followed by the talk's two-sided affine coupling, conditioned on ``c``."""

    def __init__(
        self, dim: int, condition_dim: int, hidden: int, clamp: float, generator: torch.Generator
    ) -> None:
        super().__init__()
        self.split = dim // 2
        self.clamp = clamp
        permutation = torch.randperm(dim, generator=generator)
        self.register_buffer("permutation", permutation)
        self.register_buffer("inverse_permutation", torch.argsort(permutation))
        d1, d2 = self.split, dim - self.split
        self.net2 = mlp(d2 + condition_dim, hidden, 2 * d1)  # s2, t2 from u2
        self.net1 = mlp(d1 + condition_dim, hidden, 2 * d2)  # s1, t1 from v1
        for net in (self.net1, self.net2):  # start as the identity map
            nn.init.zeros_(net[-1].weight)
            nn.init.zeros_(net[-1].bias)

    def _scale_shift(
        self, net: nn.Sequential, x: torch.Tensor, c: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # The first layer acts on cat([x, c]); its condition part is computed on c as given
        # and broadcast, so a condition shared by many rows (sampling) is multiplied once.
        first = net[0]
        d = x.shape[-1]
        hidden = F.linear(x, first.weight[:, :d]) + F.linear(c, first.weight[:, d:], first.bias)
        s, t = net[1:](hidden).chunk(2, dim=-1)
        return (2.0 * self.clamp / math.pi) * torch.atan(s / self.clamp), t

    def forward(self, u: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Map ``u`` (..., dim) to ``v``; return ``v`` and log|det dv/du| per row.

        ``c`` broadcasts against the leading dimensions of ``u``.
        """
        u = u[..., self.permutation]
        u1, u2 = u[..., : self.split], u[..., self.split :]
        s2, t2 = self._scale_shift(self.net2, u2, c)
        v1 = u1 * torch.exp(s2) + t2
        s1, t1 = self._scale_shift(self.net1, v1, c)
        v2 = u2 * torch.exp(s1) + t1
        return torch.cat([v1, v2], dim=-1), s2.sum(-1) + s1.sum(-1)

    def inverse(self, v: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Map ``v`` back to ``u``."""
        v1, v2 = v[..., : self.split], v[..., self.split :]
        s1, t1 = self._scale_shift(self.net1, v1, c)
        u2 = (v2 - t1) * torch.exp(-s1)
        s2, t2 = self._scale_shift(self.net2, u2, c)
        u1 = (v1 - t2) * torch.exp(-s2)
        return torch.cat([u1, u2], dim=-1)[..., self.inverse_permutation]


class ConditionalINN(nn.Module):
    """A stack of :class:`CouplingBlock` s sharing one condition vector."""

    def __init__(
        self,
        dim: int,
        condition_dim: int,
        n_blocks: int,
        hidden: int,
        clamp: float = 2.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.blocks = nn.ModuleList(
            CouplingBlock(dim, condition_dim, hidden, clamp, generator) for _ in range(n_blocks)
        )

    def forward(self, u: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Parameters (in network coordinates) to latent ``z``, with log|det dz/du|."""
        log_det = torch.zeros(u.shape[:-1], dtype=u.dtype, device=u.device)
        for block in self.blocks:
            u, block_log_det = block(u, c)
            log_det = log_det + block_log_det
        return u, log_det

    def inverse(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Latent ``z`` to parameters (in network coordinates)."""
        for block in reversed(self.blocks):
            z = block.inverse(z, c)
        return z

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
