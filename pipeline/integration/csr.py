"""pyFAI's CSR matrix applied to the pixels it names, as a sparse tensor on any torch device.

pyFAI's ``integrate1d`` prepares the whole frame before its sparse product: it converts the
4.5 million pixels of an Eiger 4M to float32, checks each for the bad-pixel marker, subtracts
the dark, multiplies the flat. A sector of 512 q bins sums only the pixels inside it (37,815
of them for the default model's +-5 degrees), so almost all of that work is thrown away:
13.8 ms per frame on this project's build machine, against 0.2-0.3 ms for the whole
line-out when only the pixels the matrix names are prepared and summed.

:class:`CsrEngine` takes the CSR matrix of the engine pyFAI built for a geometry (no pixel
splitting: each pixel is summed whole into one bin), keeps only the columns of the pixels it
names, and per frame gathers those pixels and applies pyFAI's own preprocessing to them alone
(the rules of pyFAI's Cython preprocessing: float32 values; a pixel is left out where it or
the flat holds the bad-pixel marker, where the value, the dark-subtracted value or the flat is
not finite, and where the flat is 0; the dark subtracted in float32), then sums them per bin
in float64 with the matrix (a ``torch`` sparse CSR tensor on a device, scipy's CSR format on
the host). The sums are pyFAI's: the pixel count, the signal and the normalization (flat) of
each bin, equal to ``integrate1d``'s to 1e-6 relative (tested on the host, on CPU tensors,
and on CUDA where there is one).

On a GPU (``device="cuda"``), only the gathered pixels travel to the device (150 kB of an
Eiger 4M frame's 18 MB). A frame given as a numpy array is summed on the host with the same
rules in numpy and the matrix in scipy's CSR format (:class:`HostSums`), 3-4x faster on a CPU
than torch's sparse product: an Eiger 4M sector in 0.12 against 0.53 ms, the full ring in 2.2
against 7.5 ms (one thread, this project's build machine).

Example:
    >>> import numpy as np
    >>> from pipeline.config import IntegrationConfig
    >>> from pipeline.integration import LineOutIntegrator
    >>> from pipeline.physics import QGrid
    >>> integrator = LineOutIntegrator(IntegrationConfig(azimuth_range_deg=(-5, 5)), QGrid())
    >>> engine = CsrEngine.of(integrator.geometry, dark=None, flat=None)
    >>> frame = np.full(integrator.shape, 3, np.uint32)
    >>> count, signal, normalization = engine.sums(frame, dummy=(4294967295.0, 0.5))
    >>> bool((count == integrator.pixels_per_bin).all()), bool((signal == 3 * count).all())
    (True, True)
    >>> engine.n_pixels
    37815
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import numpy as np
import scipy.sparse
import torch
from pyFAI.integrator.azimuthal import AzimuthalIntegrator

from pipeline.integration.rules import Values

#: unsigned pixel types gathered as the signed type of their width
_SIGNED_TWIN = {torch.uint16: torch.int16, torch.uint32: torch.int32, torch.uint64: torch.int64}


class CsrEngine:
    """The CSR matrix ``(indptr, indices, data)`` of a 1-D pyFAI engine without pixel
    splitting (bins x pixels of the frame, flattened: each pixel in at most one bin),
    restricted to the pixels it names, on ``device``; ``dark`` and ``flat`` (frames of the
    detector's shape, or ``None``) as pyFAI is given them. ``ValueError`` for a matrix that
    splits pixels between bins.

    Per frame, the pixel count and the flat of each bin are their sums over every pixel the
    flat leaves usable (computed once) less those of the frame's few left-out pixels
    (markers, NaN), and the signal is one product of the matrix with the gathered,
    dark-subtracted values (left-out pixels set to 0)."""

    def __init__(
        self,
        indptr: np.ndarray,
        indices: np.ndarray,
        data: np.ndarray,
        dark: np.ndarray | None,
        flat: np.ndarray | None,
        device: str | torch.device = "cpu",
    ) -> None:
        self.device = torch.device(device)
        indices = np.asarray(indices, dtype=np.int64)
        #: the pixels the matrix names (indices into the flattened frame), ascending
        self.pixels = np.unique(indices)
        if len(self.pixels) != len(indices):
            raise ValueError("the matrix splits pixels between bins: only no splitting is kept")
        columns = np.searchsorted(self.pixels, indices)
        indptr = np.asarray(indptr, dtype=np.int64)
        coefficients = np.asarray(data, dtype=np.float32).astype(np.float64)
        self.n_bins = len(indptr) - 1
        with warnings.catch_warnings():  # "sparse CSR tensor support is in beta state"
            warnings.simplefilter("ignore", UserWarning)
            self.matrix = torch.sparse_csr_tensor(
                torch.as_tensor(indptr),
                torch.as_tensor(columns),
                torch.as_tensor(coefficients),
                size=(self.n_bins, len(self.pixels)),
                device=self.device,
            )
        # each pixel's bin and coefficient, by column
        by_column = np.argsort(columns)
        bin_of = np.repeat(np.arange(self.n_bins), np.diff(indptr))
        self._bin_of = torch.as_tensor(bin_of[by_column], device=self.device)
        self._coefficient = torch.as_tensor(coefficients[by_column], device=self.device)
        self._pixels = torch.as_tensor(self.pixels, device=self.device)
        self._dark = self._region(dark)
        self._flat = self._region(flat)
        normalization = self._flat if self._flat is not None else self._ones()
        # pixels pyFAI leaves out whatever the frame: a flat that is 0 or not finite
        self._flat_invalid = ~torch.isfinite(normalization) | (normalization == 0)
        self._normalization = torch.where(self._flat_invalid, 0.0, normalization).double()
        self._valid_count = self._per_bin((~self._flat_invalid).double())
        self._normalization_sum = self._per_bin(self._normalization)

    @functools.cached_property
    def host(self) -> HostSums:
        """This engine on the host, for numpy frames (made when first needed: an engine on a
        device that only sums tensors never needs it)."""
        return HostSums(self)

    @classmethod
    def of(
        cls,
        geometry: AzimuthalIntegrator,
        dark: np.ndarray | None,
        flat: np.ndarray | None,
        device: str | torch.device = "cpu",
    ) -> CsrEngine:
        """The engine of the 1-D CSR integration without pixel splitting that ``geometry``
        last built (an ``integrate1d`` call with ``method=("no", "csr", "cython")`` builds
        it); ``LookupError`` when there is none."""
        for method, engine in geometry.engines.items():
            if (method.dim, method.split_lower, method.algo_lower) == (1, "no", "csr"):
                csr = engine.engine
                return cls(csr.indptr, csr.indices, csr.data, dark, flat, device)
        raise LookupError("the geometry has no 1-D CSR engine without pixel splitting")

    @property
    def n_pixels(self) -> int:
        """Pixels of the frame that the matrix sums."""
        return len(self.pixels)

    def _ones(self) -> torch.Tensor:
        return torch.ones(self.n_pixels, dtype=torch.float32, device=self.device)

    def _region(self, image: np.ndarray | None) -> torch.Tensor | None:
        """The float32 values of ``image`` at the matrix's pixels, on the device."""
        if image is None:
            return None
        values = np.ascontiguousarray(image).reshape(-1)[self.pixels].astype(np.float32)
        return torch.as_tensor(values, device=self.device)

    def _per_bin(self, values: torch.Tensor) -> torch.Tensor:
        """The matrix times ``values`` (float64, one per pixel): their sum in each bin."""
        return self.matrix @ values

    def sums(
        self,
        frame: np.ndarray | torch.Tensor,
        dummy: tuple[float, float] | None,
        dark: bool = True,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """pyFAI's per-bin sums of ``frame`` (a numpy array, summed on the host by
        :class:`HostSums`, or a tensor, summed on this engine's device): the valid pixels,
        their signal (dark subtracted unless ``dark`` is false) and their normalization (the
        flat), each float64. ``dummy``: the bad-pixel marker and its
        tolerance (pyFAI's ``dummy`` and ``delta_dummy``), ``None`` for none."""
        if not isinstance(frame, torch.Tensor):
            return self.host.sums(frame, dummy, dark)
        totals = self.batch_sums(frame.to(self.device).unsqueeze(0), dummy, dark)
        sums = totals[:, 0].cpu().numpy()
        return sums[0], sums[1], sums[2]

    def batch_sums(
        self,
        frames: torch.Tensor,
        dummy: tuple[float, float] | None,
        dark: bool = True,
    ) -> torch.Tensor:
        """:meth:`sums` of a batch of frames (frames, rows, columns) on this engine's device,
        without leaving it: (3, frames, bins) float64, the valid pixels, signal and
        normalization of each frame's bins."""
        pixels = frames.reshape(len(frames), -1)
        if frames.dtype in _SIGNED_TWIN:  # CUDA does not index most unsigned types
            gathered = pixels.view(_SIGNED_TWIN[frames.dtype])[:, self._pixels].double()
            # the negative values of the signed type are the top half of the unsigned range
            width = 2.0 ** (8 * frames.element_size())
            values = torch.where(gathered < 0, gathered + width, gathered).to(torch.float32)
        else:
            values = pixels[:, self._pixels].to(torch.float32)
        return self._region_sums(values, dummy, dark)

    def _region_sums(
        self,
        values: torch.Tensor,
        dummy: tuple[float, float] | None,
        dark: bool,
    ) -> torch.Tensor:
        """The sums of :meth:`batch_sums` from the float32 values of the matrix's pixels,
        (frames, pixels)."""
        left_out = left_out_by_value(values, self._flat, dummy, torch.isfinite)
        signal = values - self._dark if dark and self._dark is not None else values
        left_out |= ~torch.isfinite(signal)  # a dark that is not finite
        signal = signal.masked_fill(left_out | self._flat_invalid, 0.0).double()
        # the pixels each frame leaves out that the flat did not: out of the static sums
        frame, pixel = (left_out & ~self._flat_invalid).nonzero(as_tuple=True)
        bins = frame * self.n_bins + self._bin_of[pixel]
        weights = self._coefficient[pixel]
        n_frames = len(values)

        def left_out_sums(weights: torch.Tensor) -> torch.Tensor:
            summed = torch.bincount(bins, weights, minlength=n_frames * self.n_bins)
            return summed.reshape(n_frames, self.n_bins)

        count = self._valid_count - left_out_sums(weights)
        normalization = self._normalization_sum - left_out_sums(
            weights * self._normalization[pixel]
        )
        signal_sums = (self.matrix @ signal.T.contiguous()).T  # a dense operand in row order
        return torch.stack([count, signal_sums, normalization])


class HostSums:
    """:meth:`CsrEngine.sums` of numpy frames, on the host: the engine's rules
    (:meth:`CsrEngine._region_sums`) in numpy, with its matrix in scipy's CSR format (scipy's
    product of an Eiger 4M sector is 8x faster than torch's on a CPU core). The device
    integration's tests compare the two to 1e-6.

    Example:
        >>> import numpy as np
        >>> engine = CsrEngine(
        ...     indptr=[0, 2, 3], indices=[0, 3, 1], data=[1.0, 1.0, 1.0], dark=None, flat=None
        ... )
        >>> count, signal, flat = engine.host.sums(np.array([[5, 7], [0, 3]], np.uint16), None)
        >>> count.tolist(), signal.tolist(), flat.tolist()
        ([2.0, 1.0], [8.0, 7.0], [2.0, 1.0])
    """

    def __init__(self, engine: CsrEngine) -> None:
        def host(tensor: torch.Tensor) -> np.ndarray:
            return tensor.cpu().numpy()

        matrix = engine.matrix
        self.pixels = engine.pixels
        self.n_bins = engine.n_bins
        self.matrix = scipy.sparse.csr_matrix(
            (host(matrix.values()), host(matrix.col_indices()), host(matrix.crow_indices())),
            shape=tuple(matrix.shape),
        )
        self._bin_of = host(engine._bin_of)
        self._coefficient = host(engine._coefficient)
        self._dark = host(engine._dark) if engine._dark is not None else None
        self._flat = host(engine._flat) if engine._flat is not None else None
        self._flat_invalid = host(engine._flat_invalid)
        self._normalization = host(engine._normalization)
        self._valid_count = host(engine._valid_count)
        self._normalization_sum = host(engine._normalization_sum)

    def sums(
        self, frame: np.ndarray, dummy: tuple[float, float] | None, dark: bool = True
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The valid pixels, signal and normalization of each bin of ``frame`` (float64), as
        :meth:`CsrEngine.sums`."""
        values = np.ascontiguousarray(frame).reshape(-1)[self.pixels].astype(np.float32)
        left_out = left_out_by_value(values, self._flat, dummy, np.isfinite)
        signal = values - self._dark if dark and self._dark is not None else values
        left_out |= ~np.isfinite(signal)  # a dark that is not finite
        signal = np.where(left_out | self._flat_invalid, 0.0, signal).astype(np.float64)
        # the pixels this frame leaves out that the flat did not: out of the static sums
        (pixel,) = np.nonzero(left_out & ~self._flat_invalid)
        bins = self._bin_of[pixel]
        weights = self._coefficient[pixel]
        count = self._valid_count - np.bincount(bins, weights, minlength=self.n_bins)
        normalization = self._normalization_sum - np.bincount(
            bins, weights * self._normalization[pixel], minlength=self.n_bins
        )
        return count, self.matrix @ signal, normalization


def left_out_by_value(
    values: Values,
    flat: Values | None,
    dummy: tuple[float, float] | None,
    isfinite: Callable[[Values], Values],
) -> Values:
    """The pixels pyFAI leaves out of a frame (``values``: the gathered pixels, float32,
    numpy or torch) besides those of the flat: values that are not finite (integer pixels
    always are), and values or flat pixels that hold the marker ``dummy`` (pyFAI's Cython
    preprocessing, in float32: within the tolerance, or equal where it is 0; the dark is not
    checked).

    Example:
        >>> values = np.array([1.0, np.nan, 65535.0], np.float32)
        >>> left_out_by_value(values, None, (65535.0, 0.5), np.isfinite).tolist()
        [False, True, True]
    """
    left_out = ~isfinite(values)
    if dummy is None:
        return left_out
    marker, tolerance = dummy  # python floats: compared in the images' float32
    for image in (values, flat):
        if image is None:
            continue
        if tolerance == 0:
            left_out |= image == marker
        else:
            left_out |= abs(image - marker) <= tolerance
    return left_out
