"""Writer: the only process that opens the scan's HDF5 file.

It receives posterior results and failure records (PULL, bound on the results endpoint),
appends whatever has arrived to the file as one block of rows, flushes, and acknowledges
each exposure to the feeder (so nothing is acknowledged before it is in the file), with its
posterior summaries (mean, sd, 5/50/95% quantiles) for the feeder's view of the newest
results. A duplicate (an exposure index already written) is acknowledged again but not
written twice. A sender that ZeroMQ disconnects (a message part over
``transport.max_message_bytes``, or a worker that exited) is logged.

Run: ``python -m workers.writer --run-dir RUN_DIR [--resume]`` (the scan runner does this;
``--resume`` continues an existing file of the same scan, see :class:`ResultsWriter`).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time

import numpy as np
import zmq
from zmq.utils.monitor import recv_monitor_message

from pipeline.integration import DEFAULT_PONI
from pipeline.model import read_card
from pipeline.physics import PARAMETER_NAMES, PARAMETER_UNITS
from pipeline.store import ExposureResult, ResultsWriteError, ResultsWriter
from pipeline.transport import Message, ProtocolError, decode, encode
from workers.process import Parent, announce_ready, control_socket, parse_args, read_run

#: Most results appended as one block (one resize and write per dataset, one flush). The
#: writer's work per exposure (decode, append, acknowledge; ``benchmarks.writer``): 3.7 ms one
#: at a time, 0.65 ms in blocks of 8, 0.24 ms in 64, 0.20 ms in 256.
MAX_BLOCK = 256
#: A block goes on gathering while results keep arriving within this many milliseconds: a
#: worker's batch comes as a burst of messages, which then makes one block instead of 2-4
#: (300 exposures in batches of 8: 39 blocks instead of 72-77; the writer's CPU per
#: exposure 1.1 ms instead of 1.7-1.9 ms), for at most MAX_GATHER_MS more latency.
GATHER_MS = 1
MAX_GATHER_MS = 5


def to_result(message: Message) -> ExposureResult:
    """The stored form of a ``result`` or ``failed`` message."""
    header, arrays = message.header, message.arrays
    truth = header.get("truth")
    return ExposureResult(
        index=int(header["index"]),
        timestamp=float(header.get("timestamp") or np.nan),
        status="ok" if message.kind == "result" else "failed",
        error=str(header.get("error", "")),
        source=str(header.get("source") or ""),
        normalization=float(header.get("normalization") or np.nan),
        counts=arrays.get("counts"),
        counts_sd=arrays.get("counts_sd"),
        samples=arrays.get("samples"),
        mean=arrays.get("mean"),
        sd=arrays.get("sd"),
        quantiles=arrays.get("quantiles"),
        width_mode_weights=arrays.get("width_mode_weights"),
        predictive_z=float(header.get("predictive_z", np.nan)),
        truth=np.array([truth.get(name, np.nan) for name in PARAMETER_NAMES]) if truth else None,
    )


def acknowledgement(result: ExposureResult, written: bool) -> list:
    """The ``ack`` message to the feeder for a stored result (``written`` False: a duplicate,
    already in the file), with its posterior summaries for the feeder's view."""
    ack = {
        "index": result.index,
        "status": result.status,
        "error": result.error,
        "duplicate": not written,
    }
    if result.status == "ok":
        ack |= {k: getattr(result, k).tolist() for k in ("mean", "sd", "quantiles")}
        ack["predictive_z"] = result.predictive_z
    return encode("ack", ack)


def _log(message: str) -> None:
    """Write ``message`` to the log (stderr), which may be on a full disk: then it is lost,
    and the writer goes on (or leaves) as it would have."""
    with contextlib.suppress(OSError):
        print(message, file=sys.stderr, flush=True)


def serve(argv: list[str] | None = None) -> int:
    args = parse_args("beamline-inn results writer", argv)
    parent = Parent()
    config, endpoints = read_run(args.run_dir)
    poni = config.integration.poni or DEFAULT_PONI
    writer = ResultsWriter(
        config.output_path,
        PARAMETER_NAMES,
        PARAMETER_UNITS,
        config.inference.n_samples,
        config.grid.grid().q_nm,
        scan_id=config.scan_id,
        config_json=config.model_dump_json(),
        model_card=read_card(config.inference.model),
        poni_text=poni.read_text(),
        resume=args.resume,
    )
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
        """Append what has arrived (up to :data:`MAX_BLOCK` results, gathered while they
        keep coming within :data:`GATHER_MS`, for :data:`MAX_GATHER_MS` at most) as one
        block, flush, then acknowledge each; return how many messages were taken."""
        batch = []
        taken = 0
        deadline = time.monotonic() + MAX_GATHER_MS / 1e3
        while taken < MAX_BLOCK:
            try:
                frames = results.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                if time.monotonic() < deadline and results.poll(GATHER_MS, zmq.POLLIN):
                    continue
                break
            taken += 1
            try:
                batch.append(to_result(decode([f.buffer for f in frames])))
            except (ProtocolError, KeyError, TypeError, ValueError) as error:
                _log(f"writer: dropped a malformed message: {error}")
        for result, written in zip(batch, writer.append_many(batch), strict=True):
            acks.send_multipart(acknowledgement(result, written))
        return taken

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
                while write_waiting():
                    pass
                break
    except ResultsWriteError as error:  # a full disk, a lost mount: treated as a crash
        _log(
            f"writer: {error}\nwriter: every exposure acknowledged so far is in the file; "
            "resume the scan once the cause is removed"
        )
        # Closing would fail as well and leave the file flagged as open, unreadable even with
        # SWMR; left as it is, it reads (SWMR) as the last flush left it and resumes, as
        # after SIGKILL. Freeing its objects in the interpreter's teardown crashes HDF5.
        os._exit(3)
    finally:
        writer.close()
        results.disable_monitor()
        for socket in (monitor, results, control, acks):
            socket.close()
        context.term()
    return 0


if __name__ == "__main__":
    sys.exit(serve())
