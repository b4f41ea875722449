"""Inference worker: line-outs in (DEALER, from the feeder's ROUTER), posterior samples and
summaries out (PUSH to the writer).

It loads the model once and says ``ready`` with its credits (line-outs it will take); the
feeder sends it no more than that. It batches the line-outs that are waiting into one
forward pass, at most the batch its measured costs say fits ``inference.latency_budget_ms``
(:class:`BatchSizer`, never more than ``inference.max_batch``), returns the credits (keeping
twice that batch in credit) and then sends the results to the writer. While idle it sends a
heartbeat every ``transport.heartbeat_interval_s``. A worker that goes silent is replaced by
the feeder and its exposures are sent to the others. An exposure the model cannot handle is
sent on as a failure record with the error text, so the scan goes on and nothing is silently
lost.

The same :class:`InferenceSession` serves workers on other nodes (:mod:`workers.remote`).

Run: ``python -m workers.inference --run-dir RUN_DIR --id N`` (the scan runner does this).
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from dataclasses import dataclass, field

import numpy as np
import torch
import zmq

from pipeline.config import InferenceConfig
from pipeline.exposure import PosteriorSamples
from pipeline.model import load
from pipeline.model.allocator import retain_freed_memory
from pipeline.physics.quality import predictive_z
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


def run_batch(model, messages: list[Message], n_samples: int, seed: int) -> tuple[list[list], int]:
    """Messages to the writer for a batch of line-out messages: posterior results (with
    summaries and the posterior-predictive ``z``), failure records for bad ones; and how
    many results."""
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
    z = predictive_z(counts, posterior.samples, model.grid, seed=seed)
    for row, message in enumerate(good):
        out.append(
            encode(
                "result",
                {**message.header, "predictive_z": float(z[row])},
                counts=message.arrays["counts"],
                counts_sd=message.arrays["counts_sd"],
                samples=posterior.samples[row],
                mean=summaries["mean"][row].astype(np.float32),
                sd=summaries["sd"][row].astype(np.float32),
                quantiles=summaries["quantiles"][row].astype(np.float32),
                width_mode_weights=summaries["width_mode_weights"][row].astype(np.float32),
            )
        )
    return out, len(good)


class BatchSizer:
    """The largest batch (exposures) that a worker expects to finish within a latency budget.

    It fits ``seconds = overhead + per_exposure * batch`` to the batches measured so far, by
    least squares with exponentially fading weights (``memory`` per batch), so it follows a
    device that warms up or slows down. Before it has seen two different batch sizes it
    assumes no overhead. It starts at ``limit``.

    Example:
        >>> sizer = BatchSizer(limit=64, budget_s=0.050)
        >>> sizer.observe(8, 0.018)  # 8 exposures in 18 ms
        >>> sizer.observe(4, 0.010)  # -> 2 ms each + 2 ms per batch
        >>> sizer.size
        24
    """

    def __init__(self, limit: int, budget_s: float, memory: float = 0.9) -> None:
        self.limit = limit
        self.budget_s = budget_s
        self.memory = memory
        self._sums = np.zeros(5)  # weight, b, t, b*b, b*t
        self.size = limit

    def observe(self, batch: int, seconds: float) -> None:
        """Record that ``batch`` exposures took ``seconds``, and update :attr:`size`."""
        self._sums = self.memory * self._sums + np.array(
            [1.0, batch, seconds, batch * batch, batch * seconds]
        )
        weight, b, t, bb, bt = self._sums
        spread = weight * bb - b * b
        if spread > 1e-9 * weight * bb:  # two batch sizes or more: fit the overhead too
            per_exposure = (weight * bt - b * t) / spread
            overhead = max(0.0, (t - per_exposure * b) / weight)
        else:
            per_exposure, overhead = t / b, 0.0
        if per_exposure <= 0:
            self.size = self.limit
            return
        fits = int((self.budget_s - overhead) / per_exposure + 1e-6)  # 23.9999... is 24
        self.size = min(self.limit, max(1, fits))


@dataclass
class InferenceSession:
    """One worker's inference for one scan: batches line-out messages, keeps the count of
    credits it has handed to the feeder, and says how many to return after each batch
    (twice the current batch size in credit, so the next batch is waiting when this one
    ends)."""

    model: torch.nn.Module
    config: InferenceConfig
    worker_id: int
    sizer: BatchSizer
    batches: int = 0
    inferred: int = 0
    _granted: int = field(default=0, repr=False)  # credits handed to the feeder, in all
    _taken: int = field(default=0, repr=False)  # messages received against them

    @classmethod
    def start(cls, model: torch.nn.Module, config: InferenceConfig, worker_id: int):
        limit = config.batch_limit(model.device.type)
        return cls(model, config, worker_id, BatchSizer(limit, config.latency_budget_ms / 1e3))

    def credits(self) -> int:
        """Credits to hand the feeder now, to keep twice the batch size in credit."""
        outstanding = self._granted - self._taken
        more = max(0, 2 * self.sizer.size - outstanding)
        self._granted += more
        return more

    def receive(self, socket: zmq.Socket) -> tuple[list[Message], int, list[Message]]:
        """Read, without waiting, the line-outs for one batch from ``socket``; return them,
        the number of malformed messages dropped (each spends a credit), and any other
        messages (commands) met on the way, in order."""
        line_outs: list[Message] = []
        commands: list[Message] = []
        malformed = 0
        while len(line_outs) + malformed < self.sizer.size:
            try:
                frames = socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            try:
                message = decode([f.buffer for f in frames])
            except ProtocolError as error:
                malformed += 1
                print(f"worker {self.worker_id}: dropped a malformed message: {error}", flush=True)
                continue
            (line_outs if message.kind == "line_out" else commands).append(message)
        self._taken += len(line_outs) + malformed
        return line_outs, malformed, commands

    def run(self, line_outs: list[Message]) -> tuple[list[list], dict]:
        """The messages for the writer (results, failure records) of one batch, and the
        header of the ``credit`` message for the feeder (sent before the results, so that
        the feeder counts the batch as inferred before the writer acknowledges any of it)."""
        self.batches += 1
        seed = self.config.seed + 1_000_003 * self.worker_id + self.batches
        start = time.perf_counter()
        try:
            outgoing, inferred = run_batch(self.model, line_outs, self.config.n_samples, seed)
        except Exception as error:  # one bad batch must not stop the scan: report each exposure
            text = f"{type(error).__name__}: {error}"
            traceback.print_exc()
            outgoing, inferred = [_failure(m, text) for m in line_outs], 0
        seconds = time.perf_counter() - start
        if inferred:
            self.sizer.observe(len(line_outs), seconds)
        self.inferred += inferred
        credit = {
            "id": self.worker_id,
            "credits": self.credits(),
            "inferred": inferred,
            "batch_s": seconds,
            "batch_size": self.sizer.size,
        }
        return outgoing, credit


def compile_if_asked(model, config: InferenceConfig) -> None:
    """Compile the sampler (``config.compile``) for batch 1, then any size, before serving."""
    if config.compile:
        model.compile_sampling()
        for exposures in (1, 2):
            model.sample(np.ones((exposures, model.grid.n_points)), config.n_samples)


def serve(argv: list[str] | None = None) -> int:
    args = parse_args("beamline-inn inference worker", argv)
    parent = Parent()
    config, endpoints = read_run(args.run_dir)
    threads = config.inference.threads or max(1, (os.cpu_count() or 1) // config.n_workers)
    torch.set_num_threads(threads)
    retain_freed_memory()
    model = load(config.inference.model, device=config.inference.device)
    compile_if_asked(model, config.inference)
    session = InferenceSession.start(model, config.inference, args.id)

    context = zmq.Context()
    results = context.socket(zmq.PUSH)
    results.setsockopt(zmq.LINGER, 5000)
    results.connect(endpoints.results)
    control = control_socket(context, endpoints)
    work = context.socket(zmq.DEALER)
    work.setsockopt(zmq.LINGER, 0)
    work.setsockopt(zmq.MAXMSGSIZE, config.transport.max_message_bytes)
    work.setsockopt(zmq.RCVHWM, 0)  # bounded by the credits
    work.connect(endpoints.work)
    ready = {"role": "worker", "id": args.id, "pid": os.getpid(), "device": str(model.device)}
    work.send_multipart(encode("ready", {**ready, "credits": session.credits()}))

    poller = zmq.Poller()
    poller.register(work, zmq.POLLIN)
    poller.register(control, zmq.POLLIN)
    heartbeat_ms = int(1000 * config.transport.heartbeat_interval_s)
    while True:
        events = dict(poller.poll(heartbeat_ms))
        if control in events or not parent.alive():
            break
        if work not in events:
            work.send_multipart(encode("heartbeat", {"id": args.id}))
            continue
        line_outs, malformed, _ = session.receive(work)
        if not line_outs:
            if malformed:  # credits spent all the same
                work.send_multipart(encode("credit", {"id": args.id, "credits": session.credits()}))
            continue
        outgoing, credit = session.run(line_outs)
        work.send_multipart(encode("credit", credit))
        for frames in outgoing:
            results.send_multipart(frames, copy=False)
    for socket in (work, results, control):
        socket.close()
    context.term()
    return 0


if __name__ == "__main__":
    sys.exit(serve())
