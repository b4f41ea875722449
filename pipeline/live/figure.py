"""The live page's figure (:class:`LiveFigure`): one PNG, drawn at most once per
``min_interval_s`` (5 s) whatever the frame rate, and only when someone asks for it and the
scan shows something new. A drawing costs about 0.4 s of a core on the 2-core machine
(matplotlib), so the figure follows the scan every 5 s, while the page's numbers, alarms and
table follow it every second.

Four panels:

- the newest detector frame as a thumbnail (log scale), with the outline of the pixels that
  are integrated: the sector (``azimuth_range_deg``) within the model's q range;
- the newest line-out with a posterior (counts + 0.5, log scale) and its posterior-predictive
  band (:func:`~pipeline.store.views.predictive_band`, 5-95%);
- pitch, width and sigma across the scan: median and 90% interval, flagged exposures as red
  crosses;
- the counts over time: taken, written, failed, flagged, and the rate written.
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable

import numpy as np

from pipeline.config import IntegrationConfig
from pipeline.instrument import Instrument
from pipeline.integration import load_geometry
from pipeline.live.view import LiveScanView
from pipeline.physics import GRATING_PARAMETERS, QGrid
from pipeline.store.integrity import open_for_reading
from pipeline.store.reader import rows_since, stored_instrument
from pipeline.store.views import predictive_band

#: Rows looked back for the newest one with a posterior.
LOOK_BACK = 16


class LiveFigure:
    """Draws the live page's figure of ``view`` (see the module docstring).

    Args:
        view: the scan.
        integration: its integration settings (geometry and sector: the thumbnail's outline).
        grid: the model's q grid.
        min_interval_s: least time between two drawings (seconds).
        clock: a monotonic clock in seconds (tests pass their own).
    """

    def __init__(
        self,
        view: LiveScanView,
        integration: IntegrationConfig,
        grid: QGrid,
        min_interval_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.view = view
        self.integration = integration
        self.grid = grid
        self.min_interval_s = min_interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._png = b""
        self._drawn_version = -1
        self._drawn_at = -np.inf
        self._outline: tuple[tuple[int, int, int], np.ndarray] | None = None
        self._instrument: Instrument | None = None
        #: drawings made (for tests and the benchmark)
        self.drawn = 0

    def png(self) -> bytes:
        """The figure as a PNG: drawn again if the scan changed and the last drawing is older
        than ``min_interval_s``, else the last one."""
        with self._lock:
            version = self.view.state().figure_version
            now = self._clock()
            stale = version != self._drawn_version
            if not self._png or (stale and now - self._drawn_at >= self.min_interval_s):
                self._png = self._draw()
                self._drawn_version, self._drawn_at = version, now
                self.drawn += 1
            return self._png

    def _draw(self) -> bytes:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        figure = Figure(figsize=(13, 7.5))
        FigureCanvasAgg(figure)
        # a fixed layout: matplotlib's tight layout would double the drawing's cost
        outer = figure.add_gridspec(
            2,
            2,
            width_ratios=(1, 1.6),
            left=0.06,
            right=0.97,
            bottom=0.07,
            top=0.96,
            wspace=0.22,
            hspace=0.28,
        )
        self._draw_thumbnail(figure.add_subplot(outer[0, 0]))
        self._draw_line_out(figure.add_subplot(outer[0, 1]))
        self._draw_counts(figure.add_subplot(outer[1, 0]))
        traces = outer[1, 1].subgridspec(len(GRATING_PARAMETERS), 1, hspace=0.08)
        index, quantiles, flagged = self.view.traces()
        for row, name in enumerate(GRATING_PARAMETERS):
            axis = figure.add_subplot(traces[row])
            if index.size:
                q = quantiles[:, :, row]
                axis.fill_between(index, q[:, 0], q[:, 2], alpha=0.3, step="mid")
                axis.plot(index, q[:, 1], ".-", ms=2, lw=0.7)
                axis.plot(index[flagged], q[flagged, 1], "rx", ms=5)
            axis.set_ylabel(name, fontsize=8)
            axis.tick_params(labelsize=7)
            if row < len(GRATING_PARAMETERS) - 1:
                axis.tick_params(labelbottom=False)
            else:
                axis.set_xlabel("exposure index (median, 90% interval; x: flagged)", fontsize=8)
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=72)
        return buffer.getvalue()

    def _draw_thumbnail(self, axis) -> None:
        thumbnail = self.view.thumbnail
        axis.set_xticks([])
        axis.set_yticks([])
        if thumbnail is None:
            axis.set_title("no frame yet", fontsize=9)
            return
        counts, stride = thumbnail.image()
        image = np.log10(np.clip(counts, 0, None) + 1)
        brightest = float(np.percentile(image, 99.5)) if image.size else 1.0
        axis.imshow(image, cmap="magma", vmin=0.0, vmax=max(brightest, 1.0))
        outline = self._sector(thumbnail.shape, stride, image.shape)
        if outline.any() and not outline.all():
            axis.contour(outline.astype(float), levels=[0.5], colors="cyan", linewidths=0.8)
        axis.set_title(f"frame {thumbnail.index} (log counts; cyan: integrated sector)", fontsize=9)

    def _sector(self, shape: tuple[int, int], stride: int, size: tuple[int, ...]) -> np.ndarray:
        """The pixels integrated, every ``stride``-th of a frame of ``shape``, cut to the
        thumbnail's ``size`` (computed once per shape)."""
        key = (*shape, stride)
        if self._outline is None or self._outline[0] != key:
            geometry = load_geometry(self.integration.poni)
            cut = (slice(0, size[0] * stride, stride), slice(0, size[1] * stride, stride))
            q_nm = geometry.center_array(shape, unit="q_nm^-1")[cut]
            low, high = self.grid.radial_range_nm
            inside = (q_nm >= low) & (q_nm < high)
            if self.integration.azimuth_range_deg is not None:
                chi = geometry.center_array(shape, unit="chi_deg")[cut]
                first, last = self.integration.azimuth_range_deg
                inside &= (chi >= first) & (chi <= last)
            self._outline = (key, inside)
        return self._outline[1]

    def _draw_line_out(self, axis) -> None:
        newest = self._newest_posterior()
        axis.set(xlabel="q (1/nm)", ylabel="counts + 0.5", yscale="log")
        if newest is None:
            axis.set_title("no line-out with a posterior yet", fontsize=9)
            return
        index, counts, samples, z = newest
        q_nm = self.grid.q_nm
        if len(samples):  # (none where the file stores the summaries alone)
            low, high = predictive_band(
                samples, self.grid, self._instrument, np.random.default_rng(index)
            )
            axis.fill_between(
                q_nm,
                low + 0.5,
                high + 0.5,
                color="C1",
                alpha=0.5,
                label="posterior predictive 5-95%",
            )
        axis.plot(q_nm, counts + 0.5, "k-", lw=0.7, label="measured")
        axis.legend(fontsize=8, loc="upper right")
        axis.set_title(f"exposure {index}: line-out (predictive z = {z:.1f})", fontsize=9)

    def _newest_posterior(self) -> tuple[int, np.ndarray, np.ndarray, float] | None:
        path = self.view.results_path
        try:
            if self._instrument is None:
                with open_for_reading(path) as handle:
                    self._instrument = stored_instrument(handle["entry"])
            columns = ("index", "status", "counts", "samples", "predictive_z")
            _, rows = rows_since(path, columns, start=-LOOK_BACK)
        except (OSError, KeyError, ValueError):  # not made yet
            return None
        ok = np.flatnonzero(rows["status"] == "ok")
        if ok.size == 0:
            return None
        row = int(ok[-1])
        return (
            int(rows["index"][row]),
            rows["counts"][row].astype(np.float64),
            rows["samples"][row],
            float(rows["predictive_z"][row]),
        )

    def _draw_counts(self, axis) -> None:
        history = self.view.history()
        axis.set(xlabel="time since the start (s)", ylabel="exposures")
        if len(history) < 2:
            axis.set_title("counts over time", fontsize=9)
            return
        t = history[:, 0] - history[0, 0]
        for column, label, style in (
            (1, "taken", "C0-"),
            (2, "written", "C2-"),
            (3, "failed", "C3-"),
            (4, "flagged", "C1--"),
        ):
            axis.plot(t, history[:, column], style, lw=1, label=label)
        rate = axis.twinx()
        written = history[:, 2] + history[:, 3]
        rate.plot(t[1:], np.diff(written) / np.maximum(np.diff(t), 1e-3), "k:", lw=0.8)
        rate.set_ylabel("written per s (dotted)", fontsize=8)
        axis.legend(fontsize=8, loc="upper left")
        axis.set_title("counts over time", fontsize=9)
