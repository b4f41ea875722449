"""Where a scan's frames come from, as configuration: saved with its results.

A :data:`SourceSpec` is one of five kinds, told apart by ``kind``:

- :class:`SimulatedFrames` (``simulated``): frames simulated for the model's instrument, with
  known truth (the demo);
- :class:`ArchivedFiles` (``files``): EDF, CBF, TIFF and Eiger/NeXus HDF5 files, folders and
  globs of them (reprocessing);
- :class:`EigerFiles` (``eiger``): Eiger/NeXus HDF5 files only, master or data files;
- :class:`WatchedFolder` (``folder``): a folder a detector writes into, live;
- :class:`DectrisStreamSource` (``dectris-stream``): a DECTRIS detector's SIMPLON stream, live.

It is part of :class:`~pipeline.config.PipelineConfig` (``source``), so the results file
records what was read; :func:`pipeline.sources.opening.opened` makes the source of a
configuration. This module holds only the settings (pydantic), so that the configuration
does not import the readers.

Example:
    >>> from pydantic import TypeAdapter
    >>> spec = TypeAdapter(SourceSpec).validate_python(
    ...     {"kind": "folder", "directory": "/data/incoming", "pattern": "*.cbf"})
    >>> type(spec).__name__, spec.live, spec.idle_timeout_s
    ('WatchedFolder', True, 30.0)
    >>> ArchivedFiles(paths=["/data/scan-7/*.cbf"]).live
    False
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    #: frames that arrive as a detector takes them (one task takes the whole series, and
    #: SIGTERM stops the source instead of the scan), not frames that exist already
    live: ClassVar[bool] = False


class SimulatedFrames(_Spec):
    """Frames simulated for an instrument, with parameters drawn from its prior
    (:class:`~pipeline.sources.SimulatedDetector`)."""

    kind: Literal["simulated"] = "simulated"
    n_frames: int = Field(64, ge=1)
    #: seeds the parameters and the noise; equal seeds give equal scans
    seed: int = 0
    #: an instrument file (``beamline-inn instrument``) the frames are simulated for; ``None``:
    #: the model's instrument
    instrument: Path | None = None


class ArchivedFiles(_Spec):
    """Detector files that exist already (:class:`~pipeline.sources.FileSource`)."""

    kind: Literal["files"] = "files"
    #: files, folders and glob patterns, read in natural order
    paths: list[str] = Field(min_length=1)
    #: the frames' dataset in HDF5 files where it is neither an Eiger data file's nor a NeXus
    #: detector's ``data`` (a 3-D stack: one exposure per frame)
    hdf5_dataset: str | None = None
    #: frames decoded ahead by a reader process (0: read in the scan's process)
    read_ahead: int = Field(0, ge=0)


class EigerFiles(_Spec):
    """Eiger/NeXus HDF5 files only, master or data files (:class:`~pipeline.sources.EigerSource`)."""

    kind: Literal["eiger"] = "eiger"
    #: files, folders and glob patterns; data files a listed master links to are read through it
    paths: list[str] = Field(min_length=1)
    #: the frames' dataset where it is not an Eiger place or a NeXus detector's ``data``
    dataset: str | None = None
    #: frames decoded ahead by a reader process (0: read in the scan's process)
    read_ahead: int = Field(0, ge=0)


class WatchedFolder(_Spec):
    """A folder a detector writes frames into (EDF, CBF, TIFF, Eiger HDF5), taken as each file
    is complete (:class:`~pipeline.sources.DirectoryWatcher`)."""

    kind: Literal["folder"] = "folder"
    live: ClassVar[bool] = True
    directory: Path
    pattern: str = "*"
    #: the frames' dataset in HDF5 files where it is neither an Eiger data file's nor a NeXus
    #: detector's ``data`` (a 3-D stack: one exposure per frame)
    hdf5_dataset: str | None = None
    #: stop after this long without a new frame; ``None``: until cancelled
    idle_timeout_s: float | None = Field(30.0, gt=0)
    poll_interval_s: float = Field(0.5, gt=0)


class DectrisStreamSource(_Spec):
    """A DECTRIS detector's SIMPLON stream (ZeroMQ PUSH; the pipeline connects with PULL;
    :class:`~pipeline.sources.DectrisStream`)."""

    kind: Literal["dectris-stream"] = "dectris-stream"
    live: ClassVar[bool] = True
    #: the detector's stream endpoint, e.g. ``tcp://10.0.0.5:9999``
    stream: str = Field(pattern=r"^(tcp|ipc|inproc)://.+")
    protocol: Literal["dectris-v1", "dectris-v2"] = "dectris-v1"
    #: end the series after this long without a message once it started (frames kept)
    idle_timeout_s: float = Field(30.0, gt=0)
    #: larger message parts are refused (the connection dropped, the image then missing), so
    #: a rogue sender cannot exhaust memory; an Eiger2 16M image, 32-bit, is 72 MiB unpacked
    max_message_bytes: int = Field(256 * 2**20, ge=2**16)


#: A live source: what the ``online-reconstruction`` flow takes.
LiveSource = Annotated[DectrisStreamSource | WatchedFolder, Field(discriminator="kind")]

#: Any source of a scan's frames, told apart by ``kind``.
SourceSpec = Annotated[
    SimulatedFrames | ArchivedFiles | EigerFiles | WatchedFolder | DectrisStreamSource,
    Field(discriminator="kind"),
]
