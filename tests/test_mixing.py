"""Replay schedule: exact counts, coverage, epoch boundaries, micro-batch/rank partition."""

from collections import Counter

import pytest

from gere_plugin.mixing import ReplaySchedule


@pytest.mark.parametrize("n,k", [(10, 3), (7, 2), (64, 5), (6, 3)])
def test_every_sample_once_before_repeats_and_no_duplicates_in_a_step(n, k):
    s = ReplaySchedule(n, k, seed=1)
    steps = [s.rows_for_step(i) for i in range(4 * n)]
    assert all(len(r) == k for r in steps)
    assert all(len(set(r)) == k for r in steps), "a sample twice within one step"
    stream = [x for r in steps for x in r]
    for e in range(len(stream) // n):
        assert sorted(stream[e * n : (e + 1) * n]) == list(range(n)), f"epoch {e} is not a permutation"


def test_deterministic_and_seed_dependent():
    a = [ReplaySchedule(50, 4, seed=3).rows_for_step(i) for i in range(30)]
    b = [ReplaySchedule(50, 4, seed=3).rows_for_step(i) for i in range(30)]
    c = [ReplaySchedule(50, 4, seed=4).rows_for_step(i) for i in range(30)]
    assert a == b
    assert a != c


def test_resume_at_any_step_equals_uninterrupted():
    full = ReplaySchedule(20, 3, seed=9)
    ref = [full.rows_for_step(i) for i in range(40)]
    resumed = ReplaySchedule(20, 3, seed=9)  # fresh object, starts at step 17
    assert [resumed.rows_for_step(i) for i in range(17, 40)] == ref[17:]


@pytest.mark.parametrize("k,acc,world", [(3, 2, 1), (5, 2, 2), (2, 4, 1), (1, 2, 2)])
def test_micro_and_rank_partition(k, acc, world):
    s = ReplaySchedule(40, k, seed=0)
    for step in range(12):
        parts = [s.rows_for_micro(step, m, acc, r, world) for m in range(acc) for r in range(world)]
        flat = [x for p in parts for x in p]
        assert Counter(flat) == Counter(s.rows_for_step(step))
        assert max(len(p) for p in parts) - min(len(p) for p in parts) <= 1


def test_too_small_replay_set_is_an_error():
    with pytest.raises(ValueError, match="gere_replay_size"):
        ReplaySchedule(3, 2)
