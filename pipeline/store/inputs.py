"""Reading line-outs given by users: NumPy or text files of counts, or a results file.

Example:
    >>> import tempfile, numpy as np
    >>> from pathlib import Path
    >>> path = Path(tempfile.mkdtemp()) / "two.txt"
    >>> np.savetxt(path, np.ones((2, 512)))
    >>> [(name, counts.shape) for name, counts, _, _ in read_line_outs([path], None, 1e4, 1.0)]
    [('two.txt[0]', (512,)), ('two.txt[1]', (512,))]
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipeline.physics import PARAMETER_NAMES
from pipeline.store.results import open_results

N_POINTS = 512


#: Suffixes of results files among line-out inputs (others are ``.npy`` or text).
RESULTS_SUFFIXES = (".h5", ".hdf5", ".nxs")


def read_line_outs(
    paths: Sequence[Path],
    exposures: Sequence[int] | None,
    n_photons: float | None,
    background: float | None,
    n_points: int = N_POINTS,
) -> list[tuple[str, np.ndarray, float, float]]:
    """(name, counts (n_points,), n_photons, background) for every line-out in ``paths``.

    ``.h5`` files are results files: ``exposures`` picks rows by exposure index (default all
    written ones), and the recorded truth supplies the nuisances unless they are given.
    Other files are ``.npy`` or text with one line-out per row of ``n_points`` counts (the
    instrument's bins) and need both nuisances.
    """
    out = []
    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"no such file: {path}")
        if path.suffix in RESULTS_SUFFIXES:
            results = open_results(path)
            wanted = exposures if exposures else results.index[results.status == "ok"].tolist()
            for index in wanted:
                rows = np.flatnonzero(results.index == index)
                if rows.size == 0 or results.status[rows[0]] != "ok":
                    raise ValueError(f"{path}: no written line-out for exposure {index}")
                truth = dict(zip(PARAMETER_NAMES, results.truth[rows[0]], strict=True))
                n_ph = n_photons if n_photons is not None else truth["n_photons"]
                b = background if background is not None else truth["background"]
                if not (np.isfinite(n_ph) and np.isfinite(b)):
                    raise ValueError(
                        f"{path}: exposure {index} has no recorded truth: give --n-photons and --background"
                    )
                out.append(
                    (
                        f"{path.name}[{index}]",
                        results.counts[rows[0]].astype(np.float64),
                        float(n_ph),
                        float(b),
                    )
                )
            continue
        if n_photons is None or background is None:
            raise ValueError(
                f"{path}: give --n-photons and --background (the reference conditions on them)"
            )
        counts = (
            np.load(path, allow_pickle=False)
            if path.suffix == ".npy"
            else np.loadtxt(path, ndmin=2)
        )
        counts = np.atleast_2d(np.asarray(counts, dtype=np.float64))
        if counts.ndim != 2 or counts.shape[1] != n_points:
            raise ValueError(
                f"{path}: expected rows of {n_points} counts (the instrument's bins), got shape "
                f"{counts.shape}"
            )
        out.extend(
            (f"{path.name}[{row}]", counts[row], float(n_photons), float(background))
            for row in range(len(counts))
        )
    return out
