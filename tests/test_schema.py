"""The per-exposure datasets' table (pipeline/store/schema.py) against what is written, read
and documented: the writer creates exactly its datasets, the readers find them also in files
of earlier versions, and docs/results-format.md shows the same table."""

import dataclasses
from pathlib import Path

import h5py
import numpy as np
import pytest

from pipeline.store import ExposureResult, Results, ResultsWriter, open_results
from pipeline.store.format_doc import BEGIN, END, markdown_table, with_markdown_table
from pipeline.store.results import stored_identities, written_indices
from pipeline.store.schema import (
    DATASETS_BY_NAME,
    FIXED_SIZES,
    ROW_COLUMNS,
    ROW_DATASETS,
    TEXT_BYTES,
    row_paths,
)

DOC = Path(__file__).parents[1] / "docs" / "results-format.md"
NAMES, UNITS = ("pitch_nm", "width_nm"), ("nm", "nm")
N_Q, N_SAMPLES = 64, 6


def _write(path: Path, indices=(0, 1, 2)) -> None:
    with ResultsWriter(path, NAMES, UNITS, N_SAMPLES, np.linspace(0.01, 0.4, N_Q)) as writer:
        for index in indices:
            writer.append(
                ExposureResult(
                    index=index,
                    timestamp=float(index),
                    received_time=10.0 + index,
                    frame_id=f"key:{index}:1:2",
                    samples=np.full((N_SAMPLES, 2), index, np.float32),
                    width_mode_weights=np.array([0.5, 0.5]),
                )
            )


def test_the_documented_table_is_the_schema():
    document = DOC.read_text()
    assert BEGIN in document and END in document
    assert with_markdown_table(document) == document, (
        "docs/results-format.md's per-exposure datasets differ from pipeline/store/schema.py: "
        "run `python -m pipeline.store.format_doc docs/results-format.md`"
    )


def test_a_changed_table_would_fail_the_documentation_check():
    document = DOC.read_text()
    stale = document.replace(DATASETS_BY_NAME["error"].dtype, "S4", 1)
    assert stale != document and with_markdown_table(stale) == document
    assert markdown_table().count("\n| `") == len(ROW_DATASETS)
    with pytest.raises(ValueError, match="no section"):
        with_markdown_table("# no markers")


def test_the_writer_creates_exactly_the_tables_datasets(tmp_path):
    path = tmp_path / "scan.h5"
    _write(path)
    sizes = {"q": N_Q, "parameters": len(NAMES), "samples": N_SAMPLES, **FIXED_SIZES}
    with h5py.File(path, "r") as handle:
        entry = handle["entry"]
        growing = set()
        entry.visititems(
            lambda name, obj: (
                growing.add(name)
                if isinstance(obj, h5py.Dataset) and obj.maxshape[:1] == (None,)
                else None
            )
        )
        assert growing == {dataset.path for dataset in ROW_DATASETS}
        for dataset in ROW_DATASETS:
            stored = entry[dataset.path]
            assert stored.dtype == np.dtype(dataset.dtype), dataset.name
            assert stored.shape == (3, *(sizes[d] for d in dataset.dimensions)), dataset.name
            fill = stored.fillvalue
            assert fill == dataset.fill or (np.isnan(fill) and np.isnan(dataset.fill))
            attributes = {
                name: value.tolist() if isinstance(value, np.ndarray) else value
                for name, value in stored.attrs.items()
            }
            assert attributes == dataset.attributes_for(NAMES, UNITS), dataset.name


def test_the_columns_the_writer_takes_and_the_readers_give_are_the_tables():
    assert {field.name for field in dataclasses.fields(ExposureResult)} == set(ROW_COLUMNS)
    read = {dataset.name for dataset in ROW_DATASETS if dataset.read}
    assert read <= {field.name for field in dataclasses.fields(Results)}
    assert TEXT_BYTES == {
        "status": 8,
        "error": 512,
        "source": 256,
        "frame_id": 96,
        "processing_key": 32,
    }
    assert row_paths("index") == ("exposures/index",)


def test_a_file_of_an_earlier_version_reads_and_resumes(tmp_path):
    """Files written before some datasets were added, or renamed, read with the fill value
    in those, and are continued by a resume."""
    path = tmp_path / "old.h5"
    _write(path)
    with h5py.File(path, "r+") as handle:
        entry = handle["entry"]
        for dataset in ROW_DATASETS:
            if dataset.added_later:
                del entry[dataset.path]
            if dataset.former_path is not None:
                entry.move(dataset.path, dataset.former_path)
    results = open_results(path)
    assert results.index.tolist() == [0, 1, 2]
    assert np.isnan(results.received_time).all()
    np.testing.assert_array_equal(results.width_mode_weights, np.full((3, 2), 0.5))
    assert stored_identities(path)[2] == ["", "", ""]
    assert written_indices(path) == {0, 1, 2}
    with ResultsWriter(
        path, NAMES, UNITS, N_SAMPLES, np.linspace(0.01, 0.4, N_Q), resume=True
    ) as writer:
        writer.append(ExposureResult(index=3, timestamp=3.0, received_time=13.0))
    resumed = open_results(path)
    assert resumed.index.tolist() == [0, 1, 2, 3]
    np.testing.assert_array_equal(resumed.received_time, [np.nan] * 3 + [13.0])
    np.testing.assert_array_equal(resumed.samples[:3, 0, 0], [0, 1, 2])


def test_a_file_without_a_dataset_every_version_has_is_refused(tmp_path):
    path = tmp_path / "scan.h5"
    _write(path)
    with h5py.File(path, "r+") as handle:
        del handle["entry/posterior/sd"]
    with pytest.raises(ValueError, match="not a results file of this version: no posterior/sd"):
        open_results(path)
