"""Writer: the only process that opens the scan's HDF5 file.

It receives posterior results (``results``: a block of exposures from one worker's batch)
and failure records (``failed``: one exposure) on a PULL socket bound on the results
endpoint, appends whatever has arrived to the file as one block of rows, flushes, and then
acknowledges the block's exposures to the feeder in one ``acks`` message (so nothing is
acknowledged before it is in the file), with their posterior summaries (mean, sd, 5/50/95%
quantiles) for the feeder's view of the newest results. A duplicate (an exposure index
already written) is acknowledged again but not written twice. A message that does not fit
the file (an unknown field, arrays of another shape) is dropped with a log line; a sender
that ZeroMQ disconnects (a message part over ``transport.max_message_bytes``, or a worker
that exited) is logged.

Run: ``python -m workers.writer --run-dir RUN_DIR [--resume]`` (the scan runner does this;
``--resume`` continues an existing file of the same scan, see :class:`ResultsWriter`).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path

import numpy as np
import zmq
from zmq.utils.monitor import recv_monitor_message

from pipeline.bundled import DEFAULT_PONI
from pipeline.config import PipelineConfig
from pipeline.model_card import card_instrument, read_card
from pipeline.physics import PARAMETER_NAMES, PARAMETER_UNITS
from pipeline.provenance import processing_record
from pipeline.store import ExposureResult, ResultsWriteError, ResultsWriter
from pipeline.store.results import concatenate_rows, result_columns
from pipeline.transport import ProtocolError
from pipeline.transport.messages import Acks, Failure, Results, Stop, WireMessage, read, read_as
from workers.process import (
    Parent,
    announce_ready,
    control_socket,
    parse_args,
    read_dropped_rows,
    read_run,
)

#: Most exposures appended as one block (one resize and write per dataset, one flush). The
#: writer's work per exposure (decode, append, acknowledge; ``python -m benchmarks.writer``)
#: falls with the block: a block costs about 3.5 ms whatever its size.
MAX_BLOCK = 1024
#: A block goes on gathering while results keep arriving within this many milliseconds:
#: workers' batches finishing together then make one block (300 exposures in batches of 8:
#: 39 blocks instead of 72-77; the writer's CPU per exposure 1.1 ms instead of 1.7-1.9 ms),
#: for at most MAX_GATHER_MS more latency.
GATHER_MS = 1
MAX_GATHER_MS = 5


def to_result(failure: Failure) -> ExposureResult:
    """The stored form of a failure record (one exposure)."""
    truth = failure.truth
    return ExposureResult(
        index=failure.index,
        timestamp=failure.timestamp,
        received_time=failure.received_time,
        status="failed",
        error=failure.error,
        source=failure.source,
        frame_id=failure.frame_id,
        normalization=failure.normalization,
        counts=failure.counts,
        counts_sd=failure.counts_sd,
        truth=np.array([truth.get(name, np.nan) for name in PARAMETER_NAMES]) if truth else None,
    )


def columns_of(message: WireMessage) -> dict:
    """The columns (:meth:`ResultsWriter.rows`) of a :class:`Results` or :class:`Failure`
    message; ``ValueError`` for any other kind."""
    if isinstance(message, Failure):
        return result_columns([to_result(message)])
    if not isinstance(message, Results):
        raise ValueError(f"a {message.kind!r} message holds no result")
    n = message.n_exposures
    return {
        **message.columns,
        "status": ["ok"] * n,
        "error": [""] * n,
        "source": list(message.source),
        "frame_id": list(message.frame_id),
    }


def acknowledgements(rows: dict[str, np.ndarray], written: np.ndarray) -> Acks:
    """The acknowledgement to the feeder of a block of stored rows (:meth:`ResultsWriter.rows`;
    ``written`` False: a duplicate, already in the file), with their posterior summaries for
    the feeder's view (NaN for failed exposures)."""
    return Acks(
        status=tuple(status.decode() for status in rows["status"].tolist()),
        error=tuple(error.decode(errors="replace") for error in rows["error"].tolist()),
        index=rows["index"],
        duplicate=(~written).astype(np.uint8),
        mean=rows["mean"],
        sd=rows["sd"],
        quantiles=rows["quantiles"],
        predictive_z=rows["predictive_z"],
    )


def _log(message: str) -> None:
    """Write ``message`` to the log (stderr), which may be on a full disk: then it is lost,
    and the writer goes on (or leaves) as it would have."""
    with contextlib.suppress(OSError):
        print(message, file=sys.stderr, flush=True)


def rows_of(writer: ResultsWriter, frames: list) -> dict[str, np.ndarray] | None:
    """The rows (:meth:`ResultsWriter.rows`) of one received message; ``None``, logged, when
    the message is malformed or does not fit the file."""
    try:
        return writer.rows(columns_of(read(frames)))
    except (ProtocolError, KeyError, TypeError, ValueError) as error:
        _log(f"writer: dropped a malformed message: {error}")
        return None


def store(writer: ResultsWriter, blocks: list[dict[str, np.ndarray]]) -> Acks:
    """Append ``blocks`` of rows (:func:`rows_of`) to the file as one block, flushed; return
    the acknowledgement of them."""
    rows = concatenate_rows(blocks)
    return acknowledgements(rows, writer.append_rows(rows))


def open_writer(
    run_dir: Path, resume: bool, config: PipelineConfig, card: dict, poni_text: str
) -> ResultsWriter:
    """The run's results file, new or continued (``resume``; rows to redo left out), with
    the instrument of the model ``card`` (its masked bins stored as NaN, and masked)."""
    return ResultsWriter(
        config.output_path,
        PARAMETER_NAMES,
        PARAMETER_UNITS,
        config.store.draws_stored(config.inference.n_samples),
        config.grid.grid().q_nm,
        scan_id=config.scan_id,
        config_json=config.model_dump_json(),
        model_card=card,
        poni_text=poni_text,
        processing=processing_record(config, card["weights_sha256"]),
        resume=resume,
        drop_indices=read_dropped_rows(run_dir),
        samples_compression=config.store.samples_compression,
        sasdata_groups=config.store.sasdata_groups,
        q_resolution_nm=config.grid.resolution_nm,
        instrument=card_instrument(card),
    )


def serve(argv: list[str] | None = None) -> int:
    args = parse_args("beamline-inn results writer", argv)
    parent = Parent()
    config, endpoints = read_run(args.run_dir)
    poni = config.integration.poni or DEFAULT_PONI
    card = read_card(config.inference.model)
    try:
        writer = open_writer(args.run_dir, args.resume, config, card, poni.read_text())
    except (ValueError, OSError) as error:  # a file it cannot continue, a full disk
        _log(f"writer: {error}")
        return 2
    context = zmq.Context()
    results = context.socket(zmq.PULL)
    results.setsockopt(zmq.MAXMSGSIZE, config.transport.max_message_bytes)
    results.bind(endpoints.results)
    control = control_socket(context, endpoints)
    acks = announce_ready(context, endpoints, "writer", args.id, path=str(config.output_path))

    monitor = results.get_monitor_socket(zmq.EVENT_DISCONNECTED)
    poller = zmq.Poller()
    poller.register(results, zmq.POLLIN)
    poller.register(control, zmq.POLLIN)
    poller.register(monitor, zmq.POLLIN)

    def write_waiting() -> int:
        """Append what has arrived (up to :data:`MAX_BLOCK` exposures, gathered while they
        keep coming within :data:`GATHER_MS`, for :data:`MAX_GATHER_MS` at most) as one
        block, flush, then acknowledge it; return how many messages were taken."""
        blocks = []
        exposures = taken = 0
        deadline = time.monotonic() + MAX_GATHER_MS / 1e3
        while exposures < MAX_BLOCK:
            try:
                frames = results.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                if time.monotonic() < deadline and results.poll(GATHER_MS, zmq.POLLIN):
                    continue
                break
            taken += 1
            rows = rows_of(writer, [f.buffer for f in frames])
            if rows is not None:
                blocks.append(rows)
                exposures += len(rows["index"])
        if blocks:
            acks.send_multipart(store(writer, blocks).to_frames())
        return taken

    code = 0
    try:
        while True:
            events = dict(poller.poll(1000))
            if monitor in events:
                event = recv_monitor_message(monitor)
                _log(
                    f"writer: a sender disconnected ({event['endpoint'].decode()}): a worker "
                    "that exited, or a message larger than max_message_bytes "
                    f"({config.transport.max_message_bytes} B)"
                )
            if results in events:
                write_waiting()
            elif control in events or not parent.alive():  # write what has arrived, then close
                stop = _read_stop(control) if control in events else Stop()
                while write_waiting():
                    pass
                code = finish(writer, stop)
                break
    except ResultsWriteError as error:  # a full disk, a lost mount: treated as a crash
        _log(
            f"writer: {error}\nwriter: every exposure acknowledged so far is in the file; "
            "resume the scan once the cause is removed"
        )
        # Closing would fail as well and leave the file flagged as open, unreadable even with
        # SWMR; left as it is, it reads (SWMR) as the last flush left it and resumes, as
        # after SIGKILL. Freeing its objects in the interpreter's teardown crashes HDF5.
        os._exit(WRITE_FAILED)
    finally:
        writer.close()  # (closed already, unless the loop ended otherwise)
        results.disable_monitor()
        for socket in (monitor, results, control, acks):
            socket.close()
        context.term()
    return code


#: The writer's exit code when it could not write the file (a full disk, a lost mount): it
#: leaves the file as its last flush left it, and is not started again.
WRITE_FAILED = 3
#: The writer's exit code when the scan ended but its file holds another number of rows
#: (not marked complete).
INCOMPLETE = 4


def _read_stop(control: zmq.Socket) -> Stop:
    """The stop broadcast waiting on ``control`` (a malformed one: a plain stop, logged)."""
    frames = control.recv_multipart()
    try:
        return read_as(Stop, frames)
    except ProtocolError as error:
        _log(f"writer: a malformed stop message ({error}): stopping without completing the file")
        return Stop()


def finish(writer: ResultsWriter, stop: Stop) -> int:
    """Finish and close the file as ``stop`` says (:meth:`ResultsWriter.close`); the exit
    code: 0, or :data:`INCOMPLETE` (logged) when the scan ended but the file holds another
    number of rows."""
    try:
        writer.close(stop.n_exposures)
    except ValueError as error:
        _log(f"writer: {error}")
        return INCOMPLETE
    return 0


if __name__ == "__main__":
    sys.exit(serve())
