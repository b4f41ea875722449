"""An instrument (:class:`~pipeline.instrument.Instrument`) derived from a detector geometry:
what ``beamline-inn instrument`` writes for ``beamline-inn train --instrument``.

The pixels of each q bin are those pyFAI's engine sums into it when the pipeline integrates a
frame (:attr:`~pipeline.integration.LineOutIntegrator.pixels_per_bin` of the same PONI, mask
and sector), so that the instrument a model is trained for and the line-outs it is given
agree by construction. Bins without a pixel (module gaps, a mask) are masked bins; the
background weights are the pixels per bin over their mean over the observed bins, rounded to
6 decimals (which moves their mean by at most 5e-7, well inside
:data:`~pipeline.instrument.WEIGHT_MEAN_TOLERANCE`), 0 for masked bins.

A bin's pixels are those whose centres lie inside it (the integrator leaves out the pixels
outside the grid, which pyFAI's engine would otherwise sum into the first bin): on the
Pilatus geometry of ``../shared/instruments`` every bin's count equals the shipped
``pilatus1m-5m-sector.json``'s.

The resolution, unless given, is estimated from the pixels alone
(:func:`pixel_resolution_nm`); a resolution under half a bin is warned about, as the forward
model samples each peak at the bin centres (:data:`MIN_RESOLUTION_BINS`).

Example:
    >>> import tempfile
    >>> from pipeline.integration import DEFAULT_PONI
    >>> derived = derive_instrument(DEFAULT_PONI, (0.01, 0.4), 512, (-5.0, 5.0), name="eiger")
    >>> print(derived.summary())  # doctest: +ELLIPSIS
    instrument eiger: q 0.01-0.4 1/nm on 512 bins of 0.000763 1/nm, in the sector -5..5 deg
    the geometry reaches q 0-1.23 1/nm there
    masked bins: 0
    pixels per observed bin: min 3, median 73, max 160
    resolution: 6.08e-04 1/nm, estimated from 75 um pixels at 5 m and 0.155 nm
    >>> derived.instrument.save(Path(tempfile.mkdtemp()) / "eiger.json").name
    'eiger.json'
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import ValidationError

from pipeline.config import IntegrationConfig
from pipeline.instrument import FEW_PIXELS, Instrument, InstrumentError, PriorRanges
from pipeline.integration import (
    GeometryError,
    LineOutIntegrator,
    NoPixelInRange,
    load_geometry,
)
from pipeline.physics import QGrid

#: h c in keV nm: a photon's energy (keV) is this over its wavelength (nm).
HC_KEV_NM = 1.239841984
#: A resolution (sd) under this many bin widths is warned about: the forward model samples
#: each Gaussian peak at the bin centres, so the counts of a peak depend on where it falls
#: between two bins: the sum over the bins of a peak of sd 0.5 bin varies by 3% with its
#: position, of sd 0.4 bin by 16%, of sd 0.6 bin by 0.3%.
MIN_RESOLUTION_BINS = 0.5
#: Runs of bins named in full in a message; more are counted.
MOST_RUNS = 4


class InstrumentDerivationError(GeometryError):
    """A geometry from which no instrument can be derived for the requested q grid: the q
    range is not reached in the sector, or too many bins get no pixel."""


@dataclass(frozen=True)
class DerivedInstrument:
    """An instrument derived from a geometry (:func:`derive_instrument`), with what the user
    should check.

    Attributes:
        instrument: the instrument, ready to save.
        resolution_estimate_nm: the resolution sd (1/nm) the pixels alone give
            (:func:`pixel_resolution_nm`), whether or not the instrument uses it.
        resolution_given: whether the instrument's resolution was given rather than estimated.
        resolution_basis: what the estimate is from, e.g. "172 um pixels at 5 m and 0.1 nm".
        reach_nm: the q range (1/nm) of the usable pixels' centres in the sector or ring.
        warnings: one line each, about bins with few pixels or a resolution under half a bin.
    """

    instrument: Instrument
    resolution_estimate_nm: float
    resolution_given: bool
    resolution_basis: str
    reach_nm: tuple[float, float]
    warnings: tuple[str, ...]

    def summary(self, set_resolution: str = "") -> str:
        """Lines for the user: grid, reach, masked bins, pixels per bin, resolution and the
        warnings; ``set_resolution`` (e.g. "give --resolution to set it") follows an
        estimated resolution, in parentheses."""
        instrument = self.instrument
        grid = instrument.grid
        pixels = np.asarray(instrument.pixels_per_bin)[instrument.observed]
        masked = list(instrument.masked_bins)
        if self.resolution_given:
            resolution = (
                f"{instrument.resolution_nm:.2e} 1/nm, given (the pixels alone: "
                f"{self.resolution_estimate_nm:.2e} 1/nm from {self.resolution_basis})"
            )
        else:
            resolution = (
                f"{instrument.resolution_nm:.2e} 1/nm, estimated from {self.resolution_basis}"
                + (f" ({set_resolution})" if set_resolution else "")
            )
        lines = [
            f"instrument {instrument.name}: q {grid.q_min_nm:g}-{grid.q_max_nm:g} 1/nm on "
            f"{grid.n_points} bins of {grid.bin_width_nm:.3g} 1/nm, "
            f"{_where(instrument.azimuth_range_deg)}",
            f"the geometry reaches q {self.reach_nm[0]:.3g}-{self.reach_nm[1]:.3g} 1/nm there",
            f"masked bins: {len(masked)}"
            + (f", no pixel in {bin_runs(grid.q_nm, masked)}" if masked else ""),
            f"pixels per observed bin: min {pixels.min()}, median {np.median(pixels):g}, "
            f"max {pixels.max()}",
            f"resolution: {resolution}",
        ]
        return "\n".join(lines + [f"warning: {warning}" for warning in self.warnings])


def pixel_resolution_nm(pixel_m: float, distance_m: float, wavelength_nm: float) -> float:
    """An estimate of the resolution (sd, 1/nm) from the pixels: the q width of one pixel,
    ``dq = (2 pi / lambda) * pixel / distance`` for a pixel of size ``pixel`` at ``distance``
    in the small-angle limit (q = 4 pi sin(theta) / lambda ~ 2 pi r / (lambda D) at r from
    the beam on a detector normal to it).

    The pixel alone spreads q uniformly over ``dq`` (sd ``dq / sqrt(12)``); a beam spot about
    a pixel wide at the detector, as a SAXS camera is usually focused, adds an sd of about
    ``dq``, so the estimate is ``dq`` (sqrt(1 + 1/12) = 1.04 of it, rounded). The beam's size
    and divergence are not in a PONI file: check it against a measured peak width, and give
    the measured value with ``--resolution``. For the Pilatus geometry of ``../shared``
    (172 um pixels, 5 m, 0.1 nm) it is 2.2e-3 1/nm; that instrument's file has 3.0e-3 1/nm
    (one bin).

    >>> f"{pixel_resolution_nm(172e-6, 5.0, 0.1):.3g}"
    '0.00216'
    """
    return 2.0 * math.pi / wavelength_nm * pixel_m / distance_m


def bin_runs(q_nm: np.ndarray, bins: list[int]) -> str:
    """Runs of consecutive ``bins`` with their q (1/nm) at the bin centres ``q_nm``; after
    :data:`MOST_RUNS` runs, how many more.

    >>> bin_runs(np.linspace(0.1, 0.2, 11), [2, 3, 4, 8])
    'bins 2-4 (q 0.12-0.14 1/nm), bin 8 (q 0.18 1/nm)'
    """
    runs: list[tuple[int, int]] = []
    for index in bins:
        if runs and index == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], index)
        else:
            runs.append((index, index))
    parts = [
        f"bin {first} (q {q_nm[first]:.3g} 1/nm)"
        if first == last
        else f"bins {first}-{last} (q {q_nm[first]:.3g}-{q_nm[last]:.3g} 1/nm)"
        for first, last in runs[:MOST_RUNS]
    ]
    if len(runs) > MOST_RUNS:
        parts.append(f"and {len(runs) - MOST_RUNS} more runs")
    return ", ".join(parts)


def read_prior(path: Path) -> PriorRanges:
    """The :class:`~pipeline.instrument.PriorRanges` of a JSON file holding any of its fields
    (the others keep their defaults); :class:`~pipeline.instrument.InstrumentError`, one line,
    for a missing or invalid file.

    >>> read_prior(Path("/nowhere/prior.json"))
    Traceback (most recent call last):
    ...
    pipeline.instrument.InstrumentError: prior file not found: /nowhere/prior.json
    """
    path = Path(path)
    if not path.is_file():
        raise InstrumentError(f"prior file not found: {path}")
    try:
        return PriorRanges.model_validate_json(path.read_bytes())
    except ValidationError as error:
        raise InstrumentError(f"prior file {path} is not valid: {_problems(error)}") from None


def derive_instrument(
    poni: Path,
    q_range_nm: tuple[float, float],
    n_points: int,
    sector_deg: tuple[float, float] | None,
    mask: Path | None = None,
    resolution_nm: float | None = None,
    prior: PriorRanges | None = None,
    name: str | None = None,
) -> DerivedInstrument:
    """The instrument of the geometry ``poni`` (and ``mask``) for ``n_points`` q bins whose
    first and last centres are ``q_range_nm`` (1/nm), in the chi sector ``sector_deg``
    (degrees; ``None``: the full ring). See the module doc for how bins, weights and the
    resolution are made.

    Args:
        poni: the PONI file; its text is kept in the instrument.
        q_range_nm: centres (1/nm) of the first and last bin.
        n_points: bins, at least 8.
        sector_deg: (low, high) in pyFAI's chi, -180 to 180 degrees; ``None``: the full ring.
        mask: a mask image (non-zero = masked), added to the detector's own gaps.
        resolution_nm: Gaussian sd (1/nm) of the resolution; ``None``: the pixels' estimate.
        prior: the prior ranges (``None``: the defaults).
        name: the instrument's name (``None``: the PONI file's stem).

    Raises:
        InstrumentDerivationError: the geometry does not reach the q range in the sector, or
            more than half of the bins would get no pixel.
        GeometryError: a PONI or mask that cannot be read or does not fit.
        InstrumentError: arguments the instrument refuses (a name, a resolution, ...).
    """
    poni = Path(poni)
    q_min, q_max = map(float, q_range_nm)
    if not 0 < q_min < q_max:
        raise InstrumentError(f"the q range {q_min:g}-{q_max:g} 1/nm must have 0 < low < high")
    if n_points < 8:
        raise InstrumentError(f"an instrument needs at least 8 bins, not {n_points}")
    try:
        config = IntegrationConfig.model_validate(
            {"poni": poni, "mask": mask, "azimuth_range_deg": sector_deg}
        )
    except ValidationError as error:
        raise InstrumentError(_problems(error)) from None
    geometry = load_geometry(poni)
    detector = geometry.detector
    pixel_m = max(detector.pixel1, detector.pixel2)
    wavelength_nm = geometry.wavelength * 1e9
    estimate = pixel_resolution_nm(pixel_m, geometry.dist, wavelength_nm)
    resolution = estimate if resolution_nm is None else resolution_nm
    grid = QGrid(q_min, q_max, n_points, resolution)
    try:
        with _quiet_empty_engine():
            integrator = LineOutIntegrator(config, grid)
    except NoPixelInRange as error:  # still built: the reach is said below
        if error.integrator is None:
            raise
        integrator = error.integrator
    if integrator.shape is None:
        raise InstrumentDerivationError(
            f"the PONI {poni} names no detector, so its pixels are not known: add "
            "'Detector: NAME' (e.g. Pilatus1M) to it, or give a mask of the detector's shape"
        )
    reach = _reach(integrator, grid)
    pixels = np.asarray(integrator.pixels_per_bin, np.int64)
    observed = pixels > 0
    masked = [int(i) for i in np.flatnonzero(~observed)]
    if len(masked) > n_points // 2:
        raise InstrumentDerivationError(
            f"{len(masked)} of the {n_points} q bins get no pixel {_where(sector_deg)} "
            f"({bin_runs(grid.q_nm, masked)}): at least half must be observed; widen the "
            "sector or take the full ring, or take fewer, wider bins"
        )
    weights = np.where(observed, np.round(pixels / pixels[observed].mean(), 6), 0.0)
    description = (
        f"{detector.name} at {geometry.dist:g} m, wavelength {wavelength_nm:.4g} nm "
        f"({HC_KEV_NM / wavelength_nm:.4g} keV), {_where(sector_deg)}"
        + ("" if mask is None else f", mask {Path(mask).name}")
        + "; masked bins: "
        + (bin_runs(grid.q_nm, masked) if masked else "none")
    )
    try:
        instrument = Instrument(
            name=poni.stem if name is None else name,
            description=description,
            q_min_nm=q_min,
            q_max_nm=q_max,
            n_points=n_points,
            resolution_nm=resolution,
            azimuth_range_deg=sector_deg,
            masked_bins=tuple(masked),
            pixels_per_bin=tuple(int(n) for n in pixels),
            background_weights=tuple(float(w) for w in weights),
            prior=PriorRanges() if prior is None else prior,
            poni=poni.read_text(),
        )
    except ValidationError as error:
        raise InstrumentError(f"the instrument is not valid: {_problems(error)}") from None
    return DerivedInstrument(
        instrument=instrument,
        resolution_estimate_nm=estimate,
        resolution_given=resolution_nm is not None,
        resolution_basis=(
            f"{pixel_m * 1e6:.3g} um pixels at {geometry.dist:g} m and {wavelength_nm:.3g} nm"
        ),
        reach_nm=reach,
        warnings=tuple(_warnings(instrument)),
    )


def _reach(integrator: LineOutIntegrator, grid: QGrid) -> tuple[float, float]:
    """The q range (1/nm) of the usable pixels' centres; :class:`InstrumentDerivationError`
    unless it reaches the first and the last bin of ``grid``."""
    from pipeline.preflight import usable_pixel_q

    where = _where(integrator.config.azimuth_range_deg)
    q = usable_pixel_q(integrator)
    if q.size == 0:
        raise InstrumentDerivationError(f"the geometry has no usable pixel {where}")
    low, high = float(q.min()), float(q.max())
    half = 0.5 * grid.bin_width_nm
    if low > grid.q_min_nm + half or high < grid.q_max_nm - half:
        outside = high < grid.q_min_nm - half or low > grid.q_max_nm + half
        raise InstrumentDerivationError(
            f"the geometry reaches q {low:.3g}-{high:.3g} 1/nm {where}; "
            f"{grid.q_min_nm:g}-{grid.q_max_nm:g} 1/nm is "
            f"{'outside it' if outside else 'not inside it'}: choose a q range within it"
        )
    return low, high


def _warnings(instrument: Instrument) -> list[str]:
    """Bins with fewer than :data:`~pipeline.instrument.FEW_PIXELS` pixels, and a
    resolution under :data:`MIN_RESOLUTION_BINS` bins."""
    grid = instrument.grid
    warnings = []
    pixels = np.asarray(instrument.pixels_per_bin)
    few = [int(i) for i in np.flatnonzero(instrument.observed & (pixels < FEW_PIXELS))]
    if few:
        warnings.append(
            f"{len(few)} observed bins have fewer than {FEW_PIXELS} pixels, their counts are "
            f"noisy and their background weight coarse: {bin_runs(grid.q_nm, few)}"
        )
    in_bins = instrument.resolution_nm / grid.bin_width_nm
    if in_bins < MIN_RESOLUTION_BINS:
        warnings.append(
            f"the resolution {instrument.resolution_nm:.2e} 1/nm is {in_bins:.2g} of a bin "
            f"({grid.bin_width_nm:.2e} 1/nm): the model samples each peak at the bin centres, "
            "so a peak's counts would depend on where it falls between two bins; give a "
            f"resolution of at least {MIN_RESOLUTION_BINS * grid.bin_width_nm:.2e} 1/nm (the "
            "beam's size and divergence widen it beyond the pixels') or take fewer bins"
        )
    return warnings


@contextmanager
def _quiet_empty_engine() -> Iterator[None]:
    """Without pyFAI's warning of an empty engine (no pixel in the q range): the error that
    follows says it, with the q range the geometry reaches."""
    log = logging.getLogger("pyFAI.ext.sparse_builder")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _where(sector_deg: tuple[float, float] | None) -> str:
    if sector_deg is None:
        return "on the full ring"
    return f"in the sector {sector_deg[0]:g}..{sector_deg[1]:g} deg"


def _problems(error: ValidationError) -> str:
    """A pydantic error as one line: each problem's field, its value (unless the message of
    a validator says it) and message."""
    problems = []
    for e in error.errors():
        field = ".".join(map(str, e["loc"]))
        if field and e["type"] != "value_error":
            field += f" = {e['input']!r}"
        message = e["msg"].removeprefix("Value error, ")
        problems.append(f"{field}: {message}" if field else message)
    return "; ".join(problems)
