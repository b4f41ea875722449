"""Azimuthal integration of detector frames into line-outs with pyFAI.

One :class:`LineOutIntegrator` per process: pyFAI's CSR engine keeps scratch buffers and
gives wrong results when one integrator is shared between threads (DESIGN.md section 7), so
the integrator refuses calls from a second thread. The engine is built once, by integrating an
empty frame of the detector's shape: the PONI's detector, or where the PONI names none (v1
files), ``IntegrationConfig.detector_shape`` (which ``reprocess`` takes from the frame files'
headers), the mask, dark or flat file's shape, else the first frame's (a frame of another
shape fails, saying which shape was expected and where it came from). Per-frame bad pixels are
handled with pyFAI's dummy values, so the engine is never rebuilt.

The line-out is the observable the model was trained on: the *sum* of counts of the pixels
whose centres fall in each q bin of the model's grid, inside an azimuthal sector or the full
ring (no pixel splitting, no solid-angle or polarization correction), with Poisson errors.
Corrections, when configured:

- **dark current** (``IntegrationConfig.dark``): subtracted pixel by pixel; the Poisson
  variance is that of the raw counts (the dark frame is taken as exact), and bins whose
  dark-subtracted sum falls below zero are set to zero (the model needs counts >= 0);
- **flat field** (``flat``, relative pixel efficiency about 1): each bin's sum is divided by
  the mean flat of its pixels, so it stays on the scale of photon counts;
- **normalisation** by the incident monitor and the sample transmission: a scalar per
  exposure, :attr:`pipeline.exposure.LineOut.normalization`, kept beside the counts (the model
  sees counts, whose total is one of its nuisance parameters; the stored intensity
  ``I = counts / normalization``).

Bad-pixel markers: unsigned frames mark bad or overflowing pixels with the largest value of
their type (Eiger), signed integer frames with -1 and -2 (Pilatus); both are ignored as dummy
values. A frame is refused (:class:`FrameError`) for a wrong shape or dtype, NaN or inf,
negative values that are not markers, no counts at all in the integration region, or more
than ``max_bad_pixel_fraction`` of the region's pixels marked: saturated (an unsigned frame)
or detector gaps (negative markers of a signed frame), each said as such. A dark or flat that
holds no usable value is a :class:`GeometryError` when it is read, before any frame; pixels
where the dark is NaN or infinite are masked.

Example:
    >>> import numpy as np
    >>> from pipeline.config import IntegrationConfig
    >>> from pipeline.physics import QGrid
    >>> integrator = LineOutIntegrator(IntegrationConfig(), QGrid())
    >>> frame = np.ones(integrator.shape, dtype=np.uint32)
    >>> line_out = integrator.integrate(frame)
    >>> line_out.counts.shape, bool(line_out.counts.sum() == integrator.pixels_per_bin.sum())
    ((512,), True)
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np

# pyFAI's OpenCL probe warns on every import where pyopencl is absent; we use its Cython engines.
logging.getLogger("silx.opencl.common").setLevel(logging.ERROR)

import fabio  # noqa: E402
import pyFAI  # noqa: E402
from pyFAI.integrator.azimuthal import AzimuthalIntegrator  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

from pipeline.bundled import DEFAULT_PONI  # noqa: E402
from pipeline.config import IntegrationConfig  # noqa: E402
from pipeline.exposure import Exposure, LineOut  # noqa: E402
from pipeline.integration.csr import CsrEngine  # noqa: E402
from pipeline.integration.rules import line_out_values, region_error, value_error  # noqa: E402
from pipeline.physics import QGrid  # noqa: E402

#: Pilatus bad-pixel markers (-1 bad, -2 module gaps) as one pyFAI dummy range.
SIGNED_DUMMY, SIGNED_DELTA_DUMMY = -1.5, 0.6


class FrameError(ValueError):
    """A frame that cannot be integrated (wrong shape, NaN or inf, saturated, ...)."""


class GeometryError(ValueError):
    """A PONI, mask, dark or flat file that is missing, malformed or does not fit."""


class NoPixelInRange(GeometryError):
    """No usable pixel of the geometry falls in the grid's q range inside the sector.

    ``integrator`` is the :class:`LineOutIntegrator` that found it, built as far as its
    geometry, mask and shape (every bin with 0 pixels), so that a caller can say which q range
    the geometry does reach (:func:`pipeline.preflight.check_geometry`)."""

    def __init__(self, message: str, integrator: LineOutIntegrator | None = None) -> None:
        super().__init__(message)
        self.integrator = integrator


def load_geometry(poni: Path | None) -> AzimuthalIntegrator:
    """An :class:`AzimuthalIntegrator` from a PONI file (v1 or v2, as pyFAI-calib2 writes
    them; the bundled one when ``None``). Raises :class:`GeometryError` with the reason."""
    path = Path(poni) if poni is not None else DEFAULT_PONI
    if not path.is_file():
        raise GeometryError(f"PONI file not found: {path}")
    # pyFAI falls back to defaults (a 1 m distance, ...) for missing keys: check them first
    keys = {
        line.split(":", 1)[0].strip().lower()
        for line in path.read_text(errors="replace").splitlines()
        if ":" in line and not line.lstrip().startswith("#")
    }
    missing = [key for key in ("distance", "poni1", "poni2", "wavelength") if key not in keys]
    if "detector" not in keys and not {"pixelsize1", "pixelsize2"} <= keys:
        missing.append("detector (Detector, or PixelSize1 and PixelSize2)")
    if missing:
        raise GeometryError(f"PONI file {path} does not define {', '.join(missing)}")
    try:
        geometry = pyFAI.load(str(path))
    except Exception as error:  # pyFAI raises several types for bad content
        raise GeometryError(f"PONI file {path} cannot be read: {error}") from error
    if not geometry.dist > 0 or not geometry.wavelength > 0:
        raise GeometryError(
            f"PONI file {path} gives a distance of {geometry.dist} m and a wavelength of "
            f"{geometry.wavelength} m: both must be positive"
        )
    return geometry


def frame_shape_is_open(config: IntegrationConfig) -> bool:
    """Whether nothing in ``config`` fixes the frames' shape before the first frame: its PONI
    names no detector (a v1 file), and it has no ``detector_shape``, mask, dark or flat.

    Example:
        >>> from pipeline.config import IntegrationConfig
        >>> frame_shape_is_open(IntegrationConfig())  # the bundled PONI names an Eiger 4M
        False
    """
    if config.detector_shape is not None:
        return False
    if any(path is not None for path in (config.mask, config.dark, config.flat)):
        return False
    return load_geometry(config.poni).detector.shape is None


def exposure_normalization(exposure: Exposure, config: IntegrationConfig) -> float:
    """The product of the exposure's metadata entries named in ``config.normalization_keys``
    (1 when none are named); :class:`FrameError` where one is missing or not a number."""
    normalization = 1.0
    for key in config.normalization_keys:
        if key not in exposure.metadata:
            raise FrameError(f"the exposure's metadata has no {key!r} to normalise by")
        try:
            normalization *= float(exposure.metadata[key])
        except ValueError:
            raise FrameError(
                f"the exposure's {key!r} is {exposure.metadata[key]!r}, not a number"
            ) from None
    if not (np.isfinite(normalization) and normalization > 0):
        raise FrameError(
            f"normalisation by {', '.join(config.normalization_keys)} is {normalization}: "
            "nothing to divide the counts by (a beam monitor that read nothing?)"
        )
    return normalization


def read_image(path: Path, what: str) -> np.ndarray:
    """A 2-D array from an EDF, TIFF, CBF, ... file (fabio) or a NumPy ``.npy`` file."""
    path = Path(path)
    if not path.is_file():
        raise GeometryError(f"{what} file not found: {path}")
    try:
        data = (
            np.load(path, allow_pickle=False)
            if path.suffix == ".npy"
            else fabio.open(str(path)).data
        )
    except Exception as error:
        raise GeometryError(f"{what} file {path} cannot be read: {error}") from error
    if data is None or np.asarray(data).ndim != 2:
        raise GeometryError(f"{what} file {path} does not hold a 2-D image")
    return np.asarray(data)


def read_correction(path: Path, what: str) -> np.ndarray:
    """A mask, dark or flat image (:func:`read_image`) whose values can serve: a dark needs a
    finite value (its NaN or infinite pixels are masked, see :class:`LineOutIntegrator`), a
    flat must be finite and positive everywhere. :class:`GeometryError` otherwise, naming
    the file, so that a bad correction is a setup error, not a failure of every frame."""
    image = read_image(path, what)
    finite = np.isfinite(image)
    if what == "dark" and not finite.any():
        raise GeometryError(f"the dark image {path} holds no finite value (all NaN or infinite)")
    if what == "flat":
        usable = finite & (image > 0)
        if not usable.any():
            raise GeometryError(
                f"the flat image {path} holds no finite positive value (all NaN, infinite, zero "
                "or negative)"
            )
        if not usable.all():
            raise GeometryError(
                f"flat field {path} must be finite and positive: {image.size - usable.sum()} of "
                f"its {image.size} pixels are not"
            )
    return image


def sector_pixel_bins(
    geometry: AzimuthalIntegrator, grid: QGrid, config: IntegrationConfig, margin: float = 0.0
) -> np.ndarray:
    """Index of the q bin each pixel falls in, -1 outside the sector, the grid or the mask.

    ``margin`` (a fraction of a bin, and of a degree in chi) drops pixels that sit that close
    to a bin edge or a sector edge, so that a simulator using these bins agrees exactly
    with pyFAI's own assignment despite rounding.
    """
    q = geometry.center_array(unit="q_nm^-1")
    position = (q - grid.radial_range_nm[0]) / grid.bin_width_nm
    bins = np.floor(position).astype(np.int64)
    fraction = position - bins
    inside = (
        (bins >= 0) & (bins < grid.n_points) & (fraction >= margin) & (fraction <= 1.0 - margin)
    )
    if config.azimuth_range_deg is not None:
        low, high = config.azimuth_range_deg
        chi = np.degrees(geometry.center_array(unit="chi_rad"))
        inside &= (chi >= low + margin) & (chi <= high - margin)
    mask = geometry.detector.mask
    if mask is not None:
        inside &= ~mask.astype(bool)
    return np.where(inside, bins, -1)


class LineOutIntegrator:
    """Integrates frames of one detector geometry onto the model's q grid (one per process).

    Args:
        config: geometry, mask, dark, flat, sector and engine (saved with the results).
        grid: the model's q grid.
    """

    def __init__(self, config: IntegrationConfig, grid: QGrid) -> None:
        self.config = config
        self.grid = grid
        self.geometry = load_geometry(config.poni)
        self._owner: int | None = None
        self.shape: tuple[int, int] | None = None
        #: Where :attr:`shape` came from (the PONI's detector, a mask/dark/flat file, or the
        #: first frame), for the message of a frame of another shape.
        self.shape_from = ""
        self.pixels_per_bin = np.zeros(grid.n_points, np.int64)
        self.csr: CsrEngine | None = None
        # read (and checked) once; where the PONI names no detector, they fix the shape
        self._images = {
            what: read_correction(path, what)
            for path, what in ((config.mask, "mask"), (config.dark, "dark"), (config.flat, "flat"))
            if path is not None
        }
        detector = self.geometry.detector
        if detector.shape is not None:
            if config.detector_shape not in (None, tuple(detector.shape)):
                raise GeometryError(
                    f"detector shape {config.detector_shape} given, but the PONI "
                    f"{config.poni or DEFAULT_PONI} names the detector {detector.name} of "
                    f"shape {tuple(detector.shape)}"
                )
            self._build(
                tuple(detector.shape),
                f"the detector {detector.name} of the PONI {config.poni or DEFAULT_PONI}",
            )
        elif config.detector_shape is not None:
            self._build(
                config.detector_shape,
                "the frame files' headers (the shape of most frames): "
                + self._no_detector(config.detector_shape),
            )
        elif self._images:
            what, image = next(iter(self._images.items()))
            self._build(
                image.shape,
                f"the {what} file {getattr(config, what)}: {self._no_detector(image.shape)}",
            )

    def _no_detector(self, shape: tuple[int, ...]) -> str:
        """What to write into a PONI file that names no detector, so that it fixes ``shape``."""
        detector = self.geometry.detector
        rows, columns = shape
        return (
            f"the PONI {self.config.poni} names no detector (add Detector: NAME, e.g. Pilatus1M, "
            f'or Detector: Detector with Detector_config: {{"pixel1": {detector.pixel1:g}, '
            f'"pixel2": {detector.pixel2:g}, "max_shape": [{rows}, {columns}]}})'
        )

    def _build(self, shape: tuple[int, int], origin: str) -> None:
        """Masks, dark, flat and the pyFAI engine for frames of ``shape``, taken from
        ``origin`` (once). Pixels where the dark is NaN or infinite are masked."""
        config = self.config
        shape = (int(shape[0]), int(shape[1]))
        for what, image in self._images.items():
            if image.shape != shape:
                raise GeometryError(
                    f"{what} file {getattr(config, what)} is {image.shape}, the detector is "
                    f"{shape} ({origin})"
                )
        mask = np.zeros(shape, bool)
        if self.geometry.detector.mask is not None:  # the detector's own gaps
            mask |= self.geometry.detector.mask.astype(bool)
        if "mask" in self._images:
            mask |= self._images["mask"] != 0
        dark = self._images.get("dark")
        if dark is not None:
            unusable = ~np.isfinite(dark)
            mask |= unusable
            dark = np.where(unusable, 0.0, dark)
        self.mask = mask.astype(np.int8)
        # pyFAI's engine truncates a pixel's bin position towards zero, so pixels whose
        # centres lie up to a bin below the grid's first edge would be summed into bin 0:
        # they are left out, as every pixel outside the grid is
        q_nm = self.geometry.center_array(shape, unit="q_nm^-1")
        low, high = self.grid.radial_range_nm
        #: the mask pyFAI's engine is given: masked pixels and those outside the q grid
        self.binning_mask = (mask | (q_nm < low) | (q_nm >= high)).astype(np.int8)
        self.dark = None if dark is None else dark.astype(np.float32)
        flat = self._images.get("flat")
        self.flat = None if flat is None else flat.astype(np.float32)
        self._images = {}
        self.shape, self.shape_from = shape, origin
        empty = self._integrate(np.zeros(shape, np.float32), dummy=None, dark=False)
        self.pixels_per_bin = np.asarray(empty.count, dtype=np.int64)
        if config.method == "csr":  # pyFAI's matrix applied to the pixels it names
            self.csr = CsrEngine.of(self.geometry, self.dark, self.flat)
        self.dark_counts = (
            np.zeros(self.grid.n_points)
            if self.dark is None
            else np.asarray(self._integrate(self.dark, dummy=None, dark=False).sum_signal)
        )
        if not self.pixels_per_bin.any():
            raise NoPixelInRange(
                f"no pixel of the geometry in {config.poni or DEFAULT_PONI} falls in the q range "
                f"{self.grid.radial_range_nm} 1/nm inside the sector {config.azimuth_range_deg}",
                self,
            )

    def _integrate(self, frame: np.ndarray, dummy: tuple[float, float] | None, dark: bool = True):
        low, high = self.config.azimuth_range_deg or (None, None)
        return self.geometry.integrate1d(
            frame,
            self.grid.n_points,
            unit="q_nm^-1",
            radial_range=self.grid.radial_range_nm,
            azimuth_range=None if low is None else (low, high),
            mask=self.binning_mask,
            dummy=None if dummy is None else dummy[0],
            delta_dummy=None if dummy is None else dummy[1],
            dark=self.dark if dark else None,
            flat=self.flat,
            correctSolidAngle=False,
            polarization_factor=None,
            method=("no", self.config.method, "cython"),
        )

    def validate(self, frame: np.ndarray) -> None:
        """Raise :class:`FrameError` for a frame this geometry cannot integrate."""
        self.validate_layout(frame)
        kind = frame.dtype.kind
        if kind == "u":
            return
        finite = np.isfinite(frame) if kind == "f" else None
        n_not_finite = 0 if finite is None else int(np.count_nonzero(~finite))
        least = float(frame.min()) if not n_not_finite else 0.0
        error = value_error(kind, n_not_finite, least)
        if error is not None:
            raise FrameError(error)

    def validate_layout(self, frame: np.ndarray) -> None:
        """Raise :class:`FrameError` for a frame whose dimensions or type this geometry
        cannot integrate (its values are not looked at)."""
        if frame.ndim != 2:
            raise FrameError(f"frame shape {frame.shape} is not a 2-D image")
        if self.shape is not None and tuple(frame.shape) != self.shape:
            raise FrameError(
                f"frame shape {frame.shape} does not match the detector shape {self.shape}, "
                f"taken from {self.shape_from}"
            )
        if frame.dtype.kind not in "uif":
            raise FrameError(f"frame dtype {frame.dtype} is not numeric")

    @staticmethod
    def dummy(frame: np.ndarray) -> tuple[float, float] | None:
        """The bad-pixel marker of this frame's dtype as pyFAI (dummy, delta_dummy)."""
        if frame.dtype.kind == "u":
            return float(np.iinfo(frame.dtype).max), 0.5
        if frame.dtype.kind == "i":
            return SIGNED_DUMMY, SIGNED_DELTA_DUMMY
        return None

    def _sums(self, frame: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per bin: the valid pixels, their dark-subtracted signal and their flat (float64)."""
        if self.csr is not None:
            return self.csr.sums(frame, self.dummy(frame))
        if frame.dtype == np.float32 and not frame.flags.writeable:
            # pyFAI's engine takes float32 frames as they are, through a typed memoryview that
            # refuses read-only buffers (a read-ahead slot, np.frombuffer); it converts every
            # other dtype into a new array, so only this one needs a copy
            frame = frame.copy()
        result = self._integrate(frame, self.dummy(frame))
        return tuple(  # type: ignore[return-value]
            np.asarray(value, dtype=np.float64)
            for value in (result.count, result.sum_signal, result.sum_normalization)
        )

    def integrate(
        self, frame: np.ndarray, normalization: float = 1.0, source: str | None = None
    ) -> LineOut:
        """The line-out of one frame (see the module doc); ``normalization`` is the exposure's
        monitor times transmission, kept with the line-out; ``source`` (the exposure's
        ``metadata["source"]``) names the frame where its shape becomes the detector's (a PONI
        without a detector, no mask, dark or flat)."""
        thread = threading.get_ident()
        if self._owner is None:
            self._owner = thread
            if self.config.openmp_threads is not None:  # OpenMP's setting is per thread
                threadpool_limits(limits=self.config.openmp_threads, user_api="openmp")
        elif self._owner != thread:
            raise RuntimeError(
                "a LineOutIntegrator is used from a second thread: pyFAI's engine is not "
                "thread-safe; make one integrator per thread or process"
            )
        if not (np.isfinite(normalization) and normalization > 0):
            raise FrameError(f"normalization {normalization} must be finite and positive")
        self.validate(frame)
        if self.shape is None:
            first = "the first frame" if source is None else f"the first frame, {source}"
            self._build(frame.shape, f"{first}: {self._no_detector(frame.shape)}")
        count, signal, flat_sum = self._sums(frame)
        marked = int(self.pixels_per_bin.sum() - count.sum())
        error = region_error(
            marked,
            int(self.pixels_per_bin.sum()),
            self.config.max_bad_pixel_fraction,
            bool((signal > 0).any()),
            frame.dtype.name,
        )
        if error is not None:
            raise FrameError(error)
        counts, counts_sd = line_out_values(
            count, signal, flat_sum, self.pixels_per_bin, np.asarray(self.dark_counts)
        )
        return LineOut(
            q_nm=self.grid.q_nm,
            counts=counts,
            counts_sd=counts_sd,
            normalization=float(normalization),
        )
