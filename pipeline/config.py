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
    # the docstring under each field is its description in the Prefect UI's run form: plain
    # words, no markup (tests/test_operator_form.py)
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class GridConfig(_Strict):
    """The q grid of the line-outs. The model's instrument sets it (leave it out: a grid that
    is not the model's is refused); the default is the default model's."""

    q_min_nm: float = 0.01
    """Lowest q, 1/nm."""
    q_max_nm: float = 0.40
    """Highest q, 1/nm."""
    n_points: int = Field(512, ge=2)
    """Bins of the line-out."""
    resolution_nm: float = Field(1.5e-3, gt=0)
    """The instrument's q resolution, 1/nm."""

    def grid(self) -> QGrid:
        return QGrid(self.q_min_nm, self.q_max_nm, self.n_points, self.resolution_nm)


class IntegrationConfig(_Strict):
    """How each frame becomes a line-out (pyFAI azimuthal integration); saved with the
    results."""

    poni: Path | None = None
    """Geometry file, v1 or v2 as pyFAI-calib2 writes it. Empty: the bundled Eiger 4M at 5 m,
    8 keV."""
    mask: Path | None = None
    """Mask image (EDF, TIFF or .npy), non-zero pixels masked; added to the detector's own
    gaps."""
    dark: Path | None = None
    """Dark-current image, subtracted from every frame."""
    flat: Path | None = None
    """Flat-field image (relative pixel efficiency, about 1)."""
    azimuth_range_deg: tuple[float, float] | None = (-5.0, 5.0)
    """The sector, low and high angle in pyFAI's chi, -180 to 180 degrees. Empty: the full
    ring."""
    method: Literal["csr", "histogram", "lut"] = "csr"
    """pyFAI's engine (without pixel splitting)."""
    max_bad_pixel_fraction: float = Field(0.5, gt=0, le=1)
    """A frame with a larger share of the integrated pixels marked bad or saturated is
    refused."""
    normalization_keys: tuple[str, ...] = ()
    """Metadata entries of each exposure multiplied into its normalisation, e.g. the header
    keys of the incident monitor and the transmission."""
    openmp_threads: int | None = Field(None, ge=1)
    """Threads pyFAI's engine may use. Empty: one per core. Fewer leave cores to a reader
    process: threads that share their cores with a busy process wait for the slowest (9.1
    instead of 6.4 ms per Pilatus 1M frame on 2 cores)."""
    detector_shape: tuple[PositiveInt, PositiveInt] | None = None
    """Rows and columns of the frames where the PONI file names no detector (v1 files);
    beamline-inn reprocess reads it from the frame files. Empty: the shape of the mask, dark
    or flat image, else of the first frame."""

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
    """Posterior sampling by the inference workers: the model, the samples per exposure, the
    batches, the device."""

    model: Path | None = None
    """Model file, or a bundled model's name. Empty: the bundled default model."""
    n_samples: int = Field(1000, ge=2)
    """Posterior samples drawn per exposure."""
    max_batch: int | None = Field(None, ge=1)
    """Most exposures in one forward pass. Empty: by device, 8 on a CPU (fastest per
    exposure there: 1,000 samples in 7.7 ms at 8, 9.7 ms at 32 on one thread), 2048 on
    CUDA."""
    latency_budget_ms: float = Field(200.0, gt=0)
    """A worker takes the largest batch (up to the most exposures in one pass) that its
    measured cost says it finishes within this many milliseconds."""
    device: str = "auto"
    """Torch device: auto (CUDA when there is one), cpu, cuda, cuda:1, ..."""
    threads: int | None = Field(None, ge=1)
    """Torch threads per worker. Empty: the cores shared out among the workers."""
    seed: int = 0
    """Seed of the sampling."""
    compile: bool = False
    """Compile the sampler with torch.compile when a worker starts (on a CPU 11 s to 2
    minutes, the longest when the compiler's cache is cold; the scan then waits 300 s more
    for its workers). Measured on 2 cores: p99 latency at 10 Hz 26 ms instead of 55 with the
    default Eiger 4M model, 26 ms with the Pilatus 1M model."""

    def batch_limit(self, device_type: str) -> int:
        """``max_batch``, or the default for a device of this type (``"cpu"``, ``"cuda"``)."""
        if self.max_batch is not None:
            return self.max_batch
        return CUDA_MAX_BATCH if device_type == "cuda" else CPU_MAX_BATCH


CPU_MAX_BATCH = 8
#: Seconds more that workers which compile their sampler may take to start
#: (:meth:`ScanSettings.worker_startup_s`).
COMPILE_STARTUP_S = 300.0
CUDA_MAX_BATCH = 2048
#: Frames a worker that integrates takes in one batch by default (64 Eiger 4M frames are
#: 1.2 GB decoded, in pinned memory and on the device; the feeder keeps twice as many).
FRAME_MAX_BATCH = 64


class TransportConfig(_Strict):
    """How the processes of a scan talk (ZeroMQ). An empty endpoint is a socket in the run's
    private folder.

    The work, results, acks and control endpoints join the processes of one machine and must
    stay on it (ipc:// or a loopback tcp:// address). Workers on other nodes connect to the
    remote work address (beamline-inn worker --connect), which needs CURVE keys unless it is
    a loopback address: the feeder's secret key and a folder of the workers' public keys
    (beamline-inn keys).
    """

    work: str | None = None
    """Where the feeder hands exposures to the local workers."""
    results: str | None = None
    """Where the workers send their results to the writer."""
    acks: str | None = None
    """Where the writer confirms what it stored, and the processes say they are ready."""
    control: str | None = None
    """Where the feeder steers the writer and the workers."""
    remote_work: str | None = None
    """A tcp:// address on which the feeder also takes inference workers of other nodes, e.g.
    tcp://*:5555. Empty: local workers only."""
    curve_secret_key: Path | None = None
    """The feeder's secret key file (.key_secret)."""
    curve_authorized_keys: Path | None = None
    """Folder of the public keys (.key files) of the workers allowed to connect."""
    high_water_mark: int = Field(64, ge=1)
    """Line-outs in flight per worker (at least twice its largest batch): beyond that the
    feeder waits."""
    startup_timeout_s: float = Field(120.0, gt=0)
    """Seconds the writer and the workers may take to start."""
    result_timeout_s: float = Field(120.0, gt=0)
    """The scan stops when no exposure is written for this many seconds while some are in
    flight."""
    heartbeat_interval_s: float = Field(1.0, gt=0)
    """Seconds between a worker's heartbeats while it has nothing to do."""
    worker_timeout_s: float = Field(10.0, gt=0)
    """A worker silent for this long is lost: its exposures go to the others, and it is
    killed and replaced."""
    max_worker_restarts: int = Field(10, ge=0)
    """Workers replaced in one scan before the scan gives up."""
    max_writer_restarts: int = Field(3, ge=0)
    """Times the results writer is started again on the file in one scan (it exited, say
    killed) before the scan gives up."""
    max_message_bytes: int = Field(64 * 2**20, ge=2**16)
    """Largest message part a socket accepts; a peer that sends a larger one is disconnected
    (a result of 1,000 samples is 20 kB)."""

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

    samples_compression: Literal["none", "gzip", "bitshuffle-lz4"] = "none"
    """Compression of the posterior samples: none (every HDF5 reader opens the file), gzip
    (in every HDF5 build: smaller, the writer slower) or bitshuffle-lz4 (smaller still;
    readers need the filter plugin, e.g. import hdf5plugin); measured by python -m
    benchmarks.writer."""

    stored_samples: int | None = Field(None, ge=0)
    """Posterior draws stored per exposure: empty stores every draw (the inference's
    n_samples); a number stores the first that many (0: the summaries alone). The mean, sd,
    quantiles, width modes and predictive check still come from every draw; fewer stored
    draws make a smaller file for scans at high rates."""

    def draws_stored(self, n_samples: int) -> int:
        """Draws per exposure the results file holds when ``n_samples`` are drawn.

        Example:
            >>> StoreConfig().draws_stored(1000), StoreConfig(stored_samples=0).draws_stored(1000)
            (1000, 0)
        """
        return n_samples if self.stored_samples is None else min(self.stored_samples, n_samples)

    sasdata_groups: Literal["every", "first"] = "every"
    """NXcanSAS SASdata groups written when the scan ends: one per exposure with a line-out
    (every: SasView reads each curve; about 0.3 ms per exposure at the end of the scan),
    or only the first exposure's (first: for scans of many thousand exposures, whose file is
    then complete at once; every line-out stays in line_out/I, which silx and h5py read)."""


class ScanSettings(_Strict):
    """Everything the processing of a scan needs but its name and its source: what the scans
    of a deployment or of a batch share."""

    output_dir: Path = Path("beamline-inn-results")
    """Folder of the results files, one per scan (SCAN_ID.h5)."""
    n_workers: int = Field(2, ge=0)
    """Local inference workers started for the scan (0: workers of other nodes only)."""
    n_integrators: int | None = Field(None, ge=1)
    """pyFAI engines integrating the scan's frames at once: 1 integrates in the feeder; more
    run in integrator processes of their own, fed through shared memory (a DECTRIS stream's
    frames then stay compressed until these processes decode them). Empty: 1 for the csr
    method on files and simulated frames (it sums only the pixels of the region, faster than
    a frame's copy to another process), else the cores beside the local inference workers on
    a CPU (GPU workers leave them all), at least 1 and at most 8."""
    integrate_on_workers: bool = False
    """The GPU mode: the inference workers integrate the frames on their own device, each
    batch of frames copied to it once (through pinned memory on a GPU), and pass the
    line-outs straight to the model there; the feeder sends each frame as the source gave it
    (compressed where it came so, decoded by the worker). Only with the csr method, a
    detector shape known before the first frame, and local workers; at most 64 frames in a
    batch unless inference.max_batch says otherwise."""
    grid: GridConfig = GridConfig()
    """The q grid of the line-outs: the model's instrument sets it, leave it out."""
    integration: IntegrationConfig = IntegrationConfig()
    """How each frame becomes a line-out: geometry, mask, dark, flat, sector."""
    inference: InferenceConfig = InferenceConfig()
    """Posterior sampling: model, samples per exposure, batches, device."""
    transport: TransportConfig = TransportConfig()
    """How the scan's processes talk, and workers of other nodes."""
    store: StoreConfig = StoreConfig()
    """How the results file stores the samples."""
    max_failed_fraction: float = Field(0.0, ge=0.0, le=1.0)
    """The run ends Failed when more than this share of its exposures failed (0: any failed
    exposure; 1: never for failed exposures, the state's message gives the counts)."""

    @model_validator(mode="after")
    def _some_worker(self) -> ScanSettings:
        if self.n_workers == 0 and self.transport.remote_work is None:
            raise ValueError("n_workers is 0 and no remote_work endpoint is set: no worker")
        return self

    @model_validator(mode="after")
    def _workers_can_integrate(self) -> ScanSettings:
        if not self.integrate_on_workers:
            return self
        if self.integration.method != "csr":
            raise ValueError(
                f"integrate_on_workers needs the csr method, not {self.integration.method}"
            )
        if self.transport.remote_work is not None:
            raise ValueError("integrate_on_workers is for local workers: remote_work is set")
        if self.n_integrators not in (None, 1):
            raise ValueError(
                f"integrate_on_workers: the workers integrate, not {self.n_integrators} "
                "integrator processes"
            )
        return self

    def batch_limit(self, device_type: str) -> int:
        """The most exposures a worker on a device of this type (``"cpu"``, ``"cuda"``) takes
        in one batch: :meth:`InferenceConfig.batch_limit`, and at most
        :data:`FRAME_MAX_BATCH` frames when the workers integrate them, unless
        ``inference.max_batch`` is given.

        Example:
            >>> ScanSettings(integrate_on_workers=True).batch_limit("cuda")
            64
        """
        limit = self.inference.batch_limit(device_type)
        if self.integrate_on_workers and self.inference.max_batch is None:
            return min(limit, FRAME_MAX_BATCH)
        return limit

    def worker_startup_s(self) -> float:
        """Seconds the scan's workers may take to start: ``transport.startup_timeout_s``,
        and :data:`COMPILE_STARTUP_S` more where they compile their sampler
        (``inference.compile``: minutes on a CPU whose compiler cache is cold).

        Example:
            >>> ScanSettings().worker_startup_s()
            120.0
            >>> ScanSettings(inference=InferenceConfig(compile=True)).worker_startup_s()
            420.0
        """
        extra = COMPILE_STARTUP_S if self.inference.compile else 0.0
        return self.transport.startup_timeout_s + extra

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
    """The scan's name, which names its results file."""
    scan_source: str | None = None
    """The archived scan reconstructed (its folder's or Eiger master file's real path), when
    the run is one such scan (reprocess-scans): its results file belongs to it."""
    source: SourceSpec | None = None
    """Where the frames come from (pipeline.source_specs). Empty where the caller feeds the
    exposures itself."""

    @property
    def settings(self) -> ScanSettings:
        """These settings without the scan's name."""
        return ScanSettings(**{name: getattr(self, name) for name in ScanSettings.model_fields})

    @property
    def output_path(self) -> Path:
        """The scan's results file."""
        return self.output_dir / f"{self.scan_id}.h5"
