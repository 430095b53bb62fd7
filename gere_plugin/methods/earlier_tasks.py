"""Earlier-task replay (``gere_task_replay``): rows of earlier tasks' training data in every step of a later
task, by cross-entropy (experience replay). The rows, their tokenization and schedule are
:class:`~gere_plugin.task_replay.TaskReplay` (built in the set-up pass); this term puts their part into the
micro-batch's loss: ``c * rho * (n_j / N) * CE_j``, scaled like every replay term (docs/architecture.md)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

import torch

from ..model.introspection import autocast_of
from ..task_replay import TaskReplay, Tokenization
from .base import Term, register

if TYPE_CHECKING:  # pragma: no cover
    from ..trainer.resources import Resources
    from ..trainer.scaling import StepScaling
    from ..trainer.step import ReplayStep


@register
class EarlierTasks(Term):
    """The earlier-task rows of each micro-batch and their scaled cross-entropy."""

    name = "task_replay"
    key = "gere_task_replay"
    metrics = ("gere/task_replay_ce",)

    def __init__(self, replay: TaskReplay) -> None:
        self.replay = replay
        self.rows_now: list[int] = []

    @classmethod
    def build(cls, res: Resources, trainer: Any) -> EarlierTasks:
        how = Tokenization.of_trainer_args(trainer.args)
        return cls(TaskReplay.from_args(res.args, res.tokenizer, how, res.global_batch))

    def replay_loss(self, step: ReplayStep, trainer: Any, model: torch.nn.Module, index: int, micro: int,
                    scaling: StepScaling, device: torch.device) -> Optional[torch.Tensor]:
        """This micro-batch's part of ``c * rho * CE_earlier`` (``None`` without earlier-task rows here).

        The rows come from the earlier-task schedule (their own per-step count, never counted against
        ``gere_replay_per_step``); one forward; cross-entropy only, so the regularizer stays on the general
        replay rows. The CE is chunked from hidden states like the general replay CE when the logit head
        allows it (no full-vocabulary logits), else taken from the model's logits.
        """
        tr = self.replay
        self.rows_now = tr.schedule.rows_for_micro(index, micro, scaling.accumulation, step.rank, step.world_size)
        if not self.rows_now:
            return None
        module = step.forward_module(trainer, model)
        head = step.logit_head
        if head is None:
            ce_micro = tr.cross_entropy(module, self.rows_now, step.pad_token_id, device)
        else:
            pad_to = step.chunks_over_ranks(tr.schedule, lambda i: int(tr.rows.targets[i]), index, micro,
                                            scaling.accumulation, step.logit_chunk)
            with autocast_of(trainer):
                ce_micro = tr.cross_entropy(module, self.rows_now, step.pad_token_id, device,
                                            head.in_fsdp_unit(model), step.logit_chunk, pad_to)
        step.metrics.add("gere/task_replay_ce", ce_micro)
        return scaling.extra_factor * step.task_coef * tr.weight * tr.share(index, self.rows_now) * ce_micro

    def describe(self) -> str:
        return self.replay.describe()

    def state_dict(self) -> dict[str, Any]:
        return self.replay.state_dict()
