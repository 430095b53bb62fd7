"""Earlier tasks replayed next to the general replay (experience replay, ``gere_task_replay*`` keys).

General replay keeps general ability; it does not carry task-specific skills. Experience replay does:
a few rows of every earlier task's training data go into every optimizer step of a later task. Here
they are a second replay source beside ``gere_replay``:

* rows keep their own format and are tokenized the way TRL tokenizes the trainer's own rows
  (:func:`~gere_plugin.data.task_rows.tokenize_row`): ``prompt``/``completion`` with the loss on the
  completion (EOS appended as TRL does), conversational ``prompt``/``completion`` and ``messages`` through the chat template,
  ``text``, DPO pairs ``prompt``/``chosen``/``rejected`` (cross-entropy on the chosen answer), or
  pre-tokenized ``input_ids`` with ``completion_mask`` / ``labels`` (what ``gere sequence`` keeps on disk);
* at most ``gere_task_replay_size`` rows are drawn (seeded) from each source, once, and kept as
  token ids (:class:`~gere_plugin.data.task_rows.TaskReplaySet`);
* every optimizer step holds exactly ``gere_task_replay_per_step`` of them, dealt over micro-batches,
  accumulation and ranks by the same exact, seeded, resumable :class:`~gere_plugin.data.schedule.ReplaySchedule`
  as the general replay (an independent stream of the same ``gere_seed``);
* they enter the loss by cross-entropy only (no state cache, no regularizer): the task term becomes
  ``(1 - rho) * loss_task + rho * CE_earlier`` with ``CE_earlier`` the token mean over the target
  tokens of all earlier-task rows of the step (see :class:`TaskReplay` and docs/architecture.md).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Optional

import torch

from .config import GeReConfigError, resolve_task_replay_per_step, resolve_task_replay_weight
from .data.schedule import ReplaySchedule

# The rows themselves (reading, tokenizing, keeping) live in data/task_rows.py; re-exported here.
from .data.task_rows import KEY, ROW_FORMATS, TaskReplaySet, Tokenization, tokenize_row  # noqa: F401
from .model.hidden import forward_hidden
from .ops.logits import LogitHead, chunked_target_ce
from .ops.losses import target_ce

logger = logging.getLogger(__name__)


class TaskReplay:
    """Which earlier-task rows go into which micro-batch, and their cross-entropy.

    Per optimizer step with ``T = gere_task_replay_per_step`` rows and earlier-task share ``rho``, micro-batch
    ``j`` (of ``A`` per rank, ``W`` ranks) holding rows with ``n_j`` of the step's ``N`` target tokens adds
    ``F * c * rho * (n_j / N) * CE_j`` to the loss (``F = W * (A if the Trainer divides by A else 1)``,
    ``c`` the task term's coefficient): summed over micro-batches and ranks that is ``c * rho * CE_earlier``,
    the token mean over every target token of the step's earlier-task rows, whatever the layout.
    """

    def __init__(self, rows: TaskReplaySet, per_step: int, weight: float, seed: int) -> None:
        if len(rows) < 2 * per_step:
            raise GeReConfigError(
                f"gere_task_replay holds {len(rows)} usable rows but gere_task_replay_per_step={per_step}: at least "
                f"{2 * per_step} are needed so that no step repeats a row. Raise gere_task_replay_size, add earlier "
                "tasks, or lower gere_task_replay_per_step."
            )
        self.rows = rows
        self.per_step = per_step
        self.weight = weight
        self.schedule = ReplaySchedule(len(rows), per_step, seed, stream=1)
        self._targets_step = -1
        self._targets = 0

    @classmethod
    def from_args(cls, gere_args: Any, tokenizer: Any, how: Tokenization, global_batch: int) -> TaskReplay:
        per_step = resolve_task_replay_per_step(gere_args.gere_task_replay_per_step, global_batch)
        rows = TaskReplaySet.from_sources(
            gere_args.gere_task_replay, tokenizer, how, gere_args.gere_task_replay_size, gere_args.gere_seed,
            gere_args.gere_task_replay_split,
        )
        weight = resolve_task_replay_weight(gere_args.gere_task_replay_weight, per_step, global_batch)
        return cls(rows, per_step, weight, gere_args.gere_seed)

    def step_targets(self, step: int) -> int:
        """Target tokens of all earlier-task rows of optimizer ``step`` (host ints: no device sync)."""
        if step != self._targets_step:
            self._targets_step = step
            self._targets = int(sum(int(self.rows.targets[i]) for i in self.schedule.rows_for_step(step)))
        return self._targets

    def share(self, step: int, rows: Sequence[int]) -> float:
        """This micro-batch's share ``n_j / N`` of the step's earlier-task target tokens."""
        return float(sum(int(self.rows.targets[i]) for i in rows)) / max(self.step_targets(step), 1)

    def cross_entropy(self, model: torch.nn.Module, rows: Sequence[int], pad_token_id: int, device: torch.device,
                      head: Optional[LogitHead] = None, chunk: int = 0, min_chunks: int = 0) -> torch.Tensor:
        """Token-mean CE over the target tokens of ``rows`` (one forward).

        With ``head`` (the model's logit head, :mod:`gere_plugin.ops.logits`) the forward returns hidden states
        only and the CE is taken ``chunk`` tokens at a time, never building full-vocabulary logits; without
        it, from the model's logits. ``min_chunks``: head calls to make at least (sharded heads)."""
        batch = self.rows.collate(rows, pad_token_id, device=device)
        if head is not None:
            _, (last,) = forward_hidden(model, batch["input_ids"], batch["attention_mask"], [-1], need_logits=False)
            ce_sum, count = chunked_target_ce(head, last, batch["input_ids"], batch["target_mask"], chunk, min_chunks)
        else:
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
            ce_sum, count = target_ce(out.logits, batch["input_ids"], batch["target_mask"])
        return ce_sum / count.clamp_min(1)

    def describe(self) -> str:
        kept = ", ".join(str(n) for n in self.rows.kept)
        return (f"{self.per_step} earlier-task rows per optimizer step from {len(self.rows)} rows of "
                f"{len(self.rows.sources)} earlier tasks (kept per task: {kept}), share {self.weight:.3g} of the task term")

    def state_dict(self) -> dict[str, Any]:
        return {"schedule": self.schedule.state_dict(), "fingerprint": self.rows.fingerprint, "weight": self.weight,
                "kept": list(self.rows.kept)}
