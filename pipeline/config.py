"""The one configuration object of a run, saved as JSON into every output file.

Example:
    >>> config = PipelineConfig(scan_id="demo")
    >>> PipelineConfig.model_validate_json(config.model_dump_json()) == config
    True
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator, model_validator

from pipeline.physics import QGrid
from pipeline.source_specs import SourceSpec
from pipeline.transport.addresses import is_loopback


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GridConfig(_Strict):
    """The line-out's q grid (see :class:`pipeline.physics.QGrid`): the model's instrument's,
    which :func:`pipeline.preflight.settings_for_model` sets; the default is the default
    model's."""

    q_min_nm: float = 0.01
    q_max_nm: float = 0.40
    n_points: int = Field(512, ge=2)
    resolution_nm: float = Field(1.5e-3, gt=0)

    def grid(self) -> QGrid:
        return QGrid(self.q_min_nm, self.q_max_nm, self.n_points, self.resolution_nm)


class IntegrationConfig(_Strict):
    """pyFAI integration (see :mod:`pipeline.integration`), saved with the results.

    Attributes:
        poni: geometry file, v1 or v2 as pyFAI-calib2 writes it (``None``: the bundled Eiger 4M
            at 5 m, 8 keV).
        mask: EDF, TIFF or ``.npy`` image, non-zero = masked; added to the detector's own gaps.
        dark: dark-current image subtracted from every frame.
        flat: flat-field image (relative pixel efficiency, about 1).
        azimuth_range_deg: the sector, (low, high) in pyFAI's chi, -180 to 180 degrees;
            ``None`` integrates the full ring.
        method: pyFAI's engine (without pixel splitting).
        max_bad_pixel_fraction: a frame with more of the integration region's pixels marked
            bad or saturated is refused.
        normalization_keys: metadata entries of each exposure multiplied into its
            normalisation, e.g. the header keys of the incident monitor and the transmission.
        openmp_threads: OpenMP threads pyFAI's engine may use in the integrating thread;
            ``None`` leaves its default (one per core). Fewer leave cores to a reader process:
            an OpenMP team that shares its cores with a busy process waits for its slowest
            thread (measured: 9.1 instead of 6.4 ms per Pilatus 1M frame on 2 cores).
        detector_shape: (rows, columns) of the frames where the PONI names no detector (v1
            files); ``beamline-inn reprocess`` takes it from the frame files' headers.
            ``None``: the mask, dark or flat file's shape, else the first frame's.
    """

    poni: Path | None = None
    mask: Path | None = None
    dark: Path | None = None
    flat: Path | None = None
    azimuth_range_deg: tuple[float, float] | None = (-5.0, 5.0)
    method: Literal["csr", "histogram", "lut"] = "csr"
    max_bad_pixel_fraction: float = Field(0.5, gt=0, le=1)
    normalization_keys: tuple[str, ...] = ()
    openmp_threads: int | None = Field(None, ge=1)
    detector_shape: tuple[PositiveInt, PositiveInt] | None = None

    @field_validator("azimuth_range_deg")
    @classmethod
    def _sector_within_chi(cls, sector: tuple[float, float] | None) -> tuple[float, float] | None:
        if sector is not None and not -180.0 <= sector[0] < sector[1] <= 180.0:
            raise ValueError(
                f"azimuth range {sector} must be (low, high) with -180 <= low < high <= 180 "
                "degrees (pyFAI's chi)"
            )
        return sector


class InferenceConfig(_Strict):
    """Posterior sampling: model file (``None`` = the bundled model), draws per exposure,
    the largest batch of exposures per forward pass and the latency budget of one batch, the
    torch device, and whether workers compile the sampler."""

    model: Path | None = None
    n_samples: int = Field(1000, ge=2)
    #: ``None``: by device, :data:`CPU_MAX_BATCH` on a CPU (fastest per exposure there:
    #: 1,000 samples 7.7 ms at 8, 9.7 ms at 32 on one thread), :data:`CUDA_MAX_BATCH` on CUDA.
    max_batch: int | None = Field(None, ge=1)
    #: A worker takes the largest batch (up to ``max_batch``) that its measured cost says
    #: it finishes within this many milliseconds.
    latency_budget_ms: float = Field(200.0, gt=0)
    device: str = "auto"
    #: torch threads per worker; ``None``: the cores shared out among the workers.
    threads: int | None = Field(None, ge=1)
    seed: int = 0
    #: compile the sampler with torch.compile when a worker starts (up to 30 s, then about
    #: twice as fast on a CPU); see ``CountsSampler.compile_sampling``.
    compile: bool = False

    def batch_limit(self, device_type: str) -> int:
        """``max_batch``, or the default for a device of this type (``"cpu"``, ``"cuda"``)."""
        if self.max_batch is not None:
            return self.max_batch
        return CUDA_MAX_BATCH if device_type == "cuda" else CPU_MAX_BATCH


CPU_MAX_BATCH = 8
CUDA_MAX_BATCH = 2048


class TransportConfig(_Strict):
    """ZeroMQ endpoints. ``None`` puts an ``ipc://`` socket in the run's private directory.

    ``work``, ``results``, ``acks`` and ``control`` join the processes of one machine and must
    stay on it (``ipc://`` or loopback ``tcp://``). Workers on other nodes connect to
    ``remote_work`` (``beamline-inn worker --connect``), which needs CURVE keys unless it is
    a loopback address: the feeder's secret key and a folder of the workers' public keys
    (``beamline-inn keys``).
    """

    work: str | None = None
    results: str | None = None
    acks: str | None = None
    control: str | None = None
    #: ``tcp://`` address on which the feeder also accepts remote inference workers, e.g.
    #: ``tcp://*:5555``; ``None``: local workers only.
    remote_work: str | None = None
    #: The feeder's ``.key_secret`` file.
    curve_secret_key: Path | None = None
    #: Folder of the public keys (``*.key``) of the workers allowed to connect.
    curve_authorized_keys: Path | None = None
    high_water_mark: int = Field(64, ge=1)
    startup_timeout_s: float = Field(120.0, gt=0)
    result_timeout_s: float = Field(120.0, gt=0)
    #: Seconds between a worker's heartbeats while it has nothing to do.
    heartbeat_interval_s: float = Field(1.0, gt=0)
    #: A worker silent for this long is lost: its exposures go to the others, and it is
    #: killed and replaced.
    worker_timeout_s: float = Field(10.0, gt=0)
    #: Workers replaced in one scan before the scan gives up.
    max_worker_restarts: int = Field(10, ge=0)
    #: Times the results writer is started again on the file in one scan (it exited, say
    #: killed) before the scan gives up.
    max_writer_restarts: int = Field(3, ge=0)
    #: Largest message part a pipeline socket accepts; ZeroMQ disconnects a peer that sends
    #: a larger one (a 1,000-sample result is 20 kB).
    max_message_bytes: int = Field(64 * 2**20, ge=2**16)

    @model_validator(mode="after")
    def _endpoints_are_safe(self) -> TransportConfig:
        for name in ("work", "results", "acks", "control"):
            url = getattr(self, name)
            if url is not None and not is_loopback(url):
                raise ValueError(
                    f"the {name} endpoint {url} would leave this machine: use ipc:// or a "
                    "loopback tcp:// address, and remote_work for workers on other nodes"
                )
        if (self.curve_secret_key is None) != (self.curve_authorized_keys is None):
            raise ValueError("CURVE needs both curve_secret_key and curve_authorized_keys")
        if self.remote_work is not None:
            if not self.remote_work.startswith("tcp://"):
                raise ValueError(f"remote_work must be a tcp:// address, not {self.remote_work}")
            if not is_loopback(self.remote_work) and self.curve_secret_key is None:
                raise ValueError(
                    f"remote_work {self.remote_work} is reachable from other hosts: set "
                    "curve_secret_key and curve_authorized_keys (keys: beamline-inn keys)"
                )
        return self


class StoreConfig(_Strict):
    """How the results file stores what it holds (docs/results-format.md)."""

    #: compression of ``posterior/samples``: ``"none"`` (every HDF5 reader opens the file),
    #: ``"gzip"`` (deflate, in every HDF5 build: smaller, the writer slower) or
    #: ``"bitshuffle-lz4"`` (smaller still; readers need the filter plugin, e.g.
    #: ``import hdf5plugin``); measured by ``python -m benchmarks.writer``
    samples_compression: Literal["none", "gzip", "bitshuffle-lz4"] = "none"


class ScanSettings(_Strict):
    """Everything a scan's processing needs but its name: what a deployment or a batch of
    archived scans shares; :meth:`for_scan` makes the :class:`PipelineConfig` of one scan."""

    output_dir: Path = Path("beamline-inn-results")
    #: local inference workers started by the feeder (0: remote workers only)
    n_workers: int = Field(2, ge=0)
    grid: GridConfig = GridConfig()
    integration: IntegrationConfig = IntegrationConfig()
    inference: InferenceConfig = InferenceConfig()
    transport: TransportConfig = TransportConfig()
    store: StoreConfig = StoreConfig()
    #: the scan's run ends Failed when more than this fraction of its exposures failed (0:
    #: any failed exposure; 1: never for failed exposures, a state message gives the counts)
    max_failed_fraction: float = Field(0.0, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _some_worker(self) -> ScanSettings:
        if self.n_workers == 0 and self.transport.remote_work is None:
            raise ValueError("n_workers is 0 and no remote_work endpoint is set: no worker")
        return self

    def for_scan(
        self, scan_id: str, scan_source: str | None = None, source: SourceSpec | None = None
    ) -> PipelineConfig:
        """The configuration of scan ``scan_id`` with these settings, its frames from
        ``source`` (``scan_source``: the archived scan's real path, when it is one)."""
        return PipelineConfig(scan_id=scan_id, scan_source=scan_source, source=source, **dict(self))


#: A scan id names its results file and log folder: no path separators, no leading dot, at
#: most 200 characters (a file name may have 255 bytes).
SCAN_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$"


def scan_id_from(name: str) -> str:
    """A scan id (letters, digits, ``.``, ``_``, ``-``; no path separators; at most 200
    characters) made from a file or folder name.

    >>> scan_id_from("run 12/äb_master")
    'run_12__b_master'
    """
    return re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip("._-")[:200] or "scan"


class PipelineConfig(ScanSettings):
    """Everything needed to reproduce a scan's results: the settings and the scan's name,
    which names its results file (so it cannot leave ``output_dir``)."""

    scan_id: str = Field(pattern=SCAN_ID_PATTERN)
    #: the archived scan reconstructed (its folder's or Eiger master file's real path), when
    #: the run is one such scan (``reprocess-scans``): its results file belongs to it
    scan_source: str | None = None
    #: where the frames come from (:mod:`pipeline.source_specs`); ``None`` where the caller
    #: feeds the exposures itself
    source: SourceSpec | None = None

    @property
    def settings(self) -> ScanSettings:
        """These settings without the scan's name."""
        return ScanSettings(**{name: getattr(self, name) for name in ScanSettings.model_fields})

    @property
    def output_path(self) -> Path:
        """The scan's results file."""
        return self.output_dir / f"{self.scan_id}.h5"
