"""The one rule of which file an Eiger frame is read from (pipeline.sources.layout), on its own
and through the sources that use it: masters with their data files, data files alone,
symbolically linked folders and masters, absolute links."""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
from fabio.cbfimage import CbfImage

from pipeline.sources import EigerSource, FileSource, find_scans
from pipeline.sources.layout import linked_data_files, scan_files


def write_scan(folder: Path, absolute_links: bool = False) -> tuple[Path, list[Path]]:
    """``s_master.h5`` linking ``s_data_000001.h5`` and ``s_data_000002.h5`` (two frames
    each, valued by their file number) in ``folder``, by relative names or absolute ones."""
    folder.mkdir(parents=True, exist_ok=True)
    data_files = [folder / f"s_data_00000{n}.h5" for n in (1, 2)]
    with h5py.File(folder / "s_master.h5", "w") as master:
        for n, path in enumerate(data_files, start=1):
            with h5py.File(path, "w") as data_file:
                data_file["entry/data/data"] = np.full((2, 4, 6), n, np.uint16)
            name = str(path) if absolute_links else path.name
            master[f"entry/data/data_00000{n}"] = h5py.ExternalLink(name, "/entry/data/data")
        master["entry/instrument/detector/count_time"] = 0.25
    return folder / "s_master.h5", data_files


def names(paths) -> list[str]:
    return [Path(path).name for path in paths]


def test_a_master_and_its_data_files_in_one_list_read_each_frame_once(tmp_path):
    master, data_files = write_scan(tmp_path)
    listed = [*data_files, master]

    layout = scan_files(listed)
    exposures = list(FileSource(listed, "s").exposures())

    assert [file.path for file in layout.read] == [master]
    assert layout.read[0].data_files == tuple(data_files)
    assert list(layout.through_master) == data_files
    assert [int(e.frame[0, 0]) for e in exposures] == [1, 1, 2, 2]
    assert all(e.metadata["source"].startswith(f"{master}:") for e in exposures)


def test_a_data_file_whose_master_is_not_in_the_list_is_read_directly(tmp_path):
    _, data_files = write_scan(tmp_path)

    layout = scan_files([data_files[1]])
    source = EigerSource(data_files[1], "s")
    exposures = list(source.exposures())

    assert [file.path for file in layout.read] == [data_files[1]] and not layout.through_master
    assert source.files == [data_files[1]] and source.skipped_files == []
    assert [int(e.frame[0, 0]) for e in exposures] == [2, 2]
    assert exposures[0].metadata["count_time_s"] == "0.25"  # from its master, found by name


def test_a_folder_reached_through_a_symbolic_link_is_the_same_folder(tmp_path):
    master, data_files = write_scan(tmp_path / "real")
    (tmp_path / "link").symlink_to(tmp_path / "real", target_is_directory=True)
    listed = [tmp_path / "link" / master.name, *data_files]  # the master through the link

    layout = scan_files(listed)
    eiger = list(EigerSource(listed, "s").exposures())
    files = list(FileSource(listed, "s").exposures())

    assert names(file.path for file in layout.read) == ["s_master.h5"]
    assert list(layout.through_master) == data_files
    assert len(eiger) == len(files) == 4  # not 8: the data files are not read again


def test_a_master_reached_through_a_symbolic_link_finds_its_data_files_as_hdf5_does(tmp_path):
    master, data_files = write_scan(tmp_path / "real")
    (tmp_path / "latest").mkdir()
    alias = tmp_path / "latest" / "latest_master.h5"
    alias.symlink_to(os.path.relpath(master, alias.parent))

    layout = scan_files([alias, *data_files])
    exposures = list(EigerSource([alias, *data_files], "s").exposures())

    assert [os.path.realpath(p) for p in linked_data_files(alias)] == [
        os.path.realpath(p) for p in data_files
    ]
    assert [file.path for file in layout.read] == [alias]
    assert [e.error for e in exposures] == [None] * 4


def test_absolute_links_and_files_that_link_nothing(tmp_path):
    master, data_files = write_scan(tmp_path / "scan", absolute_links=True)
    CbfImage(data=np.ones((3, 4), np.int32)).write(str(tmp_path / "frame.cbf"))
    (tmp_path / "noise.h5").write_bytes(np.random.default_rng(0).bytes(2000))
    listed = [master, *data_files, tmp_path / "frame.cbf", tmp_path / "noise.h5"]

    layout = scan_files(listed)

    assert linked_data_files(master) == data_files
    assert linked_data_files(tmp_path / "frame.cbf") == linked_data_files(tmp_path / "noise.h5")
    assert linked_data_files(tmp_path / "noise.h5") == []
    assert names(file.path for file in layout.read) == ["s_master.h5", "frame.cbf", "noise.h5"]
    assert list(layout.through_master) == data_files


def test_an_eiger_scan_found_by_a_glob_is_its_master(tmp_path):
    write_scan(tmp_path / "real")
    (tmp_path / "link").symlink_to(tmp_path / "real", target_is_directory=True)

    scans = find_scans([tmp_path / "link" / "*.h5"])

    assert [(scan.scan_id, scan.path.name) for scan in scans] == [("s", "s_master.h5")]
    assert names(scans[0].files()) == ["s_master.h5", "s_data_000001.h5", "s_data_000002.h5"]
