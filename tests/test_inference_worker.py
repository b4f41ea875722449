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
    session = InferenceSession(None, InferenceConfig(), 0, BatchSizer(limit=8, budget_s=0.2))
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
