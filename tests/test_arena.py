"""The arena planner: no two live buffers share a byte; exact offsets on a small case."""

import numpy as np
import pytest

from fedtiny.arena import ArenaPlan, Buffer, check_plan, plan_arena


def test_exact_offsets_small_chain():
    # a -> b -> c, each dies after the next is made: a and c can share bytes, b cannot overlap either.
    plan = plan_arena([Buffer("a", 100, 0, 1), Buffer("b", 64, 1, 2), Buffer("c", 100, 2, 3)])
    assert plan.offsets == {"a": 0, "c": 0, "b": 104}
    assert plan.size == 168
    check_plan(plan)


@pytest.mark.parametrize("seed", range(20))
def test_random_plans_never_overlap_and_are_not_wasteful(seed):
    rng = np.random.default_rng(seed)
    bufs = []
    for i in range(40):
        first = int(rng.integers(0, 30))
        bufs.append(Buffer(f"t{i}", int(rng.integers(1, 5000)), first, first + int(rng.integers(0, 8))))
    plan = plan_arena(bufs)
    check_plan(plan)
    peak_live = max(sum(-(-b.size // 8) * 8 for b in plan.live_at(s)) for s in range(40))
    assert peak_live <= plan.size <= 2 * peak_live


def test_checker_catches_overlap():
    bufs = [Buffer("a", 16, 0, 2), Buffer("b", 16, 1, 3)]
    with pytest.raises(AssertionError, match="overlaps"):
        check_plan(ArenaPlan({"a": 0, "b": 8}, 32, bufs))
