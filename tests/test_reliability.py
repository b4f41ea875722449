"""Faults and hostile input that the other test files do not inject: a full disk, the flow
process and the read-ahead reader killed mid-scan; and the security properties: no pickle,
results confined to the output directory. Every test records what it tried in the
reliability report (``pytest -m reliability --reliability-report docs/reliability.md``)."""

from __future__ import annotations

import ast
import os
import pickle
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from test_flow import SMALL_DETECTOR_PONI
from test_scan import _line_outs, _running

from pipeline.config import InferenceConfig, PipelineConfig, scan_id_from
from pipeline.store import open_results
from workers.scan import ScanError, ScanRunner

REPOSITORY = Path(__file__).resolve().parents[1]


@pytest.fixture
def small_filesystem(tmp_path) -> Iterator[Path]:
    """A 3 MiB tmpfs at a fresh folder (mounting needs root, as on the build machine)."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if done.returncode:
        pytest.skip(f"cannot mount a size-limited file system here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_stops_the_scan_with_every_acknowledged_exposure_kept(
    small_filesystem, reliability
):
    config = PipelineConfig(
        scan_id="disk-full",
        n_workers=1,
        output_dir=small_filesystem,
        inference=InferenceConfig(n_samples=1000),  # 20 kB per exposure: full after ~100
    )
    line_outs = _line_outs(400, seed=21)
    acknowledged: set[int] = set()
    with (
        pytest.raises(ScanError, match="writer exited") as error,
        ScanRunner(config, on_result=lambda result: acknowledged.add(result.index)) as runner,
    ):
        for exposure, line_out in line_outs:
            runner.submit_line_out(exposure, line_out)
        runner.wait()
    assert "output file system is full" in str(error.value)  # the log may not say: same disk
    partial = open_results(config.output_path)  # opens as the last flush left it
    stored = partial.index.tolist()
    lost = reliability.check_every_acknowledged_once(acknowledged, stored)
    record = reliability.record(
        "fault",
        "output file system full during a scan (3 MiB tmpfs), then space freed and resumed",
        tried=1,
        accepted=len(acknowledged),
        lost=lost,
    )
    assert 20 < len(acknowledged) < 400 and lost == 0

    subprocess.run(["mount", "-o", "remount,size=64m", str(small_filesystem)], check=True)
    with ScanRunner(config, resume=True) as runner:
        for exposure, line_out in line_outs:  # the whole scan again
            runner.submit_line_out(exposure, line_out)
        summary = runner.wait()
    results = open_results(config.output_path)
    assert results.index.tolist() == list(range(400)) and (results.status == "ok").all()
    kept = sorted(acknowledged)
    np.testing.assert_array_equal(
        results.samples[kept], partial.samples[np.searchsorted(partial.index, kept)]
    )
    record.detail = (
        f"the scan stopped with ScanError naming the full disk; {len(stored)} rows in the "
        f"file; resumed: {summary.skipped} kept, {summary.written_ok} computed, 400 of 400"
    )


def _descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (children of children too)."""
    found: set[int] = set()
    todo = [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                children = (task / "children").read_text().split()
            except OSError:
                continue
            for child in map(int, children):
                if child not in found:
                    found.add(child)
                    todo.append(child)
    return found


def _stored(path: Path) -> list[int]:
    try:
        return open_results(path).index.tolist()
    except (OSError, KeyError):  # not created yet, or its datasets not yet there
        return []


def _write_frames(folder: Path, n: int) -> None:
    import fabio

    folder.mkdir()
    rng = np.random.default_rng(8)
    for number in range(n):
        frame = rng.poisson(20.0, (48, 64)).astype(np.int32)
        fabio.edfimage.EdfImage(data=frame).write(str(folder / f"frame_{number:04d}.edf"))


def test_the_flow_process_and_the_reader_killed_mid_scan_lose_nothing_written(
    prefect_harness, tmp_path, reliability
):
    """``beamline-inn reprocess`` (the flow process: source, integrator, feeder) killed with
    SIGKILL; resumed, its read-ahead reader killed; resumed again, it completes the scan."""
    _write_frames(tmp_path / "frames", 300)
    poni = tmp_path / "small.poni"
    poni.write_text(SMALL_DETECTOR_PONI)
    out = tmp_path / "out"
    path = out / "killed-flow.h5"
    command = [
        sys.executable, "-c", "import sys; from flows.cli import main; sys.exit(main())",
        "reprocess", str(tmp_path / "frames" / "frame_*.edf"), "--poni", str(poni),
        "--full-ring", "--out", str(out), "--scan-id", "killed-flow", "--workers", "1",
    ]  # fmt: skip
    environment = {**os.environ, "PREFECT_API_URL": prefect_harness}

    def run(*options: str, kill_at_rows: int, victim: str) -> tuple[list[int], str, int]:
        """Start the command; once the file holds ``kill_at_rows`` rows, SIGKILL the flow
        process or its reader; return the rows seen then, the output and the exit code."""
        log = tmp_path / f"run-{len(list(tmp_path.glob('run-*')))}.log"
        with open(log, "w") as output:
            process = subprocess.Popen(
                [*command, *options], env=environment, stdout=output, stderr=subprocess.STDOUT
            )
        try:
            deadline = time.monotonic() + 240
            while len(seen := _stored(path)) < kill_at_rows:
                assert process.poll() is None, f"ended before the kill:\n{log.read_text()}"
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)
            below = _descendants(process.pid)
            if victim == "flow":
                os.kill(process.pid, signal.SIGKILL)
            else:
                (reader,) = [p for p in below if b"spawn_main" in _cmdline(p)]
                os.kill(reader, signal.SIGKILL)
            code = process.wait(120)
        finally:
            if process.poll() is None:
                process.kill()
        deadline = time.monotonic() + 30
        while any(_running(pid) for pid in below) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(_running(pid) for pid in below), "processes outlived the flow"
        return seen, log.read_text(), code

    seen_first, _, code = run(kill_at_rows=30, victim="flow")
    after_first = open_results(path)
    lost_first = reliability.check_every_acknowledged_once(
        set(seen_first), after_first.index.tolist()
    )
    reliability.record(
        "fault",
        "SIGKILL of the flow process (source, integrator, feeder) mid-scan",
        tried=1,
        accepted=len(seen_first),
        lost=lost_first,
        detail=f"exit {code}; its writer, workers and reader exited; "
        f"{after_first.index.size} rows in the file",
    )
    seen_second, printed, code = run(
        "--resume", kill_at_rows=after_first.index.size + 60, victim="reader"
    )
    assert code != 0 and "reader" in printed.lower(), printed
    after_second = open_results(path)
    lost_second = reliability.check_every_acknowledged_once(
        set(seen_first) | set(seen_second), after_second.index.tolist()
    )
    reliability.record(
        "fault",
        "SIGKILL of the read-ahead reader process mid-scan (a resumed run)",
        tried=1,
        accepted=len(seen_second),
        lost=lost_second,
        detail=f"the flow failed naming the reader; {after_second.index.size} rows in the file",
    )
    done = subprocess.run(
        [*command, "--resume"], env=environment, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
    results = open_results(path)
    assert results.index.tolist() == list(range(300)) and (results.status == "ok").all()
    kept = sorted(seen_second)
    np.testing.assert_array_equal(
        results.samples[kept], after_second.samples[np.searchsorted(after_second.index, kept)]
    )
    assert lost_first == lost_second == 0


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


# Security: no pickle, confined output paths


#: Modules that unpickle (or run code from) what they read.
PICKLING_MODULES = {
    "pickle",
    "cPickle",
    "_pickle",
    "dill",
    "cloudpickle",
    "joblib",
    "shelve",
    "marshal",
}


def _pickle_uses(path: Path) -> list[str]:
    """Lines of ``path`` that import a pickling module, call ``torch.load``, ``np.load``
    without ``allow_pickle=False``, ``yaml.load`` or ``yaml.unsafe_load``, or ``read_pickle``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        where = f"{path.relative_to(REPOSITORY)}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names.append(node.module)
            found += [f"{where} imports {n}" for n in names if n.split(".")[0] in PICKLING_MODULES]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = ast.unparse(node.func.value)
            name = node.func.attr
            keywords = {k.arg: ast.unparse(k.value) for k in node.keywords}
            if (owner, name) == ("torch", "load") or name in ("read_pickle", "unsafe_load"):
                found.append(f"{where} calls {owner}.{name}")
            elif owner in ("np", "numpy") and name == "load":
                if keywords.get("allow_pickle") != "False":
                    found.append(f"{where} calls {owner}.load without allow_pickle=False")
            elif (owner, name) == ("yaml", "load") and "SafeLoader" not in keywords.get(
                "Loader", ""
            ):
                found.append(f"{where} calls yaml.load without SafeLoader")
    return found


def test_no_pickle_in_the_code_that_reads_messages_files_models_or_configs(reliability):
    sources = [
        path
        for package in ("pipeline", "workers", "flows", "benchmarks")
        for path in sorted((REPOSITORY / package).rglob("*.py"))
    ]
    uses = [use for path in sources for use in _pickle_uses(path)]
    reliability.record(
        "security",
        "static check: no pickling module, torch.load, np.load without allow_pickle=False, "
        "unsafe yaml.load",
        tried=len(sources),
        detail=f"{len(sources)} source files of pipeline/, workers/, flows/, benchmarks/",
    )
    assert not uses, uses
    # the check itself finds what it looks for
    probe = REPOSITORY / "tests" / "_pickle_probe.py"
    try:
        probe.write_text(
            "import pickle\nimport numpy as np\nnp.load('x')\nimport torch\ntorch.load('m')\n"
        )
        assert len(_pickle_uses(probe)) == 3
    finally:
        probe.unlink()


class _Trap:
    """Unpickling this creates ``marker``: proof that a pickle was loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickled_payloads_are_refused_without_being_unpickled(tmp_path, reliability):
    import hashlib
    import json
    import shutil

    from pipeline.model import load
    from pipeline.model.checkpoint import DEFAULT_MODEL, ModelFileError, card_path
    from pipeline.transport import ProtocolError, decode

    marker = tmp_path / "unpickled"
    payload = pickle.dumps(_Trap(marker))
    with pytest.raises(ProtocolError):
        decode([payload])
    with pytest.raises(ProtocolError):
        decode([payload, payload])
    weights = tmp_path / "model.safetensors"  # a pickled "checkpoint" under the model's name
    weights.write_bytes(payload)
    shutil.copy(card_path(DEFAULT_MODEL), card_path(weights))
    with pytest.raises(ModelFileError, match="SHA-256"):
        load(weights, device="cpu")
    card = json.loads(card_path(weights).read_text())  # a card that vouches for the pickle
    card["weights_sha256"] = hashlib.sha256(payload).hexdigest()
    card_path(weights).write_text(json.dumps(card))
    with pytest.raises(ModelFileError, match="not a safetensors file"):
        load(weights, device="cpu")
    assert not marker.exists()
    reliability.record(
        "security",
        "pickled payloads as wire messages (1 and 2 parts) and as model weights (with a bad "
        "hash, and with a card vouching for it)",
        tried=4,
        detail="each refused with an error; the payload's code never ran",
    )


HOSTILE_SCAN_IDS = [
    "../outside", "../../etc/passwd", "/etc/passwd", "a/b", "..", ".", "", ".hidden",
    "x\x00y", "a\\b", "a b", "-rf", "ü", "x" * 201, "scan\n", "~root",
]  # fmt: skip


@pytest.mark.parametrize("name", HOSTILE_SCAN_IDS)
def test_a_scan_id_that_would_leave_the_output_directory_is_refused(tmp_path, name):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="scan_id"):
        PipelineConfig(scan_id=name, output_dir=tmp_path)


def test_results_and_logs_stay_in_the_output_directory_whatever_the_names(tmp_path, reliability):
    """Scan ids made from file and folder names (archived scans, Eiger masters) and hostile
    ids given directly: the results file and log folder are always inside ``output_dir``."""
    output_dir = (tmp_path / "results").resolve()
    made = [scan_id_from(name) for name in [*HOSTILE_SCAN_IDS, "../x_master", "scan 12/ä"]]
    for scan_id in made:
        config = PipelineConfig(scan_id=scan_id, output_dir=output_dir)
        assert config.output_path.resolve().parent == output_dir
        assert (output_dir / "logs" / config.scan_id).resolve().parent == output_dir / "logs"
    refused = 0
    for name in HOSTILE_SCAN_IDS:
        try:
            PipelineConfig(scan_id=name, output_dir=output_dir)
        except ValueError:
            refused += 1
    reliability.record(
        "security",
        "scan ids that would leave the output directory (.., /, NUL, 201 characters, ...)",
        tried=len(HOSTILE_SCAN_IDS) + len(made),
        detail=f"{refused} of {len(HOSTILE_SCAN_IDS)} given directly refused; "
        f"{len(made)} made from file names all inside the output directory",
    )
    assert refused == len(HOSTILE_SCAN_IDS)
