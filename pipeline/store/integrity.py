"""Opening a results file for reading without ever hanging on a damaged one.

A results file is read in SWMR mode (also while its writer appends). An SWMR reader cannot
tell a metadata block that the writer is rewriting from one that is lost, so HDF5 retries
each read whose checksum fails, sleeping twice as long each time (from 1 ns) for 100
attempts: on a file cut short (an interrupted copy, a full disk) the first block past the cut
kept ``beamline-inn show`` waiting for days, deaf to Ctrl-C. Two guards, in
:func:`open_for_reading`:

- before HDF5 opens the file, its superblock (the first 48 bytes, checksummed) is read: a
  file shorter than the end-of-file address the superblock records is truncated (HDF5 makes
  the same check, but not in SWMR mode). A live writer's file and a killed writer's are
  never shorter (tested: 380,000 looks at a writer appending, 15 writers SIGKILLed while
  appending);
- the SWMR retries are bounded to :data:`METADATA_READ_ATTEMPTS` (about 2 s of waiting for a
  block, far more than a writer takes to finish one), so damage anywhere else fails in
  seconds too.

Example:
    >>> import tempfile, numpy as np
    >>> from pathlib import Path
    >>> from pipeline.store import ResultsWriter
    >>> path = Path(tempfile.mkdtemp()) / "scan.h5"
    >>> ResultsWriter(path, ("pitch_nm",), ("nm",), 4, np.linspace(0.01, 0.4, 512)).close()
    >>> with open_for_reading(path) as handle:
    ...     handle["entry/line_out/q_nm"].shape
    (512,)
    >>> _ = path.write_bytes(path.read_bytes()[:3000])  # cut short
    >>> open_for_reading(path)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    pipeline.store.integrity.DamagedResultsError: .../scan.h5 is truncated or damaged (3,000 of ...
"""

from __future__ import annotations

import ctypes
import functools
import os
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import h5py

#: The HDF5 file signature, which starts a results file (no user block).
SIGNATURE = b"\x89HDF\r\n\x1a\n"
#: Read attempts of one metadata block by an SWMR reader before it gives up: HDF5 sleeps
#: 1, 2, 4, ... ns after each failed one, so 31 attempts wait about 2 s in all (HDF5's
#: default, 100, would wait 2**100 ns).
METADATA_READ_ATTEMPTS = 31


class DamagedResultsError(OSError):
    """A results file is truncated or otherwise damaged; ``beamline-inn salvage``
    (:mod:`pipeline.store.salvage`) recovers its intact rows."""


@dataclass(frozen=True)
class Superblock:
    """What a results file's superblock (version 2 or 3) records of the file."""

    #: the superblock's bytes, checksum included
    image: bytes
    #: bytes per file address
    offset_size: int
    #: bytes per length field
    length_size: int
    #: where the file ends: a shorter file lost its end
    end_of_file: int
    #: address of the root group's object header
    root: int

    @property
    def being_written(self) -> bool:
        """Marked open by a writer (live, or killed before it closed the file)."""
        return bool(self.image[11] & 0b101)


def checksum(data: bytes) -> int:
    """Bob Jenkins' lookup3 hash (``hashlittle``, initial value 0), which HDF5 stores with
    its metadata blocks.

    >>> hex(checksum(b"Four score and seven years ago"))
    '0x17770551'
    """
    mask = 0xFFFFFFFF

    def rotate(x: int, k: int) -> int:
        return ((x << k) | (x >> (32 - k))) & mask

    a = b = c = (0xDEADBEEF + len(data)) & mask
    if not data:
        return c
    whole = (len(data) - 1) // 12 * 12  # the last 1..12 bytes go through the final mix
    for x, y, z in struct.iter_unpack("<3I", data[:whole]):
        a, b, c = (a + x) & mask, (b + y) & mask, (c + z) & mask
        a = (a - c) & mask ^ rotate(c, 4)
        c = (c + b) & mask
        b = (b - a) & mask ^ rotate(a, 6)
        a = (a + c) & mask
        c = (c - b) & mask ^ rotate(b, 8)
        b = (b + a) & mask
        a = (a - c) & mask ^ rotate(c, 16)
        c = (c + b) & mask
        b = (b - a) & mask ^ rotate(a, 19)
        a = (a + c) & mask
        c = (c - b) & mask ^ rotate(b, 4)
        b = (b + a) & mask
    x, y, z = struct.unpack("<3I", data[whole:].ljust(12, b"\0"))
    a, b, c = (a + x) & mask, (b + y) & mask, (c + z) & mask
    c = (c ^ b) - rotate(b, 14) & mask
    a = (a ^ c) - rotate(c, 11) & mask
    b = (b ^ a) - rotate(a, 25) & mask
    c = (c ^ b) - rotate(b, 16) & mask
    a = (a ^ c) - rotate(c, 4) & mask
    b = (b ^ a) - rotate(a, 14) & mask
    return (c ^ b) - rotate(b, 24) & mask


def read_superblock(path: str | os.PathLike) -> tuple[Superblock | None, int]:
    """The superblock of ``path`` and the file's size. ``None`` for a file that does not
    start with an HDF5 signature followed by a version 2 or 3 superblock (HDF5 itself then
    judges it, without retries); :class:`DamagedResultsError` for one that does but whose
    superblock is cut off or fails its checksum."""
    with open(path, "rb") as file:
        head = file.read(12 + 4 * 16 + 4)  # room for the largest addresses HDF5 writes
        size = os.fstat(file.fileno()).st_size  # after the read: a live file only grows
    if len(head) < 12 or head[:8] != SIGNATURE or head[8] not in (2, 3):
        return None, size
    offset_size, length_size = head[9], head[10]
    end = 12 + 4 * offset_size
    if len(head) < end + 4:
        raise DamagedResultsError(f"{path} is truncated: {size:,} bytes, not even its superblock")
    if checksum(head[:end]) != int.from_bytes(head[end : end + 4], "little"):
        raise DamagedResultsError(f"{path} is damaged: its superblock fails its checksum")
    addresses = [
        int.from_bytes(head[at : at + offset_size], "little") for at in range(12, end, offset_size)
    ]
    superblock = Superblock(
        image=head[: end + 4],
        offset_size=offset_size,
        length_size=length_size,
        end_of_file=addresses[2],
        root=addresses[3],
    )
    return superblock, size


def salvage_hint(path: str | os.PathLike) -> str:
    """The command that recovers the intact rows of a damaged results file."""
    path = Path(path)
    return f"beamline-inn salvage {path} --out {path.with_name(path.stem + '-salvaged.h5')}"


def check_intact(path: str | os.PathLike) -> None:
    """:class:`DamagedResultsError` when ``path`` is an HDF5 file cut short (shorter than
    its superblock says) or with a damaged superblock; cheap (one read of 80 bytes).

    A file a writer holds open is looked at twice more, 50 ms apart, before it is called
    damaged (no writer was ever caught mid-way, but it is cheap to be sure).
    """
    for attempt in range(3):
        if attempt:
            time.sleep(0.05)
        try:
            superblock, size = read_superblock(path)
        except DamagedResultsError as error:
            problem = f"{error}: recover what is intact with `{salvage_hint(path)}`"
            continue
        if superblock is None or size >= superblock.end_of_file:
            return
        problem = (
            f"{path} is truncated or damaged ({size:,} of {superblock.end_of_file:,} bytes): "
            f"recover its complete rows with `{salvage_hint(path)}`"
        )
        if not superblock.being_written:
            break
    raise DamagedResultsError(problem)


def open_for_reading(path: str | os.PathLike) -> h5py.File:
    """Open a results file for reading in SWMR mode (also while its writer appends, or one
    whose writer was killed), as ``h5py.File(path, "r", libver="latest", swmr=True)`` but
    never hanging: :class:`DamagedResultsError` at once for a truncated file (:func:`
    check_intact`), and HDF5's errors within seconds for damage elsewhere (metadata read
    attempts bounded to :data:`METADATA_READ_ATTEMPTS`)."""
    check_intact(path)
    access = h5py.h5p.create(h5py.h5p.FILE_ACCESS)
    access.set_libver_bounds(h5py.h5f.LIBVER_LATEST, h5py.h5f.LIBVER_LATEST)
    with h5py.h5i.phil:  # h5py's lock around HDF5 calls
        set_attempts = hdf5_function(
            "H5Pset_metadata_read_attempts", ctypes.c_int, ctypes.c_int64, ctypes.c_uint
        )
        if set_attempts(access.id, METADATA_READ_ATTEMPTS) < 0:
            raise OSError("cannot bound HDF5's metadata read attempts")
    flags = h5py.h5f.ACC_RDONLY | h5py.h5f.ACC_SWMR_READ
    return h5py.File(h5py.h5f.open(os.fsencode(path), flags, fapl=access))


@functools.cache
def hdf5_function(name: str, restype: type, *argtypes: type) -> Callable[..., int]:
    """An HDF5 C function that h5py does not wrap, from the library h5py is linked with
    (found through one of h5py's extension modules, whose dependencies the dynamic linker
    searches); call it holding ``h5py.h5i.phil``, as h5py does."""
    function = getattr(ctypes.CDLL(h5py.h5o.__file__), name)
    function.restype, function.argtypes = restype, argtypes
    return function
