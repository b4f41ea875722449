"""``beamline-inn instrument``: an instrument derived from a PONI geometry
(:mod:`pipeline.integration.instrument`), and instrument files that are refused."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from flows.cli import main
from pipeline.instrument import FEW_PIXELS, InstrumentError, load_instrument
from pipeline.integration import load_geometry
from pipeline.integration.instrument import (
    InstrumentDerivationError,
    derive_instrument,
    pixel_resolution_nm,
    read_prior,
)

SHARED = Path(__file__).parents[2] / "shared" / "instruments"
PIXEL_M = 172e-6
#: A Pilatus 1M at 2 m and 0.15 nm with the beam at pixel (row 300.5, column 400.5): the
#: sector -5..5 deg (along the rows, to higher columns) crosses the gap of columns 487-493
#: between the detector's two module columns.
BEAM_ROW, BEAM_COLUMN = 300, 400
GAP_COLUMNS = (487, 493)
PONI = f"""poni_version: 2.1
Detector: Pilatus1M
Detector_config: {{"pixel1": {PIXEL_M}, "pixel2": {PIXEL_M}, "orientation": 3}}
Distance: 2.0
Poni1: {(BEAM_ROW + 0.5) * PIXEL_M!r}
Poni2: {(BEAM_COLUMN + 0.5) * PIXEL_M!r}
Rot1: 0.0
Rot2: 0.0
Rot3: 0.0
Wavelength: 1.5e-10
"""


@pytest.fixture(scope="module")
def poni(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("geometry") / "pilatus-2m.poni"
    path.write_text(PONI)
    return path


def engine_count(poni: Path, q_range_nm, n_points: int, sector_deg) -> np.ndarray:
    """Pixels per bin counted directly from pyFAI's pixel centres (q and chi) over the
    unmasked pixels: those whose centre lies inside the bin."""
    geometry = load_geometry(poni)
    q = geometry.center_array(unit="q_nm^-1")
    chi = np.degrees(geometry.center_array(unit="chi_rad"))
    usable = (geometry.detector.mask == 0) & (chi >= sector_deg[0]) & (chi <= sector_deg[1])
    half = 0.5 * (q_range_nm[1] - q_range_nm[0]) / (n_points - 1)
    low, high = q_range_nm[0] - half, q_range_nm[1] + half
    position = np.floor((q[usable] - low) / ((high - low) / n_points)).astype(np.int64)
    return np.bincount(position[(position >= 0) & (position < n_points)], minlength=n_points)


def test_derivation_reproduces_the_shipped_pilatus_instrument():
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent")
    shipped = load_instrument(SHARED / "pilatus1m-5m-sector.json")
    derived = derive_instrument(
        SHARED / "pilatus1m_5m.poni",
        (shipped.q_min_nm, shipped.q_max_nm),
        shipped.n_points,
        shipped.azimuth_range_deg,
        resolution_nm=shipped.resolution_nm,
        prior=shipped.prior,
        name=shipped.name,
    )
    instrument = derived.instrument
    assert instrument.masked_bins == shipped.masked_bins == (184, 185, 186, 187)
    assert instrument.poni == shipped.poni
    assert "Pilatus 1M at 5 m" in instrument.description
    assert "bins 184-187 (q 0.602-0.611 1/nm)" in instrument.description
    ours, theirs = np.array(instrument.pixels_per_bin), np.array(shipped.pixels_per_bin)
    # pixel centres in each bin, as the shipped file counts them (pyFAI's engine alone would
    # also put into bin 0 the 3 pixels less than a bin below its lower edge: the
    # integrator leaves every pixel outside the grid out)
    np.testing.assert_array_equal(ours, theirs)
    weights, shipped_weights = np.array(instrument.weights), np.array(shipped.weights)
    np.testing.assert_allclose(weights, shipped_weights, atol=1e-3)
    # the resolution the pixels give: 0.72 of the file's (one bin)
    assert derived.resolution_estimate_nm == pytest.approx(2.16e-3, rel=1e-3)
    assert shipped.resolution_nm == pytest.approx(0.003)


def test_a_module_gap_in_the_sector_gives_masked_bins_where_the_gap_is(poni):
    derived = derive_instrument(poni, (0.1, 1.5), 200, (-5.0, 5.0), name="gap")
    instrument = derived.instrument
    pixels = np.array(instrument.pixels_per_bin)
    counted = engine_count(poni, (0.1, 1.5), 200, (-5.0, 5.0))
    # pyFAI bins in float32: a pixel row on a bin edge may fall on the other side
    assert pixels.sum() == counted.sum() and np.abs(pixels - counted).max() <= 2
    q_beam_row = load_geometry(poni).center_array(unit="q_nm^-1")[BEAM_ROW]
    q_gap = q_beam_row[GAP_COLUMNS[0]], q_beam_row[GAP_COLUMNS[1]]
    masked = list(instrument.masked_bins)
    assert masked == [31, 32, 33]  # consecutive, about 7 pixels of 0.0036 1/nm: 3 bins
    assert all(q_gap[0] < q < q_gap[1] for q in instrument.grid.q_nm[masked])
    assert (pixels[masked] == 0).all() and (pixels[instrument.observed] > 0).all()
    weights = np.array(instrument.background_weights)
    assert weights[instrument.observed].mean() == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(
        weights[instrument.observed],
        pixels[instrument.observed] / pixels[pixels > 0].mean(),
        atol=5e-7,
    )
    assert (weights[masked] == 0).all()
    assert "no pixel in bins 31-33 (q 0.318-0.332 1/nm)" in derived.summary()
    assert "Pilatus 1M at 2 m, wavelength 0.15 nm (8.266 keV)" in instrument.description


def test_a_q_range_the_geometry_does_not_reach_is_refused_naming_the_one_it_reaches(poni):
    geometry = load_geometry(poni)
    q = geometry.center_array(unit="q_nm^-1")
    chi = np.degrees(geometry.center_array(unit="chi_rad"))
    usable = q[(geometry.detector.mask == 0) & (np.abs(chi) <= 5.0)]
    reaches = f"the geometry reaches q {usable.min():.3g}-{usable.max():.3g} 1/nm"
    assert reaches == "the geometry reaches q 0-2.1 1/nm"
    with pytest.raises(InstrumentDerivationError) as outside:
        derive_instrument(poni, (2.5, 3.0), 128, (-5.0, 5.0))
    assert str(outside.value) == (
        f"{reaches} in the sector -5..5 deg; 2.5-3 1/nm is outside it: choose a q range within it"
    )
    with pytest.raises(InstrumentDerivationError, match=r"1.5-2.5 1/nm is not inside it"):
        derive_instrument(poni, (1.5, 2.5), 128, (-5.0, 5.0))


def test_more_than_half_of_the_bins_masked_is_refused_saying_what_to_do(poni):
    with pytest.raises(InstrumentDerivationError) as error:
        derive_instrument(poni, (0.2, 2.0), 600, (1.0, 1.1))  # rows of pixels far between
    message = str(error.value)
    assert message.startswith("334 of the 600 q bins get no pixel in the sector 1..1.1 deg")
    assert message.endswith("widen the sector or take the full ring, or take fewer, wider bins")
    assert "\n" not in message


def test_bins_with_few_pixels_are_warned_about(poni):
    derived = derive_instrument(poni, (0.05, 1.5), 200, (-1.0, 1.0), resolution_nm=0.01)
    instrument = derived.instrument
    pixels = np.array(instrument.pixels_per_bin)
    few = np.flatnonzero(instrument.observed & (pixels < FEW_PIXELS))
    assert few.size > 0
    (warning,) = derived.warnings  # the resolution (given, over a bin) is not warned about
    assert warning.startswith(
        f"{few.size} observed bins have fewer than {FEW_PIXELS} pixels, their counts are noisy"
    )
    assert f"bins {few[0]}-" in warning and f"(q {instrument.grid.q_nm[few[0]]:.3g}-" in warning
    assert f"warning: {warning}" in derived.summary()


def test_the_resolution_is_estimated_from_pixel_distance_and_wavelength(poni):
    expected = 2 * math.pi / 0.15 * PIXEL_M / 2.0
    assert pixel_resolution_nm(PIXEL_M, 2.0, 0.15) == pytest.approx(expected)
    derived = derive_instrument(poni, (0.1, 1.5), 200, (-5.0, 5.0))
    assert derived.instrument.resolution_nm == pytest.approx(expected, rel=1e-9)
    assert not derived.resolution_given
    assert derived.resolution_basis == "172 um pixels at 2 m and 0.15 nm"
    assert "resolution: 3.60e-03 1/nm, estimated from 172 um pixels" in derived.summary()
    assert not any("resolution" in warning for warning in derived.warnings)
    # under half a bin (0.00704 1/nm): the forward model samples peaks at the bin centres
    narrow = derive_instrument(poni, (0.1, 1.5), 200, (-5.0, 5.0), resolution_nm=1e-3)
    assert any(
        w.startswith("the resolution 1.00e-03 1/nm is 0.14 of a bin") for w in narrow.warnings
    )
    given = derive_instrument(poni, (0.1, 1.5), 200, (-5.0, 5.0), resolution_nm=0.004)
    assert given.instrument.resolution_nm == 0.004 and given.resolution_given
    assert given.resolution_estimate_nm == pytest.approx(expected)
    assert not any("resolution" in warning for warning in given.warnings)


def test_a_prior_file_sets_the_fields_it_holds(tmp_path, poni):
    path = tmp_path / "prior.json"
    path.write_text(json.dumps({"pitch_nm": [30, 100], "background": [0, 10]}))
    prior = read_prior(path)
    assert prior.pitch_nm == (30.0, 100.0) and prior.background == (0.0, 10.0)
    assert prior.duty == (0.1, 0.9)  # the default
    derived = derive_instrument(poni, (0.1, 1.5), 200, (-5.0, 5.0), prior=prior)
    assert derived.instrument.prior == prior
    for text in ('{"pitch_nm": [100, 30]}', '{"pitch": [30, 100]}', "{not json", "[1, 2]"):
        path.write_text(text)
        with pytest.raises(InstrumentError, match=f"prior file {path} is not valid") as error:
            read_prior(path)
        assert "\n" not in str(error.value)


def test_the_command_writes_an_instrument_file_that_loads(tmp_path, poni, capsys):
    prior = tmp_path / "prior.json"
    prior.write_text('{"sigma_nm": [0.5, 6]}')
    out = tmp_path / "models" / "pilatus-2m.instrument.json"
    code = main(
        ["instrument", "--poni", str(poni), "--sector", "-5", "5", "--q-range", "0.1", "1.5",
         "--bins", "200", "--resolution", "0.004", "--prior", str(prior), "--out", str(out)]
    )  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    instrument = load_instrument(out)
    assert instrument.name == "pilatus-2m"
    assert instrument.masked_bins == (31, 32, 33) and instrument.resolution_nm == 0.004
    assert instrument.prior.sigma_nm == (0.5, 6.0) and instrument.poni == PONI
    assert instrument.azimuth_range_deg == (-5.0, 5.0)
    assert "masked bins: 3, no pixel in bins 31-33 (q 0.318-0.332 1/nm)" in printed
    assert "pixels per observed bin: min " in printed
    assert f"written: {out}" in printed
    assert printed.rstrip().endswith(f"next: beamline-inn train --instrument {out}")

    ring = tmp_path / "ring.json"
    args = ["instrument", "--poni", str(poni), "--full-ring", "--q-range", "0.1", "1.5"]
    assert main([*args, "--bins", "64", "--name", "ring-2m", "--out", str(ring)]) == 0
    assert load_instrument(ring).name == "ring-2m"
    assert load_instrument(ring).azimuth_range_deg is None


def test_the_command_says_in_one_line_what_is_wrong(tmp_path, poni, capsys):
    args = ["instrument", "--poni", str(poni), "--bins", "64", "--out", str(tmp_path / "x.json")]
    assert main([*args, "--q-range", "2.5", "3"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1
    assert error.startswith("beamline-inn instrument: error: the geometry reaches q 0-2.1 1/nm")
    assert main([*args, "--q-range", "0.1", "1.5", "--sector", "90", "200"]) == 2
    assert "azimuth range (90.0, 200.0) must be" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (
            lambda d: d.update(pixels_per_bin=d["pixels_per_bin"][:-1]),
            "pixels_per_bin has 199 values, not n_points=200",
        ),
        (
            lambda d: d.update(background_weights=[1.01 * w for w in d["background_weights"]]),
            "background_weights have mean 1.0100 over the observed bins, not 1",
        ),
        (lambda d: d.update(colour="red"), "colour: Extra inputs are not permitted"),
    ],
)
def test_a_broken_instrument_file_is_one_line_instrument_error(tmp_path, poni, change, problem):
    instrument = derive_instrument(poni, (0.1, 1.5), 200, (-5.0, 5.0)).instrument
    data = json.loads(instrument.to_json())
    change(data)
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(data))
    with pytest.raises(InstrumentError, match=f"instrument file {path} is not valid") as error:
        load_instrument(path)
    assert "\n" not in str(error.value)
    assert problem in str(error.value)


def test_an_instrument_file_that_is_not_text_is_an_instrument_error(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\xff\xfe\x00\x01 not JSON")
    with pytest.raises(InstrumentError, match=f"instrument file {path} is not valid: "):
        load_instrument(path)


def test_a_mask_file_masks_the_bins_it_covers(tmp_path, poni):
    mask = np.zeros((1043, 981), np.uint8)
    mask[:, 700:720] = 1  # 20 columns: q 1.08-1.15 1/nm on the beam row
    path = tmp_path / "mask.npy"
    np.save(path, mask)
    derived = derive_instrument(poni, (0.1, 1.5), 200, (-5.0, 5.0), mask=path)
    q = load_geometry(poni).center_array(unit="q_nm^-1")[BEAM_ROW]
    masked = np.array(derived.instrument.masked_bins)
    in_mask = masked[masked > 33]  # beyond the module gap's bins 31-33
    assert in_mask.size >= 8 and (np.diff(in_mask) == 1).all()
    centres = derived.instrument.grid.q_nm[in_mask]
    assert q[699] < centres.min() and centres.max() < q[720]
    assert ", mask mask.npy;" in derived.instrument.description
