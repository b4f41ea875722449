"""Integration with masks, dark, flat, bad-pixel markers, full ring and real geometry files."""

import threading

import fabio
import numpy as np
import pytest

from pipeline.config import IntegrationConfig
from pipeline.integration import (
    FrameError,
    GeometryError,
    LineOutIntegrator,
    frame_shape_is_open,
)
from pipeline.physics import QGrid

#: A small detector (Pilatus 100k, 195 x 487) 1 m from the sample, beam in its middle: every
#: test here builds its engine in milliseconds.
SMALL_PONI = """# Nota: C-Order, 1 refers to the Y axis, 2 to the X axis
poni_version: 2
Detector: Pilatus100k
Detector_config: {}
Distance: 1.0
Poni1: 0.0168
Poni2: 0.0419
Rot1: 0
Rot2: 0
Rot3: 0
Wavelength: 1.55e-10
"""
SHAPE = (195, 487)


@pytest.fixture
def poni(tmp_path):
    path = tmp_path / "small.poni"
    path.write_text(SMALL_PONI)
    return path


def make(poni, **options) -> LineOutIntegrator:
    return LineOutIntegrator(IntegrationConfig(poni=poni, **options), QGrid())


def test_a_flat_frame_counts_the_pixels_of_each_bin(poni):
    integrator = make(poni)
    assert integrator.shape == SHAPE and integrator.pixels_per_bin.sum() > 100
    line_out = integrator.integrate(np.full(SHAPE, 3, np.uint32))
    np.testing.assert_array_equal(line_out.counts, 3 * integrator.pixels_per_bin)


def test_the_full_ring_holds_the_sector(poni):
    sector, ring = make(poni), make(poni, azimuth_range_deg=None)
    assert (ring.pixels_per_bin >= sector.pixels_per_bin).all()
    assert ring.pixels_per_bin.sum() > 5 * sector.pixels_per_bin.sum()


@pytest.mark.parametrize("suffix", [".npy", ".edf", ".tif"])
def test_a_mask_file_removes_its_pixels(poni, tmp_path, suffix):
    full = make(poni, azimuth_range_deg=None)
    mask = np.zeros(SHAPE, np.uint8)
    mask[:, : SHAPE[1] // 2] = 1  # the left half
    path = tmp_path / f"mask{suffix}"
    if suffix == ".npy":
        np.save(path, mask)
    else:
        image = fabio.edfimage.EdfImage(mask) if suffix == ".edf" else fabio.tifimage.TifImage(mask)
        image.write(str(path))
    masked = make(poni, azimuth_range_deg=None, mask=path)
    frame = np.ones(SHAPE, np.uint32)
    kept = masked.integrate(frame).counts.sum() / full.integrate(frame).counts.sum()
    assert 0.35 < kept < 0.65


def test_a_mask_of_the_wrong_shape_is_refused(poni, tmp_path):
    np.save(tmp_path / "mask.npy", np.zeros((10, 10)))
    with pytest.raises(GeometryError, match="mask"):
        make(poni, mask=tmp_path / "mask.npy")


def test_dark_is_subtracted_and_errors_stay_those_of_the_raw_counts(poni, tmp_path, rng):
    dark = np.full(SHAPE, 2.0, np.float32)
    np.save(tmp_path / "dark.npy", dark)
    plain, corrected = make(poni), make(poni, dark=tmp_path / "dark.npy")
    signal = rng.poisson(20.0, SHAPE).astype(np.uint32)
    expected = plain.integrate(signal)
    line_out = corrected.integrate(signal + 2)
    np.testing.assert_allclose(line_out.counts, expected.counts)
    raw = plain.integrate(signal + 2).counts
    np.testing.assert_allclose(line_out.counts_sd, np.sqrt(np.maximum(raw, 1.0)))


def test_flat_field_puts_counts_back_on_the_photon_scale(poni, tmp_path, rng):
    flat = rng.uniform(0.5, 1.5, SHAPE).astype(np.float32)
    np.save(tmp_path / "flat.npy", flat)
    integrator = make(poni, flat=tmp_path / "flat.npy")
    line_out = integrator.integrate((10.0 * flat).astype(np.float32))  # 10 photons everywhere
    filled = integrator.pixels_per_bin > 0
    mean_flat = line_out.counts[filled] / (10.0 * integrator.pixels_per_bin[filled])
    # each bin is divided by its mean flat: sum(10 f) / mean(f) = 10 n
    np.testing.assert_allclose(mean_flat, 1.0, rtol=1e-5)


def test_flat_field_must_be_positive(poni, tmp_path):
    np.save(tmp_path / "flat.npy", np.zeros(SHAPE, np.float32))
    with pytest.raises(GeometryError, match="positive"):
        make(poni, flat=tmp_path / "flat.npy")


@pytest.mark.parametrize(
    ("dtype", "marker"), [(np.uint32, 2**32 - 1), (np.uint16, 2**16 - 1), (np.int32, -1)]
)
def test_bad_pixel_markers_are_ignored_without_rebuilding_the_engine(poni, dtype, marker):
    integrator = make(poni)
    engine = id(integrator.geometry.engines)
    frame = np.full(SHAPE, 5, dtype)
    frame[::7, ::3] = marker
    if dtype is np.int32:
        frame[1::7, ::3] = -2  # Pilatus module gaps
    line_out = integrator.integrate(frame)
    clean = integrator.integrate(np.full(SHAPE, 5, dtype)).counts
    assert line_out.counts.sum() < clean.sum()
    assert line_out.counts.max() <= clean.max() and (line_out.counts >= 0).all()
    assert id(integrator.geometry.engines) == engine and len(integrator.geometry.engines) == 1


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (np.zeros(SHAPE, np.uint32), "all-zero"),
        (np.full(SHAPE, 2**32 - 1, np.uint32), "saturated"),
        (np.full(SHAPE, -5, np.int32), "negative"),
        (np.full(SHAPE, -0.5, np.float32), "negative"),
        (np.ones((SHAPE[1], SHAPE[0]), np.uint32), "shape"),
    ],
)
def test_frames_that_cannot_be_integrated_say_why(poni, frame, message):
    with pytest.raises(FrameError, match=message):
        make(poni).integrate(frame)


def test_negative_gap_markers_are_named_as_gaps_not_saturation(poni):
    """A signed frame whose region is mostly -1/-2 (Pilatus module gaps) says so."""
    frame = np.full(SHAPE, 7, np.int32)
    frame[:, ::4] = 9
    frame[:, 1::4] = frame[:, 2::4] = -1
    frame[:, 3::4] = -2
    with pytest.raises(FrameError, match="are detector gaps or bad pixels") as refused:
        make(poni, azimuth_range_deg=None).integrate(frame)
    assert "negative values" in str(refused.value) and "saturated" not in str(refused.value)
    frame[:, 1::4] = frame[:, 2::4] = 9  # a quarter are gaps: masked, the rest counted
    line_out = make(poni, azimuth_range_deg=None).integrate(frame)
    assert (line_out.counts % 9 == 0).all()


def test_a_dark_or_flat_without_a_usable_value_is_a_setup_error(poni, tmp_path):
    """Found when the integrator is made (before any frame, whether or not the PONI names a
    detector), not as every frame "saturated"."""
    v1 = tmp_path / "v1.poni"
    v1.write_text(SMALL_PONI_V1)
    np.save(tmp_path / "nan.npy", np.full(SHAPE, np.nan, np.float32))
    np.save(tmp_path / "zero.npy", np.zeros(SHAPE, np.float32))
    refused = [
        ("dark", "nan.npy", "the dark image .*nan.npy holds no finite value"),
        ("flat", "nan.npy", "the flat image .*nan.npy holds no finite positive value"),
        ("flat", "zero.npy", "the flat image .*zero.npy holds no finite positive value"),
    ]
    for what, name, message in refused:
        for geometry in (poni, v1):
            with pytest.raises(GeometryError, match=message):
                make(geometry, **{what: tmp_path / name})


def test_dark_pixels_that_are_not_finite_are_masked(poni, tmp_path):
    dark = np.full(SHAPE, 1.0, np.float32)
    dark[:, : SHAPE[1] // 2] = np.nan
    np.save(tmp_path / "dark.npy", dark)
    mask = np.isnan(dark).astype(np.uint8)
    np.save(tmp_path / "mask.npy", mask)
    corrected = make(poni, azimuth_range_deg=None, dark=tmp_path / "dark.npy")
    masked = make(poni, azimuth_range_deg=None, mask=tmp_path / "mask.npy")
    frame = np.full(SHAPE, 4, np.uint32)
    np.testing.assert_allclose(
        corrected.integrate(frame).counts, masked.integrate(frame - 1).counts
    )


#: The small geometry as a v1 PONI: pixel sizes, no detector (and so no shape).
SMALL_PONI_V1 = """PixelSize1: 0.000172
PixelSize2: 0.000172
Distance: 1.0
Poni1: 0.0168
Poni2: 0.0419
Rot1: 0
Rot2: 0
Rot3: 0
Wavelength: 1.55e-10
"""


def test_a_poni_without_a_detector_says_where_the_shape_came_from(poni, tmp_path):
    v1 = tmp_path / "v1.poni"
    v1.write_text(SMALL_PONI_V1)
    np.save(tmp_path / "mask.npy", np.zeros(SHAPE, np.uint8))
    other = np.ones((SHAPE[0] + 1, SHAPE[1]), np.uint32)

    from_mask = make(v1, mask=tmp_path / "mask.npy")
    assert from_mask.shape == SHAPE  # before any frame: a first frame of another shape fails
    with pytest.raises(FrameError) as refused:
        from_mask.integrate(other)
    message = str(refused.value)
    assert f"does not match the detector shape {SHAPE}, taken from the mask file" in message
    assert f"the PONI {v1} names no detector (add Detector: NAME" in message
    assert '"max_shape": [195, 487]' in message

    from_frame = make(v1)
    assert from_frame.shape is None
    from_frame.integrate(np.ones(SHAPE, np.uint32), source="scan_00001.cbf")
    with pytest.raises(FrameError, match=r"taken from the first frame, scan_00001.cbf: the PONI"):
        from_frame.integrate(other, source="scan_00002.cbf")
    with pytest.raises(FrameError, match=r"shape \(195, 487\), taken from the detector Pilatus"):
        make(poni).integrate(other)

    from_headers = make(v1, detector_shape=SHAPE)  # as reprocess takes it from the headers
    assert from_headers.shape == SHAPE and from_headers.pixels_per_bin.any()
    with pytest.raises(FrameError, match=r"taken from the frame files' headers .*: the PONI"):
        from_headers.integrate(other)
    assert not frame_shape_is_open(from_headers.config)
    assert frame_shape_is_open(from_frame.config) and not frame_shape_is_open(make(poni).config)
    with pytest.raises(GeometryError, match=r"names the detector Pilatus.* of shape \(195, 487\)"):
        make(poni, detector_shape=(196, 487))


def test_normalization_travels_with_the_line_out(poni):
    integrator = make(poni)
    assert integrator.integrate(np.ones(SHAPE, np.uint32), normalization=2.5).normalization == 2.5
    with pytest.raises(FrameError, match="normalization"):
        integrator.integrate(np.ones(SHAPE, np.uint32), normalization=0.0)


def test_openmp_threads_are_limited_in_the_integrating_thread_only(poni):
    from threadpoolctl import threadpool_info

    def openmp_threads() -> set[int]:
        return {pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "openmp"}

    before = openmp_threads()
    seen = []

    def integrate() -> None:
        make(poni, openmp_threads=1).integrate(np.ones(SHAPE, np.uint32))
        seen.append(openmp_threads())

    thread = threading.Thread(target=integrate)
    thread.start()
    thread.join()
    assert seen == [{1}]
    assert openmp_threads() == before  # the setting belongs to the integrating thread


def test_a_second_thread_is_refused(poni):
    integrator = make(poni)
    integrator.integrate(np.ones(SHAPE, np.uint32))
    errors = []

    def other() -> None:
        try:
            integrator.integrate(np.ones(SHAPE, np.uint32))
        except RuntimeError as error:
            errors.append(str(error))

    thread = threading.Thread(target=other)
    thread.start()
    thread.join()
    assert errors and "thread" in errors[0]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("this is not a PONI file\n", "does not define"),
        (SMALL_PONI.replace("Distance: 1.0", "Distance: far"), "cannot be read"),
        (SMALL_PONI.replace("Distance: 1.0\n", ""), "does not define distance"),
        (SMALL_PONI.replace("Wavelength: 1.55e-10\n", ""), "does not define wavelength"),
    ],
)
def test_malformed_poni_files_are_refused(tmp_path, text, message):
    path = tmp_path / "bad.poni"
    path.write_text(text)
    with pytest.raises(GeometryError, match=message):
        make(path)


def test_a_missing_poni_file_is_refused(tmp_path):
    with pytest.raises(GeometryError, match="not found"):
        make(tmp_path / "nope.poni")


def test_a_real_pilatus_frame_with_a_v1_poni(shared_data):
    """The v1 PONI names no detector: the engine is built on the first frame's shape."""
    frame = fabio.open(str(shared_data / "CeO2_Pilatus1M.tif")).data
    config = IntegrationConfig(poni=shared_data / "CeO2_Pilatus1M.poni", azimuth_range_deg=None)
    wide_angle = QGrid(q_min_nm=5.0, q_max_nm=45.0, n_points=512)  # CeO2 rings, not SAXS
    integrator = LineOutIntegrator(config, wide_angle)
    assert integrator.shape is None
    line_out = integrator.integrate(frame)
    assert integrator.shape == frame.shape == (1043, 981)
    assert np.isfinite(line_out.counts).all() and (line_out.counts >= 0).all()
    # every pixel with q inside the grid is counted once; markers (-1, -2) are not counted
    q = integrator.geometry.center_array(frame.shape, unit="q_nm^-1")
    low, high = wide_angle.radial_range_nm
    inside = (q > low) & (q < high) & (frame >= 0)
    assert line_out.counts.sum() == pytest.approx(frame[inside].sum(), rel=1e-3)
    assert (frame[(q > low) & (q < high)] < 0).any()  # the markers were exercised


def test_normalization_is_the_product_of_the_named_metadata():
    from pipeline.exposure import Exposure
    from pipeline.integration import exposure_normalization

    config = IntegrationConfig(normalization_keys=("monitor", "transmission"))
    exposure = Exposure("s", 0, 0.0, None, metadata={"monitor": "2e5", "transmission": "0.25"})
    assert exposure_normalization(exposure, config) == pytest.approx(5e4)
    assert exposure_normalization(exposure, IntegrationConfig()) == 1.0
    with pytest.raises(FrameError, match="no 'transmission'"):
        exposure_normalization(Exposure("s", 1, 0.0, None, metadata={"monitor": "1"}), config)
    with pytest.raises(FrameError, match="not a number"):
        exposure_normalization(
            Exposure("s", 2, 0.0, None, metadata={"monitor": "n/a", "transmission": "1"}), config
        )
    with pytest.raises(FrameError, match="read nothing"):
        exposure_normalization(
            Exposure("s", 3, 0.0, None, metadata={"monitor": "0", "transmission": "0.5"}), config
        )
