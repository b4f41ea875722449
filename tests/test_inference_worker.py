"""The inference worker's batching: the largest batch within the latency budget, and the
credits that keep the next batch waiting."""

import pytest

from pipeline.config import CPU_MAX_BATCH, CUDA_MAX_BATCH, InferenceConfig
from workers.inference import BatchSizer, InferenceSession


def test_batch_size_fits_the_budget_from_measured_costs():
    sizer = BatchSizer(limit=256, budget_s=0.050)
    assert sizer.size == 256  # nothing measured yet
    for batch in (256, 4, 64, 16, 128):
        sizer.observe(batch, 0.005 + 0.001 * batch)  # 5 ms per batch + 1 ms per exposure
    assert sizer.size == 45  # (50 - 5) / 1
    for _ in range(30):  # the device slows down to 2 ms per exposure
        sizer.observe(sizer.size, 0.005 + 0.002 * sizer.size)
        sizer.observe(max(1, sizer.size // 2), 0.005 + 0.002 * max(1, sizer.size // 2))
    assert sizer.size in (22, 23)


def test_batch_size_stays_within_one_and_the_limit():
    slow = BatchSizer(limit=8, budget_s=0.010)
    slow.observe(1, 0.5)  # one exposure already over the budget: still one at a time
    assert slow.size == 1
    fast = BatchSizer(limit=8, budget_s=10.0)
    fast.observe(8, 0.001)
    assert fast.size == 8


def test_credits_keep_twice_the_batch_outstanding():
    session = InferenceSession(None, InferenceConfig(), 0, BatchSizer(limit=8, budget_s=0.2), 2**20)
    assert session.credits() == 16
    session._taken += 5  # five line-outs received
    assert session.credits() == 5
    assert session.credits() == 0
    session.sizer.size = 2  # the budget now allows batches of 2: hand out none until below 4
    session._taken += 10
    assert session.credits() == 0
    session._taken += 1
    assert session.credits() == 0
    session._taken += 1  # 16 + 5 granted, 17 taken: 4 outstanding
    assert session.credits() == 0
    session._taken += 1
    assert session.credits() == 1


@pytest.mark.parametrize(
    ("max_batch", "device", "limit"),
    [(None, "cpu", CPU_MAX_BATCH), (None, "cuda", CUDA_MAX_BATCH), (32, "cuda", 32)],
)
def test_batch_limit_by_device(max_batch, device, limit):
    assert InferenceConfig(max_batch=max_batch).batch_limit(device) == limit


def test_summaries_on_a_torch_device_equal_numpy_s():
    """A GPU worker summarizes its draws on the device: mean, sd, quantiles (numpy's linear
    interpolation) and width-mode weights as numpy computes them."""
    import numpy as np
    import torch

    from pipeline.exposure import posterior_summaries
    from pipeline.physics import PARAMETER_NAMES

    draws = np.random.default_rng(3).normal(100.0, 10.0, (4, 1001, 5)).astype(np.float32)
    draws[..., 1] = np.abs(draws[..., 1] - 50.0)  # widths on both sides of pitch / 2
    as_numpy = posterior_summaries(draws, PARAMETER_NAMES)
    as_torch = posterior_summaries(torch.from_numpy(draws), PARAMETER_NAMES)
    assert as_numpy.keys() == as_torch.keys()
    for name, values in as_numpy.items():
        np.testing.assert_allclose(as_torch[name].numpy(), values, rtol=2e-6, atol=1e-4)


def test_a_batch_s_results_travel_in_messages_that_fit_and_bad_line_outs_fail_alone():
    """One ``results`` message per batch, split where a message would pass half of
    max_message_bytes; a line-out of the wrong length is a failure record without arrays
    (they would not fit the results file), the others are inferred."""
    import numpy as np

    from pipeline.model import load
    from pipeline.physics import simulate
    from pipeline.transport.messages import Failure, LineOutMessage, Results, read
    from workers.inference import run_batch

    model = load(device="cpu")
    _, counts = simulate(5, np.random.default_rng(8), model.prior, model.grid)
    line_outs = [
        LineOutMessage(index=i, scan_id="s", counts=c, counts_sd=np.sqrt(c + 1))
        for i, c in enumerate(counts.astype(np.float32))
    ]
    line_outs.append(LineOutMessage(index=9, scan_id="s", counts=np.ones(7), counts_sd=np.ones(7)))
    per_exposure = 50 * 5 * 4 + 2 * 512 * 4 + 100  # draws, line-out, summaries: about 6 kB
    out, inferred = run_batch(model, line_outs, 50, seed=0, max_message_bytes=5 * per_exposure)
    sent = [message.to_frames() for message in out]
    messages = [read(frames) for frames in sent]  # as the writer receives them
    assert inferred == 5 and [type(m) for m in messages] == [Failure, Results, Results, Results]
    failure, *results = messages
    assert isinstance(failure, Failure) and failure.index == 9 and failure.counts is None
    assert "shape (7,)" in failure.error
    assert all(isinstance(m, Results) for m in results)
    assert [m.columns["index"].tolist() for m in results] == [[0, 1], [2, 3], [4]]
    assert results[0].columns["samples"].shape == (2, 50, 5)
    assert max(sum(len(f) for f in frames) for frames in sent) <= 5 * per_exposure / 2
