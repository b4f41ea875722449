"""Files shipped with the package (``pipeline/data``), found without importing pyFAI or torch.

:mod:`pipeline.integration` imports pyFAI and :mod:`pipeline.model` torch; a process that
needs only the bundled geometry's path or a bundled model's files (the results writer) finds
them here. ``tests/test_bundled.py`` checks that they agree with those modules' constants.

Example:
    >>> DEFAULT_PONI.name, sorted(BUNDLED_MODELS)
    ('eiger4m_5m_8keV.poni', ['default', 'pilatus1m-5m-sector'])
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

#: The folder of the package's data files.
DATA = Path(str(files("pipeline") / "data"))
#: The geometry shipped with the package: Eiger 4M at 5 m, 8 keV.
DEFAULT_PONI = DATA / "eiger4m_5m_8keV.poni"
#: The model shipped in the package for the default instrument, trained by ``beamline-inn train``.
DEFAULT_MODEL = DATA / "grating-cinn.safetensors"
#: Models shipped in the package, by name.
BUNDLED_MODELS: dict[str, Path] = {
    "default": DEFAULT_MODEL,
    "pilatus1m-5m-sector": DATA / "pilatus1m-5m-sector.safetensors",
}
