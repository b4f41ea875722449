"""Inference worker: line-outs in (PULL), posterior samples and summaries out (PUSH to the writer).

It loads the model once, then batches whatever line-outs are waiting (up to
``inference.max_batch``) into one forward pass. An exposure the model cannot handle is sent
on as a failure record with the error text, so the scan goes on and nothing is silently lost.

Run: ``python -m workers.inference --run-dir RUN_DIR --id N`` (the scan runner does this).
"""

from __future__ import annotations

import os
import sys
import traceback

import numpy as np
import torch
import zmq

from pipeline.exposure import PosteriorSamples
from pipeline.model import load
from pipeline.transport import Message, ProtocolError, decode, encode
from workers.process import Parent, announce_ready, control_socket, parse_args, read_run


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


def _infer(model, messages: list[Message], n_samples: int, seed: int) -> list[list]:
    """Posterior results for a batch of line-out messages (failure records for bad ones)."""
    out = []
    good = []
    for message in messages:
        error = _line_out_error(message)
        if error is None:
            good.append(message)
        else:
            out.append(_failure(message, error))
    if not good:
        return out
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
    return out


def serve(argv: list[str] | None = None) -> int:
    args = parse_args("beamline-inn inference worker", argv)
    parent = Parent()
    config, endpoints = read_run(args.run_dir)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // config.n_workers))
    model = load(config.inference.model, device=config.inference.device)
    if config.inference.compile:
        model.compile_sampling()
        for exposures in (1, 2):  # compile before announcing ready: batch 1, then any size
            model.sample(np.ones((exposures, model.grid.n_points)), config.inference.n_samples)

    context = zmq.Context()
    work = context.socket(zmq.PULL)
    work.setsockopt(zmq.RCVHWM, config.transport.high_water_mark)
    work.connect(endpoints.work)
    results = context.socket(zmq.PUSH)
    results.setsockopt(zmq.LINGER, 5000)
    results.connect(endpoints.results)
    control = control_socket(context, endpoints)
    acks = announce_ready(context, endpoints, "worker", args.id, device=str(model.device))

    poller = zmq.Poller()
    poller.register(work, zmq.POLLIN)
    poller.register(control, zmq.POLLIN)
    batch_number = 0
    while True:
        events = dict(poller.poll(1000))
        if control in events or not parent.alive():
            break
        if work not in events:
            continue
        messages: list[Message] = []
        while len(messages) < config.inference.max_batch:
            try:
                frames = work.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            try:
                messages.append(decode([f.buffer for f in frames]))
            except ProtocolError as error:
                print(f"worker {args.id}: dropped a malformed message: {error}", file=sys.stderr)
        if not messages:
            continue
        batch_number += 1
        seed = config.inference.seed + 1_000_003 * args.id + batch_number
        try:
            outgoing = _infer(model, messages, config.inference.n_samples, seed)
        except Exception as error:  # one bad batch must not stop the scan: report each exposure
            text = f"{type(error).__name__}: {error}"
            traceback.print_exc()
            outgoing = [_failure(m, text) for m in messages]
        for frames in outgoing:
            results.send_multipart(frames, copy=False)
    for socket in (work, results, control, acks):
        socket.close()
    context.term()
    return 0


if __name__ == "__main__":
    sys.exit(serve())
