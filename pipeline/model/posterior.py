"""The posterior model: line-out counts in, posterior samples of the grating parameters out.

:class:`PosteriorModel` joins three pieces:

1. :class:`LineOutEncoder` embeds the line-out once per exposure: an MLP over the raw counts
   (:class:`~pipeline.model.cinn.ConditioningNet`) whose linear pitch head gives a rough
   pitch; :func:`~pipeline.model.orders.read_orders` refines it on the peak positions and
   reads the duty cycle and roughness off the order intensities, with standard errors; a
   second MLP merges both into the condition vector.
2. :class:`ParameterTransform` maps the physical parameters to network coordinates centred
   on that read-out: ``asinh((p - p_hat) / error)`` for the pitch, a folded log coordinate
   for the duty cycle (w and p - w map to the same value), ``asinh`` of the standardised
   prior-range logit for sigma, and prior-range logits for photons and background (or, with
   ``centred_nuisances``, their logits standardised on classical estimates). The flow
   therefore models residuals of order one instead of widths of 1e-4 of the prior range.
   Samples mapped back always lie inside the prior's support.
3. :class:`~pipeline.model.cinn.ConditionalINN` turns standard normal draws into network
   coordinates given the condition; each draw then takes the narrow (w) or the wide (p - w)
   solution with probability 1/2, which is exact: likelihood and prior are symmetric under
   w -> p - w.

Example:
    >>> import numpy as np
    >>> from pipeline.physics import simulate
    >>> model = PosteriorModel(Architecture(n_blocks=2, hidden=16, condition_dim=8, condition_hidden=16))
    >>> _, counts = simulate(2, np.random.default_rng(0))
    >>> model.sample(counts, 10).shape
    (2, 10, 5)
"""

from __future__ import annotations

import abc
import dataclasses
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.instrument import Instrument, default_instrument
from pipeline.model.cinn import ConditionalINN, ConditioningNet, ZukoRealNVP, mlp
from pipeline.model.orders import OrderReadout, ReadoutGeometry, read_orders
from pipeline.physics import PARAMETER_NAMES, PARAMETER_UNITS, GratingPrior, QGrid


@dataclass(frozen=True)
class Architecture:
    """Hyper-parameters of the posterior model: its coupling blocks and their networks (saved
    in the model card)."""

    n_blocks: int = 8
    hidden: int = 64
    condition_dim: int = 64
    condition_hidden: int = 256
    clamp: float = 2.0
    seed: int = 0
    #: Activation of the coupling subnets: "silu" or "relu".
    activation: str = "silu"
    #: A per-exposure :class:`~pipeline.model.cinn.ConditionalAffine` after the blocks.
    conditional_affine: bool = True
    #: Photons and background standardised on the read-out's estimates (see
    #: :class:`ParameterTransform`) instead of plain prior-range logits.
    centred_nuisances: bool = True
    #: "own": :class:`~pipeline.model.cinn.ConditionalINN` (the talk's two-sided blocks);
    #: "zuko-realnvp": :class:`~pipeline.model.cinn.ZukoRealNVP`.
    flow: str = "own"
    #: "maximum-likelihood": :class:`PosteriorModel`; "bidirectional": the talk's INN,
    #: :class:`~pipeline.model.bidirectional.BidirectionalINN` (own blocks; ``condition_*``
    #: and ``flow`` unused).
    objective: str = "maximum-likelihood"


class ParameterTransform(nn.Module):
    """Physical parameters (..., 5) <-> network coordinates (..., 5).

    :meth:`to_network` and :meth:`to_physical` centre pitch, duty cycle and sigma on an
    :class:`~pipeline.model.orders.OrderReadout` (its tensors broadcast against the leading
    dimensions), and with ``centred_nuisances`` photons and background too; :meth:`to_logits`
    and :meth:`from_logits` are the plain prior-range logits (used for photons and background
    otherwise, and by the bi-directional INN for all five).
    """

    EPS = 1e-6
    #: Standard deviation of a logit of a uniform variable (pi / sqrt(3)), rounded.
    SCALE = 1.8
    #: Largest |centred coordinate| mapped back (sinh(20) is 2.4e8 standard errors).
    MAX_COORDINATE = 20.0
    #: Least |logit| of the narrow-line duty cycle used as a centre (d within 1% of 1/2).
    MIN_DUTY_CENTRE = 0.01
    #: Range of the duty scale relative to its centre, and of the sigma scale (logit units).
    RELATIVE_DUTY_SCALE_LIMITS = (1e-3, 3.0)
    SIGMA_SCALE_LIMITS = (1e-3, 10.0)
    #: Range of the photon and background scales (logit units; the photon number's posterior
    #: is down to 5e-4 of its prior range wide).
    NUISANCE_SCALE_LIMITS = (1e-5, 10.0)

    # buffers (registered in __init__): lower bound and width of each natural parameter
    low: torch.Tensor
    span: torch.Tensor

    def __init__(self, prior: GratingPrior, centred_nuisances: bool = False) -> None:
        super().__init__()
        self.centred_nuisances = centred_nuisances
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

    def to_logits(self, theta: torch.Tensor) -> torch.Tensor:
        """All five parameters as prior-range logits / :attr:`SCALE` (no centring)."""
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

    def from_logits(self, u: torch.Tensor, pitch: torch.Tensor | None = None) -> torch.Tensor:
        """Inverse of :meth:`to_logits`; ``pitch`` (nm), when given, replaces ``u[..., 0]``."""
        natural = torch.sigmoid(u * self.SCALE) * self.span + self.low
        pitch = natural[..., 0] if pitch is None else pitch
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

    def _logit_centre(
        self, index: int, estimate: torch.Tensor, error: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prior-range logit of parameter ``index``'s natural ``estimate`` and its error in
        logit units (first-order propagation)."""
        unit = ((estimate - self.low[index]) / self.span[index]).clamp(1e-4, 1.0 - 1e-4)
        return torch.logit(unit), error / (self.span[index] * unit * (1.0 - unit))

    def _centres(self, readout: OrderReadout) -> _Centres:
        """Centres and scales of the coordinates (see :meth:`to_network`)."""
        duty_unit = ((readout.duty - self.low[1]) / self.span[1]).clamp(1e-4, 0.5)
        duty_centre = (-torch.logit(duty_unit)).clamp(min=self.MIN_DUTY_CENTRE)
        duty_scale = readout.duty_error / (self.span[1] * duty_unit * (1.0 - duty_unit))
        sigma_centre, sigma_scale = self._logit_centre(
            2, readout.sigma_nm, readout.log_sigma_error * readout.sigma_nm
        )
        nuisances: tuple[tuple[torch.Tensor, torch.Tensor], ...] = ()
        if self.centred_nuisances:
            nuisances = tuple(
                (centre, scale.clamp(*self.NUISANCE_SCALE_LIMITS))
                for centre, scale in (
                    self._logit_centre(3, readout.log10_n_photons, readout.log10_n_photons_error),
                    self._logit_centre(4, readout.background, readout.background_error),
                )
            )
        return _Centres(
            duty_centre,
            (duty_scale / duty_centre).clamp(*self.RELATIVE_DUTY_SCALE_LIMITS),
            sigma_centre,
            sigma_scale.clamp(*self.SIGMA_SCALE_LIMITS),
            nuisances,
        )

    def to_network(self, theta: torch.Tensor, readout: OrderReadout) -> torch.Tensor:
        """Physical parameters to network coordinates, centred on ``readout``'s estimates.

        pitch: ``asinh((p - p_hat) / error)``; duty: ``log(|l| / |l_hat|) / s`` with ``l`` the
        prior-range logit of w / p and ``s`` the relative error (folded: w and p - w give the
        same value); sigma: ``asinh((l - l_hat) / error)`` of its prior-range logit; photons
        and background: with ``centred_nuisances`` ``(l - l_hat) / error`` of their
        prior-range logits (their read-out errors are near Gaussian, so no asinh, which would
        make the residual's tails lighter than a Gaussian's), otherwise prior-range logits /
        :attr:`SCALE`.
        """
        logits = self.to_logits(theta) * self.SCALE
        centres = self._centres(readout)
        pitch = torch.asinh((theta[..., 0] - readout.pitch_nm) / readout.pitch_error_nm)
        # folded: w and p - w (logits +l and -l) map to the same coordinate
        duty = torch.log(logits[..., 1].abs().clamp(min=1e-30) / centres.duty) / centres.duty_scale
        sigma = torch.asinh((logits[..., 2] - centres.sigma) / centres.sigma_scale)
        if centres.nuisances:
            nuisances = [
                (logits[..., index] - centre) / scale
                for index, (centre, scale) in zip((3, 4), centres.nuisances, strict=True)
            ]
        else:
            nuisances = [logits[..., 3] / self.SCALE, logits[..., 4] / self.SCALE]
        return torch.stack([pitch, duty, sigma, *nuisances], dim=-1)

    def to_physical(
        self, u: torch.Tensor, readout: OrderReadout, side: torch.Tensor
    ) -> torch.Tensor:
        """Inverse of :meth:`to_network`; the result lies inside the prior's support.

        ``side`` (+1 or -1, shaped like ``u[..., 0]``) chooses the width solution: -1 the
        narrow line (w < p / 2), +1 the wide one (p - w).
        """
        limit = self.MAX_COORDINATE
        centres = self._centres(readout)
        pitch = readout.pitch_nm + readout.pitch_error_nm * torch.sinh(
            u[..., 0].clamp(-limit, limit)
        )
        pitch = pitch.clamp(self.low[0], self.low[0] + self.span[0])
        duty = side * centres.duty * torch.exp(centres.duty_scale * u[..., 1].clamp(-limit, limit))
        sigma = centres.sigma + centres.sigma_scale * torch.sinh(u[..., 2].clamp(-limit, limit))
        if centres.nuisances:
            nuisances = [
                (centre + scale * u[..., index].clamp(-limit, limit)) / self.SCALE
                for index, (centre, scale) in zip((3, 4), centres.nuisances, strict=True)
            ]
        else:
            nuisances = [u[..., 3], u[..., 4]]
        scaled = [u[..., 0], duty / self.SCALE, sigma / self.SCALE, *nuisances]
        return self.from_logits(torch.stack(scaled, dim=-1), pitch)


class _Centres(NamedTuple):
    """Centres and scales of :class:`ParameterTransform`'s coordinates for one read-out."""

    duty: torch.Tensor  #: |logit| of the narrow-line duty cycle
    duty_scale: torch.Tensor  #: relative error of it
    sigma: torch.Tensor  #: logit of sigma
    sigma_scale: torch.Tensor  #: its error (logit units)
    #: (centre, error) of the photon and background logits, or () without centring
    nuisances: tuple[tuple[torch.Tensor, torch.Tensor], ...]


class Encoding(NamedTuple):
    """What :class:`LineOutEncoder` computes once per exposure."""

    condition: torch.Tensor  #: (exposures, condition_dim)
    pitch_guess_nm: torch.Tensor  #: the pitch head's rough pitch (exposures,)
    readout: OrderReadout  #: the classical estimates the coordinates are centred on


class LineOutEncoder(nn.Module):
    """Counts (exposures, n_points) of an instrument -> :class:`Encoding`; see the module
    docstring. The values of the instrument's masked bins are never used (they are zeroed)."""

    def __init__(self, instrument: Instrument, hidden: int, condition_dim: int) -> None:
        super().__init__()
        self.geometry = ReadoutGeometry.of(instrument)
        prior = instrument.prior
        self.raw = ConditioningNet(instrument.n_points, hidden, condition_dim)
        self.pitch_head = nn.Linear(condition_dim, 1)
        nn.init.zeros_(self.pitch_head.weight)
        nn.init.zeros_(self.pitch_head.bias)
        self.pitch_centre = 0.5 * (prior.pitch_nm[0] + prior.pitch_nm[1])
        self.pitch_half_span = 0.5 * (prior.pitch_nm[1] - prior.pitch_nm[0])
        self.merge = mlp(
            condition_dim + self.geometry.n_features, hidden, condition_dim, n_layers=2
        )

    def forward(self, counts: torch.Tensor) -> Encoding:
        observed, _ = self.geometry.tensors(counts.device)
        counts = torch.where(observed, counts, 0.0)
        raw = self.raw(counts)
        guess = self.pitch_centre + self.pitch_half_span * self.pitch_head(raw)[:, 0]
        low, high = (
            self.pitch_centre - self.pitch_half_span,
            self.pitch_centre + self.pitch_half_span,
        )
        orders = read_orders(counts, guess.detach().clamp(low, high), self.geometry)
        condition = self.merge(torch.cat([raw, orders.features], dim=-1))
        return Encoding(condition, guess, orders)


class CountsSampler(nn.Module, abc.ABC):
    """``sample`` on numpy counts for models that implement ``sample_tensor``, and what
    every model knows of its instrument."""

    #: the instrument the model is made for (its grid, prior, mask and background weights)
    instrument: Instrument
    #: the parameters, in the order of the draws' last axis
    parameter_names: tuple[str, ...]

    @property
    def grid(self) -> QGrid:
        """The line-outs' q grid (the instrument's)."""
        return self.instrument.grid

    @property
    def prior(self) -> GratingPrior:
        """The prior the model was trained on (the instrument's)."""
        return self.instrument.grating_prior

    @property
    def device(self) -> torch.device:
        return next(self.buffers()).device

    @abc.abstractmethod
    def sample_tensor(
        self, counts: torch.Tensor, n_samples: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Posterior draws (exposures, n_samples, 5) for counts on the model's device."""

    @abc.abstractmethod
    def _draws(self, counts: torch.Tensor, z: torch.Tensor, side: torch.Tensor) -> torch.Tensor:
        """Draws (exposures, n_samples, parameters) for counts, the noise ``z`` and the width's
        side (+1 or -1) of each draw: the deterministic part of :meth:`sample_tensor`, which
        :meth:`compile_sampling` replaces by its compiled form."""

    @abc.abstractmethod
    def training_loss(
        self, theta: torch.Tensor, counts: torch.Tensor, progress: float = 1.0
    ) -> torch.Tensor:
        """The loss :func:`~pipeline.model.train.train` minimises on a batch of simulations
        (``progress``: the fraction of training done)."""

    @abc.abstractmethod
    def validation_loss(self, theta: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """The loss on the held-out simulations, comparable across steps."""

    def compile_sampling(self) -> None:
        """Compile the sampler (the network part of :meth:`sample_tensor`; the noise is drawn
        outside) with ``torch.compile`` (inductor) for this process.

        The first call compiles (tens of seconds on a CPU, less with inductor's on-disk cache
        warm; a second batch size compiles once more, for all sizes); after that, sampling
        takes about half the time on a CPU (1,000 samples of one exposure with the shipped
        model: 3.9 against 7.2 ms on one thread here, ``benchmarks/sampling.py``). For
        long-running workers, not for one-off calls.
        """
        self._draws = torch.compile(self._draws)  # type: ignore[method-assign]

    def sample(self, counts: np.ndarray, n_samples: int, seed: int | None = None) -> np.ndarray:
        """Posterior draws for a float array of counts (exposures, n_points) of the model's
        instrument; the values of its masked bins are ignored, NaN included.

        Returns a float32 array (exposures, n_samples, parameters) in ``parameter_names`` order.
        """
        counts = np.asarray(counts, dtype=np.float32)
        if counts.ndim != 2 or counts.shape[1] != self.instrument.n_points:
            raise ValueError(
                f"counts must have shape (exposures, {self.instrument.n_points}) for the "
                f"instrument {self.instrument.name!r}, got {counts.shape}"
            )
        observed = self.instrument.observed
        if not np.isfinite(counts[:, observed]).all() or (counts[:, observed] < 0).any():
            raise ValueError("counts must be finite and non-negative in the observed bins")
        counts = np.where(observed, counts, np.float32(0.0))
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(seed)
        with torch.inference_mode():
            tensor = torch.from_numpy(counts).to(self.device)
            return self.sample_tensor(tensor, n_samples, generator).cpu().numpy()


class PosteriorModel(CountsSampler):
    """q(parameters | line-out counts) for the grating model on one instrument (the default
    when ``instrument`` is ``None``)."""

    parameter_names: tuple[str, ...] = PARAMETER_NAMES
    parameter_units: tuple[str, ...] = PARAMETER_UNITS
    #: Weight of the pitch head's loss in :meth:`training_loss`.
    PITCH_HEAD_WEIGHT = 0.1

    def __init__(
        self, architecture: Architecture = Architecture(), instrument: Instrument | None = None
    ) -> None:
        super().__init__()
        instrument = instrument or default_instrument()
        prior = instrument.prior
        if architecture.objective != "maximum-likelihood":
            raise ValueError(
                f"PosteriorModel is trained by maximum likelihood, not {architecture.objective!r}"
            )
        if abs(prior.duty[0] + prior.duty[1] - 1.0) > 1e-9:
            raise ValueError(
                f"the duty-cycle prior {prior.duty} must be symmetric about 1/2: the model "
                "draws the two width solutions w and p - w with equal probability"
            )
        self.architecture = architecture
        self.instrument = instrument
        self.transform = ParameterTransform(
            instrument.grating_prior, architecture.centred_nuisances
        )
        self.encoder = LineOutEncoder(
            instrument, architecture.condition_hidden, architecture.condition_dim
        )
        if architecture.flow == "own":
            self.flow: ConditionalINN | ZukoRealNVP = ConditionalINN(
                len(PARAMETER_NAMES),
                architecture.condition_dim,
                architecture.n_blocks,
                architecture.hidden,
                architecture.clamp,
                architecture.seed,
                architecture.activation,
                architecture.conditional_affine,
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

    def log_prob(self, theta: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """log q(u(theta) | counts) in network coordinates, per row."""
        return self._log_prob(theta, self.encoder(counts))

    def _log_prob(self, theta: torch.Tensor, encoding: Encoding) -> torch.Tensor:
        u = self.transform.to_network(theta, encoding.readout)
        return self.flow.log_prob(u, encoding.condition)

    def validation_loss(self, theta: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Mean negative log-likelihood in network coordinates."""
        return -self.log_prob(theta, counts).mean()

    def training_loss(
        self, theta: torch.Tensor, counts: torch.Tensor, progress: float = 1.0
    ) -> torch.Tensor:
        """Mean negative log-likelihood plus the pitch head's robust regression loss.

        The head's loss (smooth L1 in nm, weight :attr:`PITCH_HEAD_WEIGHT`) teaches it the
        rough pitch that :func:`~pipeline.model.orders.read_orders` starts from. ``progress``
        (the fraction of training done) is unused: the objective is the same throughout.
        """
        encoding = self.encoder(counts)
        head = F.smooth_l1_loss(encoding.pitch_guess_nm, theta[:, 0])
        return -self._log_prob(theta, encoding).mean() + self.PITCH_HEAD_WEIGHT * head

    def sample_tensor(
        self, counts: torch.Tensor, n_samples: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Posterior draws (exposures, n_samples, 5) for counts (exposures, n_points) on the model's device."""
        z = torch.randn(
            counts.shape[0],
            n_samples,
            len(PARAMETER_NAMES),
            generator=generator,
            device=counts.device,
        )
        # w and p - w are equally probable (exact: likelihood and prior are symmetric)
        side = torch.rand(z.shape[:-1], generator=generator, device=z.device).round() * 2 - 1
        return self._draws(counts, z, side)

    def _draws(self, counts: torch.Tensor, z: torch.Tensor, side: torch.Tensor) -> torch.Tensor:
        """The draws for given noise: the deterministic part of :meth:`sample_tensor`, which
        :meth:`compile_sampling` compiles (random numbers of a symbolic batch size cannot be
        drawn inside a compiled graph)."""
        encoding = self.encoder(counts)
        # the condition (exposures, 1, C) broadcasts over the samples of its exposure
        u = self.flow.inverse(z, encoding.condition[:, None, :])
        return self.transform.to_physical(u, encoding.readout.per_sample(), side)

    def architecture_dict(self) -> dict:
        return dataclasses.asdict(self.architecture)
