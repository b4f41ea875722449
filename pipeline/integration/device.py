"""Line-outs of a batch of frames integrated on a torch device, for a model on the same device.

Where the inference workers integrate the frames themselves (``integrate_on_workers``, the
GPU mode), each batch of frames goes to the worker's device once: on CUDA the frames are
copied into page-locked (pinned) host memory and from there onto the device in one transfer
per batch; on a CPU they are stacked where they are. On the device, :class:`DeviceIntegrator`
checks their values (what :meth:`~pipeline.integration.LineOutIntegrator.validate` checks:
NaN, negative values), sums them with pyFAI's CSR matrix (:meth:`CsrEngine.batch_sums`) and
makes their line-outs by the rules every engine shares (:mod:`pipeline.integration.rules`).
The line-outs stay on the device, for the model; only what refuses a frame, a few numbers per
frame, comes back to the host. They equal
:meth:`LineOutIntegrator.integrate <pipeline.integration.LineOutIntegrator.integrate>`'s to
1e-6 relative (tested on CPU tensors, and on CUDA where there is one).

Example:
    >>> import numpy as np
    >>> from pipeline.config import IntegrationConfig
    >>> from pipeline.integration import LineOutIntegrator
    >>> from pipeline.physics import QGrid
    >>> integrator = LineOutIntegrator(IntegrationConfig(), QGrid())
    >>> on_device = DeviceIntegrator(integrator, "cpu")
    >>> frames = [np.full(integrator.shape, 2, np.uint32), np.zeros(integrator.shape, np.uint32)]
    >>> line_outs = on_device.integrate(frames)
    >>> bool((line_outs.counts[0].numpy() == integrator.integrate(frames[0]).counts).all())
    True
    >>> line_outs.errors
    [None, 'no counts in the integration region (an all-zero frame)']
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.integration import FrameError, LineOutIntegrator
from pipeline.integration.csr import CsrEngine
from pipeline.integration.rules import line_out_values, region_error, value_error


@dataclass(frozen=True)
class DeviceLineOuts:
    """The line-outs of a batch of frames, on the device: ``counts`` and ``counts_sd``
    (frames, n_points) float64 photons per bin, and for each frame why it cannot be
    integrated (``errors``, the text of a :class:`~pipeline.integration.FrameError`), or
    ``None``; a refused frame's row holds no line-out to use."""

    counts: torch.Tensor
    counts_sd: torch.Tensor
    errors: list[str | None]


class DeviceIntegrator:
    """Integrates batches of frames of ``integrator``'s geometry (the ``csr`` method, the
    frames' shape known) on ``device``; ``ValueError`` for another integrator.

    On CUDA, frames are staged in pinned host memory, one buffer per pixel type, kept and
    grown by doubling to hold the largest batch seen."""

    def __init__(self, integrator: LineOutIntegrator, device: str | torch.device) -> None:
        if integrator.csr is None or integrator.shape is None:
            raise ValueError(
                "frames are integrated on a device only with the csr method and a detector "
                "shape known before the first frame"
            )
        self.integrator = integrator
        self.device = torch.device(device)
        self.engine = (
            integrator.csr  # (on the host: the integrator's own)
            if self.device == integrator.csr.device
            else CsrEngine.of(integrator.geometry, integrator.dark, integrator.flat, device)
        )
        #: the pixels of the integration region, usable or not
        self.region = int(integrator.pixels_per_bin.sum())
        self._pixels_per_bin = torch.as_tensor(
            integrator.pixels_per_bin, dtype=torch.float64, device=self.device
        )
        self._dark_counts = torch.as_tensor(
            np.asarray(integrator.dark_counts), dtype=torch.float64, device=self.device
        )
        self._staging: dict[np.dtype, torch.Tensor] = {}

    def integrate(self, frames: Sequence[np.ndarray]) -> DeviceLineOuts:
        """The line-outs of ``frames`` (2-D arrays on the host, any pixel type pyFAI takes),
        in their order, on the device."""
        n_points = len(self._pixels_per_bin)
        counts = torch.zeros((len(frames), n_points), dtype=torch.float64, device=self.device)
        counts_sd = torch.zeros_like(counts)
        errors: list[str | None] = [None] * len(frames)
        by_dtype: dict[np.dtype, list[int]] = {}
        for position, frame in enumerate(frames):
            try:
                self.integrator.validate_layout(frame)
            except FrameError as refused:
                errors[position] = str(refused)
                continue
            by_dtype.setdefault(frame.dtype.newbyteorder("="), []).append(position)
        for dtype, positions in by_dtype.items():
            batch = self._on_device(dtype, [frames[p] for p in positions])
            group_counts, group_sd, group_errors = self._line_outs(batch, dtype)
            rows = torch.as_tensor(positions, device=self.device)
            counts[rows], counts_sd[rows] = group_counts, group_sd
            for position, error in zip(positions, group_errors, strict=True):
                errors[position] = error
        return DeviceLineOuts(counts, counts_sd, errors)

    def _on_device(self, dtype: np.dtype, frames: list[np.ndarray]) -> torch.Tensor:
        """``frames`` (all of ``dtype`` in native byte order) as one tensor on the device,
        (frames, rows, columns), copied once: through pinned memory to a GPU."""
        if self.device.type != "cuda":
            return torch.from_numpy(np.stack(frames).astype(dtype, copy=False))
        staging = self._staging.get(dtype)
        if staging is None or len(staging) < len(frames):  # grown by doubling, kept
            rows = max(len(frames), 2 * len(staging) if staging is not None else 1)
            shape = (rows, *frames[0].shape)
            like = torch.from_numpy(np.empty(0, dtype))
            staging = torch.empty(shape, dtype=like.dtype, pin_memory=True)
            self._staging[dtype] = staging
        host = staging[: len(frames)].numpy()
        for row, frame in zip(host, frames, strict=True):
            np.copyto(row, frame)  # converts the byte order where it differs
        # the caller's wait for the checks' numbers ends the transfer before the next batch
        return staging[: len(frames)].to(self.device, non_blocking=True)

    def _line_outs(
        self, batch: torch.Tensor, dtype: np.dtype
    ) -> tuple[torch.Tensor, torch.Tensor, list[str | None]]:
        """The counts, their errors and what refuses each frame of ``batch`` (of ``dtype``)."""
        dummy = LineOutIntegrator.dummy(np.empty(0, dtype))
        count, signal, flat_sum = self.engine.batch_sums(batch, dummy)
        counts, counts_sd = line_out_values(
            count, signal, flat_sum, self._pixels_per_bin, self._dark_counts
        )
        pixels = batch.reshape(len(batch), -1)
        if dtype.kind == "f":
            not_finite = (~torch.isfinite(pixels)).sum(dim=1)
        else:
            not_finite = torch.zeros(len(batch), dtype=torch.int64, device=self.device)
        least = (
            pixels.amin(dim=1).double()
            if dtype.kind != "u"
            else torch.zeros(len(batch), dtype=torch.float64, device=self.device)
        )
        marked = self.region - count.sum(dim=1)
        has_counts = (signal > 0).any(dim=1)
        # the few numbers per frame that say whether it is refused, in one copy to the host
        checks = torch.stack([not_finite.double(), least, marked, has_counts.double()]).cpu()
        errors = []
        for n_not_finite, smallest, n_marked, counted in checks.T.tolist():
            error = value_error(dtype.kind, int(n_not_finite), smallest)
            if error is None:
                error = region_error(
                    int(n_marked),
                    self.region,
                    self.integrator.config.max_bad_pixel_fraction,
                    bool(counted),
                    dtype.name,
                )
            errors.append(error)
        return counts, counts_sd, errors
