"""How a micro-batch's extra terms are scaled so the optimizer step sees step-level means.

The derivation is in docs/architecture.md ("Loss scaling under accumulation and data parallelism"):
micro-batch ``j`` adds ``F * (share_j * term_j)`` with ``F = W * (A if the Trainer divides the loss
by A else 1)``, ``W`` ranks and ``A`` micro-batches per step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from ..model.introspection import is_sharded, world_of


def trainer_divides_by_accumulation(trainer: Any, num_items_in_batch: Any) -> bool:
    """Whether ``Trainer.training_step`` divides the returned loss by the accumulation steps.

    Newer transformers expose ``loss_is_scaled_for_ga`` (``None`` = infer); older ones use the rule
    ``(not model_accepts_loss_kwargs or num_items_in_batch is None) and compute_loss_func is None``.
    """
    flag = getattr(trainer, "loss_is_scaled_for_ga", None)
    if flag is not None:
        return not bool(flag)
    return (not getattr(trainer, "model_accepts_loss_kwargs", False) or num_items_in_batch is None) and getattr(
        trainer, "compute_loss_func", None
    ) is None


@dataclass
class StepScaling:
    """How a micro-batch's extra (replay) terms are scaled so the optimizer step sees step-level means."""

    accumulation: int  # micro-batches in this optimizer step
    world_size: int
    divides: bool  # the Trainer divides the loss by ``accumulation``

    @property
    def extra_factor(self) -> float:
        # DDP averages gradients over ranks (x world); a dividing Trainer divides by accumulation.
        return float(self.world_size * (self.accumulation if self.divides else 1))

    @property
    def task_unscale(self) -> float:
        # Estimate of the micro-batch's own mean task loss from the returned value (for dynamic w).
        return 1.0 if self.divides else float(self.accumulation)


def step_scaling(trainer: Any, num_items_in_batch: Any) -> StepScaling:
    """The :class:`StepScaling` of the trainer's current micro-batch (the ONE place it is read)."""
    acc = int(getattr(trainer, "current_gradient_accumulation_steps", 0) or trainer.args.gradient_accumulation_steps)
    world, _ = world_of(trainer)
    return StepScaling(acc, world, trainer_divides_by_accumulation(trainer, num_items_in_batch))


def forward_collectives(trainer: Any, world_size: int) -> Optional[str]:
    """Why a replay forward talks to the other ranks (None when it does not).

    Then every rank must run the replay forward in the same micro-batches, or the ranks' collectives
    no longer pair up and training hangs. Under FSDP and ZeRO-3 the forward all-gathers parameters.
    Under DDP (and ZeRO-1/2) the replay forwards run through the unwrapped model
    (:meth:`ReplayStep.forward_module <gere_plugin.trainer.step.ReplayStep.forward_module>`), which has
    no collective: DDP's wrapped forward broadcasts the model's buffers (the rotary ``inv_freq``), and a
    replay forward through it on some ranks only hung (measured: 2 CPU processes, one replay row per step).
    """
    if world_size > 1 and is_sharded(trainer):
        return "DeepSpeed ZeRO-3 / FSDP all-gather the parameters in every forward"
    return None
