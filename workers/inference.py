"""Inference worker: line-outs in (DEALER, from the feeder's ROUTER), posterior samples and
summaries out (PUSH to the writer).

It loads the model once and says ``ready`` with its credits (``2 * inference.max_batch``
line-outs it will take); the feeder sends it no more than that. It batches whatever
line-outs are waiting (up to ``inference.max_batch``) into one forward pass, sends the
results to the writer and returns the credits; while idle it sends a heartbeat every
``transport.heartbeat_interval_s``. A worker that goes silent is replaced by the feeder and
its exposures are sent to the others. An exposure the model cannot handle is sent on as a
failure record with the error text, so the scan goes on and nothing is silently lost.

Run: ``python -m workers.inference --run-dir RUN_DIR --id N`` (the scan runner does this).
"""

from __future__ import annotations

import os
import sys
import time
import traceback

import numpy as np
import torch
import zmq

from pipeline.exposure import PosteriorSamples
from pipeline.model import load
from pipeline.transport import Message, ProtocolError, decode, encode
from workers.process import Parent, control_socket, parse_args, read_run


def _failure(message: Message, error: str) -> list:
    header = {**message.header, "stage": "inference", "error": error}
    return encode("failed", header, **message.arrays)


def _line_out_error(message: Message) -> str | None:
    """Why this line-out cannot go to the model, or None."""
    counts = message.arrays.get("counts")
    if counts is None or counts.ndim != 1:
        return "message holds no 1D 'counts' array"
    if not np.isfinite(counts).all():
        return "line-out holds NaN or infinite counts"
    if (counts < 0).any():
        return f"line-out has negative counts in {int((counts < 0).sum())} bins"
    return None


def _infer(model, messages: list[Message], n_samples: int, seed: int) -> tuple[list[list], int]:
    """Messages to the writer for a batch of line-out messages: posterior results, failure
    records for bad ones; and how many results."""
    out = []
    good = []
    for message in messages:
        error = _line_out_error(message)
        if error is None:
            good.append(message)
        else:
            out.append(_failure(message, error))
    if not good:
        return out, 0
    counts = np.stack([m.arrays["counts"] for m in good]).astype(np.float32)
    posterior = PosteriorSamples(
        model.sample(counts, n_samples, seed=seed), model.parameter_names, model.parameter_units
    )
    summaries = posterior.summaries()
    for row, message in enumerate(good):
        out.append(
            encode(
                "result",
                message.header,
                counts=message.arrays["counts"],
                counts_sd=message.arrays["counts_sd"],
                samples=posterior.samples[row],
                mean=summaries["mean"][row].astype(np.float32),
                sd=summaries["sd"][row].astype(np.float32),
                quantiles=summaries["quantiles"][row].astype(np.float32),
            )
        )
    return out, len(good)


def serve(argv: list[str] | None = None) -> int:
    args = parse_args("beamline-inn inference worker", argv)
    parent = Parent()
    config, endpoints = read_run(args.run_dir)
    threads = config.inference.threads or max(1, (os.cpu_count() or 1) // config.n_workers)
    torch.set_num_threads(threads)
    model = load(config.inference.model, device=config.inference.device)
    if config.inference.compile:
        model.compile_sampling()
        for exposures in (1, 2):  # compile before announcing ready: batch 1, then any size
            model.sample(np.ones((exposures, model.grid.n_points)), config.inference.n_samples)

    context = zmq.Context()
    results = context.socket(zmq.PUSH)
    results.setsockopt(zmq.LINGER, 5000)
    results.connect(endpoints.results)
    control = control_socket(context, endpoints)
    work = context.socket(zmq.DEALER)
    work.setsockopt(zmq.LINGER, 0)
    work.setsockopt(zmq.MAXMSGSIZE, config.transport.max_message_bytes)
    work.connect(endpoints.work)
    credits = 2 * config.inference.max_batch
    ready = {"role": "worker", "id": args.id, "pid": os.getpid(), "device": str(model.device)}
    work.send_multipart(encode("ready", {**ready, "credits": credits}))

    poller = zmq.Poller()
    poller.register(work, zmq.POLLIN)
    poller.register(control, zmq.POLLIN)
    heartbeat_ms = int(1000 * config.transport.heartbeat_interval_s)
    batch_number = 0
    while True:
        events = dict(poller.poll(heartbeat_ms))
        if control in events or not parent.alive():
            break
        if work not in events:
            work.send_multipart(encode("heartbeat", {"id": args.id}))
            continue
        messages: list[Message] = []
        malformed = 0
        while len(messages) + malformed < config.inference.max_batch:
            try:
                frames = work.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            try:
                messages.append(decode([f.buffer for f in frames]))
            except ProtocolError as error:
                malformed += 1
                print(f"worker {args.id}: dropped a malformed message: {error}", file=sys.stderr)
        if not messages:
            if malformed:  # its credit is spent all the same
                work.send_multipart(encode("credit", {"id": args.id, "credits": malformed}))
            continue
        batch_number += 1
        seed = config.inference.seed + 1_000_003 * args.id + batch_number
        start = time.perf_counter()
        try:
            outgoing, inferred = _infer(model, messages, config.inference.n_samples, seed)
        except Exception as error:  # one bad batch must not stop the scan: report each exposure
            text = f"{type(error).__name__}: {error}"
            traceback.print_exc()
            outgoing, inferred = [_failure(m, text) for m in messages], 0
        for frames in outgoing:
            results.send_multipart(frames, copy=False)
        credit = {
            "id": args.id,
            "credits": len(messages) + malformed,
            "inferred": inferred,
            "batch_s": time.perf_counter() - start,
        }
        work.send_multipart(encode("credit", credit))
    for socket in (work, results, control):
        socket.close()
    context.term()
    return 0


if __name__ == "__main__":
    sys.exit(serve())
