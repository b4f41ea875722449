"""The rules that turn a frame's per-bin sums into a line-out, shared by every engine.

:class:`~pipeline.integration.LineOutIntegrator` integrates one frame on the host and
:class:`~pipeline.integration.device.DeviceIntegrator` a batch of frames on a torch device;
both refuse the same frames with the same words and make the same line-outs from the sums of
pyFAI's engine (:class:`~pipeline.integration.csr.CsrEngine`), so these rules are written once
here: :func:`value_error` (what a frame's pixel values may be), :func:`region_error` (how
much of the integration region it must leave usable) and :func:`line_out_values` (counts and
their Poisson errors, for any batch shape, with numpy on the host and torch on a device).

Example:
    >>> count = np.array([4.0, 0.0])
    >>> counts, counts_sd = line_out_values(
    ...     count, signal=np.array([8.0, 0.0]), flat_sum=np.array([4.0, 0.0]),
    ...     pixels_per_bin=np.array([4.0, 2.0]), dark_counts=np.zeros(2))
    >>> counts.tolist(), counts_sd.tolist()
    ([8.0, 0.0], [2.8284271247461903, 1.0])
    >>> value_error("i", n_not_finite=0, least=-5)
    'frame holds negative pixel values (least -5) other than the bad-pixel markers -1 and -2'
"""

from __future__ import annotations

from typing import Any, TypeVar

import numpy as np
import torch

#: per-bin values: numpy arrays on the host, or torch tensors (on any device)
Values = TypeVar("Values", np.ndarray, torch.Tensor)


def value_error(kind: str, n_not_finite: int, least: float) -> str | None:
    """Why a frame whose dtype is of numpy ``kind`` (``u``, ``i``, ``f``), with
    ``n_not_finite`` NaN or infinite pixels and ``least`` as its smallest value, cannot be
    integrated; ``None`` when it can. Signed integer frames may hold the markers -1 and -2."""
    if kind == "f":
        if n_not_finite:
            return f"frame holds {n_not_finite} NaN or infinite pixel values"
        if least < 0:
            return f"frame holds negative pixel values (least {least:g})"
    elif kind == "i" and least < -2:
        return (
            f"frame holds negative pixel values (least {int(least)}) other than the "
            "bad-pixel markers -1 and -2"
        )
    return None


def region_error(
    marked: int,
    region: int,
    max_bad_fraction: float,
    has_counts: bool,
    dtype_name: str,
) -> str | None:
    """Why a frame cannot be integrated that leaves out ``marked`` of the ``region`` pixels
    of the integration region (more than ``max_bad_fraction`` of them: saturated, or the gaps
    of a signed ``dtype_name`` frame) or holds no counts there (not ``has_counts``); ``None``
    when it can."""
    if marked > max_bad_fraction * region:
        share = f"more than the {max_bad_fraction:.0%} allowed"
        if dtype_name.startswith("int"):  # signed frames mark only -1 and -2
            return (
                f"{marked} of the {region} pixels of the integration region are detector "
                f"gaps or bad pixels (negative values -1, -2), {share}: does the sector lie "
                "on the module gaps, or is the frame from another detector?"
            )
        return (
            f"{marked} of the {region} pixels of the integration region hold the largest "
            f"value of {dtype_name} (saturated or bad pixels), {share}: the frame is saturated"
        )
    if not has_counts:
        return "no counts in the integration region (an all-zero frame)"
    return None


def line_out_values(
    count: Values,
    signal: Values,
    flat_sum: Values,
    pixels_per_bin: Values,
    dark_counts: Values,
) -> tuple[Values, Values]:
    """The counts of each bin and their Poisson standard deviation, from pyFAI's sums (the
    bins' valid ``count``, dark-subtracted ``signal`` and ``flat_sum``, float64; any leading
    batch axes), the geometry's ``pixels_per_bin`` and the dark's sum in each bin
    (``dark_counts``, zeros without a dark): numpy arrays, or torch tensors on one device.

    A bin's counts are its signal divided by the mean flat of its pixels, and not below zero
    (a dark that exceeds the frame); their variance is that of the raw counts (signal plus
    the dark's share of the bin's valid pixels), at least 1, on the same scale."""
    xp: Any = torch if isinstance(count, torch.Tensor) else np
    has_pixels = count > 0
    # the bin's mean flat: the normalization is the sum of the flat over the bin's pixels
    scale = xp.where(has_pixels, count / xp.where(has_pixels, flat_sum, 1.0), 0.0)
    in_geometry = pixels_per_bin > 0
    share = xp.where(in_geometry, count / xp.where(in_geometry, pixels_per_bin, 1.0), 0.0)
    raw = signal + dark_counts * share
    counts = signal * scale
    counts = xp.where(counts > 0, counts, 0.0)
    counts_sd = xp.sqrt(xp.where(raw > 1.0, raw, 1.0)) * xp.where(has_pixels, scale, 1.0)
    return counts, counts_sd
