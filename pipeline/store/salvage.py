"""Recover the intact rows of a damaged results file into a new one.

A results file cut short (an interrupted copy, a full disk) lost its end: HDF5 refuses it
(:class:`~pipeline.store.integrity.DamagedResultsError`), but most rows usually lie before
the cut. :func:`salvage` reads the file as HDF5 would see it whole, the missing end read as
zeros, and copies each row whose data lies, in every per-exposure dataset, in chunks that end
before the cut (a zero-filled chunk is never taken as data) into a new file written by
:class:`~pipeline.store.ResultsWriter` with the damaged file's scan id, parameters, q grid,
configuration, model card, PONI text and instrument (where it has one): a normal results
file of the scan, which ``--resume`` completes.

Where HDF5 cannot find a group's members because the index it keeps them in lies past the cut
(a closed file's ``entry`` group: its NXcanSAS groups were added last, and its name index
moved to the end), they are read from the file's bytes instead: the links in the group's
object header and in the direct blocks of its fractal heap (HDF5 file format, version 2
object headers), each block verified by its checksum.

Example:
    >>> import tempfile, numpy as np
    >>> from pathlib import Path
    >>> from pipeline.store import ExposureResult, ResultsWriter, open_results
    >>> folder = Path(tempfile.mkdtemp())
    >>> with ResultsWriter(folder / "scan.h5", ("pitch_nm",), ("nm",), 4, np.ones(512)) as w:
    ...     w.append(ExposureResult(index=0, timestamp=0.0, status="failed", error="bad frame"))
    True
    >>> salvage(folder / "scan.h5", folder / "new.h5")
    Salvaged(rows=1, of=1)
    >>> open_results(folder / "new.h5").error.tolist()
    ['bad frame']
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import itertools
import json
import mmap
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
import numpy as np

from pipeline.instrument import Instrument
from pipeline.provenance import ProcessingRecord
from pipeline.store.integrity import (
    DamagedResultsError,
    Superblock,
    checksum,
    hdf5_function,
    read_superblock,
)
from pipeline.store.schema import DATASETS_BY_NAME, INSTRUMENT_PATH, ROW_COLUMNS, row_paths
from pipeline.store.writer import ResultsWriter

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

#: Rows read and written at a time.
BLOCK_ROWS = 1024
#: Object header message types (HDF5 file format specification, IV.A.2)
_NIL, _LINK_INFO, _LINK, _CONTINUATION = 0x00, 0x02, 0x06, 0x10


@dataclass(frozen=True)
class Salvaged:
    """How many rows :func:`salvage` saved, of how many the damaged file held."""

    rows: int
    of: int


class _Lost(Exception):
    """Something needed lies in the missing part of the file."""


def salvage(damaged: str | os.PathLike, out: str | os.PathLike) -> Salvaged:
    """Write into the new results file ``out`` the rows of ``damaged`` that are intact in
    every per-exposure dataset (in the damaged file's order; the derived columns ``I``,
    ``Idev`` and ``flagged`` made anew, ``written_time`` and ``processing_key`` kept).
    Columns a file of an older version lacks are left empty.

    ``FileExistsError`` when ``out`` exists; :class:`DamagedResultsError` when nothing can
    be saved (not an HDF5 file of this format, or its groups, datasets or scan description
    lost); ``out`` is then not created.
    """
    damaged, out = Path(damaged), Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists: choose another --out")
    superblock, _ = read_superblock(damaged)
    if superblock is None:
        raise DamagedResultsError(f"{damaged}: nothing to salvage: not an HDF5 results file")
    partial = out.with_name(out.name + ".salvaging")
    partial.unlink(missing_ok=True)
    with _Image(damaged, superblock) as image:
        try:
            addresses = _addresses(image)
            handle = h5py.File(image, "r")  # once every header it is shown is repaired
        except (_Lost, KeyError, OSError) as error:
            reason = error.args[0] if error.args else error
            raise DamagedResultsError(f"{damaged}: nothing to salvage: {reason}") from None
        with handle:
            try:
                source = _Source(handle, addresses, image)
            except (_Lost, KeyError, OSError, RuntimeError, ValueError) as error:
                raise DamagedResultsError(
                    f"{damaged}: nothing to salvage: the description of its scan is lost ({error})"
                ) from None
            try:
                salvaged = source.copy_rows(partial)
            except BaseException:
                partial.unlink(missing_ok=True)
                raise
    partial.replace(out)
    return salvaged


class _Image(io.RawIOBase):
    """A damaged file as HDF5 is shown it, read-only: zeros past the cut, its superblock
    marked closed and reaching to the file's end, and object headers without their
    continuation messages to blocks that are lost (:meth:`locate` finds those). Also the
    file's own bytes (``bytes``), for parsing."""

    def __init__(self, path: Path, superblock: Superblock) -> None:
        self._file = open(path, "rb")  # noqa: SIM115 (closed with the image)
        self.size = os.fstat(self._file.fileno()).st_size
        self.bytes = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
        self.superblock = superblock
        self._length = max(self.size, superblock.end_of_file)
        head = bytearray(superblock.image)
        head[11] = 0  # no writer: HDF5 opens the file without SWMR
        offset = superblock.offset_size
        head[12 + 2 * offset : 12 + 3 * offset] = self._length.to_bytes(offset, "little")
        #: address -> the bytes HDF5 is shown there, each ending in its checksum
        self._patches = {0: head}
        _seal(head)
        self._headers: dict[int, list[tuple[int, int, int]]] = {}
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        start = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._length}
        self._position = start[whence] + offset
        return self._position

    def tell(self) -> int:
        return self._position

    def readinto(self, buffer: WriteableBuffer) -> int:
        view = memoryview(buffer).cast("B")
        start = self._position
        n = max(0, min(len(view), self._length - start))
        present = max(0, min(n, self.size - start))
        view[:present] = self.bytes[start : start + present]
        view[present:n] = bytes(n - present)
        for address, patch in self._patches.items():
            first, last = max(start, address), min(start + n, address + len(patch))
            if first < last:
                view[first - start : last - start] = patch[first - address : last - address]
        self._position += n
        return n

    def close(self) -> None:
        if not self.closed:
            self.bytes.close()
            self._file.close()
        super().close()

    def address(self, at: int) -> int:
        """The file address stored at byte ``at``."""
        return self.number(at, self.superblock.offset_size)

    def number(self, at: int, size: int) -> int:
        """The little-endian unsigned number of ``size`` bytes at ``at`` (``_Lost`` past
        the cut)."""
        if at + size > self.size:
            raise _Lost(f"byte {at:,} is past the cut")
        return int.from_bytes(self.bytes[at : at + size], "little")

    def block(self, at: int, size: int) -> bytes | None:
        """The ``size`` bytes at ``at`` when they are present and end in their checksum."""
        data = self.bytes[at : at + size]
        if len(data) < size or checksum(data[:-4]) != int.from_bytes(data[-4:], "little"):
            return None
        return data

    def locate(self, path: str) -> int:
        """The object header address of the object at ``path`` (from the root group),
        followed through the file's bytes: links in object headers and in the intact direct
        blocks of the groups' fractal heaps (their B-tree indexes may be lost); the headers
        on the way are shown to HDF5 without continuations to lost blocks. ``KeyError``
        when a link is missing, ``_Lost`` when an object header is."""
        address = self.superblock.root
        for name in path.split("/"):
            links = _links(self, self.messages(address))
            if name not in links:
                raise KeyError(f"no {path} in the file, or its link is lost")
            address = links[name]
        self.messages(address)
        return address

    def messages(self, header: int) -> list[tuple[int, int, int]]:
        """(type, start, stop) of the body of each message in the intact blocks of the
        version 2 object header at ``header``; continuation messages to lost blocks are
        made NIL messages in what HDF5 is shown (so it opens the object with the rest)."""
        if header in self._headers:
            return self._headers[header]
        data, offset = self.bytes, self.superblock.offset_size
        if data[header : header + 5] != b"OHDR\x02":
            raise _Lost(f"no object header at byte {header:,}")
        flags = data[header + 5]
        at = header + 6 + (16 if flags & 0x20 else 0) + (4 if flags & 0x10 else 0)
        size_bytes = 1 << (flags & 3)
        first = at + size_bytes
        order_bytes = 2 if flags & 0x04 else 0
        messages = []
        blocks = [(header, first, first + self.number(at, size_bytes) + 4)]
        while blocks:  # (where, its first message, its end: after the checksum)
            where, at, end = blocks.pop()
            if self.block(where, end - where) is None:
                raise _Lost(f"the object header at byte {header:,} is damaged")
            while at + 4 + order_bytes <= end - 4:
                kind, size = data[at], int.from_bytes(data[at + 1 : at + 3], "little")
                start = at + 4 + order_bytes
                if kind == _CONTINUATION:
                    chunk = self.address(start)
                    length = self.number(start + offset, self.superblock.length_size)
                    if self.block(chunk, length) is None:
                        patch = self._patches.setdefault(where, bytearray(data[where:end]))
                        patch[at - where] = _NIL
                        _seal(patch)
                    else:
                        blocks.append((chunk, chunk + 4, chunk + length))
                else:
                    messages.append((kind, start, start + size))
                at = start + size
        self._headers[header] = messages
        return messages


def _seal(block: bytearray) -> None:
    """Write the checksum of ``block`` (all but its last 4 bytes) into its last 4."""
    block[-4:] = checksum(bytes(block[:-4])).to_bytes(4, "little")


#: Objects that describe the scan, besides the per-exposure datasets
_DESCRIPTION = ("line_out/q_nm", "config", "model_card", "instrument/geometry/poni", "run")
#: Per-exposure datasets the writer fills itself, copied into the new file afterwards
_KEPT = ("written_time", "processing_key")


def _addresses(image: _Image) -> dict[str, int]:
    """The object header addresses of ``entry``, of the objects that describe the scan
    (:data:`_DESCRIPTION`) and of the per-exposure datasets (by column name; those a file of
    an older version lacks are left out)."""
    addresses = {"entry": image.locate("entry")}
    for path in _DESCRIPTION:
        addresses[path] = image.locate(f"entry/{path}")
    with contextlib.suppress(KeyError):  # files of earlier versions have no record
        addresses["processing"] = image.locate("entry/processing")
    with contextlib.suppress(KeyError):  # nor an instrument
        addresses["instrument"] = image.locate(f"entry/{INSTRUMENT_PATH}")
    for name in (*ROW_COLUMNS, *_KEPT):
        for path in row_paths(name):
            with contextlib.suppress(KeyError):
                addresses[name] = image.locate(f"entry/{path}")
                break
        if name == "index" and name not in addresses:
            raise KeyError("no entry/exposures/index in the file, or its link is lost")
    return addresses


class _Source:
    """The scan description of a damaged results file, and its rows."""

    def __init__(self, handle: h5py.File, addresses: dict[str, int], image: _Image) -> None:
        self.handle, self.image = handle, image
        objects = {name: self.open_at(address) for name, address in addresses.items()}
        entry, samples = objects["entry"], objects["samples"]
        texts = {name: objects[name][()].decode() for name in ("config", "model_card", "run")}
        self.writer_arguments = dict(
            parameter_names=tuple(str(name) for name in samples.attrs["parameter_names"]),
            parameter_units=tuple(str(unit) for unit in samples.attrs["units"]),
            n_samples=samples.shape[1],
            q_nm=objects["line_out/q_nm"][()],
            scan_id=_attribute(entry, "scan_id") or texts["run"],
            config_json=texts["config"],
            model_card=json.loads(texts["model_card"]),
            poni_text=objects["instrument/geometry/poni"][()].decode(),
        )
        if "processing" in objects:
            text = objects["processing"][()].decode()
            self.writer_arguments["processing"] = ProcessingRecord.from_json(text)
        if "instrument" in objects:
            text = objects["instrument"][()].decode()
            self.writer_arguments["instrument"] = Instrument.model_validate_json(text)
        self.datasets = {name: objects[name] for name in ROW_COLUMNS if name in objects}
        self.kept = {name: objects[name] for name in _KEPT if name in objects}
        self.n_rows = min(
            dataset.shape[0] for dataset in (*self.datasets.values(), *self.kept.values())
        )

    def open_at(self, address: int) -> h5py.Group | h5py.Dataset:
        """The group or dataset whose object header is at ``address``."""
        offset = self.image.superblock.offset_size
        token = _Token()
        token.data[:offset] = address.to_bytes(offset, "little")
        open_by_token = hdf5_function("H5Oopen_by_token", ctypes.c_int64, ctypes.c_int64, _Token)
        with h5py.h5i.phil:
            identifier = open_by_token(self.handle.id.id, token)
        if identifier < 0:
            raise _Lost(f"the object at byte {address:,} cannot be read")
        wrapped = h5py.h5i.wrap_identifier(identifier)
        if isinstance(wrapped, h5py.h5g.GroupID):
            return h5py.Group(wrapped)
        return h5py.Dataset(wrapped)

    def copy_rows(self, out: Path) -> Salvaged:
        """Write the intact rows into the new results file ``out``."""
        intact = np.ones(self.n_rows, dtype=bool)
        for dataset in (*self.datasets.values(), *self.kept.values()):
            intact &= _intact_rows(dataset, self.n_rows, self.image.size)
        index = self.datasets["index"]
        unwritten = np.zeros(self.n_rows, dtype=bool)  # grown by a killed writer, not written
        for start, stop in _runs(_intact_rows(index, self.n_rows, self.image.size)):
            unwritten[start:stop] = index[start:stop] < 0
        saved = 0
        kept: dict[str, list[np.ndarray]] = {name: [] for name in self.kept}
        with ResultsWriter(out, **self.writer_arguments) as writer:
            for start, stop in _runs(intact & ~unwritten):
                for first in range(start, stop, BLOCK_ROWS):
                    rows = slice(first, min(stop, first + BLOCK_ROWS))
                    new = writer.append_rows(
                        {name: _column(dataset[rows]) for name, dataset in self.datasets.items()}
                    )
                    saved += int(new.sum())
                    for name, dataset in self.kept.items():
                        kept[name].append(dataset[rows][new])
        with h5py.File(out, "r+", libver="latest") as copy:
            for name, blocks in kept.items():
                if blocks:
                    copy["entry"][DATASETS_BY_NAME[name].path][:] = np.concatenate(blocks)
        return Salvaged(rows=saved, of=self.n_rows - int(unwritten.sum()))


def _attribute(owner: h5py.HLObject, name: str) -> str | None:
    """A text attribute, ``None`` where it is missing or lost."""
    try:
        value = owner.attrs.get(name)
    except (KeyError, OSError, RuntimeError):  # kept in dense storage that lies past the cut
        return None
    return None if value is None else str(value)


class _Token(ctypes.Structure):
    """HDF5's ``H5O_token_t``: for files, an object header's address."""

    _fields_ = [("data", ctypes.c_uint8 * 16)]


def _column(values: np.ndarray) -> np.ndarray | list[str]:
    """A block of a dataset as :meth:`ResultsWriter.rows` takes it (text decoded)."""
    if values.dtype.kind == "S":
        return [value.decode(errors="replace") for value in values]
    return values


def _runs(mask: np.ndarray) -> Iterator[tuple[int, int]]:
    """(start, stop) of each run of True in ``mask``."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    yield from zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True)


def _intact_rows(dataset: h5py.Dataset, n_rows: int, size: int) -> np.ndarray:
    """Whether each of the first ``n_rows`` rows of ``dataset`` lies in chunks that end
    within the first ``size`` bytes of the file (a chunk past them, or whose index block is,
    is lost; so is a row without a chunk)."""
    intact = np.zeros(n_rows, dtype=bool)
    chunk_rows = dataset.chunks[0]
    rest = [
        range(0, length, chunk)
        for length, chunk in zip(dataset.shape[1:], dataset.chunks[1:], strict=True)
    ]
    for start in range(0, n_rows, chunk_rows):
        whole = True
        for corner in itertools.product(*rest):
            try:
                chunk = dataset.id.get_chunk_info_by_coord((start, *corner))
            except (OSError, RuntimeError, ValueError):  # its index block lies past the cut
                whole = False
                break
            if chunk.byte_offset is None or chunk.byte_offset + chunk.size > size:
                whole = False
                break
        intact[start : start + chunk_rows] = whole
    return intact


def _links(image: _Image, messages: list[tuple[int, int, int]]) -> dict[str, int]:
    """Name -> object header address of each hard link of a group, given the messages of
    its object header: its link messages, and those in the intact direct blocks of the
    fractal heap its link info message names."""
    links: dict[str, int] = {}
    for kind, start, stop in messages:
        if kind == _LINK:
            _read_links(image, start, stop, links)
        elif kind == _LINK_INFO:
            heap = image.address(start + 2 + (8 if image.bytes[start + 1] & 1 else 0))
            if heap != 2 ** (8 * image.superblock.offset_size) - 1:  # else: links in the header
                links |= _heap_links(image, heap)
    return links


def _heap_links(image: _Image, heap: int) -> dict[str, int]:
    """The links in the intact direct blocks of the fractal heap whose header is at
    ``heap``, found by their signature and the heap's address (the heap's index of its
    blocks may be lost)."""
    offset, length = image.superblock.offset_size, image.superblock.length_size
    table = heap + 14 + 10 * length + 2 * offset  # the doubling table's fields
    header = image.block(heap, table + 12 + 2 * length + offset - heap)
    if header is None or header[:4] != b"FRHP" or image.number(heap + 7, 2):
        return {}  # lost, or its blocks are compressed
    checksummed = header[9] & 2
    width, start_size = image.number(table, 2), image.number(table + 2, length)
    offset_bytes = (image.number(table + 2 + 2 * length, 2) + 7) // 8
    signature = b"FHDB\x00" + heap.to_bytes(offset, "little")
    first = len(signature) + offset_bytes + (4 if checksummed else 0)  # its first object
    links: dict[str, int] = {}
    found = image.bytes.find(signature)
    while found >= 0:
        row = image.number(found + len(signature), offset_bytes) // (width * start_size)
        size = start_size << max(0, row.bit_length() - 1)
        block = image.bytes[found : found + size]
        whole = len(block) == size
        if whole and checksummed:  # over the block with the checksum's bytes zero
            stored = int.from_bytes(block[first - 4 : first], "little")
            whole = checksum(block[: first - 4] + bytes(4) + block[first:]) == stored
        if whole:
            _read_links(image, found + first, found + size, links)
        found = image.bytes.find(signature, found + 1)
    return links


def _read_links(image: _Image, at: int, stop: int, links: dict[str, int]) -> None:
    """Add to ``links`` the hard links of the link messages that follow each other from
    ``at`` (up to ``stop``, or the first bytes that are not a link message)."""
    data, offset = image.bytes, image.superblock.offset_size
    while at + 2 <= stop and data[at] == 1 and not data[at + 1] & 0xE0:
        flags = data[at + 1]
        kind = data[at + 2] if flags & 0x08 else 0
        at += 2 + (1 if flags & 0x08 else 0) + (8 if flags & 0x04 else 0) + (flags >> 4 & 1)
        size_bytes = 1 << (flags & 3)
        name_end = at + size_bytes + int.from_bytes(data[at : at + size_bytes], "little")
        if name_end <= at + size_bytes or name_end > stop:
            return
        try:
            name = data[at + size_bytes : name_end].decode()
        except UnicodeDecodeError:
            return
        if kind == 0:  # a hard link: the object header's address
            at = name_end + offset
            if at <= stop:
                links[name] = image.address(name_end)
        elif kind in (1, 64):  # soft and external links: a text
            at = name_end + 2 + int.from_bytes(data[name_end : name_end + 2], "little")
        else:
            return
