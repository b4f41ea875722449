"""A damaged results file: every reader fails at once with a clear error instead of hanging in
HDF5's SWMR retries, and ``beamline-inn salvage`` recovers its intact rows.

Each open of a damaged file runs in a subprocess with a timeout, so that a regression fails
the test instead of hanging it."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from flows.cli import main
from pipeline.store import ExposureResult, ResultsWriter, open_results, read_completion

NAMES, UNITS = ("pitch_nm", "width_nm"), ("nm", "nm")
Q = np.linspace(0.01, 0.4, 512)
SCAN = dict(scan_id="s1", config_json='{"a": 1}', model_card={"weights_sha256": "abc"})
TESTS = Path(__file__).resolve().parent


def _row(index: int) -> ExposureResult:
    """An exposure with 500 draws per parameter (16 exposures per chunk of draws); every
    seventh failed."""
    if index % 7 == 3:
        return ExposureResult(index, float(index), status="failed", error=f"bad frame {index}")
    rng = np.random.default_rng(index)
    samples = rng.normal(200, 1, (500, 2)).astype(np.float32)
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


def _writer(path: Path, **options) -> ResultsWriter:
    return ResultsWriter(path, NAMES, UNITS, 500, Q, poni_text="Distance: 0.1", **SCAN, **options)


def _append(writer: ResultsWriter, indices: range) -> None:
    """Append in blocks of 4, as the writer process does."""
    for first in range(indices.start, indices.stop, 4):
        writer.append_many([_row(i) for i in range(first, min(indices.stop, first + 4))])


def _finished_scan(path: Path, n: int = 96) -> Path:
    """A closed results file of ``n`` exposures, marked complete (its NXcanSAS groups and
    the completion were added last, at its end)."""
    writer = _writer(path)
    _append(writer, range(n))
    writer.close(n_exposures=n)
    return path


def _cut(path: Path, fraction: float) -> Path:
    cut = path.with_name(f"cut{round(fraction * 100)}.h5")
    data = path.read_bytes()
    cut.write_bytes(data[: int(len(data) * fraction)])
    return cut


READERS = """
import json, sys, time
from pipeline.store import open_results, read_completion, latest_posterior
from pipeline.store.results import written_indices
from test_integrity import _writer

calls = {
    "open_results": lambda p: open_results(p).index.size,
    "written_indices": lambda p: max(written_indices(p)),
    "latest_posterior": lambda p: latest_posterior(p)[0],
    "read_completion": lambda p: repr(read_completion(p)),
    "resume": lambda p: _writer(p, resume=True).close(),
}
report = {}
for path in sys.argv[2:]:
    for name in sys.argv[1].split(","):
        call = calls[name]
        start = time.monotonic()
        try:
            outcome = call(path)
        except Exception as error:
            outcome = f"{type(error).__name__}: {error}"
        report[f"{path} {name}"] = [outcome, time.monotonic() - start]
print(json.dumps(report))
"""


ALL = ("open_results", "written_indices", "latest_posterior", "read_completion", "resume")


def _read(*paths: Path, calls: tuple[str, ...] = ALL) -> dict[str, list]:
    """Per path and reader (of ``calls``, in order): its outcome (a value, or the error's
    class and text) and the seconds it took, from a subprocess killed after 2 minutes."""
    done = subprocess.run(
        [sys.executable, "-c", READERS, ",".join(calls), *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=TESTS,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_a_truncated_file_fails_at_once_for_every_reader(tmp_path):
    """Cut at 1-99% of its size, a results file made ``show``, ``reprocess --resume`` and
    ``reprocess-scans`` wait forever in HDF5's SWMR retries: now each reader fails at once,
    naming the sizes and the salvage command (``read_completion`` says None, as for any
    unreadable file; a resume refuses the file, naming the salvage command too). So does a
    file whose superblock is damaged."""
    scan = _finished_scan(tmp_path / "scan.h5")
    cuts = [_cut(scan, fraction) for fraction in (0.01, 0.3, 0.6, 0.99)]
    flipped = tmp_path / "flipped.h5"
    data = bytearray(scan.read_bytes())
    data[30] ^= 0x40  # in the end-of-file address, which the checksum covers
    flipped.write_bytes(data)
    report = _read(*cuts, flipped)
    size = scan.stat().st_size
    for cut in cuts:
        shown = f"{cut} is truncated or damaged ({cut.stat().st_size:,} of {size:,} bytes)"
        hint = f"`beamline-inn salvage {cut} --out {tmp_path / (cut.stem + '-salvaged.h5')}`"
        for name in ("open_results", "written_indices", "latest_posterior"):
            outcome, seconds = report[f"{cut} {name}"]
            assert outcome.startswith(f"DamagedResultsError: {shown}") and hint in outcome
            assert seconds < 1
        assert report[f"{cut} read_completion"][0] == "None"
        outcome, seconds = report[f"{cut} resume"]
        assert outcome.startswith(f"DamagedResultsError: {shown}") and hint in outcome
        assert seconds < 1
    assert report[f"{flipped} open_results"][0] == (
        f"DamagedResultsError: {flipped} is damaged: its superblock fails its checksum: "
        f"recover what is intact with `beamline-inn salvage {flipped} --out "
        f"{tmp_path / 'flipped-salvaged.h5'}`"
    )
    assert report[f"{flipped} open_results"][1] < 1


def test_damage_inside_a_file_of_full_length_fails_within_seconds(tmp_path):
    """Damage the superblock cannot show (here the object header of the exposure indices,
    overwritten) fails after HDF5's bounded SWMR retries: about 2 s, not days."""
    scan = _finished_scan(tmp_path / "scan.h5", n=8)
    with h5py.File(scan, "r") as handle:
        header = h5py.h5g.get_objinfo(handle["entry/exposures/index"].id).objno[0]
    data = bytearray(scan.read_bytes())
    data[header + 8 : header + 24] = bytes(16)
    scan.write_bytes(data)
    readers = ("open_results", "written_indices", "latest_posterior")
    report = _read(scan, calls=readers)
    for name in readers:
        outcome, seconds = report[f"{scan} {name}"]
        assert "incorrect metadata checksum after all read attempts" in outcome
        assert seconds < 6


def test_show_of_a_truncated_file_says_so_in_one_line(tmp_path):
    cut = _cut(_finished_scan(tmp_path / "scan.h5", n=8), 0.5)
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "show", str(cut)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1
    assert done.stderr.startswith(f"beamline-inn show: error: {cut} is truncated or damaged (")


KILLED_WRITER = """
import sys, time
from pathlib import Path
from test_integrity import _append, _writer
writer = _writer(Path(sys.argv[1]))
_append(writer, range(40))
for dataset in writer._datasets.values():  # the next block grown, not written: killed mid-block
    dataset.resize(44, axis=0)
writer.file.flush()
print("ready", flush=True)
time.sleep(600)
"""


def test_files_being_written_or_left_by_a_killed_writer_still_open(tmp_path):
    """Neither a live writer's file nor a SIGKILLed writer's is taken for a damaged one
    (both are marked open for writing; resume depends on the second); salvage takes the
    killed writer's complete rows."""
    live = tmp_path / "live.h5"
    with _writer(live) as writer:
        _append(writer, range(12))
        readers = ("open_results", "written_indices", "latest_posterior")
        report = _read(live, calls=readers)
        assert [report[f"{live} {name}"][0] for name in readers] == [12, 11, 11]
        _append(writer, range(12, 20))
        assert _read(live, calls=readers)[f"{live} open_results"][0] == 20

    killed = tmp_path / "killed.h5"
    process = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(killed)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=TESTS,
    )
    try:
        assert process.stdout.readline().strip() == "ready"
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    report = _read(killed)
    assert report[f"{killed} open_results"][0] == 40
    assert report[f"{killed} written_indices"][0] == 39
    assert report[f"{killed} resume"][0] is None  # resumed: the file is a normal one again
    assert main(["salvage", str(killed), "--out", str(tmp_path / "new.h5")]) == 0
    assert open_results(tmp_path / "new.h5").index.tolist() == list(range(40))


def test_salvage_recovers_the_intact_rows_of_a_file_cut_near_its_end(tmp_path, capsys):
    scan = _finished_scan(tmp_path / "scan.h5")
    original = open_results(scan)
    new = tmp_path / "new.h5"
    assert main(["salvage", str(_cut(scan, 0.95)), "--out", str(new)]) == 0
    saved = open_results(new)
    assert capsys.readouterr().out.startswith(
        f"saved {saved.index.size} of 96 rows of {tmp_path / 'cut95.h5'} into {new}\n"
    )
    assert saved.index.size >= 72  # draws of the last exposures were rewritten at the end
    assert saved.index.tolist() == list(range(saved.index.size))  # the first rows, in order
    for name in ("timestamp", "status", "error", "source", "normalization", "truth", "counts"):
        expected = getattr(original, name)[: saved.index.size]
        np.testing.assert_array_equal(getattr(saved, name), expected)
    for name in ("samples", "mean", "sd", "quantiles", "predictive_z", "width_mode_weights"):
        expected = getattr(original, name)[: saved.index.size]
        np.testing.assert_array_equal(getattr(saved, name), expected)
    np.testing.assert_array_equal(saved.flagged, original.flagged[: saved.index.size])
    for name in ("scan_id", "parameter_names", "parameter_units", "config_json", "model_card"):
        assert getattr(saved, name) == getattr(original, name)
    np.testing.assert_array_equal(saved.q_nm, original.q_nm)
    with h5py.File(new, "r") as copy, h5py.File(scan, "r") as before:
        assert copy["entry/instrument/geometry/poni"][()] == b"Distance: 0.1"
        rows = saved.index.size
        for name in ("exposures/written_time", "line_out/I", "line_out/Idev"):
            np.testing.assert_array_equal(copy["entry"][name][:], before["entry"][name][:rows])
        assert "sasdata_000000" in copy["entry"]

    assert read_completion(new) is None  # rows are missing: a reprocessing resumes it
    with _writer(new, resume=True) as writer:  # a normal results file of the scan
        _append(writer, range(96))
    assert open_results(new).index.tolist() == list(range(96))


def test_salvage_says_when_nothing_can_be_saved(tmp_path, capsys):
    scan = _finished_scan(tmp_path / "scan.h5", n=8)
    stub = tmp_path / "stub.h5"
    stub.write_bytes(scan.read_bytes()[:1000])
    assert main(["salvage", str(stub), "--out", str(tmp_path / "new.h5")]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"beamline-inn salvage: error: {stub}: nothing to salvage: ")
    assert error.count("\n") == 1
    assert not (tmp_path / "new.h5").exists()
    assert main(["salvage", str(scan), "--out", str(stub)]) == 2
    assert f"{stub} exists" in capsys.readouterr().err


@pytest.mark.parametrize("fraction", [0.6, 0.8])
def test_salvage_never_takes_a_lost_chunk_for_data(tmp_path, fraction):
    """Rows whose chunks lie past the cut (read back as zeros) are left out: every row saved
    equals the original."""
    scan = _finished_scan(tmp_path / "scan.h5")
    original = open_results(scan)
    new = tmp_path / "new.h5"
    assert main(["salvage", str(_cut(scan, fraction)), "--out", str(new)]) == 0
    saved = open_results(new)
    assert 0 < saved.index.size < 96
    np.testing.assert_array_equal(saved.samples, original.samples[saved.index])
    np.testing.assert_array_equal(saved.counts, original.counts[saved.index])
