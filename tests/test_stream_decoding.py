"""Frames left compressed for the integrator processes (``decode_frames=False``), a DECTRIS
stream's images and HDF5 files' bitshuffle-LZ4 and LZ4 chunks: checked when they come, decoded
by the integrator processes, and stored as if decoded where they came."""

import json
import struct

import bitshuffle
import cbor2
import h5py
import hdf5plugin
import lz4.block
import numpy as np
import pytest

from pipeline.config import IntegrationConfig, PipelineConfig
from pipeline.exposure import Exposure
from pipeline.integration import LineOutIntegrator
from pipeline.integration.pool import IntegratorPool, integrator_processes
from pipeline.physics import QGrid
from pipeline.source_specs import (
    ArchivedFiles,
    DectrisStreamSource,
    SimulatedFrames,
    WatchedFolder,
)
from pipeline.sources import EigerSource, FileSource, SimulatedDetector
from pipeline.sources.compression import EncodedFrame, FormatError
from pipeline.sources.dectris import parse_message
from pipeline.sources.opening import opened
from pipeline.store import Results, open_results
from workers.feeder import Feeder, ScanSummary

SECTOR = IntegrationConfig(azimuth_range_deg=(-5.0, 5.0))


def bslz4(frame: np.ndarray) -> EncodedFrame:
    """``frame`` as a v1 stream sends it with encoding ``bs32-lz4<`` (no HDF5 header)."""
    blob = bitshuffle.compress_lz4(np.ascontiguousarray(frame, "<u4")).tobytes()
    return EncodedFrame(blob, frame.shape, "<u4", "bslz4", 4, "auto")


def spoiled(encoded: EncodedFrame) -> EncodedFrame:
    """``encoded`` cut short by 10 bytes (it no longer decodes)."""
    return encoded.with_data(bytes(encoded.data)[:-10])


def v1_message(frame: np.ndarray, encoding: str, blob: bytes) -> list[bytes]:
    description = {
        "htype": "dimage_d-1.0",
        "shape": [frame.shape[1], frame.shape[0]],
        "type": frame.dtype.name,
        "encoding": encoding,
        "size": len(blob),
    }
    timing = {"htype": "dconfig-1.0", "start_time": 0, "stop_time": 9, "real_time": 9}
    first = {"htype": "dimage-1.0", "series": 1, "frame": 4, "hash": ""}
    return [json.dumps(part).encode() for part in (first, description)] + [
        blob,
        json.dumps(timing).encode(),
    ]


def v2_message(frame: np.ndarray, payload: object, tag: int, order_tag: int = 40) -> list[bytes]:
    shape = list(frame.shape)
    data = {"threshold_1": cbor2.CBORTag(order_tag, [shape, cbor2.CBORTag(tag, payload)])}
    image = {"type": "image", "series_id": 1, "image_id": 4, "data": data}
    return [cbor2.dumps(image)]


def scanned(config: PipelineConfig, exposures: list[Exposure]) -> tuple[ScanSummary, Results]:
    """A Feeder scan of ``exposures`` with ``config``: its summary and its results file."""
    with Feeder(config) as feeder:
        for exposure in exposures:
            feeder.submit(exposure)
        summary = feeder.wait()
    return summary, open_results(config.output_path)


@pytest.fixture(scope="module")
def frame() -> np.ndarray:
    return np.random.default_rng(2).poisson(4.0, (37, 23)).astype(np.uint32)


def _messages(frame: np.ndarray) -> dict[str, list[bytes]]:
    raw = frame.astype("<u4").tobytes()
    shuffled = bitshuffle.compress_lz4(frame.astype("<u4")).tobytes()
    big = frame.astype(">u2")
    return {
        "v1 bs32-lz4": v1_message(frame, "bs32-lz4<", shuffled),
        "v1 raw": v1_message(frame, "<", raw),
        "v1 big-endian uint16": v1_message(frame.astype(np.uint16), ">", big.tobytes()),
        "v1 bitshuffle alone": v1_message(
            frame, "bs32<", bitshuffle.bitshuffle(frame.astype("<u4").ravel()).tobytes()
        ),
        "v1 lz4": v1_message(frame, "lz4<", lz4.block.compress(raw, store_size=False)),
        "v2 bslz4": v2_message(
            frame,
            cbor2.CBORTag(56500, ["bslz4", 4, struct.pack(">QI", len(raw), 0) + shuffled]),
            70,
        ),
        "v2 raw": v2_message(frame, raw, 70),
        "v2 column-major": v2_message(frame.T, frame.astype("<u4").tobytes(), 70, 1040),
    }


@pytest.mark.parametrize("kind", list(_messages(np.zeros((2, 8), np.uint32))))
def test_an_image_left_encoded_decodes_to_the_frame_decoded_at_once(frame, kind):
    parts = _messages(frame)[kind]
    now = parse_message(parts)
    later = parse_message(parts, decode=False)
    assert now.kind == later.kind == "image"
    assert later.frame is None and later.error is None and later.encoded is not None
    assert now.encoded is None and now.error is None
    decoded = later.encoded.decode()
    assert decoded.dtype == now.frame.dtype and decoded.flags.writeable
    np.testing.assert_array_equal(decoded, now.frame)


def test_data_that_does_not_decode_fails_when_it_is_decoded_and_a_wrong_size_at_once(frame):
    shuffled = bitshuffle.compress_lz4(frame.astype("<u4")).tobytes()[:-10]
    parts = v1_message(frame, "bs32-lz4<", shuffled)
    assert "bitshuffle-LZ4 data" in (parse_message(parts).error or "")
    later = parse_message(parts, decode=False)
    assert later.error is None and later.encoded is not None
    with pytest.raises(FormatError, match="bitshuffle-LZ4 data"):
        later.encoded.decode()
    short = v1_message(frame, "<", frame.tobytes()[:-4])
    refused = parse_message(short, decode=False)
    assert refused.encoded is None and "needs" in (refused.error or "")


def test_the_pool_decodes_what_it_is_given_compressed(tmp_path):
    frames = [e.frame for e in SimulatedDetector(SECTOR, seed=4).scan("enc", 3).exposures()]
    given = [bslz4(frames[0]), frames[1], spoiled(bslz4(frames[2])), bslz4(frames[2][:40])]
    own = LineOutIntegrator(SECTOR, QGrid())
    with IntegratorPool(SECTOR, QGrid(), processes=2) as pool:
        pool.wait_ready(timeout_s=60)
        for key, item in enumerate(given):
            while not pool.has_room:
                pool.wait_any(1.0)
            pool.submit(key, item, normalization=1.0, source=f"image {key}")
        done = {result.key: result for result in pool.wait_all(timeout_s=60)}
    for key, source_frame in ((0, frames[0]), (1, frames[1])):
        expected = own.integrate(source_frame, 1.0)
        np.testing.assert_array_equal(done[key].line_out.counts, expected.counts)
        assert done[key].stage == "integration" and done[key].error is None
    assert done[2].line_out is None and done[2].stage == "read"
    assert done[2].error.startswith("image 2: ") and "bitshuffle-LZ4 data" in done[2].error
    assert done[3].stage == "integration" and "shape" in done[3].error


def test_a_scan_of_compressed_frames_through_integrators_stores_what_decoding_first_does(
    tmp_path,
):
    config = PipelineConfig(scan_id="x")
    exposures = list(SimulatedDetector(config.integration, seed=6).scan("x", 8).exposures())
    encoded = [
        Exposure(e.scan_id, e.index, e.timestamp, None, e.truth, e.metadata, encoded=bslz4(e.frame))
        for e in exposures
    ]
    encoded[5].encoded = spoiled(encoded[5].encoded)
    stored = {}
    for name, given, integrators in (
        ("decoded", exposures, 1),
        ("here", encoded, 1),
        ("processes", encoded, 2),
    ):
        config = PipelineConfig(
            scan_id=name, n_workers=1, n_integrators=integrators, output_dir=tmp_path
        )
        summary, results = scanned(config, given)
        assert summary.stages["integrated"]["count"] == (8 if name == "decoded" else 7)
        stored[name] = (summary, results)
    decoded, here, processes = (stored[name][1] for name in ("decoded", "here", "processes"))
    ok = np.arange(8) != 5
    np.testing.assert_array_equal(here.counts[ok], decoded.counts[ok])
    np.testing.assert_array_equal(processes.counts, here.counts)
    for name in ("here", "processes"):
        summary = stored[name][0]
        assert set(summary.failures) == {5} and "bitshuffle-LZ4 data" in summary.failures[5]


def test_a_stream_scan_leaves_decoding_to_its_integrator_processes():
    def stream_config(integrators: int | None) -> PipelineConfig:
        spec = DectrisStreamSource(stream="tcp://127.0.0.1:1", protocol="dectris-v2")
        return PipelineConfig(scan_id="s", source=spec, n_integrators=integrators)

    with opened(stream_config(2)) as source:
        assert source.source.decode_frames is False
    with opened(stream_config(1)) as source:
        assert source.source.decode_frames is True


def test_compressed_stream_frames_get_the_spare_cores_and_decoded_csr_frames_one(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(6)), raising=False)
    stream = DectrisStreamSource(stream="tcp://127.0.0.1:1")
    assert integrator_processes(PipelineConfig(scan_id="s", source=stream, n_workers=2)) == 4
    simulated = PipelineConfig(scan_id="s", source=SimulatedFrames(), n_workers=2)
    assert integrator_processes(simulated) == 1
    given = PipelineConfig(scan_id="s", source=stream, n_workers=2, n_integrators=3)
    assert integrator_processes(given) == 3


@pytest.fixture
def hdf5_files(tmp_path) -> dict[str, tuple]:
    """Eiger-like data files of 3 frames, one chunk per frame, by filter: (path, frames)."""
    rng = np.random.default_rng(9)
    files = {}
    for name, dtype, filters in (
        ("bslz4", np.uint32, hdf5plugin.Bitshuffle(cname="lz4")),
        ("lz4", np.uint16, hdf5plugin.LZ4()),
        ("gzip", np.uint16, {"compression": "gzip"}),
    ):
        frames = rng.poisson(5.0, (3, 40, 30)).astype(dtype)
        path = tmp_path / f"{name}_data_000001.h5"
        with h5py.File(path, "w") as handle:
            handle.create_dataset("entry/data/data", data=frames, chunks=(1, 40, 30), **filters)
        files[name] = (path, frames)
    return files


@pytest.mark.parametrize("reader", [EigerSource, FileSource])
def test_hdf5_chunks_left_compressed_decode_to_what_h5py_reads(hdf5_files, reader):
    for name, (path, frames) in hdf5_files.items():
        exposures = list(reader([path], "h5", decode_frames=False).exposures())
        assert [e.index for e in exposures] == [0, 1, 2]
        for exposure, frame in zip(exposures, frames, strict=True):
            assert exposure.error is None
            if name == "gzip":  # a filter the integrators do not decode: decoded here
                assert exposure.encoded is None and exposure.frame is not None
            else:
                assert exposure.frame is None and exposure.encoded.compression == name
            np.testing.assert_array_equal(exposure.image(), frame)


@pytest.mark.parametrize("watched", [False, True], ids=["archived", "watched-folder"])
def test_a_scan_with_integrator_processes_leaves_hdf5_chunks_to_them(hdf5_files, watched):
    """Archived files (read ahead by a reader process) and a watched folder alike."""
    path, frames = hdf5_files["bslz4"]
    source = (
        WatchedFolder(
            directory=str(path.parent), pattern=path.name, poll_interval_s=0.05, idle_timeout_s=0.3
        )
        if watched
        else ArchivedFiles(paths=[str(path)])
    )
    for integrators, compressed in ((2, True), (1, False)):
        config = PipelineConfig(scan_id="h5", source=source, n_integrators=integrators)
        with opened(config) as scan:
            exposures = list(scan.source.exposures())
        assert [e.encoded is not None for e in exposures] == [compressed] * 3
        for exposure, frame in zip(exposures, frames, strict=True):
            np.testing.assert_array_equal(exposure.image(), frame)
