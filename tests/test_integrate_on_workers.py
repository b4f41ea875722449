"""The GPU mode (``integrate_on_workers``): the feeder sends frames, compressed where they came
so, and each inference worker integrates its batch on the model's device and hands the
line-outs to the model there. Its results are those of the feeder's own integration; frames
that do not decode or integrate fail alone, with the feeder's words. On CPU tensors here (the
device integration itself is tested on CUDA where there is one:
tests/test_integration_device.py)."""

import os
import signal

import bitshuffle
import numpy as np
import pytest
from pydantic import ValidationError
from test_stream_decoding import bslz4, scanned, spoiled

from pipeline.config import InferenceConfig, PipelineConfig, TransportConfig
from pipeline.exposure import Exposure
from pipeline.model import load
from pipeline.preflight import checked_integrator
from pipeline.source_specs import DectrisStreamSource
from pipeline.sources import SimulatedDetector
from pipeline.sources.opening import opened
from pipeline.store import open_results
from pipeline.transport.messages import FrameMessage, LineOutMessage, Results, read
from workers.feeder import Feeder
from workers.feeder.integration import Integration, Unusable
from workers.feeder.metrics import ScanMetrics
from workers.feeder.reports import ScanError
from workers.inference import InferenceSession


@pytest.fixture(scope="module")
def model():
    return load(device="cpu")


def _exposures(n: int, seed: int) -> list[Exposure]:
    config = PipelineConfig(scan_id="x")
    return list(SimulatedDetector(config.integration, seed=seed).scan("x", n).exposures())


@pytest.mark.parametrize("threads", [1, 3], ids=["decoded-in-turn", "decoded-by-3-threads"])
def test_a_worker_s_batch_of_frames_gives_the_results_of_the_feeder_s_line_outs(model, threads):
    """Frames (decoded, compressed, one cut short, one all zeros) through a worker that
    integrates: the same draws as the line-outs the feeder's integrator makes, and the
    failure records the feeder would write."""
    config = PipelineConfig(scan_id="x", integrate_on_workers=True)
    integrator = checked_integrator(config)
    exposures = _exposures(5, seed=3)
    frames: list[np.ndarray | object] = [e.frame for e in exposures]
    frames[1] = bslz4(exposures[1].frame)
    frames[2] = spoiled(bslz4(exposures[2].frame))
    frames[3] = bslz4(np.zeros_like(exposures[3].frame))
    messages = [
        FrameMessage.of({"index": e.index, "scan_id": "x", "normalization": 2.0}, frame)
        for e, frame in zip(exposures, frames, strict=True)
    ]
    line_outs = [
        LineOutMessage(
            index=e.index, scan_id="x", normalization=2.0, counts=line_out.counts,
            counts_sd=line_out.counts_sd,
        )
        for e in (exposures[0], exposures[1], exposures[4])
        for line_out in [integrator.integrate(e.frame)]
    ]  # fmt: skip

    def results(sent: list) -> tuple[dict, dict]:
        session = InferenceSession.start(model, config, worker_id=0, threads=threads)
        outgoing, credit = session.run([read(m.to_frames()) for m in sent])  # as received
        columns = [m.columns for m in outgoing if isinstance(m, Results)]
        failures = {m.index: (m.stage, m.error) for m in outgoing if not isinstance(m, Results)}
        assert credit.inferred == 3
        joined = {name: np.concatenate([c[name] for c in columns]) for name in columns[0]}
        return joined, failures

    ours, failed = results(messages)
    expected, none = results(line_outs)
    assert none == {}
    assert set(failed) == {2, 3}
    assert failed[2][0] == "read" and "bitshuffle-LZ4 data" in failed[2][1]
    assert failed[3] == ("integration", "no counts in the integration region (an all-zero frame)")
    assert ours["index"].tolist() == [0, 1, 4]
    np.testing.assert_allclose(ours["counts"], expected["counts"], rtol=1e-6)
    np.testing.assert_allclose(ours["counts_sd"], expected["counts_sd"], rtol=1e-6)
    np.testing.assert_array_equal(ours["normalization"], [2.0] * 3)
    np.testing.assert_allclose(ours["samples"], expected["samples"], rtol=1e-5, atol=1e-4)


def test_a_batch_the_model_fails_on_keeps_its_read_failures(model, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr("workers.inference.run_batch", out_of_memory)
    config = PipelineConfig(scan_id="x", integrate_on_workers=True)
    frame = _exposures(1, seed=4)[0].frame
    messages = [
        FrameMessage.of({"index": 0}, bslz4(frame)),
        FrameMessage.of({"index": 1}, spoiled(bslz4(frame))),
    ]
    session = InferenceSession.start(model, config, worker_id=0)
    outgoing, credit = session.run(messages)
    assert credit.inferred == 0
    assert {m.index: (m.stage, m.error[:12]) for m in outgoing} == {
        0: ("inference", "RuntimeError"),
        1: ("read", "bitshuffle-L"),
    }


def test_a_frame_compressed_in_a_way_no_decoder_knows_fails_at_the_read_stage(model):
    config = PipelineConfig(scan_id="x", integrate_on_workers=True)
    frame = _exposures(1, seed=2)[0].frame
    blob = bitshuffle.compress_lz4(frame).tobytes()
    message = FrameMessage.of({"index": 0, "source": "a.h5::7"}, bslz4(frame))
    unknown = FrameMessage(
        **{**message.__dict__, "compression": "zstd", "image": np.frombuffer(blob, np.uint8)}
    )
    session = InferenceSession.start(model, config, worker_id=0)
    (failure,), credit = session.run([unknown])
    assert credit.inferred == 0
    assert failure.stage == "read"
    assert failure.error.startswith("a.h5::7: a frame compressed as 'zstd'")


def test_a_scan_integrated_on_the_workers_stores_what_the_feeder_s_integration_does(tmp_path):
    exposures = _exposures(8, seed=6)
    given = list(exposures)
    for position in (2, 5):  # compressed, as a stream leaves them
        e = exposures[position]
        encoded = bslz4(e.frame) if position == 2 else spoiled(bslz4(e.frame))
        given[position] = Exposure(
            e.scan_id, e.index, e.timestamp, None, e.truth, e.metadata, encoded=encoded
        )
    given[6] = Exposure("x", 6, 0.0, None, error="truncated file")
    stored = {}
    for name, on_workers in (("feeder", False), ("workers", True)):
        config = PipelineConfig(
            scan_id=name, n_workers=2, integrate_on_workers=on_workers, output_dir=tmp_path
        )
        stored[name] = scanned(config, given)
    (feeder_summary, here), (workers_summary, there) = stored["feeder"], stored["workers"]
    assert set(workers_summary.failures) == set(feeder_summary.failures) == {5, 6}
    assert workers_summary.failures == feeder_summary.failures
    # counted from the workers' batches, which integrate and infer
    assert workers_summary.stages["integrated"] == workers_summary.stages["inferred"]
    assert (
        feeder_summary.stages["integrated"]["count"]
        == 6
        == workers_summary.stages["integrated"]["count"]
    )
    ok = ~np.isin(np.arange(8), [5, 6])
    np.testing.assert_allclose(there.counts[ok], here.counts[ok], rtol=1e-6)
    assert (there.status[ok] == "ok").all() and (there.status[~ok] == "failed").all()


def test_a_worker_killed_while_it_holds_frames_loses_none(tmp_path):
    """The feeder keeps each frame until its exposure is written, and sends those of a
    worker that died to the other one: every exposure is written once."""
    frames = [bslz4(e.frame) for e in _exposures(4, seed=7)]
    config = PipelineConfig(
        scan_id="killed",
        n_workers=2,
        integrate_on_workers=True,
        output_dir=tmp_path,
        inference=InferenceConfig(n_samples=50),
    )
    with Feeder(config) as feeder:
        for index in range(60):
            if index == 20:
                feeder.collect()
                workers = [pid for name, pid in feeder.children.items() if name != "writer"]
                os.kill(workers[0], signal.SIGKILL)
            exposure = Exposure("killed", index, 0.0, None, encoded=frames[index % 4])
            feeder.submit(exposure)
        summary = feeder.wait()
    assert summary.worker_restarts == 1
    results = open_results(config.output_path)
    assert sorted(results.index.tolist()) == list(range(60)) and (results.status == "ok").all()


def test_frames_a_worker_could_not_take_fail_in_the_feeder():
    """Not sent: a frame that is not an image (refused with the host's words), and one
    larger than a worker's socket takes; a float16 frame goes as float32."""
    frame = _exposures(1, seed=2)[0].frame  # 18 MB of uint32

    def outcome(image: np.ndarray, max_message_bytes: int = 64 * 2**20) -> object:
        transport = TransportConfig(max_message_bytes=max_message_bytes)
        config = PipelineConfig(scan_id="x", integrate_on_workers=True, transport=transport)
        return Integration(config, ScanMetrics()).for_worker(Exposure("x", 0, 0.0, image))

    flat = outcome(frame.reshape(-1))
    assert flat == Unusable("integration", f"frame shape ({frame.size},) is not a 2-D image")
    too_large = outcome(frame, max_message_bytes=16 * 2**20)
    assert isinstance(too_large, Unusable) and "more than a worker takes" in too_large.error
    half = outcome(frame.astype(np.float16))
    assert isinstance(half, FrameMessage) and half.image.dtype == np.float32
    assert read(half.to_frames()).image.shape == frame.shape


def test_the_frames_shape_must_be_known_before_the_first_frame(tmp_path):
    from test_integration_corrections import SMALL_PONI_V1

    poni = tmp_path / "v1.poni"
    poni.write_text(SMALL_PONI_V1)
    config = PipelineConfig.model_validate(
        {"scan_id": "x", "integrate_on_workers": True, "integration": {"poni": poni}}
    )
    with pytest.raises(ScanError, match="needs the frames' shape before the first frame"):
        Feeder(config)


@pytest.mark.parametrize(
    ("settings", "why"),
    [
        ({"integration": {"method": "lut"}}, "needs the csr method, not lut"),
        ({"n_integrators": 2}, "not 2 integrator processes"),
        ({"transport": TransportConfig(remote_work="tcp://127.0.0.1:5999")}, "local workers"),
    ],
)
def test_workers_integrate_only_what_they_can(settings, why):
    with pytest.raises(ValidationError, match=why):
        PipelineConfig(scan_id="x", integrate_on_workers=True, **settings)


def test_a_stream_leaves_its_frames_compressed_for_workers_that_integrate():
    spec = DectrisStreamSource(stream="tcp://127.0.0.1:1", protocol="dectris-v2")
    config = PipelineConfig(scan_id="s", source=spec, integrate_on_workers=True)
    with opened(config) as source:
        assert source.source.decode_frames is False
    assert config.batch_limit("cuda") == 64 and config.batch_limit("cpu") == 8
