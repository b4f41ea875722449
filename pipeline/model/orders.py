"""Classical read-out of the diffraction orders: pitch, duty cycle and roughness with errors.

The pitch posterior is about 1e-4 of its prior range wide, which a network regressing from
raw counts does not reach. The peak positions, however, give the pitch directly: order n sits
at q_n = 2 pi n / p. :func:`read_orders` starts from a rough pitch (within a few nm; the
model's own pitch head gives one), takes the background-subtracted centroid of each order's
window, and fits q_n = n k by weighted least squares (weights: the order's net counts, so the
inverse variance of its centroid), first on orders 1-2, then 1-4, 1-8 and all, so that a
start a few nm off does not lock onto the wrong peaks. It returns the pitch ``2 pi / k``, its
standard error from the same fit (resolution and bin width only; an underestimate where the
background is high), and, at that pitch, features of every order aligned across exposures:
the window's counts, the centroid offset and whether the window lies on the grid.

The same windows then give the duty cycle d = w / p and the roughness: order n carries
``A sin^2(pi n d) / n^2 exp(-(2 pi n sigma / p)^2)`` net counts. A table over (d, sigma / p)
(the narrow-line side d <= 1/2: the intensities are the same for d and 1 - d) gives a start,
and Gauss-Newton steps on (d, log sigma), with the amplitude A profiled out and Poisson
weights, the least-squares estimate and its standard errors.

Last, the nuisances: the background ``b`` is the count of the observed bins more than
:data:`BACKGROUND_CLEARANCE_SD` resolution sd from every order at the refined pitch (pure
background in this model) divided by their summed background weights, and the photon number
is the total count less the background of all observed bins, divided by the share of the
photons that the observed bins see (the grating of the read-out's pitch, duty cycle and
roughness puts the rest into the masked bins); both with Poisson standard errors (and half the
masked share's photons added in quadrature, for its uncertainty).

Everything instrument-specific comes from the :class:`~pipeline.instrument.Instrument`
(:class:`ReadoutGeometry`): the orders read (up to the highest below the grid's end at the
prior's largest pitch), the window (3 resolution sd), the scales of the features (from the
prior), the background weights ``g`` (the background of bin i is ``b g_i``) and the masked
bins, whose values are never used: an order whose window touches one counts as off the grid.

Costs about 20 ms per 512 line-outs on 2 CPU cores; no weights, not differentiable.

Example:
    >>> import numpy as np, torch
    >>> from pipeline.instrument import default_instrument
    >>> instrument = default_instrument()
    >>> counts = torch.tensor(instrument.expected_counts(np.array([[200.0, 60.0, 3.0, 1e5, 1.0]])))
    >>> read = read_orders(counts.float(), torch.tensor([203.0]), instrument)
    >>> round(float(read.pitch_nm[0]), 2), round(float(read.duty[0]), 3), read.features.shape
    (200.0, 0.3, torch.Size([1, 68]))
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import torch

from pipeline.instrument import Instrument
from pipeline.physics import QGrid, expected_counts

#: Half-width of each order's window in resolution sd.
HALF_WINDOW_SD = 3.0
#: Successive highest orders used by the pitch fit (then all).
ORDER_SCHEDULE = (2, 4, 8)
#: Least net counts for an order to enter the pitch fit.
MIN_ORDER_COUNTS = 3.0
#: Standard error assumed when no order can be fitted, as a fraction of the pitch prior's span.
MAX_PITCH_ERROR_FRACTION = 0.025
#: Points of the start table of the duty-cycle fit along d (narrow side, from the prior's
#: lowest duty cycle to 1/2).
DUTY_TABLE_POINTS = 41
#: sigma / p of the start table (log-spaced), widened where the prior reaches beyond it.
ROUGHNESS_RATIO_TABLE = (0.003, 0.2, 30)
#: Gauss-Newton steps of the duty-cycle fit.
GAUSS_NEWTON_STEPS = 5
#: Bins nearer than this many resolution sd to an order are left out of the background estimate.
BACKGROUND_CLEARANCE_SD = 5.0
#: Bins with a background weight below this are left out of the first background estimate
#: (a bin of few pixels sees too few background counts to rank).
MIN_RANKED_WEIGHT = 0.5
#: Relative error assumed for the share of the photons in masked bins, as the read-out's
#: duty cycle and roughness give it.
MASKED_SHARE_RELATIVE_ERROR = 0.5
#: The largest pitch of the grating whose share of the photons in masked bins is estimated,
#: as a multiple of the prior's largest pitch (a read-out beyond it is taken as that).
MASKED_SHARE_PITCH_FACTOR = 2.0
#: Fixed features besides the three per order.
N_FIT_FEATURES = 8


@dataclass(frozen=True)
class ReadoutGeometry:
    """What :func:`read_orders` takes from an instrument (built once per instrument).

    >>> from pipeline.instrument import default_instrument
    >>> geometry = ReadoutGeometry.of(default_instrument())
    >>> geometry.n_orders, geometry.half_window_bins, geometry.n_features
    (20, 6, 68)
    """

    grid: QGrid
    n_orders: int
    half_window_bins: int
    pitch_range_nm: tuple[float, float]
    duty_low: float
    ratio_table: tuple[float, float, int]
    observed: tuple[bool, ...]
    weights: tuple[float, ...]

    @staticmethod
    def of(instrument: Instrument) -> ReadoutGeometry:
        grid, prior = instrument.grid, instrument.prior
        low, high, steps = ROUGHNESS_RATIO_TABLE
        return ReadoutGeometry(
            grid=grid,
            n_orders=math.floor(grid.q_max_nm * prior.pitch_nm[1] / (2.0 * math.pi)) + 1,
            half_window_bins=max(1, round(HALF_WINDOW_SD * grid.resolution_nm / grid.bin_width_nm)),
            pitch_range_nm=prior.pitch_nm,
            duty_low=prior.duty[0],
            ratio_table=(
                min(low, prior.sigma_nm[0] / prior.pitch_nm[1]),
                max(high, prior.sigma_nm[1] / prior.pitch_nm[0]),
                steps,
            ),
            observed=tuple(bool(o) for o in instrument.observed),
            weights=tuple(float(w) for w in instrument.weights),
        )

    @property
    def n_features(self) -> int:
        """Length of :attr:`OrderReadout.features`."""
        return 3 * self.n_orders + N_FIT_FEATURES

    @property
    def max_pitch_error_nm(self) -> float:
        """Standard error assumed when no order can be fitted (nm)."""
        return MAX_PITCH_ERROR_FRACTION * (self.pitch_range_nm[1] - self.pitch_range_nm[0])

    @functools.cache  # noqa: B019 (frozen, few instances)
    def tensors(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``observed`` (bool) and ``weights`` (float32) as tensors on ``device``."""
        with torch.inference_mode(False), torch.no_grad():
            return (
                torch.tensor(self.observed, device=device),
                torch.tensor(self.weights, dtype=torch.float32, device=device),
            )


@dataclass(frozen=True)
class OrderReadout:
    """Result of :func:`read_orders` for a batch of line-outs (all tensors have the batch first)."""

    pitch_nm: torch.Tensor  #: refined pitch (exposures,)
    pitch_error_nm: torch.Tensor  #: its standard error from the fit (exposures,)
    duty: torch.Tensor  #: duty cycle w / p of the narrow-line solution, <= 0.5 (exposures,)
    duty_error: torch.Tensor  #: its standard error
    sigma_nm: torch.Tensor  #: roughness (exposures,)
    log_sigma_error: torch.Tensor  #: standard error of log(sigma)
    log10_n_photons: torch.Tensor  #: log10 of the photon number (exposures,)
    log10_n_photons_error: torch.Tensor  #: its standard error
    background: torch.Tensor  #: background counts per bin (exposures,)
    background_error: torch.Tensor  #: its standard error
    features: torch.Tensor  #: per-order and fit features (exposures, n_features)

    def per_sample(self) -> OrderReadout:
        """The estimates as (exposures, 1), to broadcast over the samples of each exposure."""
        return dataclasses.replace(
            self, **{f.name: getattr(self, f.name)[:, None] for f in dataclasses.fields(self)[:-1]}
        )


def _windows(
    net: torch.Tensor, pitch: torch.Tensor, geometry: ReadoutGeometry
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per order window: positive net counts, their centroid, the order centre, the flag of
    a window wholly on the grid's observed bins, and the plain net sum (may be negative)."""
    grid, half = geometry.grid, geometry.half_window_bins
    orders = torch.arange(1, geometry.n_orders + 1, dtype=net.dtype, device=net.device)
    offsets = torch.arange(-half, half + 1, device=net.device)
    q_n = 2.0 * math.pi * orders / pitch[:, None]
    centre = torch.round((q_n - grid.q_min_nm) / grid.bin_width_nm)
    bins = centre[..., None] + offsets
    index = bins.clamp(0, grid.n_points - 1).long().reshape(net.shape[0], -1)
    observed, _ = geometry.tensors(net.device)
    inside = ((bins >= 0) & (bins < grid.n_points)).all(-1)
    inside = inside & observed[index].reshape(bins.shape).all(-1)
    values = torch.gather(net, 1, index).reshape(bins.shape)
    net_sum = values.sum(-1) * inside
    values = values.clamp(min=0.0)
    total = values.sum(-1)
    q_bins = grid.q_min_nm + bins * grid.bin_width_nm
    centroid = (values * q_bins).sum(-1) / total.clamp(min=1e-6)
    return total * inside, centroid, q_n, inside, net_sum


@torch.no_grad()
def read_orders(
    counts: torch.Tensor, pitch_guess_nm: torch.Tensor, instrument: Instrument | ReadoutGeometry
) -> OrderReadout:
    """Refine ``pitch_guess_nm`` (exposures,) on ``counts`` (exposures, n_points) of
    ``instrument``; see the module doc. Values of masked bins are not used (NaN allowed)."""
    geometry = (
        instrument if isinstance(instrument, ReadoutGeometry) else ReadoutGeometry.of(instrument)
    )
    grid = geometry.grid
    observed, bin_weights = geometry.tensors(counts.device)
    counts = torch.where(observed, counts.float(), 0.0)
    pitch = pitch_guess_nm.float().clone()
    ranked = observed & (bin_weights >= MIN_RANKED_WEIGHT)
    per_weight = (counts / bin_weights.clamp(min=MIN_RANKED_WEIGHT))[:, ranked]
    level = torch.kthvalue(per_weight, max(1, per_weight.shape[-1] // 5), dim=-1, keepdim=True)
    background = level.values * bin_weights
    net = counts - background
    orders = torch.arange(1, geometry.n_orders + 1, dtype=counts.dtype, device=counts.device)
    bin_variance = grid.resolution_nm**2 + grid.bin_width_nm**2 / 12.0
    information = torch.zeros_like(pitch)
    for highest in (*ORDER_SCHEDULE, geometry.n_orders):
        weight, centroid, _, _, _ = _windows(net, pitch, geometry)
        weight = weight * ((orders <= highest) & (weight > MIN_ORDER_COUNTS))
        information = (weight * orders**2).sum(-1)
        k = (weight * orders * centroid).sum(-1) / information.clamp(min=1e-6)
        pitch = torch.where(information > 0, 2.0 * math.pi / k.clamp(min=1e-6), pitch)
    k = 2.0 * math.pi / pitch
    error = pitch * torch.sqrt(bin_variance / information.clamp(min=1e-12)) / k
    max_error = geometry.max_pitch_error_nm
    error = torch.where(information > 0, error, torch.full_like(error, max_error))
    error = error.clamp(1e-4, max_error)

    weight, centroid, q_n, inside, net_sum = _windows(net, pitch, geometry)
    window_bins = 2 * geometry.half_window_bins + 1
    inverse_variance = inside / (net_sum.clamp(min=0.0) + window_bins * level.values + 1.0)
    duty, duty_error, ratio, log_ratio_error, misfit = _fit_duty_roughness(
        net_sum, inverse_variance, orders, geometry
    )
    pitch_low, pitch_high = geometry.pitch_range_nm
    duty_centre = 0.5 * (geometry.duty_low + 0.5)
    duty_scale = 0.3 * (0.5 - geometry.duty_low)
    offset = ((centroid - q_n) / grid.resolution_nm).clamp(-3.0, 3.0) * (weight > 0)
    intensity = (torch.log1p(weight) - 4.0) / 3.0 * inside
    features = torch.cat(
        [
            intensity,
            offset,
            inside.to(counts.dtype),
            torch.stack(
                [
                    (pitch - 0.5 * (pitch_low + pitch_high)) / (0.3 * (pitch_high - pitch_low)),
                    torch.log(error) / 3.0,
                    (duty - duty_centre) / duty_scale,
                    torch.log(duty_error) / 3.0,
                    torch.log(ratio * pitch) / 1.5 - 1.0,
                    torch.log(log_ratio_error) / 3.0,
                ],
                dim=-1,
            ),
            torch.log1p(level.values) / 2.0,
            torch.log1p(misfit)[:, None] / 3.0,
        ],
        dim=-1,
    )
    return OrderReadout(
        pitch,
        error,
        duty,
        duty_error,
        ratio * pitch,
        log_ratio_error,
        *_read_nuisances(counts, pitch, duty, ratio * pitch, geometry),
        features,
    )


def _read_nuisances(
    counts: torch.Tensor,
    pitch: torch.Tensor,
    duty: torch.Tensor,
    sigma_nm: torch.Tensor,
    geometry: ReadoutGeometry,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """log10 photons, its error, background per bin and its error (see the module doc);
    ``counts`` are 0 in the masked bins, whose share of the photons is estimated from the
    read-out's pitch, duty cycle and roughness."""
    grid = geometry.grid
    observed, bin_weights = geometry.tensors(counts.device)
    q = torch.linspace(grid.q_min_nm, grid.q_max_nm, grid.n_points, device=counts.device)
    # distance of every bin to its nearest order, in units of the order spacing 2 pi / p
    spacing = 2.0 * math.pi / pitch[:, None]
    phase = q / spacing
    distance = (phase - torch.round(phase).clamp(min=1.0)).abs() * spacing
    clear = ((distance > BACKGROUND_CLEARANCE_SD * grid.resolution_nm) & observed).to(counts.dtype)
    clear_weight = (clear * bin_weights).sum(-1).clamp(min=1.0)
    background = (counts * clear).sum(-1) / clear_weight
    background_error = torch.sqrt((background + 1.0) / clear_weight)
    total = counts.sum(-1)
    total_weight = float(sum(geometry.weights))
    n_photons = (total - total_weight * background).clamp(min=1.0)
    n_photons_error = torch.sqrt(total + 1.0 + (total_weight * background_error) ** 2)
    if not all(geometry.observed):
        # photons that fell into masked bins: the read-out's own grating tells how many (its
        # pitch bounded, so that the orders summed, a shape, do not depend on the data)
        largest = MASKED_SHARE_PITCH_FACTOR * geometry.pitch_range_nm[1]
        bounded = pitch.clamp(max=largest)
        # a bounded pitch keeps its roughness relative to the pitch
        rough = torch.where(pitch > largest, sigma_nm * (largest / pitch), sigma_nm)
        shape = torch.stack(
            [bounded, duty * bounded, rough, torch.ones_like(pitch), torch.zeros_like(pitch)], -1
        )
        masked = expected_counts(shape, grid, max_pitch_nm=largest)[:, ~observed].sum(-1)
        masked = masked.clamp(0.0, 0.5)
        n_photons = n_photons / (1.0 - masked)
        uncertain = MASKED_SHARE_RELATIVE_ERROR * masked * n_photons
        n_photons_error = torch.sqrt(n_photons_error**2 / (1.0 - masked) ** 2 + uncertain**2)
    log10_error = (n_photons_error / n_photons / math.log(10.0)).clamp(1e-5, 3.0)
    return torch.log10(n_photons), log10_error, background, background_error


def _order_intensities(
    duty: torch.Tensor, ratio: torch.Tensor, orders: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """sin^2(pi n d) / n^2 and the Debye-Waller factor exp(-(2 pi n ratio)^2), (..., orders)."""
    damping = torch.exp(-((2.0 * math.pi * orders * ratio[..., None]) ** 2))
    return torch.sin(math.pi * orders * duty[..., None]) ** 2 / orders**2, damping


@functools.lru_cache(maxsize=8)
def _start_table(
    geometry: ReadoutGeometry, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Duty and sigma / p of the start table, and the order intensities on it (built once)."""
    with torch.inference_mode(False), torch.no_grad():  # usable in and out of inference mode
        duty = torch.linspace(geometry.duty_low, 0.5, DUTY_TABLE_POINTS, device=device)
        low, high, steps = geometry.ratio_table
        ratio = torch.linspace(math.log(low), math.log(high), steps, device=device).exp()
        duty, ratio = (g.reshape(-1) for g in torch.meshgrid(duty, ratio, indexing="ij"))
        orders = torch.arange(1, geometry.n_orders + 1, dtype=torch.float32, device=device)
        shape, damping = _order_intensities(duty, ratio, orders)
        return duty, ratio, shape * damping  # table: (table points, orders)


def _fit_duty_roughness(
    net_sum: torch.Tensor,
    inverse_variance: torch.Tensor,
    orders: torch.Tensor,
    geometry: ReadoutGeometry,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weighted least squares of the order sums over (duty, log sigma/p), amplitude profiled.

    Returns duty, its standard error, sigma / p, the standard error of log(sigma / p) and the
    reduced misfit (chi^2 per order), each (exposures,).
    """
    duty_grid, ratio_grid, table = _start_table(geometry, net_sum.device)
    low, high, _ = geometry.ratio_table
    weighted = net_sum * inverse_variance
    projection = weighted @ table.T
    norm = inverse_variance @ (table**2).T
    score = torch.where(projection > 0, projection**2 / norm.clamp(min=1e-30), 0.0)
    best = score.argmax(-1)
    duty, log_ratio = duty_grid[best], ratio_grid[best].log()

    root_weight = inverse_variance.sqrt()
    for _ in range(GAUSS_NEWTON_STEPS + 1):
        ratio = log_ratio.exp()
        shape, damping = _order_intensities(duty, ratio, orders)
        model = shape * damping
        amplitude = (weighted * model).sum(-1) / (inverse_variance * model**2).sum(-1).clamp(
            min=1e-30
        )
        amplitude = amplitude.clamp(min=1e-6)[:, None]
        residual = (net_sum - amplitude * model) * root_weight
        d_amplitude = model * root_weight
        d_duty = (
            amplitude
            * math.pi
            * torch.sin(2.0 * math.pi * orders * duty[:, None])
            / orders
            * damping
            * root_weight
        )
        d_log_ratio = -2.0 * amplitude * model * (2.0 * math.pi * orders * ratio[:, None]) ** 2
        d_log_ratio = d_log_ratio * root_weight
        # normal equations with the amplitude eliminated (Schur complement)
        h_aa = (d_amplitude**2).sum(-1).clamp(min=1e-30)
        a_d, a_l = (d_amplitude * d_duty).sum(-1), (d_amplitude * d_log_ratio).sum(-1)
        h_dd = (d_duty**2).sum(-1) - a_d**2 / h_aa
        h_ll = (d_log_ratio**2).sum(-1) - a_l**2 / h_aa
        h_dl = (d_duty * d_log_ratio).sum(-1) - a_d * a_l / h_aa
        h_dd, h_ll = h_dd.clamp(min=1e-12), h_ll.clamp(min=1e-12)
        determinant = (h_dd * h_ll - h_dl**2).clamp(min=1e-24)
        if _ == GAUSS_NEWTON_STEPS:
            break
        g_d, g_l = (d_duty * residual).sum(-1), (d_log_ratio * residual).sum(-1)
        damped = determinant * 1.002 + 1e-24
        duty = (duty + (h_ll * g_d - h_dl * g_l) / damped).clamp(geometry.duty_low, 0.5)
        log_ratio = (log_ratio + (h_dd * g_l - h_dl * g_d) / damped).clamp(
            math.log(low), math.log(high)
        )
    used = (inverse_variance > 0).sum(-1).clamp(min=1)
    misfit = (residual**2).sum(-1) / used
    duty_error = (h_ll / determinant).sqrt().clamp(1e-4, 0.2)
    log_ratio_error = (h_dd / determinant).sqrt().clamp(1e-3, 2.0)
    return duty, duty_error, ratio, log_ratio_error, misfit
