"""The records that travel through the pipeline: an :class:`Exposure` in, a :class:`LineOut` out
of integration, :class:`PosteriorSamples` out of inference."""

from __future__ import annotations

import math
import types
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from pipeline.sources.compression import EncodedFrame


@dataclass
class Exposure:
    """One detector frame of a scan.

    Attributes:
        scan_id: the scan this frame belongs to.
        index: frame index within the scan (the exposure id, unique per scan).
        timestamp: acquisition time, seconds since the epoch.
        frame: the 2D detector image (rows, columns), counts per pixel; ``None`` when the
            source could not read it (then ``error`` says why), or left it ``encoded``.
        truth: the true parameters by name, for simulated frames; ``None`` for measured ones.
        metadata: anything else the source knows; ``source`` names where the frame came from
            (file and frame number, stream endpoint and series), as text.
        error: why the frame could not be read (corrupt file, malformed message, ...), or
            ``None``. An exposure with an error still takes its place in the scan, so the
            results file records it.
        received_at: when the pipeline took the frame from a live source (a detector's
            stream), seconds since the epoch; ``None`` for archived frames. The scan's
            latencies count from the earlier of this and ``timestamp``.
        encoded: the image as the detector sent it, checked but still compressed, where the
            source left decoding to the integrator processes (a DECTRIS stream's
            ``decode_frames=False``); ``frame`` is then ``None``. :meth:`image` decodes it.
    """

    scan_id: str
    index: int
    timestamp: float
    frame: np.ndarray | None
    truth: dict[str, float] | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    received_at: float | None = None
    encoded: EncodedFrame | None = None

    def image(self) -> np.ndarray | None:
        """The frame, decoded from :attr:`encoded` where the source left it so (each call
        decodes again: :class:`~pipeline.sources.compression.FormatError`, naming the
        frame's source, for data that does not decode); ``None`` without either.

        Example:
            >>> Exposure("doc", 0, 0.0, np.zeros((2, 3), np.uint16)).image().shape
            (2, 3)
        """
        if self.frame is not None or self.encoded is None:
            return self.frame
        return self.encoded.decode(self.metadata.get("source"))


@dataclass
class LineOut:
    """A 1D line-out: photon counts per q bin with their Poisson standard deviation.

    ``normalization`` is the exposure's incident monitor times sample transmission (1 when
    unknown): the intensity is ``counts / normalization``.
    """

    q_nm: np.ndarray
    counts: np.ndarray
    counts_sd: np.ndarray
    normalization: float = 1.0


@dataclass
class PosteriorSamples:
    """Posterior draws for a batch of exposures: ``samples`` has shape (exposures, samples, parameters)."""

    samples: np.ndarray
    parameter_names: tuple[str, ...]
    parameter_units: tuple[str, ...]

    QUANTILES = (0.05, 0.5, 0.95)

    def summaries(self) -> dict[str, np.ndarray]:
        """Per-exposure ``mean`` and ``sd`` (exposures, parameters), ``quantiles``
        (exposures, 3, parameters) at :attr:`QUANTILES`, and, for a grating, the
        ``width_mode_weights`` (exposures, 2): the fractions of draws in the narrow-line
        (width < pitch / 2) and the wide-line solution, which give the same line-out.

        Example:
            >>> draws = np.array([[[100.0, 30.0], [100.0, 70.0], [100.0, 32.0], [100.0, 29.0]]])
            >>> PosteriorSamples(draws, ("pitch_nm", "width_nm"), ("nm", "nm")).summaries()[
            ...     "width_mode_weights"
            ... ].tolist()
            [[0.75, 0.25]]
        """
        return posterior_summaries(self.samples, self.parameter_names)


def posterior_summaries(samples: Any, parameter_names: tuple[str, ...]) -> dict[str, Any]:
    """:meth:`PosteriorSamples.summaries` of ``samples`` (exposures, samples, parameters), a
    numpy array or a torch tensor (then computed on its device: a GPU worker summarizes its
    draws where it drew them). Quantiles interpolate linearly between order statistics, as
    numpy's default does (torch's own ``quantile`` refuses tensors over 2**24 elements)."""
    levels = PosteriorSamples.QUANTILES
    xp: types.ModuleType  # the array library of samples: numpy or torch
    if isinstance(samples, np.ndarray):
        xp = np
        out = {
            "mean": samples.mean(axis=1),
            "sd": samples.std(axis=1, ddof=1),
            "quantiles": np.moveaxis(np.quantile(samples, levels, axis=1), 0, 1),
        }
    else:
        import torch

        xp = torch
        ordered = samples.sort(dim=1).values
        last = samples.shape[1] - 1
        quantiles = []
        for level in levels:
            below = math.floor(level * last)
            above = min(below + 1, last)
            fraction = level * last - below
            low, high = ordered[:, below], ordered[:, above]
            quantiles.append(low + fraction * (high - low))
        out = {
            "mean": samples.mean(1),
            "sd": samples.std(1),
            "quantiles": torch.stack(quantiles, 1),
        }
    if {"pitch_nm", "width_nm"} <= set(parameter_names):
        pitch = samples[..., parameter_names.index("pitch_nm")]
        width = samples[..., parameter_names.index("width_nm")]
        narrow = ((width < pitch / 2) * 1.0).mean(1)
        out["width_mode_weights"] = xp.stack([narrow, 1.0 - narrow], -1)
    return out
