"""The one configuration object of a run, saved as JSON into every output file.

Example:
    >>> config = PipelineConfig(scan_id="demo")
    >>> PipelineConfig.model_validate_json(config.model_dump_json()) == config
    True
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from pipeline.physics import QGrid


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GridConfig(_Strict):
    """The line-out's q grid (must equal the model's; see :class:`pipeline.physics.QGrid`)."""

    q_min_nm: float = 0.01
    q_max_nm: float = 0.40
    n_points: int = Field(512, ge=2)
    resolution_nm: float = Field(1.5e-3, gt=0)

    def grid(self) -> QGrid:
        return QGrid(self.q_min_nm, self.q_max_nm, self.n_points, self.resolution_nm)


class IntegrationConfig(_Strict):
    """pyFAI integration: geometry (PONI file; ``None`` = the bundled Eiger 4M at 5 m, 8 keV)
    and the azimuthal sector in degrees (pyFAI's chi)."""

    poni: Path | None = None
    chi_center_deg: float = 0.0
    chi_half_width_deg: float = Field(5.0, gt=0, le=180)
    method: Literal["csr", "histogram", "lut"] = "csr"


class InferenceConfig(_Strict):
    """Posterior sampling: model file (``None`` = the bundled model), draws per exposure,
    the largest batch of exposures per forward pass, and the torch device."""

    model: Path | None = None
    n_samples: int = Field(1000, ge=2)
    max_batch: int = Field(32, ge=1)
    device: str = "auto"
    seed: int = 0


class TransportConfig(_Strict):
    """ZeroMQ endpoints. ``None`` puts an ``ipc://`` socket in the run's private directory."""

    work: str | None = None
    results: str | None = None
    acks: str | None = None
    control: str | None = None
    high_water_mark: int = Field(64, ge=1)
    startup_timeout_s: float = Field(120.0, gt=0)
    result_timeout_s: float = Field(120.0, gt=0)


class PipelineConfig(_Strict):
    """Everything needed to reproduce a scan's results."""

    scan_id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    output_dir: Path = Path("beamline-inn-results")
    n_workers: int = Field(2, ge=1)
    grid: GridConfig = GridConfig()
    integration: IntegrationConfig = IntegrationConfig()
    inference: InferenceConfig = InferenceConfig()
    transport: TransportConfig = TransportConfig()

    @property
    def output_path(self) -> Path:
        """The scan's results file."""
        return self.output_dir / f"{self.scan_id}.h5"
