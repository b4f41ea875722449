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
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
import zmq
import zmq.utils.garbage as zmq_garbage

from pipeline.config import InferenceConfig, PipelineConfig
from pipeline.exposure import posterior_summaries
from pipeline.model import load
from pipeline.model.allocator import retain_freed_memory
from pipeline.model.posterior import CountsSampler
from pipeline.physics.quality import predictive_z
from pipeline.transport import ProtocolError
from pipeline.transport.messages import (
    Credit,
    Failure,
    FrameMessage,
    Heartbeat,
    LineOutMessage,
    Ready,
    Results,
    WireMessage,
    read,
)
from workers.process import Parent, control_socket, parse_args, read_run

if TYPE_CHECKING:
    from workers.frames import FrameIntegration


def _failure(message: LineOutMessage | FrameMessage, error: str, n_points: int) -> Failure:
    """The failure record of a line-out (with its counts where they fit the results file)
    or of a frame, at the inference stage."""
    if isinstance(message, FrameMessage):
        return message.failure("inference", error)
    fits = message.counts.shape == (n_points,)
    return message.failure("inference", error, with_line_out=fits)


def _line_out_error(line_out: LineOutMessage, observed: np.ndarray) -> str | None:
    """Why this line-out cannot go to a model whose instrument observes the bins
    ``observed`` (n_points,) of its grid, or None; the other bins' values are not used."""
    n_points = observed.size
    if line_out.counts.shape != (n_points,):
        return f"line-out of shape {line_out.counts.shape}, the model takes ({n_points},)"
    counts = line_out.counts[observed]
    if not np.isfinite(counts).all():
        return "line-out holds NaN or infinite counts in observed bins"
    if (counts < 0).any():
        return f"line-out has negative counts in {int((counts < 0).sum())} bins"
    return None


def run_batch(
    model: CountsSampler,
    line_outs: list[LineOutMessage],
    n_samples: int,
    seed: int,
    max_message_bytes: int,
    on_device: torch.Tensor | None = None,
) -> tuple[list[Results | Failure], int]:
    """Messages to the writer for a batch of line-outs: the posterior results of the good
    ones as :class:`Results` (a block of exposures each, as many as fit in half of
    ``max_message_bytes``), with summaries and the posterior-predictive ``z``; a
    :class:`Failure` for each bad one; and how many results. ``on_device``: their counts
    already on the model's device (a row per line-out, float32), given to the model as they
    are."""
    out: list[Results | Failure] = []
    good, good_rows = [], []
    observed = model.instrument.observed
    for row, line_out in enumerate(line_outs):
        error = _line_out_error(line_out, observed)
        if error is None:
            good.append(line_out)
            good_rows.append(row)
        else:
            out.append(_failure(line_out, error, model.grid.n_points))
    if not good:
        return out, 0
    counts = np.stack([m.counts for m in good]).astype(np.float32)
    if on_device is not None and len(good) < len(line_outs):
        on_device = on_device[torch.as_tensor(good_rows, device=on_device.device)]
    posterior = posterior_columns(model, counts, n_samples, seed, on_device)
    columns: dict[str, np.ndarray] = {
        "index": np.array([m.index for m in good], dtype=np.int64),
        "timestamp": np.array([m.timestamp for m in good], np.float64),
        "received_time": np.array([m.received_time for m in good], np.float64),
        "normalization": np.array([m.normalization for m in good], np.float64),
        "truth": np.array([m.truth_row(model.parameter_names) for m in good], np.float64),
        "counts": counts,
        "counts_sd": np.stack([m.counts_sd for m in good]).astype(np.float32),
        **{name: column.astype(np.float32) for name, column in posterior.items()},
    }
    sources = tuple(m.source for m in good)
    frame_ids = tuple(m.frame_id for m in good)
    row_bytes = sum(column[0].nbytes for column in columns.values()) + 256
    per_message = max(1, max_message_bytes // (2 * row_bytes))
    for first in range(0, len(good), per_message):
        rows = slice(first, first + per_message)
        out.append(
            Results(
                columns={name: column[rows] for name, column in columns.items()},
                source=sources[rows],
                frame_id=frame_ids[rows],
            )
        )
    return out, len(good)


def posterior_columns(
    model: CountsSampler,
    counts: np.ndarray,
    n_samples: int,
    seed: int,
    on_device: torch.Tensor | None = None,
) -> dict[str, np.ndarray]:
    """Posterior draws for a batch of line-outs (exposures, n_points), with their summaries
    (:func:`posterior_summaries`) and posterior-predictive ``z``, as host arrays;
    ``on_device``: the same counts on the model's device, where they are already there.

    On a GPU all of it is computed on the device, where the draws are, and only the results
    are copied back, through pinned host memory; computed with numpy on a CPU the summaries
    and ``z`` would cost 3 ms per exposure of a CPU core, 60 cores at 20,000 exposures/s. On
    a CPU the draws go to numpy first (its ``z`` is faster there than torch's: 2.5 against
    4.2 ms per exposure on one thread).
    """
    with torch.inference_mode():
        tensor = on_device if on_device is not None else torch.from_numpy(counts).to(model.device)
        generator = torch.Generator(device=model.device).manual_seed(seed)
        sampled = model.sample_tensor(tensor, n_samples, generator)
        draws: torch.Tensor | np.ndarray = sampled
        line_outs: torch.Tensor | np.ndarray = tensor
        if model.device.type == "cpu":
            draws, line_outs = sampled.numpy(), counts
        columns = {
            "samples": draws,
            **posterior_summaries(draws, model.parameter_names),
            "predictive_z": predictive_z(
                line_outs,
                draws,
                model.grid,
                seed=seed,
                background_weights=model.instrument.weights,
                observed=model.instrument.observed,
            ),
        }
        return to_host(columns)


def to_host(columns: dict) -> dict[str, np.ndarray]:
    """``columns`` as numpy arrays: tensors on a GPU are copied into pinned (page-locked)
    host memory, all copies queued before one wait; numpy arrays stay as they are."""
    on_device = {k: v for k, v in columns.items() if isinstance(v, torch.Tensor)}
    host = {}
    for name, tensor in on_device.items():
        if tensor.device.type == "cuda":
            host[name] = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            host[name].copy_(tensor, non_blocking=True)
        else:
            host[name] = tensor
    for device in {tensor.device for tensor in on_device.values() if tensor.is_cuda}:
        torch.cuda.synchronize(device)
    return {name: host[name].numpy() if name in host else v for name, v in columns.items()}


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
    """One worker's inference for one scan: batches line-out messages (or frames, which
    ``frames`` integrates where the workers do: ``integrate_on_workers``), keeps the count of
    credits it has handed to the feeder, and says how many to return after each batch
    (twice the current batch size in credit, so the next batch is waiting when this one
    ends)."""

    model: CountsSampler
    config: InferenceConfig
    worker_id: int
    sizer: BatchSizer
    #: the largest message part the writer takes (``transport.max_message_bytes``)
    max_message_bytes: int
    #: the integration of the frames this worker is sent, where it integrates them
    frames: FrameIntegration | None = None
    batches: int = 0
    inferred: int = 0
    _granted: int = field(default=0, repr=False)  # credits handed to the feeder, in all
    _taken: int = field(default=0, repr=False)  # messages received against them

    @classmethod
    def start(
        cls, model: CountsSampler, config: PipelineConfig, worker_id: int, threads: int = 1
    ) -> InferenceSession:
        """The session of worker ``worker_id``, which may use ``threads`` cores (to decode
        the frames it integrates, where it does)."""
        inference = config.inference
        limit = config.batch_limit(model.device.type)
        sizer = BatchSizer(limit, inference.latency_budget_ms / 1e3)
        frames = None
        if config.integrate_on_workers:  # (imported only then: it brings the sources' readers)
            from workers.frames import FrameIntegration

            frames = FrameIntegration(config, model, decode_threads=threads)
        return cls(model, inference, worker_id, sizer, config.transport.max_message_bytes, frames)

    def credits(self) -> int:
        """Credits to hand the feeder now, to keep twice the batch size in credit."""
        outstanding = self._granted - self._taken
        more = max(0, 2 * self.sizer.size - outstanding)
        self._granted += more
        return more

    def receive(
        self, socket: zmq.Socket
    ) -> tuple[list[LineOutMessage | FrameMessage], int, list[WireMessage]]:
        """Read, without waiting, the line-outs (or frames) for one batch from ``socket``;
        return them, the number of malformed messages dropped (each spends a credit), and any
        other messages (commands) met on the way, in order."""
        line_outs: list[LineOutMessage | FrameMessage] = []
        commands: list[WireMessage] = []
        malformed = 0
        while len(line_outs) + malformed < self.sizer.size:
            try:
                frames = socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            try:
                message = read([f.buffer for f in frames])
            except ProtocolError as error:
                malformed += 1
                print(f"worker {self.worker_id}: dropped a malformed message: {error}", flush=True)
                continue
            if isinstance(message, LineOutMessage | FrameMessage):
                line_outs.append(message)
            else:
                commands.append(message)
        self._taken += len(line_outs) + malformed
        return line_outs, malformed, commands

    def _line_outs(
        self, messages: list[LineOutMessage | FrameMessage]
    ) -> tuple[list[LineOutMessage], torch.Tensor | None, list[Failure]]:
        """The line-outs of a batch (frames integrated here, their counts left on the
        model's device where all are frames) and the failure records of frames that gave
        none."""
        frames = [m for m in messages if isinstance(m, FrameMessage)]
        line_outs = [m for m in messages if isinstance(m, LineOutMessage)]
        if not frames:
            return line_outs, None, []
        if self.frames is None:
            refused = "a frame sent to a worker that does not integrate (integrate_on_workers)"
            return line_outs, None, [m.failure("inference", refused) for m in frames]
        integrated = self.frames.integrate(frames)
        on_device = integrated.counts if not line_outs else None
        return [*integrated.line_outs, *line_outs], on_device, integrated.failures

    def _all_failed(
        self, messages: Sequence[LineOutMessage | FrameMessage], error: Exception
    ) -> list[Failure]:
        """The failure records of these messages, all lost to ``error`` (its traceback is
        printed to the worker's log)."""
        traceback.print_exc()
        text = f"{type(error).__name__}: {error}"
        return [_failure(message, text, self.model.grid.n_points) for message in messages]

    def run(
        self, messages: list[LineOutMessage | FrameMessage]
    ) -> tuple[list[Results | Failure], Credit]:
        """The messages for the writer (results, failure records) of one batch, and the
        ``credit`` message for the feeder (sent before the results, so that the feeder
        counts the batch as inferred before the writer acknowledges any of it)."""
        self.batches += 1
        seed = self.config.seed + 1_000_003 * self.worker_id + self.batches
        start = time.perf_counter()
        # one bad batch must not stop the scan: each exposure is reported
        try:
            line_outs, on_device, unusable = self._line_outs(messages)
        except Exception as error:  # integrating the frames failed
            line_outs, on_device, unusable = [], None, self._all_failed(messages, error)
        try:
            inferred_batch, inferred = run_batch(
                self.model,
                line_outs,
                self.config.n_samples,
                seed,
                self.max_message_bytes,
                on_device,
            )
        except Exception as error:
            inferred_batch, inferred = [*self._all_failed(line_outs, error)], 0
        outgoing: list[Results | Failure] = [*unusable, *inferred_batch]
        seconds = time.perf_counter() - start
        if inferred:
            self.sizer.observe(len(messages), seconds)
        self.inferred += inferred
        credit = Credit(
            id=self.worker_id,
            credits=self.credits(),
            inferred=inferred,
            batch_s=seconds,
            batch_size=self.sizer.size,
        )
        return outgoing, credit


def compile_if_asked(model: CountsSampler, config: InferenceConfig) -> None:
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
    session = InferenceSession.start(model, config, args.id, threads)

    # pyzmq sends a frame over 64 kB without a copy and starts, on the first such send, a
    # thread with a zmq context of its own that frees the buffers; started now, so that a
    # worker's threads and descriptors stay the same from the first batch on (the soak test
    # saw it appear mid-scan: 3 threads and 7 descriptors more)
    zmq_garbage.gc.start()
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
    ready = Ready(
        role="worker",
        id=args.id,
        pid=os.getpid(),
        device=str(model.device),
        credits=session.credits(),
    )
    work.send_multipart(ready.to_frames())

    poller = zmq.Poller()
    poller.register(work, zmq.POLLIN)
    poller.register(control, zmq.POLLIN)
    heartbeat_ms = int(1000 * config.transport.heartbeat_interval_s)
    while True:
        events = dict(poller.poll(heartbeat_ms))
        if control in events or not parent.alive():
            break
        if work not in events:
            work.send_multipart(Heartbeat(id=args.id).to_frames())
            continue
        line_outs, malformed, _ = session.receive(work)
        if not line_outs:
            if malformed:  # credits spent all the same
                credit = Credit(id=args.id, credits=session.credits())
                work.send_multipart(credit.to_frames())
            continue
        outgoing, credit = session.run(line_outs)
        work.send_multipart(credit.to_frames())
        for message in outgoing:
            results.send_multipart(message.to_frames(), copy=False)
    for socket in (work, results, control):
        socket.close()
    context.term()
    return 0


if __name__ == "__main__":
    sys.exit(serve())
