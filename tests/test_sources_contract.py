"""Every source keeps the contract of ``pipeline.sources.base.Source``: ``ended_cleanly`` is
``False`` until a full iteration ended and after a ``stop()``, ``statistics`` counts the read
and the failed frames; and the modules of ``pipeline/sources`` import only lower ones."""

from __future__ import annotations

import ast
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import h5py
import numpy as np
import pytest
import zmq
from fabio.edfimage import EdfImage

import pipeline.sources
from pipeline.config import IntegrationConfig
from pipeline.sources import (
    DectrisStream,
    DirectoryWatcher,
    EigerSource,
    FileSource,
    ReadAhead,
    SimulatedDetector,
    Source,
    SourceStatistics,
)

TIMEOUT_S = 20.0
KINDS = ["files", "eiger", "watched folder", "read ahead", "dectris stream", "simulated"]
#: exposures (read and failed) of a full iteration, and how many of them failed
FULL = {
    "files": (3, 1),
    "eiger": (5, 1),
    "watched folder": (3, 1),
    "read ahead": (3, 1),
    "dectris stream": (3, 1),
    "simulated": (3, 0),
}
#: stopped after the first exposure: the exposures that still follow, and what
#: ``statistics.frames_received`` says then
AFTER_STOP = {
    "files": (0, 1),
    "eiger": (0, 1),
    "read ahead": (0, 1),
    "simulated": (0, 1),
    # the last look gives the file complete by then, and reports the unreadable one
    "watched folder": (2, 3),
    # the images that never came follow as failed exposures, counted as missing, not received
    "dectris stream": (2, 1),
}


def write_image_files(folder: Path) -> Path:
    """Two EDF frames and a file of garbage with an EDF name."""
    folder.mkdir()
    for n in (1, 2):
        EdfImage(data=np.full((4, 5), n, np.uint16)).write(str(folder / f"f_{n}.edf"))
    (folder / "f_3.edf").write_bytes(np.random.default_rng(0).bytes(3000))
    return folder


def write_eiger_scan(folder: Path) -> Path:
    """A master linking two data files of two frames each (h5py ExternalLink), and an
    unreadable HDF5 file."""
    folder.mkdir()
    with h5py.File(folder / "s_master.h5", "w") as master:
        for n in (1, 2):
            with h5py.File(folder / f"s_data_00000{n}.h5", "w") as data_file:
                data_file["entry/data/data"] = np.full((2, 4, 6), n, np.uint16)
            master[f"entry/data/data_00000{n}"] = h5py.ExternalLink(
                f"s_data_00000{n}.h5", "/entry/data/data"
            )
    (folder / "t_broken.h5").write_bytes(np.random.default_rng(1).bytes(3000))
    return folder


def v1_messages(frames: int, *, bad: int | None = None, end: bool = True) -> list[list[bytes]]:
    """A DECTRIS stream v1 series of 3 images: the header, ``frames`` raw images (image
    ``bad`` with a shape its data cannot fill) and, with ``end``, the end message."""
    frame = np.arange(48, dtype=np.uint32).reshape(6, 8)
    messages = [
        [
            json.dumps({"htype": "dheader-1.0", "series": 7, "header_detail": "basic"}).encode(),
            json.dumps({"ntrigger": 1, "nimages": 3}).encode(),
        ]
    ]
    for number in range(frames):
        shape = [8, 7] if number == bad else [8, 6]
        description = {"htype": "dimage_d-1.0", "shape": shape, "type": "uint32"}
        description |= {"encoding": "<", "size": frame.nbytes}
        messages.append(
            [
                json.dumps({"htype": "dimage-1.0", "series": 7, "frame": number}).encode(),
                json.dumps(description).encode(),
                frame.tobytes(),
                json.dumps({"htype": "dconfig-1.0", "start_time": 0, "stop_time": 1}).encode(),
            ]
        )
    if end:
        messages.append([json.dumps({"htype": "dseries_end-1.0", "series": 7}).encode()])
    return messages


@pytest.fixture(scope="module")
def simulated() -> SimulatedDetector:
    return SimulatedDetector(IntegrationConfig(), seed=0)


@pytest.fixture
def make(tmp_path, simulated) -> Iterator[Callable[[str, bool], Source]]:
    """``make(kind, whole)``: a source of that kind, whose series (DECTRIS) is whole or stops
    after its first image; closed at the end of the test."""
    closing: list[Callable[[], None]] = []
    counter = iter(range(100))

    def new(kind: str, whole: bool) -> Source:
        folder = tmp_path / f"{kind.replace(' ', '_')}_{next(counter)}"
        if kind == "files":
            return FileSource(write_image_files(folder), "s")
        if kind == "eiger":
            return EigerSource(write_eiger_scan(folder), "s")
        if kind == "watched folder":
            return DirectoryWatcher(
                write_image_files(folder),
                "s",
                "*.edf",
                poll_interval_s=0.02,
                idle_timeout_s=0.3,
                settle_timeout_s=0.1,
            )
        if kind == "read ahead":
            reader = ReadAhead(FileSource(write_image_files(folder), "s"), depth=2)
            closing.append(reader.close)
            return reader
        if kind == "dectris stream":
            sender = zmq.Context.instance().socket(zmq.PUSH)  # one per receiver
            sender.setsockopt(zmq.LINGER, 0)
            sender.bind("tcp://127.0.0.1:*")
            stream = DectrisStream(
                sender.getsockopt_string(zmq.LAST_ENDPOINT),
                idle_timeout_s=0.5,
                start_timeout_s=TIMEOUT_S,
            )
            closing.extend([stream.close, lambda: sender.close(linger=0)])
            assert stream.wait_connected(TIMEOUT_S)
            messages = v1_messages(3, bad=1) if whole else v1_messages(1, end=False)
            for message in messages:
                sender.send_multipart(message)
            return stream
        assert kind == "simulated"
        return simulated.scan("s", 3)

    yield new
    for close in closing:
        close()


@pytest.mark.parametrize("kind", KINDS)
def test_a_full_iteration_ends_cleanly_and_counts_read_and_failed_frames(make, kind):
    source = make(kind, True)
    assert isinstance(source, Source) and isinstance(source.statistics, SourceStatistics)
    assert not source.ended_cleanly

    exposures = list(source.exposures())

    received, failed = FULL[kind]
    assert [exposure.index for exposure in exposures] == list(range(received))
    assert sum(exposure.error is not None for exposure in exposures) == failed
    assert (source.statistics.frames_received, source.statistics.frames_failed) == FULL[kind]
    assert source.ended_cleanly
    summary = source.statistics.summary()
    assert str(received) in summary and "\n" not in summary


@pytest.mark.parametrize("kind", KINDS)
def test_a_source_stopped_halfway_does_not_end_cleanly(make, kind):
    source = make(kind, False)
    exposures = source.exposures()

    first = next(exposures)
    source.stop()
    rest = list(exposures)

    assert first.index == 0 and first.error is None
    assert (len(rest), source.statistics.frames_received) == AFTER_STOP[kind]
    assert not source.ended_cleanly


def test_an_object_without_the_contract_is_no_source():
    assert not isinstance(iter([]), Source)
    assert not isinstance(object(), SourceStatistics)


#: pipeline/sources modules, lowest first: each may import only those before it
LAYERS = [
    "compression",
    "base",
    "paths",
    "identity",
    "images",
    "hdf5",
    "layout",
    "eiger",
    "files",
    "watch",
    "readahead",
    "handoff",
    "simulated",
    "dectris",
    "opening",
]


def imported_sources_modules(path: Path) -> set[str]:
    """The ``pipeline.sources`` modules that the module at ``path`` imports anywhere (at its
    top or inside functions), by their name under ``pipeline.sources``."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            names = [node.module]
        for name in names:
            if name.startswith("pipeline.sources."):
                found.add(name.split(".")[2])
    return found


def test_the_modules_of_sources_import_only_lower_ones_and_files_and_eiger_not_each_other():
    folder = Path(pipeline.sources.__file__).parent
    modules = {path.stem for path in folder.glob("*.py")} - {"__init__"}
    assert modules | {"dectris"} == set(LAYERS)
    for position, name in enumerate(LAYERS):
        paths = (
            sorted((folder / name).glob("*.py")) if name == "dectris" else [folder / f"{name}.py"]
        )
        imported = set().union(*(imported_sources_modules(path) for path in paths))
        higher = set(LAYERS[position + 1 :]) & imported
        assert not higher, f"pipeline/sources/{name} imports the higher {sorted(higher)}"
    assert "files" not in imported_sources_modules(folder / "eiger.py")
