"""The distributed loader's rule, checked against plain statements of what it promises."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scaling.errors import UsageError
from scaling.loader import IndexPlan


@st.composite
def plans(draw: st.DrawFn) -> IndexPlan:
    world = draw(st.sampled_from([1, 2, 3, 4, 8]))
    gb = world * draw(st.integers(1, 6))
    n = draw(st.integers(gb, gb * 5 + 7))
    return IndexPlan(n, gb, world, draw(st.booleans()), draw(st.integers(0, 2**31)), draw(st.sampled_from(["drop", "pad", "keep"])))


def epoch_samples(plan: IndexPlan, epoch: int) -> list[np.ndarray]:
    """Every rank's samples of every step of one epoch."""
    return [plan.rank_indices(epoch, s, r) for s in range(plan.steps_per_epoch) for r in range(plan.world)]


@settings(max_examples=150, deadline=None)
@given(plans())
def test_every_sample_once_per_epoch_across_ranks(plan: IndexPlan) -> None:
    seen = np.concatenate(epoch_samples(plan, epoch=3))
    counts = np.bincount(seen, minlength=plan.n)
    full, rest = divmod(plan.n, plan.global_batch)
    if plan.remainder == "drop" or rest == 0:
        assert len(seen) == full * plan.global_batch and counts.max() == 1
    elif plan.remainder == "pad":  # every sample at least once; the padding repeats the epoch's first ones
        assert counts.min() == 1 and len(seen) == (full + 1) * plan.global_batch
    else:  # keep: all but the remainder's last rest % world samples, once each
        assert counts.max() == 1 and len(seen) == plan.n - rest % plan.world


@settings(max_examples=100, deadline=None)
@given(plans())
def test_ranks_take_equal_contiguous_slices_of_the_same_global_batch(plan: IndexPlan) -> None:
    for s in range(plan.steps_per_epoch):
        parts = [plan.rank_indices(0, s, r) for r in range(plan.world)]
        assert len({len(p) for p in parts}) == 1
        assert np.array_equal(np.concatenate(parts), plan.global_indices(0, s))


def test_shuffle_is_deterministic_by_seed_and_differs_per_epoch() -> None:
    a, b, c = IndexPlan(100, 10, 2, True, 7), IndexPlan(100, 10, 2, True, 7), IndexPlan(100, 10, 2, True, 8)
    assert np.array_equal(a.order(0), b.order(0)) and np.array_equal(a.order(5), b.order(5))
    assert not np.array_equal(a.order(0), a.order(1))
    assert not np.array_equal(a.order(0), c.order(0))
    assert sorted(a.order(4).tolist()) == list(range(100))
    assert np.array_equal(IndexPlan(100, 10, 2, False).order(3), np.arange(100))


def test_position_of_a_global_step_continues_mid_epoch() -> None:
    plan = IndexPlan(50, 8, 2, True, 1)  # 6 steps per epoch (drop)
    assert plan.steps_per_epoch == 6
    assert plan.position(0) == (0, 0) and plan.position(6) == (1, 0) and plan.position(14) == (2, 2)


@pytest.mark.parametrize("n,gb,world", [(10, 64, 2), (63, 64, 4)])
def test_a_dataset_smaller_than_the_global_batch_is_refused(n: int, gb: int, world: int) -> None:
    with pytest.raises(UsageError, match=f"the dataset has {n} samples, fewer than one global batch of {gb}"):
        IndexPlan(n, gb, world)


def test_a_batch_that_does_not_divide_over_the_devices_is_refused() -> None:
    with pytest.raises(UsageError, match="does not divide evenly over 4 devices"):
        IndexPlan(100, 30, 4)
    with pytest.raises(UsageError, match="valid: drop, pad, keep"):
        IndexPlan(100, 8, 2, remainder="wrap")
