"""The commands that read results files: ``show`` and ``salvage``."""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from pathlib import Path

from flows.commands.arguments import Commands


def add_show(commands: Commands) -> None:
    """``show``: a results file's summary, and plots."""
    show = commands.add_parser(
        "show",
        help="summarise a results file; with --png, plot traces, a line-out and a posterior",
    )
    show.add_argument("results", type=Path, help="a results file (SCAN_ID.h5)")
    show.add_argument("--exposure", type=int, help="only this exposure (and plot it)")
    show.add_argument("--png", type=Path, metavar="DIR", help="write PNG plots into DIR")
    show.set_defaults(run=_show)


def _index_ranges(indices: Iterable[int], most: int = 8) -> str:
    """Exposure indices as ranges, e.g. ``exposures 0-10, 12, 14-63`` (the first ``most``)."""
    runs: list[list[int]] = []
    for index in sorted({int(i) for i in indices}):
        if runs and index == runs[-1][1] + 1:
            runs[-1][1] = index
        else:
            runs.append([index, index])
    if not runs:
        return "no exposures"
    text = ", ".join(f"{low}-{high}" if high > low else f"{low}" for low, high in runs[:most])
    return f"exposures {text}{', ...' if len(runs) > most else ''}"


def _show(args: argparse.Namespace) -> int:
    from pipeline.store import open_results
    from pipeline.store.views import summary_table, write_plots

    results = open_results(args.results)  # ValueError for a file that is not one
    if args.exposure is not None and args.exposure not in results.index:
        raise ValueError(
            f"exposure {args.exposure} is not in {args.results} ({_index_ranges(results.index)})"
        )
    ok = results.status == "ok"
    print(
        f"scan {results.scan_id}: {results.index.size} exposures, {int(ok.sum())} with a "
        f"posterior, {int((~ok).sum())} failed, {int(results.flagged.sum())} flagged "
        f"(not explained by a grating)"
    )
    print(summary_table(results, None if args.exposure is None else [args.exposure]))
    if args.png is not None:
        for path in write_plots(results, args.png, args.exposure):
            print(f"wrote {path}")
    return 0


def add_salvage(commands: Commands) -> None:
    """``salvage``: the intact rows of a damaged results file."""
    salvage = commands.add_parser(
        "salvage",
        help="copy the intact rows of a truncated or damaged results file into a new one",
    )
    salvage.add_argument("damaged", type=Path, help="the damaged results file (SCAN_ID.h5)")
    salvage.add_argument("--out", type=Path, required=True, help="the new results file")
    salvage.set_defaults(run=_salvage)


def _salvage(args: argparse.Namespace) -> int:
    from pipeline.store.salvage import salvage

    saved = salvage(args.damaged, args.out)
    print(f"saved {saved.rows:,} of {saved.of:,} rows of {args.damaged} into {args.out}")
    if saved.rows < saved.of:
        print(
            f"the others lay in the lost part of the file: to redo them, put the saved file in "
            f"the damaged one's place (mv {args.out} {args.damaged}) and run its scan again "
            "with --resume"
        )
    return 0
