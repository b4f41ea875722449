"""The source of a scan's configuration: :func:`opened` turns ``config.source`` (a
:data:`~pipeline.source_specs.SourceSpec`) into a :class:`~pipeline.sources.base.Source`.

What the source says about the scan goes back into the configuration the scan runs with:

- archived files: a PONI without a detector takes the detector shape of the files' headers
  (:func:`with_detector_shape`), so that an odd first frame fails alone; a file list gives
  its :meth:`~pipeline.sources.FileSource.manifest`, what a resumed scan compares its
  results file with; a pattern that matches nothing is a ``ValueError`` (a typo stops the
  command instead of giving an empty scan);
- frames read ahead by a reader process leave it a core: pyFAI's engine in the scan's
  process takes one thread fewer than the cores unless the configuration says how many;
  where integrator processes integrate, they take the frames where the reader put them
  (no copy), and the reader gets :func:`~pipeline.integration.pool.frames_held` slots more
  than ``read_ahead`` for the frames they hold;
- a scan with integrator processes (:func:`~pipeline.integration.pool.integrator_processes`),
  or whose inference workers integrate (``integrate_on_workers``), leaves the decoding of
  compressed frames to them (:func:`~pipeline.integration.pool.decoded_by_receiver`): a
  DECTRIS stream's images, and the bitshuffle-LZ4 and LZ4 chunks of HDF5 files (archived,
  or in a watched folder), come as their compressed bytes (``Exposure.encoded``);
- simulated frames: the scan's number of frames is known ahead.

Example:
    >>> from pipeline.config import PipelineConfig
    >>> from pipeline.source_specs import SimulatedFrames
    >>> config = PipelineConfig(scan_id="doc", source=SimulatedFrames(n_frames=2))
    >>> with opened(config) as scan:
    ...     indices = [exposure.index for exposure in scan.source.exposures()]
    >>> indices, scan.expected_frames, scan.source.ended_cleanly
    ([0, 1], 2, True)
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Literal

from pipeline.config import PipelineConfig
from pipeline.integration import frame_shape_is_open
from pipeline.integration.pool import decoded_by_receiver, frames_held
from pipeline.source_specs import (
    ArchivedFiles,
    DectrisStreamSource,
    EigerFiles,
    SimulatedFrames,
    SourceSpec,
    WatchedFolder,
)
from pipeline.sources.base import Source
from pipeline.sources.dectris import DectrisStream
from pipeline.sources.eiger import EigerSource
from pipeline.sources.files import FileSource
from pipeline.sources.identity import FileStamp
from pipeline.sources.readahead import ReadAhead
from pipeline.sources.simulated import SimulatedDetector
from pipeline.sources.watch import DirectoryWatcher


@dataclass(frozen=True)
class OpenedSource:
    """A configuration's source, ready to give its exposures.

    Attributes:
        source: the exposures' source.
        config: the configuration to run the scan with (see the module docstring).
        manifest: an archived scan's files by key, for resuming (``None`` otherwise).
        expected_frames: the scan's number of frames where known ahead.
    """

    source: Source
    config: PipelineConfig
    manifest: Mapping[str, FileStamp] | None = None
    expected_frames: int | None = None


@contextlib.contextmanager
def opened(config: PipelineConfig) -> Iterator[OpenedSource]:
    """``config.source`` opened (a stream connected, a reader process started) for the scan
    ``config.scan_id``, and closed on leaving; ``ValueError`` when the configuration names
    no source, or files that do not exist."""
    spec: SourceSpec | None = config.source
    if spec is None:
        raise ValueError(f"the configuration of scan {config.scan_id!r} names no source")
    if isinstance(spec, SimulatedFrames):
        yield _simulated(config, spec)
    elif isinstance(spec, ArchivedFiles | EigerFiles):
        with _archived(config, spec) as archived:
            yield archived
    elif isinstance(spec, WatchedFolder):
        watcher = DirectoryWatcher(
            spec.directory,
            config.scan_id,
            spec.pattern,
            poll_interval_s=spec.poll_interval_s,
            idle_timeout_s=spec.idle_timeout_s,
            hdf5_dataset=spec.hdf5_dataset,
            decode_frames=decoded_by_receiver(config),
        )
        yield OpenedSource(watcher, config)
    else:
        with _stream(config, spec) as stream:
            yield stream


def _simulated(config: PipelineConfig, spec: SimulatedFrames) -> OpenedSource:
    from pipeline.instrument import load_instrument
    from pipeline.model.checkpoint import card_instrument, read_card

    if spec.instrument is not None:
        instrument = load_instrument(spec.instrument)
    else:
        instrument = card_instrument(read_card(config.inference.model))
    detector = SimulatedDetector(config.integration, instrument, seed=spec.seed)
    return OpenedSource(detector.scan(config.scan_id, spec.n_frames), config, None, spec.n_frames)


def archived_files(config: PipelineConfig) -> OpenedSource:
    """The files of ``config.source`` (:class:`~pipeline.source_specs.ArchivedFiles` or
    :class:`~pipeline.source_specs.EigerFiles`), read in this process, with the configuration
    and manifest they give (see the module docstring): what a command checks before it starts
    a scan. ``ValueError`` when a pattern matches nothing."""
    spec = config.source
    decode = decoded_by_receiver(config)  # else HDF5 chunks go compressed to who integrates
    files: FileSource | EigerSource
    if isinstance(spec, ArchivedFiles):
        files = FileSource(
            spec.paths, config.scan_id, hdf5_dataset=spec.hdf5_dataset, decode_frames=decode
        )
    elif isinstance(spec, EigerFiles):
        files = EigerSource(spec.paths, config.scan_id, dataset=spec.dataset, decode_frames=decode)
    else:
        raise ValueError(f"the source of scan {config.scan_id!r} is not archived files: {spec}")
    if files.unmatched_patterns or not files.files:
        raise ValueError(f"no file matches {', '.join(files.unmatched_patterns or spec.paths)}")
    if isinstance(files, EigerSource):
        return OpenedSource(files, config)
    return OpenedSource(files, with_detector_shape(config, files), files.manifest())


@contextlib.contextmanager
def _archived(config: PipelineConfig, spec: ArchivedFiles | EigerFiles) -> Iterator[OpenedSource]:
    files = archived_files(config)
    if spec.read_ahead == 0:
        yield files
        return
    config = files.config
    held = frames_held(config)  # by integrator processes, in the reader's slots
    if config.integration.openmp_threads is None and not held:
        threads = max(1, (os.cpu_count() or 1) - 1)
        integration = config.integration.model_copy(update={"openmp_threads": threads})
        config = config.model_copy(update={"integration": integration})
    with ReadAhead(files.source, spec.read_ahead + held) as reader:
        reader.start()  # its start-up (about a second) overlaps the workers'
        yield OpenedSource(reader, config, files.manifest)


@contextlib.contextmanager
def _stream(config: PipelineConfig, spec: DectrisStreamSource) -> Iterator[OpenedSource]:
    protocol: Literal["v1", "v2"] = "v1" if spec.protocol == "dectris-v1" else "v2"
    with DectrisStream(
        spec.stream,
        config.scan_id,
        protocol=protocol,
        idle_timeout_s=spec.idle_timeout_s,
        max_message_bytes=spec.max_message_bytes,
        decode_frames=decoded_by_receiver(config),
    ) as stream:
        yield OpenedSource(stream, config)


def with_detector_shape(config: PipelineConfig, source: FileSource) -> PipelineConfig:
    """``config`` with the detector shape of ``source``'s frame headers where nothing else
    fixes it (a PONI without a detector, no mask, dark or flat): a first frame of another
    shape then fails alone instead of every frame after it."""
    if not frame_shape_is_open(config.integration):
        return config
    shape = source.frame_shape()
    if shape is None:
        return config
    integration = config.integration.model_copy(update={"detector_shape": shape})
    return config.model_copy(update={"integration": integration})
