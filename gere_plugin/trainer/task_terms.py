"""The anti-forgetting terms that act on the task side and need no replay: FLOW, KL to the base, EWC, WiSE-FT.

:class:`TaskTerms` is built by the set-up pass when ``gere_flow``, ``gere_task_kl > 0``,
``gere_ewc_lambda > 0`` or ``0 < gere_wise_alpha < 1`` is set, and called from
:meth:`GeReTrainerMixin.compute_loss <gere_plugin.trainer.mixin.GeReTrainerMixin.compute_loss>` on every
training micro-batch:

* when a term needs the task logits (FLOW, the task KL) it computes the task loss itself, from one forward
  of the task rows (:meth:`TaskTerms.task_loss`): ``L = sum_{i,t} (w_i * ce_{i,t} + beta * kl_{i,t}) / N``,
  with ``w_i`` FLOW's sample weight (1 without FLOW), ``kl_{i,t} = KL(p_base || p_model)`` at the same
  trained positions, ``beta = gere_task_kl`` and ``N`` the denominator the parent trainer uses for its
  token mean (``num_items_in_batch`` over ranks when it averages over it, else the micro-batch's trained
  tokens). With ``w = 1`` and ``beta = 0`` this equals TRL's SFT loss exactly (tested), so the replay
  terms, gradient accumulation and data parallelism see the same scaling as before;
* with EWC it adds the penalty once per optimizer step (:meth:`TaskTerms.add_terms`), after the replay
  terms so GeRe's dynamic weight still balances against the task loss alone.
* when training returns, every term's ``after_task`` (:meth:`TaskTerms.on_train_end`): WiSE-FT's
  interpolation first, then EWC's Fisher of the weights handed on. WiSE-FT touches no loss, so it is the
  one task-side term every loss family (SFT, DPO, GRPO) may use.

It logs ``gere/task_ce`` (the task rows' token-mean CE, without FLOW's weights or the KL: whenever FLOW or
the task KL computes the task loss), ``gere/flow_weight`` (mean weight of the step's rows) and
``gere/flow_ce`` (the same value as ``gere/task_ce``, its older name, only with FLOW), ``gere/task_kl``
(token mean of the KL), ``gere/ewc_penalty`` and, when no replay runs, ``gere/task_loss``: averaged over
the step's micro-batches on all ranks with one all-reduce.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch

from ..config import ANY_FAMILY_TASK_METHODS, GeReConfigError
from ..data.trainer_rows import FORWARD_KEYS
from ..methods.base import TaskBatch, Term, task_terms
from ..ops.losses import per_row_ce
from .metrics import MetricBuffer
from .scaling import step_scaling

logger = logging.getLogger(__name__)


def check_task_methods(trainer: Any, gere_args: Any, methods: list[str]) -> None:
    """Refuse set-ups the task methods cannot serve, before any forward pass (each error names the key)."""
    classes = task_terms(gere_args)
    by_name = {c.name: c for c in classes}
    # the family and dataset checks concern the methods that act on the task loss (WiSE works with any family)
    keys = ", ".join(by_name[m].key for m in methods if m in by_name and m not in ANY_FAMILY_TASK_METHODS)
    family = getattr(trainer, "gere_family", None) or "sft"
    sft_only = [c for c in classes if c.name not in ANY_FAMILY_TASK_METHODS]
    if sft_only and (family != "sft" or getattr(trainer, "gere_combine", "mean") != "mean"):
        raise GeReConfigError(
            f"{keys}: supported by the SFT trainers only (GeReSFTTrainer, Axolotl SFT, with_gere(..., family='sft')); "
            f"this trainer's loss family is {family!r}. Remove the key, or use replay with gere_regularizer for DPO/GRPO."
        )
    args = trainer.args
    owns = [c for c in classes if c.needs_task_logits]
    if owns:
        what = ", ".join(c.key for c in owns)
        if getattr(args, "use_liger_kernel", False):
            raise GeReConfigError(f"{what} compute the task loss from the logits; use_liger_kernel never builds them. Turn one off.")
        if getattr(args, "padding_free", False) or getattr(args, "packing", False):
            raise GeReConfigError(f"{what} need padded batches (one row per sample): set packing=False and padding_free=False.")
        loss_type = getattr(args, "loss_type", None)
        if loss_type not in (None, "nll", "chunked_nll"):
            raise GeReConfigError(f"{what} replace the task loss by a (weighted) CE; loss_type={loss_type!r} would be ignored. Use loss_type='nll'.")
        if getattr(trainer, "compute_loss_func", None) is not None:
            raise GeReConfigError(f"{what} compute the task loss themselves, so the trainer's compute_loss_func would be ignored. Remove one.")
    for cls in classes:
        cls.check(trainer, gere_args)
    if ("flow" in methods or "ewc" in methods) and getattr(trainer, "train_dataset", None) is None:
        raise GeReConfigError(f"{keys}: the trainer needs its train_dataset (FLOW and EWC read the task samples).")


class TaskTerms:
    """The task-side terms of one trainer (see the module docstring), built by the set-up pass.

    Args:
        terms: the built terms (FLOW, EWC, task KL), in the order ``config.task_methods`` names them.
        has_replay: a replay step runs too (it then logs ``gere/task_loss`` itself).
    """

    def __init__(self, terms: list[Term], has_replay: bool) -> None:
        self.terms = terms
        self.methods = [t.name for t in terms]
        self.has_replay = has_replay
        keys = ["gere/task_ce", "gere/flow_weight", "gere/flow_ce", "gere/task_kl", "gere/ewc_penalty"]
        if not has_replay:
            keys.insert(0, "gere/task_loss")
        self.metrics = MetricBuffer(tuple(keys))
        self._step, self._micro = -1, 0

    def term(self, name: str) -> Optional[Term]:
        return next((t for t in self.terms if t.name == name), None)

    # the attributes earlier versions exposed (TaskStep)
    @property
    def flow(self) -> Any:
        t = self.term("flow")
        return None if t is None else t.table  # type: ignore[attr-defined]

    @property
    def flow_action(self) -> str:
        t = self.term("flow")
        return "" if t is None else t.action  # type: ignore[attr-defined]

    @property
    def kl_weight(self) -> float:
        t = self.term("task_kl")
        return 0.0 if t is None else t.weight  # type: ignore[attr-defined]

    @property
    def ref_model(self) -> Optional[torch.nn.Module]:
        t = self.term("task_kl")
        return None if t is None else t.ref_model  # type: ignore[attr-defined]

    @property
    def ewc(self) -> Any:
        return self.term("ewc")

    @property
    def owns_task_loss(self) -> bool:
        """A term needs the task logits: the task loss comes from one forward of its own instead of the parent's."""
        return any(t.needs_task_logits for t in self.terms)

    # -- the task loss --------------------------------------------------------------------------
    @staticmethod
    def denominator(trainer: Any, local_tokens: torch.Tensor, num_items_in_batch: Any) -> Any:
        """What the parent trainer divides its summed token CE by (see the module docstring)."""
        scaling = step_scaling(trainer, num_items_in_batch)
        if num_items_in_batch is not None and not scaling.divides:
            spread = scaling.world_size if getattr(trainer.args, "average_tokens_across_devices", False) else 1
            return torch.as_tensor(num_items_in_batch, device=local_tokens.device, dtype=torch.float32) / max(spread, 1)
        # a micro-batch mean; a Trainer that does not divide by the accumulation steps gets it pre-divided
        return local_tokens.float() * (1 if scaling.divides else scaling.accumulation)

    def task_loss(self, trainer: Any, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool,
                  num_items_in_batch: Any) -> Any:
        """The task loss of one training micro-batch (weighted CE + extra terms), scaled like the parent's."""
        if "labels" not in inputs:
            raise GeReConfigError("gere_flow / gere_task_kl need labels in the training batches (an SFT collator).")
        labels = inputs["labels"]
        fwd = {k: inputs[k] for k in FORWARD_KEYS if k in inputs}
        outputs = model(**fwd, use_cache=False)  # the policy forward first: see GeReTrainerMixin._gere_refreeze
        sums, counts = per_row_ce(outputs.logits, labels)
        tokens = counts.sum()
        batch = TaskBatch(trainer, model, inputs, fwd, outputs.logits, labels, sums, counts)
        weights = torch.ones_like(sums)
        extra: Optional[torch.Tensor] = None
        for term in self.terms:
            if not term.needs_task_logits:
                continue
            part = term.task_loss(batch)
            if part.weights is not None:
                weights = weights * part.weights
            if part.extra is not None:
                extra = part.extra if extra is None else extra + part.extra
            for key, value in part.logs.items():
                self.metrics.add(key, value)
        numerator = (weights * sums).sum()
        task_ce = sums.detach().sum() / tokens.clamp_min(1)
        self.metrics.add("gere/task_ce", task_ce)
        if self.flow is not None:  # the older name of the same value, kept for FLOW runs
            self.metrics.add("gere/flow_ce", task_ce)
        if extra is not None:
            numerator = numerator + extra
        # (a micro-batch without trained tokens gives 0, still connected to every parameter through ``sums``)
        loss = numerator / self.denominator(trainer, tokens, num_items_in_batch).clamp_min(1e-12)
        return (loss, outputs) if return_outputs else loss

    # -- after the replay terms: penalties, bookkeeping -----------------------------------------
    def add_terms(self, trainer: Any, loss: torch.Tensor, task_loss: torch.Tensor, num_items_in_batch: Any) -> torch.Tensor:
        """Add the step penalties (EWC; once per optimizer step in total) and record the micro-batch's metrics.

        ``task_loss`` is the task term as the parent (or :meth:`task_loss`) returned it, for ``gere/task_loss``.
        """
        scaling = step_scaling(trainer, num_items_in_batch)
        if not self.has_replay:
            self.metrics.add("gere/task_loss", task_loss.detach().float() * scaling.task_unscale)
        for term in self.terms:
            penalty = term.step_penalty()
            if penalty is None:
                continue
            share = scaling.extra_factor / (scaling.accumulation * scaling.world_size)
            loss = loss + (share * penalty).to(loss.dtype)
            self.metrics.add(term.metrics[0], penalty)
        step = int(trainer.state.global_step)
        if step != self._step:
            self._step, self._micro = step, 0
        self._micro += 1
        if self._micro >= scaling.accumulation:
            self.metrics.flush(trainer)
            self._micro = 0
        return loss

    def on_train_end(self, trainer: Any, model: torch.nn.Module) -> None:
        """Every term's ``after_task``: first those that move the weights (WiSE-FT's interpolation), then the
        others (EWC: this task's Fisher and anchor, of the weights handed on, written next to the model)."""
        for term in sorted(self.terms, key=lambda t: not t.moves_weights):
            term.after_task(trainer, model)

    def describe(self) -> str:
        """One line part for the train-start announcement."""
        return "; ".join(t.describe() for t in self.terms)

    def state_dict(self) -> dict[str, Any]:
        return {t.name: t.state_dict() for t in self.terms if t.state_dict()}
