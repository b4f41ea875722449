"""Image files through fabio: formats, multi-frame EDF, globs, natural order, broken files."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
from fabio.cbfimage import CbfImage
from fabio.edfimage import EdfImage
from fabio.tifimage import TifImage

from pipeline.sources.files import FileSource, header_frames_shape, open_source
from pipeline.sources.images import header_metadata, parse_header_time
from pipeline.sources.paths import expand_paths, natural_sort_key


def image(seed: int, dtype: type = np.int32, shape: tuple[int, int] = (32, 40)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 1000, shape).astype(dtype)


def write_edf(path: Path, frames: list[np.ndarray], headers: list[dict] | None = None) -> Path:
    headers = headers or [{} for _ in frames]
    edf = EdfImage(data=frames[0], header=headers[0])
    for frame, header in zip(frames[1:], headers[1:], strict=True):
        edf.append_frame(data=frame, header=header)
    edf.write(str(path))
    return path


def read_all(paths, scan_id: str = "scan") -> tuple[FileSource, list]:
    source = FileSource(paths, scan_id)
    return source, list(source.exposures())


def test_natural_order_puts_scan_2_before_scan_10():
    names = ["scan_10.cbf", "scan_2.cbf", "scan_1.cbf", "scan_1b.cbf", "SCAN_3.cbf"]
    assert sorted(names, key=natural_sort_key) == [
        "scan_1.cbf",
        "scan_1b.cbf",
        "scan_2.cbf",
        "SCAN_3.cbf",
        "scan_10.cbf",
    ]
    assert sorted(["a/x_10", "a/x_9", "b/x_1"], key=natural_sort_key) == [
        "a/x_9",
        "a/x_10",
        "b/x_1",
    ]


def test_edf_cbf_and_tiff_frames_keep_their_values_and_dtype(tmp_path):
    edf_data, cbf_data, tif_data = image(1, np.uint16), image(2, np.int32), image(3, np.int32)
    write_edf(tmp_path / "a_1.edf", [edf_data], [{"count_time": "0.25", "Monitor": "1234"}])
    CbfImage(data=cbf_data).write(str(tmp_path / "a_2.cbf"))
    TifImage(data=tif_data).write(str(tmp_path / "a_3.tif"))

    source, exposures = read_all(tmp_path / "a_*")

    assert [e.index for e in exposures] == [0, 1, 2]
    assert all(e.error is None and e.scan_id == "scan" for e in exposures)
    for exposure, expected in zip(exposures, [edf_data, cbf_data, tif_data], strict=True):
        assert exposure.frame.dtype == expected.dtype
        np.testing.assert_array_equal(exposure.frame, expected)
    assert [e.metadata["source"] for e in exposures] == [
        str(tmp_path / f"a_{n}.{ext}") for n, ext in [(1, "edf"), (2, "cbf"), (3, "tif")]
    ]
    assert [e.metadata["format"] for e in exposures] == ["EDF", "CBF", "TIF"]
    assert exposures[0].metadata["count_time_s"] == "0.25"
    assert exposures[0].metadata["monitor"] == "1234"
    mtime = os.stat(tmp_path / "a_2.cbf").st_mtime
    assert (
        exposures[1].timestamp == mtime and exposures[1].metadata["timestamp_from"] == "file mtime"
    )
    assert source.statistics.summary() == "3 frames (3 read, 0 failed)"


def test_multi_frame_edf_gives_one_exposure_per_frame(tmp_path):
    frames = [image(seed, np.uint16) for seed in range(3)]
    headers = [{"time_of_day": f"{1795915364.0 + k:.1f}", "count_time": "0.1"} for k in range(3)]
    path = write_edf(tmp_path / "multi.edf", frames, headers)
    write_edf(tmp_path / "single.edf", [image(9, np.uint16)])

    _, exposures = read_all([tmp_path / "multi.edf", tmp_path / "single.edf"])

    assert [e.index for e in exposures] == [0, 1, 2, 3]
    for k in range(3):
        np.testing.assert_array_equal(exposures[k].frame, frames[k])
        assert exposures[k].metadata["source"] == f"{path} frame {k}"
        assert exposures[k].metadata["frame"] == str(k)
        assert exposures[k].metadata["n_frames"] == "3"
        assert exposures[k].timestamp == 1795915364.0 + k
        assert exposures[k].metadata["timestamp_from"] == "header time_of_day"
    assert exposures[3].metadata["source"] == str(tmp_path / "single.edf")


def test_globs_lists_and_directories_are_read_in_natural_order_once(tmp_path):
    for n in (10, 2, 1):
        write_edf(tmp_path / f"scan_{n}.edf", [np.full((4, 4), n, np.uint16)])
    (tmp_path / ".hidden.edf").write_bytes(b"")

    files, unmatched = expand_paths(
        [tmp_path / "scan_1*.edf", str(tmp_path / "scan_2.edf"), tmp_path, tmp_path / "none_*"]
    )

    assert [f.name for f in files] == ["scan_1.edf", "scan_2.edf", "scan_10.edf"]
    assert unmatched == [str(tmp_path / "none_*")]
    exposures = list(open_source([str(tmp_path / "scan_*.edf")], "scan-7"))
    assert [int(e.frame[0, 0]) for e in exposures] == [1, 2, 10]
    assert [e.scan_id for e in exposures] == ["scan-7"] * 3


def test_truncated_edf_frames_are_errors_and_the_complete_frames_are_kept(tmp_path, reliability):
    frames = [image(seed, np.uint16) for seed in range(3)]
    whole = write_edf(tmp_path / "whole.edf", frames).read_bytes()
    frame_bytes = len(whole) // 3
    (tmp_path / "cut_data.edf").write_bytes(whole[: 2 * frame_bytes + frame_bytes // 2])
    (tmp_path / "cut_header.edf").write_bytes(whole[: 2 * frame_bytes + 100])
    single = write_edf(tmp_path / "single.edf", [frames[0]]).read_bytes()
    (tmp_path / "single.edf").write_bytes(single[:-10])

    _, cut_data = read_all(tmp_path / "cut_data.edf")
    _, cut_header = read_all(tmp_path / "cut_header.edf")
    source, cut_single = read_all(tmp_path / "single.edf")

    for exposures in (cut_data, cut_header):
        assert len(exposures) == 3
        for k in range(2):
            assert exposures[k].error is None
            np.testing.assert_array_equal(exposures[k].frame, frames[k])
        assert exposures[2].frame is None
        assert exposures[2].error.startswith("truncated file")
        assert exposures[2].metadata["source"].endswith("frame 2")
    assert len(cut_single) == 1 and cut_single[0].frame is None
    assert "truncated file" in cut_single[0].error
    assert source.statistics.summary() == "1 frame (0 read, 1 failed)"
    read = [*cut_data, *cut_header, *cut_single]
    reliability.record(
        "bad input",
        "EDF files cut in a frame's data, in a frame's header, and a one-frame file cut short",
        tried=len((cut_data, cut_header, cut_single)),
        detail=f"{sum(e.error is not None for e in read)} cut frames are 'truncated file' "
        f"errors; the {sum(e.error is None for e in read)} complete frames before them kept, "
        "equal to those written",
    )


def test_truncated_and_corrupt_cbf_are_errors(tmp_path, reliability):
    data = image(4)
    CbfImage(data=data).write(str(tmp_path / "good.cbf"))
    raw = (tmp_path / "good.cbf").read_bytes()
    (tmp_path / "truncated.cbf").write_bytes(raw[: len(raw) - 200])
    flipped = bytearray(raw)
    flipped[len(raw) - 300] ^= 0xFF
    (tmp_path / "flipped.cbf").write_bytes(bytes(flipped))

    _, (flipped_exposure, good, truncated) = read_all(  # in natural order
        [tmp_path / "good.cbf", tmp_path / "truncated.cbf", tmp_path / "flipped.cbf"]
    )

    np.testing.assert_array_equal(good.frame, data)
    assert truncated.frame is None and truncated.error.startswith("truncated file")
    assert flipped_exposure.frame is None
    assert flipped_exposure.error.startswith("corrupt data") and "MD5" in flipped_exposure.error
    reliability.record(
        "bad input",
        "CBF files cut short by 200 bytes, or with one byte of the image flipped",
        tried=len((truncated, flipped_exposure)),
        detail="the cut file a 'truncated file' error, the flipped byte a 'corrupt data' error "
        "(MD5 mismatch); the good file beside them read equal to what was written",
    )


def test_garbage_unknown_empty_missing_and_truncated_tiff_files_are_errors_and_reading_goes_on(
    tmp_path, reliability
):
    rng = np.random.default_rng(5)
    write_edf(tmp_path / "f_01.edf", [image(1, np.uint16)])
    (tmp_path / "f_02.edf").write_bytes(rng.bytes(4000))  # garbage with an EDF name
    (tmp_path / "f_03.xyz").write_bytes(b"neither header nor image " * 40)  # unknown format
    (tmp_path / "f_04.edf").write_bytes(b"")
    TifImage(data=image(2)).write(str(tmp_path / "f_05.tif"))
    tif = (tmp_path / "f_05.tif").read_bytes()
    (tmp_path / "f_05.tif").write_bytes(tif[: len(tif) // 2])
    write_edf(tmp_path / "f_06.edf", [image(3, np.uint16)])

    source, exposures = read_all([tmp_path / "f_*", tmp_path / "f_07_missing.edf"])

    assert [e.index for e in exposures] == list(range(7))
    errors = [e.error for e in exposures]
    assert errors[0] is None and errors[5] is None
    assert errors[1].startswith("corrupt or truncated EDF file")
    assert errors[2].startswith("unknown format")
    assert errors[3] == "empty file (0 bytes)"
    assert "TIF" in errors[4] and "truncated" in errors[4]
    assert errors[6].startswith("file not found")
    assert all((e.frame is None) == (e.error is not None) for e in exposures)
    assert exposures[6].metadata["source"] == str(tmp_path / "f_07_missing.edf")
    assert source.statistics.summary() == "7 frames (2 read, 5 failed)"
    reliability.record(
        "bad input",
        "garbage with an EDF name, unknown format, empty file, truncated TIFF, missing file",
        tried=source.statistics.frames_failed,  # the 5 bad files, as asserted above
        detail="each bad file one failed exposure with its cause, in order; the 2 good files "
        "among them read",
    )


def test_pilatus_cbf_header_gives_exposure_time_flux_and_timestamp(tmp_path):
    contents = (
        "# Detector: PILATUS3 1M, S/N 24-0118\n"
        "# 2026-11-29T01:02:03.500\n"
        "# Pixel_size 172e-6 m x 172e-6 m\n"
        "# Exposure_time 0.5000000 s\n"
        "# Exposure_period 0.5050000 s\n"
        "# Flux 1.5e12\n"
    )
    CbfImage(
        data=image(6),
        header={
            "_array_data.header_convention": "PILATUS_1.2",
            "_array_data.header_contents": contents,
        },
    ).write(str(tmp_path / "pilatus.cbf"))

    (exposure,) = open_source([tmp_path / "pilatus.cbf"], "scan")

    assert exposure.error is None
    assert exposure.metadata["exposure_time_s"] == "0.5"
    assert exposure.metadata["frame_time_s"] == "0.505"
    assert exposure.metadata["flux_photons_per_s"] == "1500000000000.0"
    assert exposure.metadata["detector"].startswith("PILATUS3 1M")
    expected = time.mktime((2026, 11, 29, 1, 2, 3, 0, 0, -1)) + 0.5
    assert exposure.timestamp == pytest.approx(expected)


def test_header_dates_in_the_usual_styles():
    assert parse_header_time("2026-11-29T01:02:03Z") == 1795914123.0
    local = time.mktime((2014, 10, 23, 14, 20, 5, 0, 0, -1))
    assert parse_header_time("2014/Oct/23 14:20:05.250") == pytest.approx(local + 0.25)
    assert parse_header_time("Thu Oct 23 14:20:05 2014") == pytest.approx(local)
    assert parse_header_time("2014:10:23 14:20:05") == pytest.approx(local)
    assert parse_header_time("0.5 s") is None
    # fabio's Pilatus TIFF reader splits the date line at its first colon
    _, stamp, key = header_metadata({"2014-10-23T14": "20:05.250", "Exposure_time": "1 s"})
    assert stamp == pytest.approx(local + 0.25) and key == "date"


def test_real_pilatus_tiff_reads_with_its_header(shared_data):
    (exposure,) = open_source([shared_data / "CeO2_Pilatus1M.tif"], "ceo2")

    assert exposure.error is None
    assert exposure.frame.shape == (1043, 981) and exposure.frame.dtype == np.int32
    assert exposure.metadata["exposure_time_s"] == "3.0"
    assert exposure.metadata["frame_time_s"] == "3.0"
    assert exposure.metadata["format"] == "PILATUS"
    assert header_frames_shape(shared_data / "CeO2_Pilatus1M.tif") == (1, 1043, 981)
    eiger = shared_data / "eiger2_simread7_2datafiles_4images_bslz4_data_000001.h5"
    frames = [e.frame.shape for e in open_source([eiger], "eiger") if e.frame is not None]
    assert frames and header_frames_shape(eiger) == (len(frames), *frames[0])


def test_the_frame_shape_is_that_of_most_frames_in_the_headers(tmp_path):
    """What a PONI without a detector takes as its shape: every format's header tells it
    without decoding a pixel; a file that cannot tell is left out."""
    import h5py

    for number in range(3):
        TifImage(data=image(number, shape=(31, 40))).write(str(tmp_path / f"a_{number}.tif"))
    CbfImage(data=image(3)).write(str(tmp_path / "b.cbf"))
    write_edf(tmp_path / "c.edf", [image(4, np.uint16), image(5, np.uint16)])
    with h5py.File(tmp_path / "d.h5", "w") as handle:
        handle["entry/data/data"] = np.stack([image(6), image(7)])
    (tmp_path / "e.cbf").write_bytes(b"not a frame")
    shapes = {path.name: header_frames_shape(path) for path in sorted(tmp_path.iterdir())}
    assert shapes == {
        **{f"a_{number}.tif": (1, 31, 40) for number in range(3)},
        "b.cbf": (1, 32, 40),
        "c.edf": (2, 32, 40),
        "d.h5": (2, 32, 40),
        "e.cbf": None,
    }
    assert FileSource([tmp_path], "scan").frame_shape() == (32, 40)  # 5 frames against 3
    tiffs = FileSource([tmp_path / "a_*.tif", tmp_path / "b.cbf", tmp_path / "e.cbf"], "s")
    assert tiffs.frame_shape() == (31, 40)
    assert FileSource([tmp_path / "e.cbf"], "scan").frame_shape() is None


def test_a_glob_through_a_symlink_loop_reads_each_file_once(tmp_path, reliability):
    folder = tmp_path / "dir"
    (folder / "sub").mkdir(parents=True)
    for number in range(3):
        write_edf(folder / "sub" / f"f_{number}.edf", [image(number)])
    os.symlink(folder, folder / "sub" / "loop")  # dir/sub/loop/sub/loop/... back to dir
    os.symlink(folder / "sub" / "f_0.edf", folder / "alias_of_f_0.edf")
    _, exposures = read_all([str(folder / "**" / "*.edf")])
    names = sorted(Path(e.metadata["source"]).name for e in exposures)
    reliability.record(
        "bad input",
        "a ** glob through a symbolic link loop, and a link to a file of the scan",
        tried=1,
        accepted=3,
        lost=3 - len({Path(e.metadata["source"]).resolve() for e in exposures}),
        doubled=len(exposures) - len({e.metadata["frame_id"] for e in exposures}),
        detail=f"{len(exposures)} exposures from 3 files (each once, by real path)",
    )
    assert len(exposures) == 3, names
    assert len({e.metadata["frame_id"] for e in exposures}) == 3
    sources = [Path(e.metadata["source"]) for e in exposures]
    assert sources == [folder / "sub" / f"f_{number}.edf" for number in range(3)]


def test_a_broken_symlink_in_a_folder_is_a_failed_row_naming_the_link(tmp_path, reliability):
    for number in (0, 2):
        write_edf(tmp_path / f"f_{number}.edf", [image(number)])
    os.symlink(tmp_path / "gone.edf", tmp_path / "f_1.edf")
    _, exposures = read_all([tmp_path])
    reliability.record(
        "bad input",
        "a dangling symbolic link among the files of a folder",
        tried=1,
        accepted=3,
        lost=3 - len(exposures),
        doubled=len(exposures) - len({e.metadata["source"] for e in exposures}),
        detail=f"exposure 1: {exposures[1].error}",
    )
    assert [e.index for e in exposures] == [0, 1, 2]
    assert exposures[1].frame is None
    assert "broken symbolic link" in exposures[1].error and "gone.edf" in exposures[1].error
    assert exposures[2].frame is not None


def test_each_frame_carries_its_identity_which_changes_with_its_file(tmp_path):
    path = write_edf(tmp_path / "f.edf", [image(0), image(1)])
    first = [e.metadata["frame_id"] for e in read_all([path])[1]]
    assert len(set(first)) == 2 and all(text.count(":") == 3 for text in first)
    assert [e.metadata["frame_id"] for e in read_all([tmp_path / "." / "f.edf"])[1]] == first
    write_edf(path, [image(0), image(1), image(2)])
    second = [e.metadata["frame_id"] for e in read_all([path])[1]]
    assert [t.rsplit(":", 2)[0] for t in second[:2]] == [t.rsplit(":", 2)[0] for t in first]
    assert second[:2] != first  # same place, another version of the file
