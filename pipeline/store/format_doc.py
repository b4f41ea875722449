"""The table of per-exposure datasets in docs/results-format.md, rendered from the schema.

:func:`markdown_table` renders :data:`~pipeline.store.schema.ROW_DATASETS` (and the
dimensions of their rows) as Markdown; :func:`with_markdown_table` puts it in a document
between :data:`BEGIN` and :data:`END`. ``python -m pipeline.store.format_doc
docs/results-format.md`` writes it there, and ``tests/test_schema.py`` fails while the
document holds another table.

Example:
    >>> document = f"# Results\\n{BEGIN}\\nold\\n{END}\\n"
    >>> with_markdown_table(document).splitlines()[2]
    '| dataset | row | dtype | none | attributes | holds |'
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from pipeline.store.schema import DIMENSIONS, ROW_DATASETS, RowDataset

#: The markers around the table in docs/results-format.md.
BEGIN, END = "<!-- per-exposure-datasets -->", "<!-- /per-exposure-datasets -->"


def _cell(dataset: RowDataset) -> list[str]:
    """The cells of ``dataset``'s line in :func:`markdown_table`."""
    dimensions = f"({', '.join(dataset.dimensions)})" if dataset.dimensions else "()"
    fill = dataset.fill
    if isinstance(fill, bytes):
        shown_fill = f'"{fill.decode()}"'
    else:
        shown_fill = "NaN" if np.isnan(fill) else str(fill)
    if dataset.per_parameter:
        attributes = ["parameter_names", "units (one per parameter)"]
    else:
        attributes = [] if dataset.units is None else [f'units "{dataset.units}"']
    attributes += [f"{name} {json.dumps(value)}" for name, value in dataset.attributes]
    description = dataset.description
    if dataset.former_path is not None:
        description += f"; `{dataset.former_path}` in files of earlier versions"
    if not dataset.given:
        description += " (computed by the writer)"
    return [
        f"`{dataset.path}`",
        dimensions,
        dataset.dtype,
        shown_fill,
        "; ".join(attributes),
        description,
    ]


def markdown_table() -> str:
    """The per-exposure datasets as a Markdown table, with the dimensions of their rows
    (the section of docs/results-format.md between :data:`BEGIN` and :data:`END`).

    >>> print(markdown_table().splitlines()[2])
    | `exposures/index` | () | int64 | -1 | units "dimensionless" | exposure index ...
    """
    header = ["dataset", "row", "dtype", "none", "attributes", "holds"]
    lines = [header, ["---"] * len(header), *(_cell(dataset) for dataset in ROW_DATASETS)]
    if any("|" in cell for line in lines for cell in line):
        raise ValueError("a cell of the per-exposure datasets' table holds a '|'")
    table = ["| " + " | ".join(line) + " |" for line in lines]
    dimensions = [f"- `{name}`: {meaning}" for name, meaning in DIMENSIONS.items()]
    return "\n".join([*table, "", "Dimensions of a row:", "", *dimensions])


def with_markdown_table(document: str) -> str:
    """``document`` with its section between :data:`BEGIN` and :data:`END` replaced by
    :func:`markdown_table`; ``ValueError`` when it has no such section."""
    start, stop = document.find(BEGIN), document.find(END)
    if start < 0 or stop < start:
        raise ValueError(f"no section between {BEGIN} and {END}")
    return f"{document[: start + len(BEGIN)]}\n{markdown_table()}\n{document[stop:]}"


if __name__ == "__main__":  # python -m pipeline.store.format_doc docs/results-format.md
    for doc in sys.argv[1:]:
        Path(doc).write_text(with_markdown_table(Path(doc).read_text()))
