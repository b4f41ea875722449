import os
import subprocess
import sys
import time

import h5py
import hdf5plugin
import numpy as np
import pytest

from pipeline.store import (
    ExposureResult,
    ResultsWriter,
    open_results,
    read_completion,
    read_nxcansas,
)
from pipeline.store.results import CHUNK_BYTES, making

NAMES, UNITS = ("pitch_nm", "width_nm"), ("nm", "nm")
Q = np.linspace(0.01, 0.4, 512)


def _ok(index: int) -> ExposureResult:
    rng = np.random.default_rng(index)
    samples = rng.normal(200, 1, (10, 2)).astype(np.float32)
    return ExposureResult(
        index=index,
        timestamp=1.0 + index,
        source=f"scan_{index:05d}.cbf",
        normalization=1e5 + index,
        counts=rng.poisson(3, 512).astype(np.float32),
        counts_sd=np.ones(512, np.float32),
        samples=samples,
        mean=samples.mean(0),
        sd=samples.std(0),
        quantiles=np.quantile(samples, [0.05, 0.5, 0.95], axis=0),
        truth=np.array([200.0, 60.0]),
        predictive_z=float(index),
        width_mode_weights=np.array([0.25, 0.75]),
    )


def test_rows_are_written_once_and_read_back_in_index_order(tmp_path):
    path = tmp_path / "scan.h5"
    with ResultsWriter(path, NAMES, UNITS, 10, Q, scan_id="s1", config_json='{"a": 1}') as writer:
        assert writer.append(_ok(2))
        assert writer.append(
            ExposureResult(index=0, timestamp=0.0, status="failed", error="bad frame")
        )
        assert writer.append(_ok(1))
        assert not writer.append(_ok(2))  # duplicate
    results = open_results(path)
    assert results.index.tolist() == [0, 1, 2]
    assert results.status.tolist() == ["failed", "ok", "ok"]
    assert results.error[0] == "bad frame"
    assert results.source.tolist() == ["", "scan_00001.cbf", "scan_00002.cbf"]
    np.testing.assert_array_equal(results.normalization[1:], [1e5 + 1, 1e5 + 2])
    assert np.isnan(results.samples[0]).all() and np.isfinite(results.samples[1:]).all()
    np.testing.assert_array_equal(results.samples[2], _ok(2).samples)
    np.testing.assert_array_equal(results.predictive_z[1:], [1.0, 2.0])
    np.testing.assert_array_equal(results.width_mode_weights[2], [0.25, 0.75])
    assert np.isnan(results.width_mode_weights[0]).all() and not results.flagged.any()
    assert results.parameter_names == NAMES and results.config_json == '{"a": 1}'


def test_units_and_names_are_stored(tmp_path):
    path = tmp_path / "scan.h5"
    with ResultsWriter(path, NAMES, UNITS, 10, Q) as writer:
        writer.append(_ok(0))
    with h5py.File(path) as handle:
        assert handle["entry/line_out/q_nm"].attrs["units"] == "1/nm"
        assert list(handle["entry/posterior/samples"].attrs["parameter_names"]) == list(NAMES)
        assert handle["entry/posterior/samples"].shape == (1, 10, 2)
        for group in ("exposures", "line_out", "posterior"):  # units on every quantity
            for name, dataset in handle["entry"][group].items():
                if isinstance(dataset, h5py.Dataset) and dataset.dtype.kind in "fiu":
                    assert "units" in dataset.attrs, f"{group}/{name}"


PLAIN_H5PY_READS = """
import sys, h5py
with h5py.File(sys.argv[1]) as handle:
    entry = handle["entry"]
    paths = []
    entry.visit(lambda name: paths.append(name) if isinstance(entry[name], h5py.Dataset) else None)
    for name in paths:
        entry[name][()]
    print(len(paths), float(entry["posterior/samples"][0].sum()))
assert "hdf5plugin" not in sys.modules
"""


@pytest.mark.parametrize("compression", ["none", "gzip"])
def test_plain_h5py_without_plugins_reads_every_dataset(tmp_path, compression):
    """No filter plugin needed (as for h5dump or MATLAB): every dataset, the draws too,
    opens in h5py with no plugin imported or on HDF5's plugin path."""
    path = tmp_path / "scan.h5"
    with ResultsWriter(path, NAMES, UNITS, 10, Q, samples_compression=compression) as writer:
        writer.append_many([_ok(0), _ok(1)])
    environment = {**os.environ, "HDF5_PLUGIN_PATH": str(tmp_path / "no-plugins")}
    read = subprocess.run(
        [sys.executable, "-c", PLAIN_H5PY_READS, str(path)],
        capture_output=True,
        text=True,
        env=environment,
        timeout=60,
    )
    assert read.returncode == 0, read.stderr
    n_datasets, first_draws = read.stdout.split()
    assert int(n_datasets) > 30
    assert float(first_draws) == pytest.approx(float(_ok(0).samples.sum()), rel=1e-5)


def test_bitshuffle_compression_is_an_option_read_with_hdf5plugin(tmp_path):
    path = tmp_path / "scan.h5"
    with ResultsWriter(path, NAMES, UNITS, 10, Q, samples_compression="bitshuffle-lz4") as writer:
        writer.append(_ok(0))
    with h5py.File(path) as handle:
        assert str(hdf5plugin.BSHUF_ID) in handle["entry/posterior/samples"]._filters
    np.testing.assert_array_equal(open_results(path).samples[0], _ok(0).samples)
    with pytest.raises(ValueError, match="unknown samples compression 'zip': one of none"):
        ResultsWriter(tmp_path / "other.h5", NAMES, UNITS, 10, Q, samples_compression="zip")


def test_per_exposure_arrays_are_chunked_many_exposures_per_chunk(tmp_path):
    """Draws, line-outs and summaries share chunks of CHUNK_BYTES (a chunk per exposure made
    the writer 1.2x slower in full blocks: benchmarks.writer), and rows appended in blocks
    that cross chunk boundaries read back as written."""
    path = tmp_path / "scan.h5"
    with ResultsWriter(path, NAMES, UNITS, 10, Q) as writer:
        for first, end in ((0, 3), (3, 40), (40, 41)):  # across chunks of 32 line-outs
            writer.append_many([_ok(index) for index in range(first, end)])
    with h5py.File(path) as handle:
        assert handle["entry/posterior/samples"].chunks == (CHUNK_BYTES // (10 * 2 * 4), 10, 2)
        assert handle["entry/line_out/counts"].chunks == (32, 512)
        assert handle["entry/posterior/mean"].chunks == (1024, 2)
    results = open_results(path)
    assert results.index.tolist() == list(range(41))
    for index in (0, 2, 3, 31, 32, 39, 40):
        np.testing.assert_array_equal(results.counts[index], _ok(index).counts)
        np.testing.assert_array_equal(results.samples[index], _ok(index).samples)


def test_an_existing_file_is_never_overwritten(tmp_path):
    path = tmp_path / "scan.h5"
    path.write_bytes(b"precious")
    with pytest.raises(FileExistsError):
        ResultsWriter(path, NAMES, UNITS, 10, Q)
    assert path.read_bytes() == b"precious"


def _scan_with_a_failure(path):
    with ResultsWriter(path, NAMES, UNITS, 10, Q, scan_id="s1") as writer:
        writer.append(_ok(2))
        writer.append(ExposureResult(index=0, timestamp=0.0, status="failed", error="bad frame"))
        writer.append(_ok(1))
    return {i: _ok(i) for i in (1, 2)}


def test_sasview_reader_loads_each_line_out(tmp_path):
    from sasdata.dataloader.loader import Loader

    path = tmp_path / "scan.h5"
    expected = _scan_with_a_failure(path)
    curves = Loader().load(str(path))  # SasView's own reader
    assert len(curves) == 2  # the failed exposure has no line-out
    for curve, index in zip(curves, (1, 2), strict=True):
        np.testing.assert_allclose(curve.x, Q / 10)  # sasdata gives 1/A
        intensity = expected[index].counts / expected[index].normalization
        np.testing.assert_allclose(curve.y, intensity, rtol=1e-6)
        np.testing.assert_allclose(curve.dy, 1 / expected[index].normalization, rtol=1e-6)
        assert curve.run == ["s1"]


def test_our_reader_reads_our_line_outs_and_an_nxcansas_file_from_elsewhere(tmp_path, shared_data):
    from pipeline.store import read_nxcansas

    path = tmp_path / "scan.h5"
    expected = _scan_with_a_failure(path)
    ours = read_nxcansas(path)
    assert [c.name for c in ours] == ["entry/sasdata_000001", "entry/sasdata_000002"]
    np.testing.assert_allclose(ours[1].q_nm, Q)
    np.testing.assert_allclose(ours[1].intensity, expected[2].counts / (1e5 + 2), rtol=1e-6)
    (glassy_carbon,) = read_nxcansas(shared_data / "gc14-dls-i22.h5")  # Diamond I22, in 1/A
    with h5py.File(shared_data / "gc14-dls-i22.h5") as handle:
        q_per_angstrom = handle["sasentry/sasdata/Q"][()]
        intensity = handle["sasentry/sasdata/I"][()]
    np.testing.assert_allclose(glassy_carbon.q_nm, 10 * q_per_angstrom)
    np.testing.assert_allclose(glassy_carbon.intensity, intensity)
    assert glassy_carbon.intensity_units == "electrons/nm3"
    assert np.isnan(glassy_carbon.intensity_sd).all()  # it names an Idev it does not hold
    assert glassy_carbon.q_nm.size == 244


def test_a_file_without_nxcansas_data_is_refused(tmp_path):
    from pipeline.store import read_nxcansas

    path = tmp_path / "plain.h5"
    with h5py.File(path, "w") as handle:
        handle["x"] = np.arange(3)
    with pytest.raises(ValueError, match="no NXcanSAS"):
        read_nxcansas(path)


def test_resuming_continues_only_a_file_of_the_same_scan(tmp_path):
    path = tmp_path / "scan.h5"
    card = {"weights_sha256": "abc"}
    with ResultsWriter(path, NAMES, UNITS, 10, Q, scan_id="s1", model_card=card) as writer:
        writer.append(_ok(0))
    others = {
        "it holds scan 's1', not 's2'": dict(scan_id="s2", model_card=card),
        "its model is": dict(scan_id="s1", model_card={"weights_sha256": "def"}),
    }
    for what, changed in others.items():
        with pytest.raises(ValueError, match=what):
            ResultsWriter(path, NAMES, UNITS, 10, Q, resume=True, **changed)
    with pytest.raises(ValueError, match="samples per exposure"):
        ResultsWriter(path, NAMES, UNITS, 20, Q, scan_id="s1", model_card=card, resume=True)
    with pytest.raises(ValueError, match="q grid"):
        ResultsWriter(path, NAMES, UNITS, 10, Q * 2, scan_id="s1", model_card=card, resume=True)
    (tmp_path / "scan.h5.resuming").write_bytes(b"left by an interrupted resume")
    with ResultsWriter(path, NAMES, UNITS, 10, Q, scan_id="s1", model_card=card, resume=True) as w:
        assert not w.append(_ok(0)) and w.append(_ok(1))  # 0 is in the file already
    assert open_results(path).index.tolist() == [0, 1]
    assert not (tmp_path / "scan.h5.resuming").exists()


FOLLOWER = """
import sys, time
from pipeline.store import open_results
seen = []
print(open_results(sys.argv[1]).index.size, flush=True)  # ready: imports done, file open
deadline = time.monotonic() + 60
while time.monotonic() < deadline and (not seen or seen[-1] < int(sys.argv[2])):
    seen.append(open_results(sys.argv[1]).index.size)  # the file is open for writing meanwhile
    time.sleep(0.05)
print(" ".join(map(str, seen)))
"""


def test_a_reader_in_another_process_follows_the_file_while_it_is_written(tmp_path):
    path = tmp_path / "scan.h5"
    with ResultsWriter(path, NAMES, UNITS, 10, Q, scan_id="s1") as writer:
        follower = subprocess.Popen(
            [sys.executable, "-c", FOLLOWER, str(path), "30"], stdout=subprocess.PIPE, text=True
        )
        assert follower.stdout.readline().strip() == "0"  # it reads the file before any row
        for index in range(30):
            writer.append(_ok(index))
            time.sleep(0.1)
        seen = [int(n) for n in follower.communicate(timeout=60)[0].split()]
    assert seen[-1] == 30
    assert len({n for n in seen if 0 < n < 30}) >= 5  # rows appeared while the writer wrote
    assert seen == sorted(seen)


HOLDER = """
import sys, time, h5py
path = sys.argv[1]
print("waiting", flush=True)
while True:  # open the file the moment it appears, and hold it open
    try:
        handle = h5py.File(path, "r", swmr=True)
        break
    except FileNotFoundError:
        time.sleep(0.001)
print("open", flush=True)
sys.stdin.read()  # until the test is done
print(len(handle["entry/exposures/index"]), flush=True)
"""


def test_readers_may_hold_the_file_from_its_creation_to_its_end(tmp_path):
    """A viewer that opens the file as soon as it appears (SWMR) gets it, every time, and
    holding it open does not stop the writer from finishing it: NXcanSAS groups and the
    completion are written with the writer's own handle, nothing reopens the file."""
    for attempt in range(4):
        path = tmp_path / f"scan{attempt}.h5"
        holder = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert holder.stdout.readline().strip() == "waiting"
        time.sleep(0.01 * attempt)
        writer = ResultsWriter(path, NAMES, UNITS, 10, Q, scan_id="s1")
        assert holder.stdout.readline().strip() == "open", holder.stderr.read()
        writer.append_many([_ok(i) for i in range(3)])
        writer.append(ExposureResult(index=3, timestamp=0.0, status="failed", error="bad"))
        writer.close(n_exposures=4)
        out, err = holder.communicate("", timeout=60)
        assert holder.returncode == 0, err
        assert out.split() == ["4"]  # the rows it was holding the file for
        completion = read_completion(path)
        assert completion is not None and completion.n_exposures == 4
        with h5py.File(path, "r") as handle:
            groups = sorted(k for k in handle["entry"] if k.startswith("sasdata_"))
        assert groups == ["sasdata_000000", "sasdata_000001", "sasdata_000002"]
        assert not making(path).exists()


def test_a_scan_that_holds_other_rows_than_it_ended_with_is_not_marked_complete(tmp_path):
    path = tmp_path / "scan.h5"
    writer = ResultsWriter(path, NAMES, UNITS, 10, Q)
    writer.append(_ok(0))
    with pytest.raises(
        ValueError, match="holds 1 exposures, not the scan's 2: not marked complete"
    ):
        writer.close(n_exposures=2)
    assert read_completion(path) is None
    assert [c.name for c in read_nxcansas(path)] == ["entry/sasdata_000000"]


def test_show_prints_a_table_and_writes_plots(tmp_path, capsys):
    from flows.cli import main
    from pipeline.exposure import PosteriorSamples
    from pipeline.model import load
    from pipeline.physics import simulate
    from pipeline.physics.quality import predictive_z, sphere_counts

    model = load(device="cpu")
    _, counts = simulate(4, np.random.default_rng(5))
    counts[2] = sphere_counts(1, np.random.default_rng(6), model.grid)[0][0]  # not a grating
    posterior = PosteriorSamples(model.sample(counts, 300, seed=0), model.parameter_names, ())
    summaries = posterior.summaries()
    z = predictive_z(counts, posterior.samples, model.grid, seed=0)
    path = tmp_path / "scan.h5"
    units = model.parameter_units
    with ResultsWriter(path, model.parameter_names, units, 300, model.grid.q_nm, scan_id="s") as w:
        for row in range(4):
            w.append(
                ExposureResult(
                    index=row,
                    timestamp=0.0,
                    counts=counts[row],
                    counts_sd=np.sqrt(counts[row] + 1),
                    normalization=1.0,
                    samples=posterior.samples[row],
                    **{key: summaries[key][row] for key in ("mean", "sd", "quantiles")},
                    predictive_z=float(z[row]),
                )
            )
        w.append(ExposureResult(index=4, timestamp=0.0, status="failed", error="bad frame"))

    assert main(["show", str(path), "--png", str(tmp_path / "png"), "--exposure", "2"]) == 0
    out = capsys.readouterr().out
    assert "5 exposures, 4 with a posterior, 1 failed, 1 flagged" in out
    assert "FLAGGED" in out and "pitch_nm median [5%, 95%]" in out
    for name in ("traces.png", "lineout_000002.png", "corner_000002.png"):
        assert (tmp_path / "png" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["show", str(path)]) == 0
    assert "bad frame" in capsys.readouterr().out
    assert main(["show", str(path), "--png", str(tmp_path / "png"), "--exposure", "4"]) == 2
    assert "failed (bad frame): nothing to plot" in capsys.readouterr().err


def test_long_and_non_ascii_text_is_kept_within_its_field(tmp_path):
    path = tmp_path / "scan.h5"
    error = "détecteur saturé " * 60  # 1,140 bytes of UTF-8
    with ResultsWriter(path, NAMES, UNITS, 10, Q) as writer:
        writer.append(ExposureResult(0, 0.0, status="failed", error=error, source="scan_α.cbf"))
    results = open_results(path)
    assert results.source[0] == "scan_α.cbf"
    assert results.error[0].startswith("détecteur saturé") and results.error[0].endswith("...")
    assert len(results.error[0].encode()) <= 512


def test_a_file_caught_mid_block_reads_only_its_complete_rows(tmp_path):
    """A reader can find a file being written (or left by a killed writer) with some
    datasets grown and others not, and grown rows not yet written (index -1): only rows
    complete in every dataset are read (this raised IndexError while a scan ran)."""
    path = tmp_path / "scan.h5"
    writer = ResultsWriter(path, NAMES, UNITS, 10, Q, scan_id="s1")
    writer.append_many([_ok(i) for i in range(3)])
    for dataset in writer._datasets.values():  # a block of rows grown, nothing written yet
        dataset.resize(4, axis=0)
    writer._datasets["index"].resize(5, axis=0)  # and the next block begun in one dataset
    writer.file.flush()
    results = open_results(path)
    assert results.index.tolist() == [0, 1, 2] and len(results.samples) == 3
    np.testing.assert_array_equal(results.samples[2], _ok(2).samples)
    writer.close()


def test_blocks_of_columns_are_checked_before_anything_is_written(tmp_path):
    """A block with a column of another shape or length, an unknown column, a negative index
    or text where numbers belong is refused as a whole (the writer process drops such a
    message with a log line; an unchecked one crashed it halfway through a block)."""
    path = tmp_path / "scan.h5"
    good = {"index": np.array([0, 1]), "status": ["ok", "ok"], "samples": np.zeros((2, 10, 2))}
    bad = {
        "a line-out of 7 bins": {**good, "counts": np.zeros((2, 7))},
        "3 rows of draws for 2 exposures": {**good, "samples": np.zeros((3, 10, 2))},
        "one row of another shape": {**good, "mean": [np.zeros(2), np.zeros(3)]},
        "an unknown column": {**good, "weights": np.zeros(2)},
        "a negative index": {**good, "index": np.array([0, -1])},
        "text as numbers": {**good, "timestamp": np.array(["a", "b"])},
        "one text for two exposures": {**good, "status": "ok"},
        "no index": {"status": ["ok", "ok"]},
    }
    with ResultsWriter(path, NAMES, UNITS, 10, Q) as writer:
        for what, columns in bad.items():
            with pytest.raises(ValueError):
                writer.append_rows(columns)
            assert writer.n_rows == 0, what
        written = writer.append_rows({**good, "index": np.array([5, 5])})
        assert written.tolist() == [True, False]  # the same exposure twice in one block
    results = open_results(path)
    assert results.index.tolist() == [5] and results.status.tolist() == ["ok"]
    assert np.isnan(results.counts).all() and (results.samples == 0).all()


def test_masked_bins_are_stored_as_nan_beside_the_mask_with_the_instrument(tmp_path, capsys):
    """With the model's instrument, its masked bins are NaN in every row's counts, counts_sd,
    I and Idev (whatever was sent: 0 from an integrator, a failed exposure's line-out
    included) and True in I_mask; the instrument is in the file. A resume, salvage, ``show``
    and the line-out reader take such a file; one without an instrument (as files written
    before) reads with none and no bin masked."""
    from importlib.resources import files
    from pathlib import Path

    from flows.cli import main
    from pipeline.instrument import load_instrument
    from pipeline.store import read_line_outs
    from pipeline.store.salvage import salvage

    data = Path(str(files("pipeline") / "data"))
    instrument = load_instrument(data / "pilatus1m-5m-sector.instrument.json")
    names = ("pitch_nm", "width_nm", "sigma_nm", "n_photons", "background")
    theta = np.array([60.0, 25.0, 2.0, 1e5, 5.0])
    counts = np.random.default_rng(0).poisson(instrument.expected_counts(theta)).astype(np.float32)
    counts[list(instrument.masked_bins)] = 0.0
    counts.flags.writeable = False  # as a message's buffer: not changed in place
    samples = np.tile(theta, (10, 1)).astype(np.float32)
    ok = ExposureResult(
        index=0,
        timestamp=0.0,
        counts=counts,
        counts_sd=np.sqrt(np.maximum(counts, 1)),
        normalization=2.0,
        samples=samples,
        mean=theta,
        sd=np.ones(5),
        quantiles=np.tile(theta, (3, 1)),
        truth=theta,
    )
    failed = ExposureResult(1, 0.0, status="failed", error="worker", counts=counts)
    path = tmp_path / "scan.h5"
    masked = ~instrument.observed
    arguments = (names, ("nm",) * 3 + ("photons", "counts"), 10, instrument.grid.q_nm)
    with ResultsWriter(path, *arguments, scan_id="p", instrument=instrument) as writer:
        writer.append_many([ok, failed])
    assert (counts[masked] == 0).all()
    results = open_results(path)
    assert results.instrument == instrument
    assert np.isnan(results.counts[:, masked]).all()
    assert np.isfinite(results.counts[:, ~masked]).all()
    with h5py.File(path) as handle:
        assert handle["entry/line_out/I_mask"][()].tolist() == masked.tolist()
        for name in ("counts_sd", "I", "Idev"):
            assert np.isnan(handle[f"entry/line_out/{name}"][0, masked]).all()
        np.testing.assert_allclose(handle["entry/line_out/I"][0, ~masked], counts[~masked] / 2)

    with ResultsWriter(path, *arguments, scan_id="p", instrument=instrument, resume=True) as w:
        w.append(ExposureResult(2, 0.0, counts=counts, counts_sd=counts, normalization=1.0))
    assert np.isnan(open_results(path).counts[:, masked]).all()
    salvage(path, tmp_path / "salvaged.h5")
    assert open_results(tmp_path / "salvaged.h5").instrument == instrument
    assert main(["show", str(path), "--png", str(tmp_path / "png"), "--exposure", "0"]) == 0
    assert (tmp_path / "png" / "lineout_000000.png").is_file()
    capsys.readouterr()
    ((_, read, _, _),) = read_line_outs([path], [0], None, None)
    assert np.isnan(read[masked]).all()

    with ResultsWriter(tmp_path / "old.h5", *arguments, scan_id="old") as writer:
        writer.append(ok)
    with h5py.File(tmp_path / "old.h5") as handle:
        assert not handle["entry/line_out/I_mask"][()].any()
        assert "beamline_inn_instrument" not in handle["entry/instrument/geometry"]
    old = open_results(tmp_path / "old.h5")
    assert old.instrument is None and (old.counts[0, masked] == 0).all()


def test_each_sasdata_group_holds_its_exposure_s_curve_and_links_to_the_shared_axes(tmp_path):
    """Every group copies one template: its own ``I`` and ``Idev`` (the exposure's row, in
    exposure order whatever the order written), ``I_errors`` the same dataset as ``Idev``,
    and hard links to the line-out's ``q_nm``, ``I_mask`` and ``Qdev``."""
    path = tmp_path / "scan.h5"
    with ResultsWriter(path, NAMES, UNITS, 10, Q, q_resolution_nm=0.002) as writer:
        for index in (2, 0, 1):
            writer.append(_ok(index))
    with h5py.File(path) as handle:
        entry = handle["entry"]
        for index in range(3):
            group = entry[f"sasdata_{index:06d}"]
            assert group.attrs["canSAS_class"] == "SASdata" and group.attrs["signal"] == "I"
            expected = _ok(index)
            np.testing.assert_allclose(
                group["I"][()], expected.counts / expected.normalization, rtol=1e-6
            )
            np.testing.assert_allclose(
                group["Idev"][()], expected.counts_sd / expected.normalization, rtol=1e-6
            )
            assert group["I"].attrs["uncertainties"] == "Idev"
            assert group["I_errors"].id == group["Idev"].id
            for link, target in (("Q", "q_nm"), ("I_mask", "I_mask"), ("Qdev", "Qdev")):
                assert group[link].id == entry["line_out"][target].id
        assert entry["sasdata_000000/I"].id != entry["sasdata_000001/I"].id


def test_a_file_with_only_the_first_sasdata_group_is_nxcansas_and_keeps_every_line_out(tmp_path):
    """``sasdata_groups="first"`` (high-rate scans): one SASdata group, the first exposure
    with a line-out's, which SasView, our NXcanSAS reader and the NeXus validator take; every
    row stays in the file."""
    from conftest import nexus_validation_problems
    from sasdata.dataloader.loader import Loader

    path = tmp_path / "scan.h5"
    with ResultsWriter(path, NAMES, UNITS, 10, Q, scan_id="s1", sasdata_groups="first") as writer:
        for index in (3, 1, 2):
            writer.append(_ok(index))
        writer.append(ExposureResult(index=0, timestamp=0.0, status="failed", error="bad frame"))
    with h5py.File(path) as handle:
        assert sorted(k for k in handle["entry"] if k.startswith("sasdata_")) == ["sasdata_000001"]
        assert handle["entry"].attrs["default"] == "sasdata_000001"
    assert [c.name for c in read_nxcansas(path)] == ["entry/sasdata_000001"]
    (curve,) = Loader().load(str(path))
    np.testing.assert_allclose(curve.y, _ok(1).counts / _ok(1).normalization, rtol=1e-6)
    results = open_results(path)
    assert sorted(results.index.tolist()) == [0, 1, 2, 3]
    assert nexus_validation_problems(path) == []


def test_a_writer_refuses_an_unknown_choice_of_sasdata_groups(tmp_path):
    with pytest.raises(ValueError, match="every or first"):
        ResultsWriter(tmp_path / "scan.h5", NAMES, UNITS, 10, Q, sasdata_groups="none")


@pytest.mark.parametrize("stored", [0, 3])
def test_a_file_that_stores_fewer_draws_keeps_the_first_ones_and_every_summary(tmp_path, stored):
    """``store.stored_samples`` (high-rate scans): the writer keeps the first K draws of each
    exposure (0: the summaries alone); the file stays NXcanSAS, plain h5py reads it, it is
    resumed with the same K only."""
    from conftest import nexus_validation_problems

    from pipeline.store import latest_posterior

    path = tmp_path / "scan.h5"
    with ResultsWriter(path, NAMES, UNITS, stored, Q, scan_id="s1") as writer:
        writer.append(_ok(0))  # a row alone (lists of rows)
        writer.append_many([_ok(1), _ok(2)])
        writer.append(ExposureResult(index=3, timestamp=0.0, status="failed", error="bad"))
    results = open_results(path)
    assert results.samples.shape == (4, stored, 2)
    for index in (0, 1, 2):
        np.testing.assert_array_equal(results.samples[index], _ok(index).samples[:stored])
        np.testing.assert_allclose(results.mean[index], _ok(index).mean, rtol=1e-6)
        np.testing.assert_allclose(results.quantiles[index], _ok(index).quantiles, rtol=1e-6)
    assert nexus_validation_problems(path) == []
    with h5py.File(path) as handle:
        assert handle["entry/posterior/samples"].shape == (4, stored, 2)
    assert latest_posterior(path)[1].shape == (stored, 2)
    with pytest.raises(ValueError, match="samples per exposure"):
        ResultsWriter(path, NAMES, UNITS, 10, Q, scan_id="s1", resume=True)
    with ResultsWriter(path, NAMES, UNITS, stored, Q, scan_id="s1", resume=True) as writer:
        assert writer.append(_ok(4))
    assert open_results(path).samples.shape == (5, stored, 2)
