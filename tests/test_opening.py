"""A configuration's source (``pipeline.sources.opening``) and its settings
(``pipeline.source_specs``): what every scan flow opens through ``reconstruct(config)``."""

import os

import numpy as np
import pytest
from conftest import SMALL_DETECTOR_PONI
from fabio.edfimage import EdfImage
from pydantic import TypeAdapter, ValidationError

from pipeline.config import IntegrationConfig, PipelineConfig
from pipeline.source_specs import (
    ArchivedFiles,
    DectrisStreamSource,
    SimulatedFrames,
    SourceSpec,
    WatchedFolder,
)
from pipeline.sources import FileSource, ReadAhead
from pipeline.sources.base import Source
from pipeline.sources.opening import archived_files, opened


def _frames(folder, n, shape=(6, 8)):
    folder.mkdir(exist_ok=True)
    for number in range(n):
        EdfImage(data=np.full(shape, number, np.uint16)).write(str(folder / f"f_{number}.edf"))


@pytest.mark.parametrize(
    "spec",
    [
        SimulatedFrames(n_frames=3, seed=2),
        ArchivedFiles(paths=["/data/a/*.cbf", "/data/b_master.h5"], read_ahead=4),
        WatchedFolder(directory="/data/incoming", pattern="*.cbf", idle_timeout_s=None),
        DectrisStreamSource(stream="tcp://10.0.0.5:9999", protocol="dectris-v2"),
    ],
)
def test_a_source_is_saved_with_the_configuration_and_read_back_as_it_was(spec):
    config = PipelineConfig(scan_id="s", source=spec)
    again = PipelineConfig.model_validate_json(config.model_dump_json())
    assert again == config and type(again.source) is type(spec)


def test_a_source_of_unknown_kind_or_with_unknown_fields_is_refused():
    adapter = TypeAdapter(SourceSpec)
    with pytest.raises(ValidationError, match="kind"):
        adapter.validate_python({"kind": "tape", "paths": ["x"]})
    with pytest.raises(ValidationError, match="live"):  # what is live is not a setting
        adapter.validate_python({"kind": "files", "paths": ["x"], "live": True})
    with pytest.raises(ValidationError):
        ArchivedFiles(paths=[])


def test_only_live_sources_are_live():
    assert WatchedFolder(directory="/x").live and DectrisStreamSource(stream="tcp://h:1").live
    assert not SimulatedFrames().live and not ArchivedFiles(paths=["x"]).live


def test_archived_files_give_their_manifest_and_the_headers_detector_shape(tmp_path):
    _frames(tmp_path / "scan", 3)
    poni = tmp_path / "no-detector.poni"  # pixel sizes, no detector: the shape is open
    poni.write_text(SMALL_DETECTOR_PONI)
    spec = ArchivedFiles(paths=[str(tmp_path / "scan" / "f_*.edf")])
    config = PipelineConfig(scan_id="s", integration=IntegrationConfig(poni=poni), source=spec)
    files = archived_files(config)
    assert isinstance(files.source, FileSource) and isinstance(files.source, Source)
    assert files.config.integration.detector_shape == (6, 8)
    assert len(files.manifest) == 3


def test_a_pattern_that_matches_nothing_stops_before_anything_is_read(tmp_path):
    spec = ArchivedFiles(paths=[str(tmp_path / "typo_*.edf")])
    with (
        pytest.raises(ValueError, match=r"no file matches .*typo_"),
        opened(PipelineConfig(scan_id="s", source=spec)),
    ):
        pass
    with pytest.raises(ValueError, match="not archived files"):
        archived_files(PipelineConfig(scan_id="s", source=SimulatedFrames()))
    with pytest.raises(ValueError, match="names no source"), opened(PipelineConfig(scan_id="s")):
        pass


def test_files_read_ahead_leave_the_reader_a_core_and_end_cleanly(tmp_path):
    _frames(tmp_path / "scan", 4)
    spec = ArchivedFiles(paths=[str(tmp_path / "scan")], read_ahead=2)
    with opened(PipelineConfig(scan_id="s", source=spec)) as scan:
        assert isinstance(scan.source, ReadAhead) and isinstance(scan.source, Source)
        assert scan.config.integration.openmp_threads == max(1, (os.cpu_count() or 1) - 1)
        values = [int(exposure.frame[0, 0]) for exposure in scan.source.exposures()]
    assert values == [0, 1, 2, 3] and scan.source.ended_cleanly
    assert scan.source.statistics.frames_received == 4 and scan.manifest is not None


def test_a_simulated_scan_stopped_halfway_does_not_end_cleanly():
    with opened(PipelineConfig(scan_id="s", source=SimulatedFrames(n_frames=5))) as scan:
        exposures = scan.source.exposures()
        next(exposures)
        scan.source.stop()
        assert list(exposures) == []
    assert not scan.source.ended_cleanly and scan.source.statistics.frames_received == 1
