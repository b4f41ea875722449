"""Looking at a results file: a summary table and PNG plots (``beamline-inn show``).

- :func:`summary_table`: one line per exposure: status, quality flag, and the posterior
  median with its 90% interval for pitch, width and sigma (or the error of a failed one);
- :func:`write_plots`: the parameter traces across the scan with their 90% bands; for one
  exposure, its line-out with the posterior-predictive band (5-95% of line-outs simulated
  from 200 of its posterior draws, Poisson noise included, with the background weights of
  the file's instrument; none in its masked bins, whose counts are NaN) and a corner plot of
  its posterior (:func:`predictive_band`);
- :func:`live_view_png`: the same traces while a scan runs, beside the newest exposure's
  posterior marginals, as one PNG (drawn without pyplot, so from any thread).

Example:
    >>> import tempfile, numpy as np
    >>> from pathlib import Path
    >>> from pipeline.physics import simulate
    >>> from pipeline.store import ExposureResult, ResultsWriter, open_results
    >>> theta, counts = simulate(1, np.random.default_rng(0))
    >>> path = Path(tempfile.mkdtemp()) / "scan.h5"
    >>> names = ("pitch_nm", "width_nm", "sigma_nm", "n_photons", "background")
    >>> with ResultsWriter(path, names, ("nm",) * 3 + ("", ""), 3, np.linspace(0.01, 0.4, 512)) as w:
    ...     w.append(ExposureResult(0, 0.0, status="failed", error="truncated file"))
    True
    >>> print(summary_table(open_results(path)).splitlines()[-1])
        0  failed  truncated file
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipeline.instrument import Instrument
from pipeline.physics import GRATING_PARAMETERS, QGrid, expected_counts
from pipeline.store.results import Results


def summary_table(results: Results, exposures: list[int] | None = None) -> str:
    """A text table of ``exposures`` (indices; default all) of ``results``."""
    columns = [results.parameter_names.index(name) for name in GRATING_PARAMETERS]
    header = f"{'index':>5}  {'status':<7} " + "".join(
        f"{name + ' median [5%, 95%]':>30}" for name in GRATING_PARAMETERS
    )
    lines = [header]
    for row, index in enumerate(results.index):
        if exposures is not None and int(index) not in exposures:
            continue
        if results.status[row] != "ok":
            lines.append(f"{index:>5}  {results.status[row]:<7} {results.error[row]}")
            continue
        q05, q50, q95 = results.quantiles[row][:, columns]
        cells = "".join(
            f"{f'{m:.1f} [{lo:.1f}, {hi:.1f}]':>30}"
            for lo, m, hi in zip(q05, q50, q95, strict=True)
        )
        flag = "  FLAGGED: not a grating?" if results.flagged[row] else ""
        lines.append(f"{index:>5}  {'ok':<7} {cells}{flag}")
    return "\n".join(lines)


def write_plots(results: Results, out_dir: Path, exposure: int | None = None) -> list[Path]:
    """Traces across the scan, and the line-out and corner plot of ``exposure`` (default:
    the first exposure with a posterior); return the files written. A file that stores no
    draws (``store.stored_samples`` 0) gives the line-out without its predictive band, and
    no corner plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ok = results.status == "ok"
    if not ok.any():
        raise ValueError("no exposure of this file has a posterior to plot")
    written = []

    columns = [results.parameter_names.index(name) for name in GRATING_PARAMETERS]
    figure, axes = plt.subplots(
        len(GRATING_PARAMETERS), 1, figsize=(8, 2.2 * len(GRATING_PARAMETERS)), sharex=True
    )
    for axis, name, column in zip(axes, GRATING_PARAMETERS, columns, strict=True):
        q = results.quantiles[ok][:, :, column]
        axis.fill_between(results.index[ok], q[:, 0], q[:, 2], alpha=0.3, label="90% interval")
        axis.plot(results.index[ok], q[:, 1], ".-", ms=3, label="median")
        flagged = ok & results.flagged
        axis.plot(results.index[flagged], results.quantiles[flagged][:, 1, column], "rx")
        axis.set_ylabel(f"{name}")
    axes[0].legend(loc="upper right", fontsize=8)
    axes[-1].set_xlabel("exposure index")
    axes[0].set_title(f"Scan {results.scan_id}: posterior across the scan (x: flagged)")
    written.append(_save(figure, out_dir / "traces.png"))

    rows = np.flatnonzero(ok) if exposure is None else np.flatnonzero(results.index == exposure)
    if rows.size == 0:
        raise ValueError(f"exposure {exposure} is not in the file")
    row = int(rows[0])
    if results.status[row] != "ok":
        raise ValueError(f"exposure {exposure} failed ({results.error[row]}): nothing to plot")
    index = int(results.index[row])
    samples = results.samples[row]

    figure, axis = plt.subplots(figsize=(8, 4))
    if len(samples):
        low, high = predictive_band(
            samples, _grid(results), results.instrument, np.random.default_rng(index)
        )
        axis.fill_between(
            results.q_nm,
            low + 0.5,
            high + 0.5,
            color="C1",
            alpha=0.5,
            label="posterior predictive, 5-95%",
        )
    axis.plot(results.q_nm, results.counts[row] + 0.5, "k-", lw=0.7, label="measured")
    axis.set(
        yscale="log",
        xlabel="q (1/nm)",
        ylabel="counts + 0.5",
        title=f"Exposure {index}: z = {results.predictive_z[row]:.1f}",
    )
    axis.legend(fontsize=8)
    written.append(_save(figure, out_dir / f"lineout_{index:06d}.png"))
    if not len(samples):  # the summaries alone were stored
        return written

    n = len(results.parameter_names)
    figure, axes = plt.subplots(n, n, figsize=(2 * n, 2 * n))
    for i in range(n):
        for j in range(n):
            axis = axes[i, j]
            if j > i:
                axis.axis("off")
            elif i == j:
                axis.hist(samples[:, i], bins=40, color="C0")
            else:
                axis.plot(samples[:, j], samples[:, i], ",", alpha=0.5)
            if i == n - 1:
                axis.set_xlabel(f"{results.parameter_names[j]} ({results.parameter_units[j]})")
            if j == 0 and i > 0:
                axis.set_ylabel(results.parameter_names[i])
    figure.suptitle(f"Exposure {index}: posterior ({len(samples)} draws)")
    written.append(_save(figure, out_dir / f"corner_{index:06d}.png"))
    return written


def predictive_band(
    samples: np.ndarray,
    grid: QGrid,
    instrument: Instrument | None,
    rng: np.random.Generator,
    n_draws: int = 200,
) -> tuple[np.ndarray, np.ndarray]:
    """The 5% and 95% of line-outs simulated from ``n_draws`` of an exposure's posterior
    ``samples`` (samples, parameters), Poisson noise included, with the background weights
    of ``instrument`` (``None``: a file from before instruments, weights 1); NaN in the bins
    it does not observe (masked: their counts are NaN too).

    >>> from pipeline.physics import simulate
    >>> theta, counts = simulate(4, np.random.default_rng(0))
    >>> low, high = predictive_band(theta, QGrid(), None, np.random.default_rng(1))
    >>> low.shape == high.shape == (QGrid().n_points,), bool((low <= high).all())
    (True, True)
    """
    draws = samples[rng.choice(len(samples), min(n_draws, len(samples)), replace=False)]
    weights = None if instrument is None else instrument.weights
    replicas = rng.poisson(expected_counts(draws.astype(np.float64), grid, weights))
    low, high = np.percentile(replicas, [5, 95], axis=0)
    if instrument is not None:
        low, high = (np.where(instrument.observed, band, np.nan) for band in (low, high))
    return low, high


def live_view_png(
    index: np.ndarray,
    quantiles: np.ndarray,
    flagged: np.ndarray,
    latest: tuple[int, np.ndarray] | None,
    title: str,
    max_points: int = 2000,
) -> bytes:
    """A PNG of the scan so far: median and 90% interval of pitch, width and sigma against
    the exposure index (flagged exposures as red crosses; at most ``max_points`` per trace,
    evenly thinned), and on the right the newest posterior's marginals.

    Args:
        index: (n,) exposure indices of the exposures with a posterior.
        quantiles: (n, 3, 3) their 5/50/95% quantiles of pitch, width and sigma (nm).
        flagged: (n,) bool, the posterior-predictive flag.
        latest: the newest exposure's index and samples (samples, parameters; the first
            three are pitch, width, sigma; no marginals where it has no draws), or ``None``.
        title: the figure's title.
    """
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 6.5))
    FigureCanvasAgg(figure)
    grid = figure.add_gridspec(len(GRATING_PARAMETERS), 2, width_ratios=(3, 1))
    order = np.argsort(index, kind="stable")
    keep = order[:: max(1, -(-order.size // max_points))]
    for row, name in enumerate(GRATING_PARAMETERS):
        axis = figure.add_subplot(grid[row, 0])
        if keep.size:
            x, q = index[keep], quantiles[keep, :, row]
            axis.fill_between(x, q[:, 0], q[:, 2], alpha=0.3, label="90% interval")
            axis.plot(x, q[:, 1], ".-", ms=3, lw=0.8, label="median")
            marked = keep[flagged[keep]]
            axis.plot(index[marked], quantiles[marked, 1, row], "rx", label="flagged")
        axis.set_ylabel(name)
        if row == 0:
            axis.set_title(title)
            axis.legend(loc="upper right", fontsize=7)
        if row == len(GRATING_PARAMETERS) - 1:
            axis.set_xlabel("exposure index")
        marginal = figure.add_subplot(grid[row, 1])
        if latest is not None and len(latest[1]):
            marginal.hist(latest[1][:, row], bins=40, color="C1")
            marginal.set_yticks([])
            if row == 0:
                marginal.set_title(f"exposure {latest[0]}: posterior")
        marginal.set_xlabel(name, fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=72)
    return buffer.getvalue()


def _grid(results: Results) -> QGrid:
    """The scan's q grid, with its resolution, from the configuration saved in the file."""
    grid = json.loads(results.config_json or "{}").get("grid")
    if grid:
        return QGrid(**grid)
    return QGrid(float(results.q_nm[0]), float(results.q_nm[-1]), int(results.q_nm.size))


def _save(figure, path: Path) -> Path:
    import matplotlib.pyplot as plt

    figure.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(figure)
    return path
