"""Batch insertion: which replay samples go into which optimizer step, micro-batch and rank.

The schedule is a pure function of ``(num_samples, per_step, seed, step)``: replay samples form an
endless stream of seeded permutations ("epochs" of the replay set), and optimizer step ``s`` takes
stream positions ``[s*k, (s+1)*k)``. Hence

* every optimizer step holds exactly ``k = per_step`` replay rows;
* every replay sample is used once before any sample repeats;
* no sample appears twice in one step, even across an epoch boundary (the next permutation is
  adjusted so that its head avoids the previous tail);
* resuming at step ``s`` replays exactly what an uninterrupted run would (no state but ``s``);
* the ``k`` rows are dealt round-robin over the ``accumulation x world_size`` micro-batches of the
  step, so ranks never share a row and the total over ranks is exactly ``k``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..config import GeReConfigError


@dataclass
class ReplaySchedule:
    """Deterministic replay schedule.

    Args:
        num_samples: size ``n`` of the replay set.
        per_step: replay rows ``k`` per optimizer step; ``n >= 2k`` is required so that no step ever
            needs a sample twice.
        seed: schedule seed.
        stream: ``0`` for the general replay; another number gives an independent seeded stream from
            the same seed (the earlier-task replay uses ``1``), so two schedules never move in lockstep.
    """

    num_samples: int
    per_step: int
    seed: int = 0
    stream: int = 0
    _epochs: dict[int, np.ndarray] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.per_step < 1:
            raise GeReConfigError(f"gere_replay_per_step={self.per_step} must be >= 1.")
        if self.num_samples < 2 * self.per_step:
            raise GeReConfigError(
                f"The replay set has {self.num_samples} samples but gere_replay_per_step={self.per_step}: "
                f"at least 2 x gere_replay_per_step ({2 * self.per_step}) samples are needed so that no step "
                "repeats a sample. Raise gere_replay_size or lower gere_replay_per_step."
            )

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The permutation of replay indices used in replay epoch ``epoch``."""
        if epoch in self._epochs:
            return self._epochs[epoch]
        start = max([e for e in self._epochs if e < epoch], default=-1) + 1
        for e in range(start, epoch + 1):
            rng = np.random.default_rng([self.seed, e] if self.stream == 0 else [self.seed, e, self.stream])
            perm = rng.permutation(self.num_samples)
            if e > 0:
                perm = self._avoid_tail(perm, self._epochs[e - 1][-(self.per_step - 1) :] if self.per_step > 1 else [])
            self._epochs[e] = perm
        return self._epochs[epoch]

    def _avoid_tail(self, perm: np.ndarray, tail: np.ndarray | list) -> np.ndarray:
        """Swap elements of ``tail`` out of the first ``k-1`` positions of ``perm``."""
        head = self.per_step - 1
        if head == 0:
            return perm
        tail_set = {int(t) for t in tail}
        perm = perm.copy()
        j = head
        for i in range(head):
            if int(perm[i]) in tail_set:
                while int(perm[j]) in tail_set:
                    j += 1
                perm[i], perm[j] = perm[j], perm[i]
                j += 1
        return perm

    def rows_for_step(self, step: int) -> list[int]:
        """The ``k`` replay indices of optimizer step ``step`` (0-based), in stream order."""
        if step < 0:
            raise ValueError("step must be >= 0")
        n, k = self.num_samples, self.per_step
        start = step * k
        out = []
        for pos in range(start, start + k):
            epoch, offset = divmod(pos, n)
            out.append(int(self.epoch_order(epoch)[offset]))
        return out

    def rows_for_micro(self, step: int, micro: int, num_micro: int, rank: int = 0, world_size: int = 1) -> list[int]:
        """Replay indices for one micro-batch of one rank.

        Micro-batch ``micro`` (0-based, within the optimizer step) of ``rank`` has the global index
        ``g = micro * world_size + rank``; it gets stream positions ``p`` of the step with
        ``p % (num_micro * world_size) == g``.
        """
        if not 0 <= micro < num_micro:
            raise ValueError(f"micro={micro} outside [0, {num_micro})")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} outside [0, {world_size})")
        g_total = num_micro * world_size
        g = micro * world_size + rank
        return self.rows_for_step(step)[g::g_total]

    def state_dict(self) -> dict:
        out = {"num_samples": self.num_samples, "per_step": self.per_step, "seed": self.seed}
        if self.stream:
            out["stream"] = self.stream
        return out


def uneven_micro_batches(per_step: int, world_size: int, accumulation: int) -> bool:
    """Whether some micro-batch holds replay rows on some ranks but not on others.

    Rows are dealt round-robin over the ``accumulation x world_size`` slots of a step (slot
    ``micro * world_size + rank``); slot ``g`` gets rows iff ``g < per_step``. Every micro-batch is
    then all-or-none over ranks exactly when ``per_step`` is a multiple of the world size or fills
    every slot (``per_step >= accumulation x world_size``).
    """
    return per_step % world_size != 0 and per_step < accumulation * world_size
