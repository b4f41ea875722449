"""What a scan's results depend on, as digests: the processing record of a results file.

Two runs may write rows into one results file only when they would compute the same row
from the same frame: the same q grid, geometry (the PONI file's text), mask, dark and flat
(their bytes), integration settings, model (its weights' SHA-256), samples per exposure and
seed (not the detector shape that a PONI without a detector takes from the frames: a
property of the data, the same for every frame that is integrated).
:func:`processing_record` gives a digest for each, and one key for them all, which the
results file stores (as an attribute, and with every row); a resume whose record differs is
refused, naming what differs.

Example:
    >>> from pipeline.config import PipelineConfig
    >>> config = PipelineConfig(scan_id="s")
    >>> record = processing_record(config, model_sha256="ab" * 32)
    >>> sorted(record.parts)[:3]
    ['dark', 'flat', 'geometry (PONI)']
    >>> other = processing_record(config.model_copy(update={"n_workers": 7}), "ab" * 32)
    >>> record.key == other.key  # how many workers ran changes no result
    True
    >>> record.differences(processing_record(config, "cd" * 32))
    ['model']
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from pipeline.bundled import DEFAULT_PONI
from pipeline.config import PipelineConfig

#: Bytes of each digest (32 hexadecimal digits).
DIGEST_BYTES = 16


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=DIGEST_BYTES).hexdigest()


def _file_digest(path: Path | None) -> str:
    """The digest of a file's bytes; ``"none"`` for no file."""
    if path is None:
        return "none"
    digest = hashlib.blake2b(digest_size=DIGEST_BYTES)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class ProcessingRecord:
    """Digests of what a results file's rows depend on (by name), and one key for all."""

    parts: dict[str, str]

    @property
    def key(self) -> str:
        """One digest of every part."""
        return _digest(json.dumps(self.parts, sort_keys=True).encode())

    def differences(self, other: ProcessingRecord) -> list[str]:
        """The names of the parts that differ from ``other``'s (or that one of them lacks)."""
        names = sorted(set(self.parts) | set(other.parts))
        return [name for name in names if self.parts.get(name) != other.parts.get(name)]

    def to_json(self) -> str:
        return json.dumps(self.parts, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ProcessingRecord:
        return cls(dict(json.loads(text)))


def processing_record(config: PipelineConfig, model_sha256: str) -> ProcessingRecord:
    """The :class:`ProcessingRecord` of ``config`` with the model whose weights have
    ``model_sha256``. Reads the PONI (the bundled one when none is set), mask, dark and flat
    files (``OSError`` when one cannot be read)."""
    integration = config.integration
    settings = integration.model_dump(
        mode="json", exclude={"poni", "mask", "dark", "flat", "openmp_threads", "detector_shape"}
    )
    parts = {
        "q grid": _digest(config.grid.model_dump_json().encode()),
        "geometry (PONI)": _file_digest(integration.poni or DEFAULT_PONI),
        "mask": _file_digest(integration.mask),
        "dark": _file_digest(integration.dark),
        "flat": _file_digest(integration.flat),
        "integration settings": _digest(json.dumps(settings, sort_keys=True).encode()),
        "model": model_sha256,
        "samples per exposure": str(config.inference.n_samples),
        "seed": str(config.inference.seed),
    }
    return ProcessingRecord(parts)
