"""Earlier-task replay, the ``task_replay`` term: earlier tasks replayed next to the general replay (experience replay, ``gere_task_replay*`` keys).

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
* they enter the loss by cross-entropy (no state cache, no regularizer): the task term becomes
  ``(1 - rho) * loss_task + rho * CE_earlier`` with ``CE_earlier`` the token mean over the target
  tokens of all earlier-task rows of the step (see :class:`TaskReplay` and docs/architecture.md);
* with ``gere_task_replay_logit_weight = beta > 0`` (logit replay, :mod:`gere_plugin.methods.logit_replay`)
  also by a KL to the top-k log-probabilities stored when their task ended:
  ``rho * (CE_earlier + beta * KL_earlier)``, the KL summed over the same tokens and divided by the same count.

:class:`TaskReplay` is the rows, their schedule, shares and cross-entropy; :class:`EarlierTasks` puts their
scaled part into each micro-batch's loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Optional

import torch

from ..config import GeReConfigError, resolve_task_replay_per_step, resolve_task_replay_weight
from ..data.schedule import ReplaySchedule
from ..data.task_rows import TaskReplaySet, Tokenization
from ..model.hidden import forward_final
from ..model.introspection import autocast_of
from ..ops.logits import LogitHead, chunked_target_ce, kl_chunk_tokens
from ..ops.losses import target_ce
from .base import Term, register
from .logit_replay import LogitReplay

if TYPE_CHECKING:  # pragma: no cover
    from ..trainer.resources import Resources
    from ..trainer.scaling import StepScaling
    from ..trainer.step import ReplayStep


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

    @staticmethod
    def cross_entropy_of(batch: dict[str, torch.Tensor], last: Optional[torch.Tensor], logits: Optional[torch.Tensor],
                         head: Optional[LogitHead] = None, chunk: int = 0, min_chunks: int = 0) -> torch.Tensor:
        """Token-mean CE over the target tokens of ``batch``'s rows, from a forward already run over them:
        their final hidden states ``last`` with ``head`` (the model's logit head, :mod:`gere_plugin.ops.logits`;
        the CE is taken ``chunk`` tokens at a time, never building full-vocabulary logits, and ``min_chunks``
        head calls at least for sharded heads), else their ``logits``; each ``[rows, batch width, ...]``."""
        if head is not None:
            assert last is not None
            ce_sum, count = chunked_target_ce(head, last, batch["input_ids"], batch["target_mask"], chunk, min_chunks)
        else:
            assert logits is not None
            ce_sum, count = target_ce(logits, batch["input_ids"], batch["target_mask"])
        return ce_sum / count.clamp_min(1)

    def describe(self) -> str:
        kept = ", ".join(str(n) for n in self.rows.kept)
        return (f"{self.per_step} earlier-task rows per optimizer step from {len(self.rows)} rows of "
                f"{len(self.rows.sources)} earlier tasks (kept per task: {kept}), share {self.weight:.3g} of the task term")

    def state_dict(self) -> dict[str, Any]:
        return {"schedule": self.schedule.state_dict(), "fingerprint": self.rows.fingerprint, "weight": self.weight,
                "kept": list(self.rows.kept)}


@register
class EarlierTasks(Term):
    """The earlier-task rows of each micro-batch and their scaled cross-entropy (+ logit replay's KL)."""

    name = "task_replay"
    key = "gere_task_replay"
    metrics = ("gere/task_replay_ce", "gere/task_replay_kl")

    def __init__(self, replay: TaskReplay, logits: Optional[LogitReplay] = None) -> None:
        self.replay = replay
        self.logits = logits
        self.rows_now: list[int] = []

    @classmethod
    def build(cls, res: Resources, trainer: Any) -> EarlierTasks:
        how = Tokenization.of_trainer_args(trainer.args)
        replay = TaskReplay.from_args(res.args, res.tokenizer, how, res.global_batch)
        beta = float(getattr(res.args, "gere_task_replay_logit_weight", 0.0) or 0.0)
        logits = None
        if beta > 0:
            vocab = int(getattr(getattr(res.model, "config", None), "vocab_size", 0) or 0)
            logits = LogitReplay(replay.rows, beta, int(res.args.gere_task_replay_topk), vocab)
        return cls(replay, logits)

    def rows_for(self, step: ReplayStep, index: int, micro: int, scaling: StepScaling) -> list[int]:
        """This micro-batch's earlier-task rows (kept as :attr:`rows_now`), from the earlier-task schedule:
        their own per-step count, never counted against ``gere_replay_per_step``."""
        self.rows_now = self.replay.schedule.rows_for_micro(index, micro, scaling.accumulation, step.rank,
                                                            step.world_size)
        return self.rows_now

    def collate(self, pad_token_id: int, device: torch.device) -> dict[str, torch.Tensor]:
        """:attr:`rows_now`, right-padded (``input_ids`` / ``attention_mask`` / ``target_mask``)."""
        return self.replay.rows.collate(self.rows_now, pad_token_id, device=device)

    def replay_loss(self, step: ReplayStep, trainer: Any, model: torch.nn.Module, index: int, micro: int,
                    scaling: StepScaling, device: torch.device) -> Optional[torch.Tensor]:
        """This micro-batch's part of ``c * rho * CE_earlier`` from a forward of its own (``None`` without
        earlier-task rows here). :class:`~gere_plugin.trainer.step.ReplayStep` runs this forward only when the
        micro-batch has no general replay rows; otherwise it packs both kinds into one forward and calls
        :meth:`loss_of` (the same numbers up to float rounding, one forward less)."""
        if not self.rows_for(step, index, micro, scaling):
            return None
        batch = self.collate(step.pad_token_id, device)
        last, logits = forward_final(step.forward_module(trainer, model), batch["input_ids"], batch["attention_mask"],
                                     step.logit_head is not None)
        return self.loss_of(step, trainer, model, index, micro, scaling, batch, last, logits)

    def loss_of(self, step: ReplayStep, trainer: Any, model: torch.nn.Module, index: int, micro: int,
                scaling: StepScaling, batch: dict[str, torch.Tensor], last: Optional[torch.Tensor],
                logits: Optional[torch.Tensor]) -> torch.Tensor:
        """:meth:`replay_loss` from a forward already run over :attr:`rows_now` (collated as ``batch``): their
        final hidden states ``last`` when the step has a logit head (:attr:`ReplayStep.logit_head`), else
        their ``logits``, each ``[rows, batch width, ...]``.

        Cross-entropy only (+ logit replay's KL), so the regularizer stays on the general replay rows. The CE
        is chunked from hidden states like the general replay CE when the logit head allows it (no
        full-vocabulary logits), else taken from the logits.
        """
        if self.logits is not None:
            return self._with_logits(step, trainer, model, index, micro, scaling, batch, last, logits)
        tr = self.replay
        head = step.logit_head
        if head is None:
            ce_micro = tr.cross_entropy_of(batch, last, logits)
        else:
            pad_to = step.chunks_over_ranks(tr.schedule, lambda i: int(tr.rows.targets[i]), index, micro,
                                            scaling.accumulation, step.logit_chunk)
            with autocast_of(trainer):
                ce_micro = tr.cross_entropy_of(batch, last, logits, head.in_fsdp_unit(model), step.logit_chunk, pad_to)
        step.metrics.add("gere/task_replay_ce", ce_micro)
        return scaling.extra_factor * step.task_coef * tr.weight * tr.share(index, self.rows_now) * ce_micro

    def _with_logits(self, step: ReplayStep, trainer: Any, model: torch.nn.Module, index: int, micro: int,
                     scaling: StepScaling, batch: dict[str, torch.Tensor], last: Optional[torch.Tensor],
                     logits: Optional[torch.Tensor]) -> torch.Tensor:
        """:meth:`loss_of` with logit replay: ``F * c * rho * (CE_sum + beta * KL_sum) / N`` (``N`` the
        step's earlier-task target tokens), CE and KL from one log-softmax per chunk."""
        tr, lr, rows = self.replay, self.logits, self.rows_now
        assert lr is not None
        head = step.logit_head
        if head is None:
            ce_sum, kl_sum = lr.ce_kl_of(rows, batch, last, logits)
        else:
            chunk = kl_chunk_tokens(step.logit_chunk)  # a chunk holds logits, log-softmax and the rest mass
            pad_to = step.chunks_over_ranks(tr.schedule, lambda i: int(tr.rows.targets[i]), index, micro,
                                            scaling.accumulation, chunk)
            with autocast_of(trainer):
                ce_sum, kl_sum = lr.ce_kl_of(rows, batch, last, logits, head.in_fsdp_unit(model), chunk, pad_to)
        tokens = max(sum(int(tr.rows.targets[i]) for i in rows), 1)
        step.metrics.add("gere/task_replay_ce", ce_sum.detach() / tokens)
        covered = lr.snapshot_tokens(rows)
        if covered:
            step.metrics.add("gere/task_replay_kl", kl_sum.detach() / covered)
        part = (ce_sum + lr.weight * kl_sum) / tokens
        return scaling.extra_factor * step.task_coef * tr.weight * tr.share(index, rows) * part

    def describe(self) -> str:
        out = self.replay.describe()
        return out if self.logits is None else f"{out}; {self.logits.describe()}"

    def state_dict(self) -> dict[str, Any]:
        out = self.replay.state_dict()
        if self.logits is not None:  # absent when off: checkpoints of runs without logit replay still match
            out["logit_replay"] = self.logits.state_dict()
        return out
