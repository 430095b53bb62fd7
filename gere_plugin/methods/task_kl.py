"""KL to the base on the task rows (``gere_task_kl``): ``beta * KL(p_base || p_model)`` at every trained
position of the task rows, summed over tokens and divided by the task CE's own denominator, so that
``L = sum(w_i * ce_it + beta * kl_it) / N`` (the "anchored" SFT of LLaMA-Factory / RL's Razor's signal)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

import torch

from ..model.introspection import unwrap
from ..model.reference import Reference
from ..ops.losses import per_row_kl
from .base import TaskBatch, TaskLossPart, Term, register

if TYPE_CHECKING:  # pragma: no cover
    from ..trainer.resources import Resources


@register
class TaskKL(Term):
    """KL(base || model) on the task rows, against the run's reference (:mod:`gere_plugin.model.reference`)."""

    name = "task_kl"
    key = "gere_task_kl"
    metrics = ("gere/task_kl",)
    needs_task_logits = True
    needs_reference = True

    def __init__(self, weight: float, reference: Reference) -> None:
        self.weight = weight
        self.reference = reference

    @classmethod
    def build(cls, res: Resources, trainer: Any) -> TaskKL:
        return cls(float(res.args.gere_task_kl), res.reference)

    @property
    def ref_model(self) -> Optional[torch.nn.Module]:
        """The reference module (``None``: the PEFT model with adapters disabled)."""
        return self.reference.module

    def base_logits(self, trainer: Any, model: torch.nn.Module, fwd: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            if self.reference.module is not None:
                return self.reference.module(**fwd, use_cache=False).logits
            unwrapped = unwrap(trainer, model)
            with unwrapped.disable_adapter():
                return unwrapped(**fwd, use_cache=False).logits

    def task_loss(self, batch: TaskBatch) -> TaskLossPart:
        kl = per_row_kl(batch.logits, self.base_logits(batch.trainer, batch.model, batch.fwd), batch.labels).sum()
        tokens = batch.row_counts.sum().clamp_min(1)
        return TaskLossPart(extra=self.weight * kl, logs={"gere/task_kl": kl.detach() / tokens})

    def describe(self) -> str:
        return f"task KL(base || model) weight {self.weight:g} against {self.reference.source}"
