"""Property tests (hypothesis) for the replay schedule and the packed state labels.

The schedule is what keeps replay exact across ranks, accumulation and resumes, so its invariants are
checked over random ``(n, k, seed, layout)`` rather than a few hand-picked cases. Example counts are
bounded so the file runs in a few seconds.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from gere_plugin import states
from gere_plugin.mixing import ReplaySchedule

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SEEDS = st.integers(min_value=0, max_value=2**32 - 1)


@st.composite
def n_and_k(draw: st.DrawFn, max_n: int = 60) -> tuple[int, int]:
    """A replay-set size ``n`` and rows per step ``k`` with ``n >= 2k`` (the schedule's requirement)."""
    n = draw(st.integers(min_value=2, max_value=max_n))
    k = draw(st.integers(min_value=1, max_value=n // 2))
    return n, k


def stream(schedule: ReplaySchedule, steps: int) -> list[int]:
    out: list[int] = []
    for s in range(steps):
        out.extend(schedule.rows_for_step(s))
    return out


@FAST
@given(nk=n_and_k(), seed=SEEDS, epochs=st.integers(min_value=1, max_value=4))
def test_every_step_has_k_distinct_rows_and_every_sample_is_used_once_per_epoch(
    nk: tuple[int, int], seed: int, epochs: int
) -> None:
    n, k = nk
    sched = ReplaySchedule(n, k, seed)
    steps = -(-epochs * n // k)  # enough steps to cover `epochs` full epochs and cross their boundaries
    for s in range(steps):
        rows = sched.rows_for_step(s)
        assert len(rows) == k
        assert len(set(rows)) == k, f"step {s} repeats a sample: {rows}"
        assert all(0 <= r < n for r in rows)
    pos = stream(sched, steps)
    # Aligned windows of n stream positions ("replay epochs") are permutations of the replay set:
    # every sample is replayed once before any sample is replayed again.
    for e in range(epochs):
        assert sorted(pos[e * n : (e + 1) * n]) == list(range(n)), f"epoch {e} is not a permutation"


@FAST
@given(nk=n_and_k(), seed=SEEDS, start=st.integers(min_value=0, max_value=200))
def test_schedule_is_a_pure_function_of_the_step(nk: tuple[int, int], seed: int, start: int) -> None:
    """A fresh schedule queried first at a late step (a resumed run) equals one that walked there."""
    n, k = nk
    walked = ReplaySchedule(n, k, seed)
    expected = [walked.rows_for_step(s) for s in range(start + 3)]
    resumed = ReplaySchedule(n, k, seed)
    assert [resumed.rows_for_step(s) for s in range(start, start + 3)] == expected[start:]
    assert [resumed.rows_for_step(s) for s in range(start)] == expected[:start]


@FAST
@given(nk=n_and_k(), seeds=st.lists(SEEDS, min_size=2, max_size=2, unique=True))
def test_different_seeds_give_different_orders(nk: tuple[int, int], seeds: list[int]) -> None:
    n, k = nk
    assume(n >= 10)  # two random permutations of >= 10 items coincide with probability < 3e-7
    a = stream(ReplaySchedule(n, k, seeds[0]), n // k)
    b = stream(ReplaySchedule(n, k, seeds[1]), n // k)
    assert a != b


@FAST
@given(
    nk=n_and_k(max_n=80),
    seed=SEEDS,
    num_micro=st.integers(min_value=1, max_value=5),
    world=st.integers(min_value=1, max_value=4),
    step=st.integers(min_value=0, max_value=40),
)
def test_rows_are_partitioned_over_micro_batches_and_ranks(
    nk: tuple[int, int], seed: int, num_micro: int, world: int, step: int
) -> None:
    n, k = nk
    sched = ReplaySchedule(n, k, seed)
    parts = {
        (m, r): sched.rows_for_micro(step, m, num_micro, rank=r, world_size=world)
        for m in range(num_micro)
        for r in range(world)
    }
    union = [row for rows in parts.values() for row in rows]
    assert sorted(union) == sorted(sched.rows_for_step(step)), "union over (micro, rank) != rows of the step"
    assert len(union) == len(set(union)) == k, "a replay row is given to two micro-batches or ranks"
    slots = num_micro * world
    for rows in parts.values():  # round-robin dealing: shares differ by at most one row
        assert len(rows) in (k // slots, -(-k // slots))


@FAST
@given(nk=n_and_k(), seed=SEEDS, world=st.integers(min_value=1, max_value=4))
def test_each_rank_alone_reproduces_its_share(nk: tuple[int, int], seed: int, world: int) -> None:
    """Ranks never talk about the schedule: separate objects on separate ranks must agree."""
    n, k = nk
    per_rank = [ReplaySchedule(n, k, seed) for _ in range(world)]
    for step in range(3):
        rows = [per_rank[r].rows_for_micro(step, 0, 1, rank=r, world_size=world) for r in range(world)]
        merged = sorted(x for part in rows for x in part)
        assert merged == sorted(ReplaySchedule(n, k, seed).rows_for_step(step))


@FAST
@given(n=st.integers(min_value=1, max_value=40), k=st.integers(min_value=1, max_value=40))
def test_too_small_replay_set_is_refused_with_the_keys(n: int, k: int) -> None:
    assume(n < 2 * k)
    with pytest.raises(ValueError) as err:
        ReplaySchedule(n, k, 0)
    assert "gere_replay_per_step" in str(err.value) and "gere_replay_size" in str(err.value)


# ---------------------------------------------------------------------------------------------
# Packed state labels
# ---------------------------------------------------------------------------------------------
FORMATS = {  # name -> (pack, unpack, labels per byte, number of distinct codes)
    "2bit": ("pack_2bit", "unpack_2bit", 4, 4),
    "base3": ("pack_trits", "unpack_trits", 5, 3),
}
SHAPES = st.tuples(
    st.lists(st.integers(min_value=1, max_value=5), min_size=0, max_size=3),  # leading dims
    st.integers(min_value=1, max_value=41),  # hidden size, often not a multiple of 4 or 5
)


def _format(name: str) -> tuple:
    pack, unpack, per_byte, high = FORMATS[name]
    if not hasattr(states, pack):
        pytest.skip(f"gere_plugin.states has no {pack} in this version")
    return getattr(states, pack), getattr(states, unpack), per_byte, high


def _codes(lead: list[int], hidden: int, seed: int, high: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, high, (*lead, hidden), generator=g, dtype=torch.uint8)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@FAST
@given(shape=SHAPES, seed=SEEDS)
def test_packing_round_trip(fmt: str, shape: tuple[list[int], int], seed: int) -> None:
    pack, unpack, per_byte, high = _format(fmt)
    lead, hidden = shape
    codes = _codes(lead, hidden, seed, high)
    packed = pack(codes)
    assert packed.dtype == torch.uint8
    assert tuple(packed.shape) == (*lead, -(-hidden // per_byte))
    assert torch.equal(unpack(packed, hidden), codes)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_packing_round_trip_of_empty_tensors(fmt: str) -> None:
    pack, unpack, per_byte, high = _format(fmt)
    codes = torch.zeros((0, 3, 7), dtype=torch.uint8)
    packed = pack(codes)
    assert tuple(packed.shape) == (0, 3, -(-7 // per_byte))
    assert torch.equal(unpack(packed, 7), codes)
