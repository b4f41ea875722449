"""Eiger/NeXus HDF5: master files with external links, data files, compression, broken parts."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import h5py
import hdf5plugin
import numpy as np
import pytest

from pipeline.sources.eiger import EigerSource, read_hdf5_file, read_pixel_mask
from pipeline.sources.files import FileSource, open_source

REAL_DATA_FILES = [f"eiger2_simread7_2datafiles_4images_bslz4_data_00000{n}.h5" for n in (1, 2)]
SHAPE = (6, 10)
START = "2026-11-29T01:00:00.000+00:00"


@pytest.fixture
def eiger_files(shared_data) -> list[Path]:
    """The two real Eiger2 data files (skipped where ``../shared/data`` lacks them)."""
    files = [shared_data / name for name in REAL_DATA_FILES]
    if not all(path.is_file() for path in files):
        pytest.skip(f"{shared_data} lacks the Eiger files")
    return files


def frames_for(file_number: int, n_frames: int) -> np.ndarray:
    rng = np.random.default_rng(file_number)
    return rng.integers(0, 60000, (n_frames, *SHAPE)).astype(np.uint16)


def write_data_file(path: Path, frames: np.ndarray, first_image_nr: int, compression: dict) -> None:
    with h5py.File(path, "w") as handle:
        dataset = handle.create_dataset(
            "entry/data/data", data=frames, chunks=(1, *SHAPE), **compression
        )
        dataset.attrs["image_nr_low"] = np.uint64(first_image_nr)
        dataset.attrs["image_nr_high"] = np.uint64(first_image_nr + len(frames) - 1)


def write_scan(folder: Path, counts=(3, 3, 2), name: str = "scan") -> tuple[Path, list[np.ndarray]]:
    """A master file linking data files that alternate bitshuffle-LZ4 and LZ4."""
    compressions = [hdf5plugin.Bitshuffle(cname="lz4"), hdf5plugin.LZ4()]
    all_frames = []
    image_nr = 1
    with h5py.File(folder / f"{name}_master.h5", "w") as master:
        detector = master.create_group("entry/instrument/detector")
        for key, value, units in [
            ("count_time", 0.099, "s"),
            ("frame_time", 0.1, "s"),
            ("x_pixel_size", 75.0, "um"),
            ("y_pixel_size", 7.5e-5, "m"),
            ("beam_center_x", 512.5, "pixel"),
            ("beam_center_y", 300.25, "pixel"),
            ("detector_distance", 2500.0, "mm"),
        ]:
            detector[key] = value
            detector[key].attrs["units"] = units
        master["entry/instrument/beam/incident_wavelength"] = 1.0
        master["entry/instrument/beam/incident_wavelength"].attrs["units"] = "angstrom"
        detector["description"] = b"Dectris EIGER2 Si 4M"
        specific = detector.create_group("detectorSpecific")
        specific["nimages"] = np.uint32(sum(counts))
        specific["ntrigger"] = np.uint32(1)
        specific["data_collection_date"] = START.encode()
        mask = np.zeros(SHAPE, np.uint32)
        mask[0, 0], mask[2, 3] = 1, 8
        specific["pixel_mask"] = mask
        for k, n_frames in enumerate(counts, start=1):
            frames = frames_for(k, n_frames)
            write_data_file(
                folder / f"{name}_data_{k:06d}.h5", frames, image_nr, compressions[k % 2]
            )
            master[f"entry/data/data_{k:06d}"] = h5py.ExternalLink(
                f"{name}_data_{k:06d}.h5", "/entry/data/data"
            )
            all_frames.extend(frames)
            image_nr += n_frames
    return folder / f"{name}_master.h5", all_frames


def test_master_file_with_external_links_reads_every_frame_with_metadata(tmp_path):
    master, frames = write_scan(tmp_path)

    source = EigerSource(master, "scan-1")
    exposures = list(source.exposures())

    assert [e.index for e in exposures] == list(range(8))
    for exposure, expected in zip(exposures, frames, strict=True):
        assert exposure.error is None and exposure.frame.dtype == np.uint16
        np.testing.assert_array_equal(exposure.frame, expected)
    assert exposures[4].metadata["source"] == f"{master}:/entry/data/data_000002 frame 1"
    assert exposures[4].metadata["data_file"] == "scan_data_000002.h5"
    assert exposures[4].metadata["image_nr"] == "5"
    metadata = exposures[0].metadata
    assert metadata["count_time_s"] == "0.099"
    assert metadata["frame_time_s"] == "0.1"
    assert metadata["x_pixel_size_m"] == "7.5e-05" == metadata["y_pixel_size_m"]
    assert metadata["beam_center_x_pixel"] == "512.5"
    assert metadata["beam_center_y_pixel"] == "300.25"
    assert metadata["detector_distance_m"] == "2.5"
    assert metadata["incident_wavelength_angstrom"] == "1"
    assert metadata["description"] == "Dectris EIGER2 Si 4M"
    start = datetime.fromisoformat(START).timestamp()
    assert [e.timestamp for e in exposures] == pytest.approx([start + 0.1 * k for k in range(8)])
    assert source.statistics.summary() == "8 frames (8 read, 0 failed)"


def test_pixel_mask_is_exposed_and_not_applied(tmp_path):
    master, frames = write_scan(tmp_path)
    source = EigerSource(master, "scan")

    mask = source.pixel_mask()

    assert mask is not None and mask.shape == SHAPE and mask[0, 0] == 1 and mask[2, 3] == 8
    assert np.count_nonzero(mask) == 2
    first = next(iter(source.exposures()))
    assert first.frame[0, 0] == frames[0][0, 0]  # the masked pixel keeps its counts
    data_file = tmp_path / "scan_data_000002.h5"
    np.testing.assert_array_equal(read_pixel_mask(data_file), mask)  # through its master


def test_missing_data_file_gives_one_error_per_lost_frame_and_the_rest_is_read(
    tmp_path, reliability
):
    master, frames = write_scan(tmp_path)
    (tmp_path / "scan_data_000002.h5").unlink()

    source = EigerSource(master, "scan")
    exposures = list(source.exposures())

    assert [e.index for e in exposures] == list(range(8))
    lost = exposures[3:6]
    assert all(e.frame is None for e in lost)
    assert all(e.error.startswith("missing data file: scan_data_000002.h5") for e in lost)
    assert "from nimages x ntrigger" in lost[0].error
    assert lost[2].metadata["source"] == f"{master}:/entry/data/data_000002 frame 2"
    assert [e.metadata["image_nr"] for e in lost] == ["4", "5", "6"]
    start = datetime.fromisoformat(START).timestamp()
    assert [e.timestamp for e in exposures] == pytest.approx([start + 0.1 * k for k in range(8)])
    for exposure, expected in zip(
        exposures[:3] + exposures[6:], frames[:3] + frames[6:], strict=True
    ):
        np.testing.assert_array_equal(exposure.frame, expected)
    assert exposures[6].metadata["image_nr"] == "7"
    assert source.statistics.summary() == "8 frames (5 read, 3 failed)"
    reliability.record(
        "bad input",
        "an Eiger scan with one of its 3 data files missing",
        tried=1,
        detail=f"{source.statistics.frames_failed} failed exposures, one per lost frame, named by the "
        f"master's counts and links; the other 5 frames read intact",
    )


def test_unreadable_chunk_is_an_error_for_that_frame_only(tmp_path, reliability):
    master, frames = write_scan(tmp_path, counts=(3, 3))
    damaged = ("scan_data_000001.h5", "scan_data_000002.h5")  # LZ4 and bitshuffle-LZ4
    for name in damaged:
        with h5py.File(tmp_path / name, "r") as handle:
            chunk = handle["entry/data/data"].id.get_chunk_info(1)
        with open(tmp_path / name, "r+b") as raw:
            raw.seek(chunk.byte_offset)
            raw.write(b"\xff" * chunk.size)

    exposures = list(EigerSource(master, "scan").exposures())

    assert [e.error is None for e in exposures] == [True, False, True, True, False, True]
    for bad in (exposures[1], exposures[4]):
        assert bad.frame is None and bad.error.startswith("unreadable chunk: frame 1")
        assert bad.metadata["frame"] == "1"
    np.testing.assert_array_equal(exposures[5].frame, frames[5])
    failed = sum(e.error is not None for e in exposures)
    reliability.record(
        "bad input",
        "a compressed chunk overwritten in each of 2 Eiger data files (LZ4, bitshuffle-LZ4)",
        tried=len(damaged),
        detail=f"{failed} frames are 'unreadable chunk' errors, the other "
        f"{len(exposures) - failed} of {len(exposures)} read",
    )


def test_data_files_linked_from_a_master_in_the_list_are_not_read_twice(tmp_path):
    write_scan(tmp_path)

    source = FileSource([tmp_path / "*.h5"], "scan")
    exposures = list(source.exposures())

    assert len(exposures) == 8 and all(e.error is None for e in exposures)
    assert {p.name for p in source.skipped_files} == {f"scan_data_00000{k}.h5" for k in (1, 2, 3)}
    assert len(EigerSource(tmp_path, "scan").files) == 1


def test_data_file_alone_takes_metadata_from_its_master_and_broken_files_are_errors(tmp_path):
    _, frames = write_scan(tmp_path)
    raw = (tmp_path / "scan_data_000003.h5").read_bytes()
    (tmp_path / "cut.h5").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "noise.h5").write_bytes(np.random.default_rng(0).bytes(5000))
    with h5py.File(tmp_path / "other.h5", "w") as handle:
        handle["entry/sample/name"] = b"no frames here"

    (second,) = [e for e in read_hdf5_file(tmp_path / "scan_data_000002.h5")][1:2]
    cut, noise, other = [
        next(read_hdf5_file(tmp_path / name)) for name in ("cut.h5", "noise.h5", "other.h5")
    ]

    np.testing.assert_array_equal(second.data, frames[4])
    assert second.metadata["count_time_s"] == "0.099" and second.metadata["image_nr"] == "5"
    assert cut.data is None and cut.error.startswith("truncated file")
    assert noise.data is None and noise.error.startswith("corrupt data or not an HDF5 file")
    assert other.data is None and other.error.startswith("no detector frames")


def test_other_layouts_need_the_dataset_path(tmp_path):
    with h5py.File(tmp_path / "stack.nxs", "w") as handle:
        handle["entry/instrument/detector/data"] = frames_for(9, 2)

    exposures = list(
        EigerSource(
            tmp_path / "stack.nxs", "s", dataset="/entry/instrument/detector/data"
        ).exposures()
    )

    assert len(exposures) == 2
    np.testing.assert_array_equal(exposures[1].frame, frames_for(9, 2)[1])


def write_nexus(path: Path, detectors: dict[str, np.ndarray]) -> None:
    """A NeXus file: NXentry/NXinstrument/NXdetector groups, each holding ``data``."""
    with h5py.File(path, "w") as handle:
        handle.create_group("scan").attrs["NX_class"] = "NXentry"
        handle["scan"].create_group("beamline").attrs["NX_class"] = b"NXinstrument"
        for name, frames in detectors.items():
            group = handle["scan/beamline"].create_group(name)
            group.attrs["NX_class"] = "NXdetector"
            group["data"] = frames
        handle["scan/beamline/monitor"] = np.arange(len(frames))


def test_a_nexus_detectors_data_is_read_by_default_one_exposure_per_frame(tmp_path):
    write_nexus(tmp_path / "run.nxs", {"saxs": frames_for(4, 3)})

    exposures = list(FileSource([tmp_path / "run.nxs"], "s").exposures())

    assert [e.error for e in exposures] == [None, None, None]
    for number, exposure in enumerate(exposures):
        np.testing.assert_array_equal(exposure.frame, frames_for(4, 3)[number])
        assert exposure.metadata["source"].endswith(
            f"run.nxs:/scan/beamline/saxs/data frame {number}"
        )


def test_frames_elsewhere_need_hdf5_dataset_and_the_error_lists_the_candidates(tmp_path):
    with h5py.File(tmp_path / "other.h5", "w") as handle:
        handle["measurement/images"] = frames_for(5, 4)
        handle["measurement/monitor"] = np.ones(4)
    write_nexus(tmp_path / "two.nxs", {"saxs": frames_for(6, 2), "waxs": frames_for(7, 2)})

    (missing,) = FileSource([tmp_path / "other.h5"], "s").exposures()
    (absent,) = FileSource([tmp_path / "other.h5"], "s", hdf5_dataset="/images").exposures()
    (several,) = FileSource([tmp_path / "two.nxs"], "s").exposures()
    stack = FileSource([tmp_path / "other.h5"], "s", hdf5_dataset="/measurement/images")
    chosen = list(stack.exposures())

    assert missing.frame is None and missing.error.startswith("no detector frames: neither")
    assert "name the frames' dataset with --hdf5-dataset PATH" in missing.error
    assert "its 3-D datasets: /measurement/images (4, 6, 10) uint16)" in missing.error
    assert absent.error.startswith("no detector frames: no dataset /images in other.h5")
    assert "several (/scan/beamline/saxs/data, /scan/beamline/waxs/data)" in several.error
    assert "--hdf5-dataset" in several.error
    assert len(chosen) == 4 and [e.error for e in chosen] == [None] * 4
    np.testing.assert_array_equal(chosen[3].frame, frames_for(5, 4)[3])


def test_a_real_nxcansas_curve_is_no_detector_frame(shared_data):
    """A reduced 1-D curve from Diamond I22 (NXcanSAS): NXdetector, but no frames."""
    (exposure,) = FileSource([shared_data / "gc14-dls-i22.h5"], "s").exposures()

    assert exposure.frame is None and exposure.error.startswith("no detector frames")
    assert "--hdf5-dataset" in exposure.error and "the file holds no 3-D dataset" in exposure.error


def test_real_eiger2_bitshuffle_lz4_data_files(eiger_files):
    source = EigerSource([eiger_files[1], eiger_files[0]], "real")
    exposures = list(source.exposures())

    assert len(exposures) == 4 and [e.index for e in exposures] == [0, 1, 2, 3]
    for exposure in exposures:
        assert exposure.error is None
        assert exposure.frame.shape == (512, 1028) and exposure.frame.dtype == np.uint16
        assert exposure.frame.min() >= 1 and exposure.frame.max() <= 7
    assert (
        exposures[0].metadata["source"].endswith(f"{REAL_DATA_FILES[0]}:/entry/data/data frame 0")
    )
    assert (
        exposures[3].metadata["source"].endswith(f"{REAL_DATA_FILES[1]}:/entry/data/data frame 1")
    )
    assert [e.metadata["image_nr"] for e in exposures] == ["1", "2", "3", "4"]
    assert source.statistics.summary() == "4 frames (4 read, 0 failed)"
    mixed = list(open_source([str(eiger_files[0].parent / "eiger2_*_data_*.h5")], "real"))
    assert len(mixed) == 4
    np.testing.assert_array_equal(mixed[2].frame, exposures[2].frame)
