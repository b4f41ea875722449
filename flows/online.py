"""``online-reconstruction``: the long-running flow of a beamtime, one live series per run.

It takes frames from a DECTRIS detector's stream or from a folder a detector writes into,
starts the writer and the local inference workers (remote workers on other nodes attach on
``transport.remote_work``), and runs until the series ends (its end message, or the idle
timeout) or the run is cancelled.

Its run form in the UI starts with what an operator fills (:mod:`flows.operator`): the scan
id, the source as one line of text (a stream's address, ``tcp://HOST:PORT``, or a folder,
which may end in a pattern of file names, ``/data/incoming/*.cbf``: :func:`live_source`), the
PONI file, the mask, the model and the output folder; then ``expert``, the
:class:`~pipeline.config.ScanSettings` of everything else, which the operator's fields
override, and ``source_options`` (:class:`SourceOptions`: the stream's protocol, the idle
timeout, ...). A text box rather than a choice of source objects: the UI's older form shows
a union of objects told apart by ``kind`` as a raw JSON box.

The stream is connected before the processes start (a detector, or ALBA's simulator, may
drop what it cannot send), so the first images can wait in the socket for the seconds the
workers take to start. That wait is reported, not hidden: a stream's exposures are timed
by the detector's own acquisition times (:class:`~pipeline.sources.DectrisStream`), the
scan's latencies and rate count from them, and the ``received`` stage says how long frames
waited before the hand-over; the results file keeps when each was taken from the socket
(``exposures/received_time``).

Cancelling (from the UI: Prefect's runner sends SIGTERM to the flow's process) is a clean
stop: the source stops taking frames, every frame already taken is integrated, inferred and
written, the results file is closed, the summary artifact is made, and only then does the
run end as *Cancelled*. The writer and workers are not in the flow's process group, so the
signal reaches only the flow, which stops them in order; should the runner's grace period
(30 s) run out, they still finish what they hold once the flow's process is gone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from prefect import flow
from prefect.states import State
from pydantic import BaseModel, ConfigDict, Field

from flows.operator import ScanId, operator_settings
from flows.scan import default_scan_id, final_state, reconstruct, run_name
from pipeline.config import ScanSettings
from pipeline.source_specs import DectrisStreamSource, WatchedFolder

#: What a source text starts with when it is a stream's address, not a folder.
STREAM_SCHEMES = ("tcp://", "ipc://", "inproc://")

_STREAM = DectrisStreamSource.model_fields
_FOLDER = WatchedFolder.model_fields


class SourceOptions(BaseModel):
    """How the stream or the folder is read; each option is for a stream, a folder or both."""

    # the docstrings under the fields are their descriptions in the UI's run form
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    protocol: Literal["dectris-v1", "dectris-v2"] = _STREAM["protocol"].default
    """A stream: the version of DECTRIS's stream format the detector sends."""
    idle_timeout_s: float | None = Field(_FOLDER["idle_timeout_s"].default, gt=0)
    """End the series after this many seconds without a new frame (a stream: once its series
    started). Empty: a folder is watched until the run is cancelled; a stream needs a value."""
    hdf5_dataset: str | None = None
    """A folder of HDF5 files: the frames' dataset, where it is neither an Eiger data file's
    nor a NeXus detector's data."""
    poll_interval_s: float = Field(_FOLDER["poll_interval_s"].default, gt=0)
    """A folder: seconds between two looks for new files."""
    max_message_bytes: int = Field(_STREAM["max_message_bytes"].default, ge=2**16)
    """A stream: larger message parts are refused (the image is then missing), so that a
    rogue sender cannot exhaust memory; an Eiger2 16M image of 32 bits is 72 MiB."""


def live_source(source: str, options: SourceOptions) -> DectrisStreamSource | WatchedFolder:
    """The source that the text ``source`` names: a DECTRIS stream for an address
    (:data:`STREAM_SCHEMES`), else the folder a detector writes into, whose last part may be
    a pattern of file names (``*``, ``?``, ``[``), read with ``options``.

    Example:
        >>> live_source("/data/incoming/*.cbf", SourceOptions()).pattern
        '*.cbf'
        >>> live_source("tcp://10.0.0.5:9999", SourceOptions(protocol="dectris-v2")).protocol
        'dectris-v2'
    """
    source = source.strip()
    if source.startswith(STREAM_SCHEMES):
        if options.idle_timeout_s is None:
            raise ValueError(
                f"the stream {source} needs an idle timeout (source_options.idle_timeout_s): "
                "the series ends after it without a message"
            )
        return DectrisStreamSource(
            stream=source,
            protocol=options.protocol,
            idle_timeout_s=options.idle_timeout_s,
            max_message_bytes=options.max_message_bytes,
        )
    path = Path(source).expanduser()
    directory, pattern = (path.parent, path.name) if is_pattern(path.name) else (path, "*")
    return WatchedFolder(
        directory=directory,
        pattern=pattern,
        hdf5_dataset=options.hdf5_dataset,
        idle_timeout_s=options.idle_timeout_s,
        poll_interval_s=options.poll_interval_s,
    )


def is_pattern(name: str) -> bool:
    """Whether the file name ``name`` is a pattern of names: it has ``*``, ``?`` or ``[``."""
    return bool(set("*?[") & set(name))


@flow(
    name="online-reconstruction",
    flow_run_name=run_name("online", lambda parameters: parameters.get("scan_id")),
)
def online_reconstruction(
    *,
    scan_id: ScanId | None = None,
    source: str,
    poni: Path | None = None,
    mask: Path | None = None,
    model: str | None = None,
    output_dir: Path | None = None,
    expert: ScanSettings | None = None,
    source_options: SourceOptions | None = None,
) -> State:
    """Reconstruct one live series into OUTPUT_DIR/SCAN_ID.h5 while its frames arrive, until
    the series ends or the run is cancelled. The run is named by the scan id.

    Args:
        scan_id: The scan's name, which names its results file (letters, digits, dots,
            dashes, underscores). Empty: online-YYYYmmdd-HHMMSS, the run's start in UTC.
        source: Where the frames come from: the detector's stream address, e.g.
            tcp://10.0.0.5:9999, or the folder the detector writes its files into, e.g.
            /data/incoming, whose last part may be a pattern of file names, e.g.
            /data/incoming/*.cbf.
        poni: The detector's geometry: a PONI file, as pyFAI-calib2 writes it. Empty: the
            expert settings' (by default the bundled Eiger 4M at 5 m, 8 keV).
        mask: A mask image (EDF, TIFF or .npy; non-zero pixels are masked). Empty: the expert
            settings' (by default none).
        model: A model file, or the name of a bundled model (default, pilatus1m-5m-sector).
            Empty: the expert settings' (by default the default model).
        output_dir: The folder of the results file. Empty: the expert settings' (by default
            beamline-inn-results).
        expert: Everything else, for experts: integration, inference, transport, storage. A
            field filled above wins over the same field here. Empty: the defaults.
        source_options: How the stream or the folder is read: protocol, idle timeout, HDF5
            dataset. Empty: the defaults.
    """
    settings = operator_settings(expert, poni=poni, mask=mask, model=model, output_dir=output_dir)
    live = live_source(source, source_options or SourceOptions())
    config = settings.for_scan(scan_id or default_scan_id("online"), source=live)
    return final_state(reconstruct(config), config.max_failed_fraction)
