"""Frames integrated in batches on a torch device (``pipeline.integration.device``) give the
line-outs, and the refusals, of ``LineOutIntegrator.integrate``: on CPU tensors here and on
CUDA where there is one."""

import numpy as np
import pytest
from test_integration_corrections import SHAPE, SMALL_PONI
from test_integration_csr import DEVICES, _corrections, _frames

from pipeline.config import IntegrationConfig
from pipeline.integration import FrameError, LineOutIntegrator
from pipeline.integration.device import DeviceIntegrator
from pipeline.physics import QGrid


def _integrator(tmp_path, corrected: bool, **settings) -> LineOutIntegrator:
    rng = np.random.default_rng(3)
    poni = tmp_path / "small.poni"
    poni.write_text(SMALL_PONI)
    corrections = _corrections(tmp_path, rng) if corrected else {}
    return LineOutIntegrator(IntegrationConfig(poni=poni, **corrections, **settings), QGrid())


def _expected(integrator: LineOutIntegrator, frame: np.ndarray) -> np.ndarray | str:
    try:
        line_out = integrator.integrate(frame)
    except FrameError as error:
        return str(error)
    return np.stack([line_out.counts, line_out.counts_sd])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("corrected", [False, True], ids=["raw", "dark-and-flat"])
def test_a_batch_on_the_device_gives_the_host_s_line_outs_to_a_millionth(
    tmp_path, device, corrected
):
    integrator = _integrator(tmp_path, corrected, azimuth_range_deg=(-20.0, 20.0))
    frames = list(_frames(np.random.default_rng(8)).values())
    frames += list(_frames(np.random.default_rng(9)).values())  # two of each pixel type
    frames.append(frames[0].astype(">u4"))  # big-endian, as some files hold them
    frames.append(np.minimum(frames[0], 2**20).astype(np.uint64))
    line_outs = DeviceIntegrator(integrator, device).integrate(frames)
    assert line_outs.counts.device.type == device
    assert line_outs.errors == [None] * len(frames)
    for row, frame in enumerate(frames):
        ours = np.stack([line_outs.counts[row].cpu().numpy(), line_outs.counts_sd[row].cpu()])
        expected = _expected(integrator, frame)
        assert isinstance(expected, np.ndarray) and expected[0].sum() > 1000
        np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=0, err_msg=str(frame.dtype))


@pytest.mark.parametrize("device", DEVICES)
def test_frames_the_host_refuses_are_refused_on_the_device_with_its_words(tmp_path, device):
    integrator = _integrator(tmp_path, corrected=False, max_bad_pixel_fraction=0.2)
    good = _frames(np.random.default_rng(4))
    saturated = good["uint32"].copy()
    saturated[:, : SHAPE[1] // 2 + 60] = np.iinfo(np.uint32).max
    gaps = good["int32"].copy()
    gaps[:, : SHAPE[1] // 2 + 60] = -2
    not_finite, negative = (good["float32"].copy() for _ in range(2))
    not_finite[5, 5:8] = np.nan
    negative[7, 7] = -0.5
    wrong_markers = good["int32"].copy()
    wrong_markers[0, 0] = -7
    frames = [
        good["uint32"],
        saturated,
        gaps,
        not_finite,
        negative,
        wrong_markers,
        np.zeros(SHAPE, np.uint16),  # no counts
        np.ones((SHAPE[0], SHAPE[1] - 1), np.uint32),  # another detector's shape
        np.ones(SHAPE, np.complex64),  # not a pixel type
        good["int32"],
    ]
    line_outs = DeviceIntegrator(integrator, device).integrate(frames)
    for frame, error in zip(frames, line_outs.errors, strict=True):
        expected = _expected(integrator, frame)
        if isinstance(expected, str):
            assert error == expected
        else:
            assert error is None
    assert [error is None for error in line_outs.errors] == [
        True, False, False, False, False, False, False, False, False, True
    ]  # fmt: skip


def test_only_the_csr_method_with_a_known_shape_integrates_on_a_device(tmp_path):
    lut = _integrator(tmp_path, corrected=False, method="lut")
    with pytest.raises(ValueError, match="only with the csr method"):
        DeviceIntegrator(lut, "cpu")
