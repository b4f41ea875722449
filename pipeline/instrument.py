"""The instrument a posterior model is made for, as data: q grid, resolution, sector, unobserved
bins, pixels and background weight per bin, prior ranges and the PONI it was derived from.

One :class:`Instrument` travels with a model (its card) and with every results file. The
forward model for it (:func:`pipeline.physics.expected_counts`) is, for each observed bin i,

    mu_i = n_photons * I(q_i) / sum_j I(q_j) + background * g_i

where the sum runs over every bin of the grid (masked ones included) and ``g`` is
:attr:`Instrument.background_weights` (mean 1 over the observed bins: ``background`` is the
mean background count per observed bin). Masked bins are not observed: their values in a
line-out are ignored, whatever they hold.

An instrument's JSON file is the contract (``beamline-inn instrument`` writes one from a PONI;
``../shared/instruments/pilatus1m-5m-sector.json`` is an example). The bundled default,
:func:`default_instrument`, has DESIGN.md's grid and prior, every weight 1 and no masked bin.

Example:
    >>> instrument = default_instrument()
    >>> instrument.name, instrument.n_points, bool(instrument.observed.all())
    ('default', 512, True)
    >>> float(instrument.weights.mean())
    1.0
"""

from __future__ import annotations

import hashlib
import json
from functools import cache
from importlib.resources import files
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.physics.grating import GratingPrior, QGrid, expected_counts, simulate

#: The default instrument's file, beside the default model.
DEFAULT_INSTRUMENT_FILE = Path(str(files("pipeline") / "data" / "default.instrument.json"))
#: Background weights must have mean 1 over the observed bins within this (JSON files round).
WEIGHT_MEAN_TOLERANCE = 1e-3
#: Bins with fewer pixels than this are worth a warning when an instrument is derived.
FEW_PIXELS = 3


class InstrumentError(ValueError):
    """An instrument file that is missing, unreadable or inconsistent."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Range = tuple[float, float]


class PriorRanges(_Strict):
    """Uniform prior ranges: pitch (nm), duty cycle w / p, roughness sigma (nm), log10 of the
    photon number and the background (mean counts per observed bin).

    >>> PriorRanges().grating_prior().pitch_nm
    (100.0, 300.0)
    """

    pitch_nm: Range = (100.0, 300.0)
    duty: Range = (0.1, 0.9)
    sigma_nm: Range = (1.0, 20.0)
    log10_n_photons: Range = (3.0, 6.0)
    background: Range = (0.0, 5.0)

    @model_validator(mode="after")
    def _ordered(self) -> PriorRanges:
        for name, (low, high) in self:
            if not low < high:
                raise ValueError(f"prior range {name} = ({low}, {high}) must have low < high")
        if self.pitch_nm[0] <= 0 or self.sigma_nm[0] < 0 or self.background[0] < 0:
            raise ValueError("pitch must be positive, sigma and background non-negative")
        if not (self.duty[0] > 0 and self.duty[1] < 1):
            raise ValueError(f"the duty cycle range {self.duty} must lie inside (0, 1)")
        return self

    def grating_prior(self) -> GratingPrior:
        """The same ranges as the :class:`~pipeline.physics.GratingPrior` that draws from them."""
        return GratingPrior(
            pitch_nm=self.pitch_nm,
            duty=self.duty,
            sigma_nm=self.sigma_nm,
            log10_n_photons=self.log10_n_photons,
            background=self.background,
        )


class Instrument(_Strict):
    """What a model knows of the instrument (see the module doc); JSON as in its file."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
    description: str = ""
    #: centres of the first and last q bin (1/nm), and the number of bins
    q_min_nm: float = Field(gt=0)
    q_max_nm: float
    n_points: int = Field(ge=8)
    #: Gaussian standard deviation of the instrument resolution (1/nm)
    resolution_nm: float = Field(gt=0)
    #: the sector in pyFAI's chi (degrees); ``None``: the full ring
    azimuth_range_deg: Range | None
    #: bins that no usable pixel reaches (detector gaps, beam stop): not observed
    masked_bins: tuple[int, ...] = ()
    #: pixels whose centre falls in each bin (0 for masked bins)
    pixels_per_bin: tuple[int, ...]
    #: g_i, relative background per bin: mean 1 over the observed bins, 0 for masked bins
    background_weights: tuple[float, ...]
    prior: PriorRanges = PriorRanges()
    #: the PONI file's text the instrument was derived from
    poni: str | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Instrument:
        n = self.n_points
        if not self.q_max_nm > self.q_min_nm:
            raise ValueError(f"q_max_nm {self.q_max_nm} must exceed q_min_nm {self.q_min_nm}")
        for name in ("pixels_per_bin", "background_weights"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} has {len(getattr(self, name))} values, not n_points={n}")
        masked = self.masked_bins
        if list(masked) != sorted(set(masked)) or any(not 0 <= i < n for i in masked):
            raise ValueError(f"masked_bins must be distinct, sorted bins in 0..{n - 1}")
        if len(masked) > n // 2:
            raise ValueError(f"{len(masked)} of the {n} bins are masked: too few are observed")
        weights = np.asarray(self.background_weights, dtype=np.float64)
        observed = np.ones(n, bool)
        observed[list(masked)] = False
        if not np.isfinite(weights).all() or (weights < 0).any():
            raise ValueError("background_weights must be finite and non-negative")
        mean = weights[observed].mean()
        if abs(mean - 1.0) > WEIGHT_MEAN_TOLERANCE:
            raise ValueError(
                f"background_weights have mean {mean:.4f} over the observed bins, not 1"
            )
        if min(self.pixels_per_bin) < 0:
            raise ValueError("pixels_per_bin must be non-negative")
        return self

    @property
    def grid(self) -> QGrid:
        """The line-out's q grid and resolution."""
        return QGrid(self.q_min_nm, self.q_max_nm, self.n_points, self.resolution_nm)

    @property
    def grating_prior(self) -> GratingPrior:
        """The prior to draw parameters from."""
        return self.prior.grating_prior()

    @property
    def observed(self) -> np.ndarray:
        """(n_points,) bool: True for the bins a line-out observes."""
        observed = np.ones(self.n_points, bool)
        observed[list(self.masked_bins)] = False
        return observed

    @property
    def weights(self) -> np.ndarray:
        """(n_points,) float64 background weights g, exactly 0 at masked bins."""
        return np.where(self.observed, np.asarray(self.background_weights, np.float64), 0.0)

    @property
    def is_uniform(self) -> bool:
        """Every bin observed with weight 1: the forward model of DESIGN.md as it stands."""
        return not self.masked_bins and all(w == 1.0 for w in self.background_weights)

    def expected_counts(self, theta: Any) -> Any:
        """Expected counts (..., n_points) of parameters ``theta`` (..., 5), numpy or torch
        (:func:`~pipeline.physics.expected_counts` with this grid and these weights)."""
        return expected_counts(theta, self.grid, self.weights)

    def simulate(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """``n`` prior draws (n, 5) and their Poisson line-outs (n, n_points), NaN in the
        masked bins.

        >>> theta, counts = default_instrument().simulate(2, np.random.default_rng(0))
        >>> counts.shape
        (2, 512)
        """
        return simulate(n, rng, self.grating_prior, self.grid, self.weights, self.observed)

    def sha256(self) -> str:
        """SHA-256 of the canonical JSON (sorted keys): the instrument's identity."""
        text = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    def to_json(self) -> str:
        """The JSON text of the instrument file."""
        return json.dumps(self.model_dump(mode="json"), indent=1) + "\n"

    def save(self, path: Path) -> Path:
        """Write the instrument file ``path``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json())
        return path

    def describe(self) -> str:
        """One line: name, q range, bins, masked bins and sector."""
        sector = (
            "full ring"
            if self.azimuth_range_deg is None
            else f"sector {self.azimuth_range_deg[0]:g}..{self.azimuth_range_deg[1]:g} deg"
        )
        return (
            f"{self.name}: q {self.q_min_nm:g}-{self.q_max_nm:g} 1/nm on {self.n_points} bins "
            f"({len(self.masked_bins)} masked), resolution {self.resolution_nm:g} 1/nm, {sector}"
        )


def load_instrument(path: Path) -> Instrument:
    """The instrument of the JSON file ``path``; :class:`InstrumentError` saying what is wrong.

    >>> load_instrument(DEFAULT_INSTRUMENT_FILE).n_points
    512
    """
    path = Path(path)
    if not path.is_file():
        raise InstrumentError(f"instrument file not found: {path}")
    try:
        return Instrument.model_validate_json(path.read_bytes())  # bytes: not UTF-8 is invalid
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'file'}: {e['msg']}" for e in error.errors()
        )
        raise InstrumentError(f"instrument file {path} is not valid: {problems}") from None


@cache
def default_instrument() -> Instrument:
    """The bundled default instrument (the default model's)."""
    return load_instrument(DEFAULT_INSTRUMENT_FILE)
