"""pyFAI's CSR matrix applied to the pixels it names (``pipeline.integration.csr``) gives
pyFAI's own sums, to 1e-6 relative: every kind of frame and bad-pixel marker, with and without
dark and flat, on CPU tensors here and on CUDA where there is one."""

import fabio
import numpy as np
import pytest
import torch
from test_integration_corrections import SHAPE, SMALL_PONI

from pipeline.config import IntegrationConfig
from pipeline.integration import LineOutIntegrator
from pipeline.integration.csr import CsrEngine
from pipeline.physics import QGrid

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here"),
    ),
]


def _corrections(tmp_path, rng) -> dict:
    """A dark with unusable (NaN) pixels and some at the int32 frames' marker (-1, which
    pyFAI does not look for in the dark), and a flat about 1."""
    dark = rng.uniform(0.0, 3.0, SHAPE).astype(np.float32)
    dark[::17, ::13] = np.nan
    dark[3::19, 2::23] = -1.0
    np.save(tmp_path / "dark.npy", dark)
    np.save(tmp_path / "flat.npy", rng.uniform(0.8, 1.2, SHAPE).astype(np.float32))
    return {"dark": tmp_path / "dark.npy", "flat": tmp_path / "flat.npy"}


def _dead(flat: np.ndarray | None) -> np.ndarray | None:
    """``flat`` with dead (0) and unusable (NaN) pixels, which pyFAI leaves out (the
    pipeline refuses such a flat file; the engine must still agree with pyFAI on it)."""
    if flat is None:
        return None
    flat = flat.copy()
    flat[::11, ::7] = 0.0
    flat[5::23, ::19] = np.nan
    return flat


def _frames(rng) -> dict[str, np.ndarray]:
    counts = rng.poisson(rng.uniform(0, 400, SHAPE))
    unsigned = counts.astype(np.uint32)
    unsigned[::29, ::31] = np.iinfo(np.uint32).max  # saturated or bad
    signed = counts.astype(np.int32)
    signed[:, 190:197] = -2  # a module gap
    signed[::37, ::41] = -1  # bad pixels
    return {
        "uint32": unsigned,
        "uint16": np.minimum(counts, 65535).astype(np.uint16),
        "int32": signed,
        "float32": (counts * 1.25).astype(np.float32),
    }


def _pyfai_sums(
    integrator: LineOutIntegrator, frame: np.ndarray, flat: np.ndarray | None
) -> np.ndarray:
    """pyFAI's integrate1d on the whole frame, as the engine was built for."""
    dummy, delta_dummy = integrator.dummy(frame) or (None, None)
    low, high = integrator.config.azimuth_range_deg or (None, None)
    result = integrator.geometry.integrate1d(
        frame,
        integrator.grid.n_points,
        unit="q_nm^-1",
        radial_range=integrator.grid.radial_range_nm,
        azimuth_range=None if low is None else (low, high),
        mask=integrator.binning_mask,
        dummy=dummy,
        delta_dummy=delta_dummy,
        dark=integrator.dark,
        flat=flat,
        correctSolidAngle=False,
        polarization_factor=None,
        method=("no", "csr", "cython"),
    )
    return np.stack([result.count, result.sum_signal, result.sum_normalization]).astype(np.float64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sector", [(-20.0, 20.0), None], ids=["sector", "full-ring"])
@pytest.mark.parametrize("corrected", [False, True], ids=["raw", "dark-and-flat"])
def test_the_csr_engine_gives_pyfai_s_sums_to_a_millionth(tmp_path, device, sector, corrected):
    rng = np.random.default_rng(11)
    poni = tmp_path / "small.poni"
    poni.write_text(SMALL_PONI)
    corrections = _corrections(tmp_path, rng) if corrected else {}
    integrator = LineOutIntegrator(
        IntegrationConfig(poni=poni, azimuth_range_deg=sector, **corrections), QGrid()
    )
    for flat in (integrator.flat, _dead(integrator.flat)):
        engine = CsrEngine.of(integrator.geometry, integrator.dark, flat, device=device)
        assert 0 < engine.n_pixels < np.prod(SHAPE)
        for kind, frame in _frames(rng).items():
            dummy = integrator.dummy(frame)
            expected = _pyfai_sums(integrator, frame, flat)
            ours = np.stack(engine.sums(frame, dummy))
            assert (expected[0] > 0).sum() > 50, kind  # bins with pixels in them
            np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=0, err_msg=kind)
            if kind != "uint32":  # a frame on the device gives the same (no uint32 in torch)
                on_device = torch.as_tensor(frame, device=device)
                np.testing.assert_array_equal(np.stack(engine.sums(on_device, dummy)), ours)


def test_line_outs_are_those_of_pyfai_s_whole_frame_engine(tmp_path):
    rng = np.random.default_rng(5)
    poni = tmp_path / "small.poni"
    poni.write_text(SMALL_PONI)
    corrections = _corrections(tmp_path, rng)
    csr = LineOutIntegrator(IntegrationConfig(poni=poni, **corrections), QGrid())
    whole = LineOutIntegrator(IntegrationConfig(poni=poni, method="lut", **corrections), QGrid())
    assert csr.csr is not None and whole.csr is None
    for kind, frame in _frames(rng).items():
        ours, theirs = csr.integrate(frame), whole.integrate(frame)
        np.testing.assert_allclose(ours.counts, theirs.counts, rtol=1e-6, err_msg=kind)
        np.testing.assert_allclose(ours.counts_sd, theirs.counts_sd, rtol=1e-6, err_msg=kind)


@pytest.mark.parametrize("sector", [(-10.0, 10.0), None], ids=["sector", "full-ring"])
def test_a_real_pilatus_frame_integrates_as_pyfai_does(shared_data, sector):
    """The CeO2 Pilatus 1M frame (int32, module gaps -1/-2) with its v1 PONI (no detector:
    the frame gives the shape), on a wide-angle grid its rings cover."""
    frame = fabio.open(str(shared_data / "CeO2_Pilatus1M.tif")).data
    grid = QGrid(q_min_nm=5.0, q_max_nm=45.0, n_points=512)
    settings = {"poni": shared_data / "CeO2_Pilatus1M.poni", "azimuth_range_deg": sector}
    csr = LineOutIntegrator(IntegrationConfig(**settings), grid)
    whole = LineOutIntegrator(IntegrationConfig(method="lut", **settings), grid)
    ours, theirs = csr.integrate(frame), whole.integrate(frame)
    assert csr.csr is not None and (frame < 0).any()
    np.testing.assert_allclose(ours.counts, theirs.counts, rtol=1e-6)
    np.testing.assert_allclose(ours.counts_sd, theirs.counts_sd, rtol=1e-6)
    assert ours.counts.sum() > 1e6
