"""Own cINN vs FrEIA and zuko: the same conditional flow, side by side in one run.

Three implementations of a conditional flow over the 5 grating parameters, each with 8
coupling blocks, subnets of two hidden layers of 128 units, and a 64-dimensional condition:

- ``own``: :class:`pipeline.model.cinn.ConditionalINN` (the talk's two-sided affine coupling,
  atan soft clamp 2, fixed random permutations);
- ``freia``: FrEIA 0.2 (PyPI) ``SequenceINN`` of ``PermuteRandom`` + ``GLOWCouplingBlock``
  (the same block, clamp 2, ATAN);
- ``zuko``: zuko ``RealNVP`` (one-sided affine couplings with alternating masks), with 8
  transforms and, for equal weights, 16 (``zuko_16``).

Measured: weights; training-step time (log-likelihood + backward, batch 512, 2 threads);
time for 1,000 samples of one exposure (1 thread); inversion error; and the held-out negative
log-likelihood (and the inversion error) after the same short training on the grating task (each flow behind the same
conditioning network, same seeds, same simulated batches).

Run: ``pip install FrEIA zuko && python -m benchmarks.flow_libraries``.
"""

from __future__ import annotations

import json
import math
import platform
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from benchmarks.report import save
from pipeline.instrument import default_instrument
from pipeline.model.cinn import ConditionalINN, ConditioningNet
from pipeline.model.posterior import ParameterTransform
from pipeline.model.train import simulate_batch
from pipeline.physics import GratingPrior, QGrid

DIM, CONDITION, BLOCKS, HIDDEN = 5, 64, 8, 128
RESULTS = Path(__file__).parent / "results" / "flow_libraries.json"


def _mlp(n_in: int, n_out: int) -> nn.Sequential:
    net = nn.Sequential(
        nn.Linear(n_in, HIDDEN),
        nn.SiLU(),
        nn.Linear(HIDDEN, HIDDEN),
        nn.SiLU(),
        nn.Linear(HIDDEN, n_out),
    )
    nn.init.zeros_(net[-1].weight)
    nn.init.zeros_(net[-1].bias)
    return net


class Own(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.flow = ConditionalINN(DIM, CONDITION, BLOCKS, HIDDEN, seed=0)

    def log_prob(self, u: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.flow.log_prob(u, c)

    def sample(self, c: torch.Tensor, n: int) -> torch.Tensor:
        return self.flow.inverse(torch.randn(n, DIM), c.expand(n, -1))

    def round_trip(self, u: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.flow.inverse(self.flow(u, c)[0], c)


class Freia(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        import FrEIA.framework as ff
        import FrEIA.modules as fm

        self.inn = ff.SequenceINN(DIM)
        for block in range(BLOCKS):
            self.inn.append(fm.PermuteRandom, seed=block)
            self.inn.append(
                fm.GLOWCouplingBlock,
                cond=0,
                cond_shape=(CONDITION,),
                subnet_constructor=_mlp,
                clamp=2.0,
            )

    def log_prob(self, u: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        z, log_jac = self.inn(u, c=[c])
        return -0.5 * (z**2).sum(-1) - 0.5 * DIM * math.log(2 * math.pi) + log_jac

    def sample(self, c: torch.Tensor, n: int) -> torch.Tensor:
        return self.inn(torch.randn(n, DIM), c=[c.expand(n, -1)], rev=True)[0]

    def round_trip(self, u: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        z = self.inn(u, c=[c])[0]
        return self.inn(z, c=[c], rev=True)[0]


class Zuko(nn.Module):
    transforms = BLOCKS

    def __init__(self) -> None:
        super().__init__()
        import zuko

        self.flow = zuko.flows.RealNVP(
            DIM, CONDITION, transforms=self.transforms, hidden_features=(HIDDEN, HIDDEN)
        )

    def log_prob(self, u: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.flow(c).log_prob(u)

    def sample(self, c: torch.Tensor, n: int) -> torch.Tensor:
        return self.flow(c).sample((n,))

    def round_trip(self, u: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        transform = self.flow(c).transform
        return transform.inv(transform(u))


class Zuko16(Zuko):
    """RealNVP transforms update half the features each: 16 of them match 8 two-sided blocks."""

    transforms = 2 * BLOCKS


def _median_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def measure(kind: type[nn.Module], steps: int) -> dict:
    torch.manual_seed(0)
    flow = kind()
    conditioning = ConditioningNet(QGrid().n_points, 256, CONDITION)
    transform = ParameterTransform(GratingPrior())
    parameters = list(flow.parameters()) + list(conditioning.parameters())
    optimiser = torch.optim.Adam(parameters, lr=1e-3)
    u, c = torch.randn(512, DIM), torch.randn(512, CONDITION)

    def step() -> None:
        loss = -flow.log_prob(u, c).mean()
        optimiser.zero_grad()
        loss.backward()

    torch.set_num_threads(2)
    step_s = _median_time(step, 20)
    with torch.inference_mode():
        torch.set_num_threads(1)
        sample_s = _median_time(lambda: flow.sample(c[:1], 1000), 20)
        torch.set_num_threads(2)

    rng, generator = np.random.default_rng(1), torch.Generator().manual_seed(1)
    instrument = default_instrument()
    val_theta, val_counts = simulate_batch(2048, instrument, rng, generator)
    start = time.perf_counter()
    for _ in range(steps):
        theta, counts = simulate_batch(512, instrument, rng, generator)
        loss = -flow.log_prob(transform.to_network(theta), conditioning(counts)).mean()
        optimiser.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 10.0)
        optimiser.step()
    train_s = time.perf_counter() - start
    with torch.no_grad():
        condition = conditioning(val_counts)
        u_val = transform.to_network(val_theta)
        nll = -flow.log_prob(u_val, condition).mean().item()
        error = float((flow.round_trip(u_val, condition) - u_val).abs().max())
    return {
        "weights": sum(p.numel() for p in flow.parameters()),
        "train_step_ms": 1e3 * step_s,
        "sample_1000_ms_1_thread": 1e3 * sample_s,
        "inversion_error": error,
        "task_steps": steps,
        "task_train_s": train_s,
        "task_validation_nll": nll,
    }


def main(steps: int = 1500) -> dict:
    results = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__}
    for name, kind in (("own", Own), ("freia", Freia), ("zuko", Zuko), ("zuko_16", Zuko16)):
        try:
            results[name] = measure(kind, steps)
        except ImportError as error:
            results[name] = {"skipped": f"not installed: {error}"}
        print(name, json.dumps(results[name]), flush=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    save(RESULTS, results)
    return results


if __name__ == "__main__":
    main()
