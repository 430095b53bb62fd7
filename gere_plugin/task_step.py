"""The anti-forgetting terms that act on the task rows and need no replay: FLOW, KL to the base, EWC.

:class:`TaskStep` is built by :func:`gere_plugin.trainer.setup_gere` when ``gere_flow``,
``gere_task_kl > 0`` or ``gere_ewc_lambda > 0`` is set, and called from
:meth:`GeReTrainerMixin.compute_loss <gere_plugin.trainer.GeReTrainerMixin.compute_loss>` on every
training micro-batch:

* with FLOW or the task KL it computes the task loss itself, from one forward of the task rows
  (:meth:`TaskStep.task_loss`): ``L = sum_{i,t} (w_i * ce_{i,t} + beta * kl_{i,t}) / N``, with ``w_i``
  FLOW's sample weight (1 without FLOW), ``kl_{i,t} = KL(p_base || p_model)`` at the same trained
  positions, ``beta = gere_task_kl`` and ``N`` the denominator the parent trainer uses for its token
  mean (``num_items_in_batch`` over ranks when it averages over it, else the micro-batch's trained
  tokens). With ``w = 1`` and ``beta = 0`` this equals TRL's SFT loss exactly (tested), so the
  replay terms, gradient accumulation and data parallelism see the same scaling as before;
* with EWC it adds the penalty once per optimizer step (:meth:`TaskStep.add_terms`), after the
  replay terms so GeRe's dynamic weight still balances against the task loss alone.

It logs ``gere/task_ce`` (the task rows' token-mean CE, without FLOW's weights or the KL: whenever FLOW
or the task KL computes the task loss), ``gere/flow_weight`` (mean weight of the step's rows) and
``gere/flow_ce`` (the same value as ``gere/task_ce``, its older name, only with FLOW), ``gere/task_kl``
(token mean of the KL), ``gere/ewc_penalty`` and, when no replay runs, ``gere/task_loss``: averaged over
the step's micro-batches on all ranks with one all-reduce.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any, Optional

import torch

from .config import GeReConfigError, task_methods
from .ewc import EWCTerm
from .flow import FORWARD_KEYS, FlowTable, batch_digests, prepare_flow
from .losses import per_row_ce, per_row_kl

logger = logging.getLogger(__name__)

SWITCH = {"flow": "gere_flow", "ewc": "gere_ewc_lambda", "task_kl": "gere_task_kl"}


class MetricBuffer:
    """``gere/*`` values of one optimizer step, kept on the device until its last micro-batch, then
    averaged over micro-batches and ranks in one all-reduce and appended to the trainer's ``_metrics``."""

    def __init__(self, keys: tuple[str, ...]) -> None:
        self.keys = keys
        self.pending: dict[str, list[torch.Tensor]] = defaultdict(list)

    def add(self, key: str, value: torch.Tensor) -> None:
        self.pending[key].append(value.detach().float().reshape(()))

    def flush(self, trainer: Any) -> None:
        acc = getattr(trainer, "accelerator", None)
        multi = acc is not None and acc.num_processes > 1
        device = acc.device if multi else next((v[0].device for v in self.pending.values() if v), torch.device("cpu"))
        zero = torch.zeros((), dtype=torch.float32, device=device)
        local = []
        for key in self.keys:
            vals = self.pending.get(key, [])
            local += [torch.stack(vals).to(device).sum() if vals else zero, zero + len(vals)]
        self.pending.clear()
        totals = torch.stack(local)
        if multi:
            totals = acc.reduce(totals, reduction="sum")
        totals = totals.cpu()
        store = getattr(trainer, "_metrics", None)
        if store is None:
            return
        for i, key in enumerate(self.keys):
            if totals[2 * i + 1] > 0:
                store["train"][key].append(float(totals[2 * i] / totals[2 * i + 1]))


def check_task_methods(trainer: Any, gere_args: Any, methods: list[str]) -> None:
    """Refuse set-ups the task methods cannot serve, before any forward pass (each error names the key)."""
    keys = ", ".join(SWITCH[m] for m in methods)
    family = getattr(trainer, "gere_family", None) or "sft"
    if family != "sft" or getattr(trainer, "gere_combine", "mean") != "mean":
        raise GeReConfigError(
            f"{keys}: supported by the SFT trainers only (GeReSFTTrainer, Axolotl SFT, with_gere(..., family='sft')); "
            f"this trainer's loss family is {family!r}. Remove the key, or use replay with gere_regularizer for DPO/GRPO."
        )
    args = trainer.args
    owns = [m for m in methods if m in ("flow", "task_kl")]
    if owns:
        what = ", ".join(SWITCH[m] for m in owns)
        if getattr(args, "use_liger_kernel", False):
            raise GeReConfigError(f"{what} compute the task loss from the logits; use_liger_kernel never builds them. Turn one off.")
        if getattr(args, "padding_free", False) or getattr(args, "packing", False):
            raise GeReConfigError(f"{what} need padded batches (one row per sample): set packing=False and padding_free=False.")
        loss_type = getattr(args, "loss_type", None)
        if loss_type not in (None, "nll", "chunked_nll"):
            raise GeReConfigError(f"{what} replace the task loss by a (weighted) CE; loss_type={loss_type!r} would be ignored. Use loss_type='nll'.")
        if getattr(trainer, "compute_loss_func", None) is not None:
            raise GeReConfigError(f"{what} compute the task loss themselves, so the trainer's compute_loss_func would be ignored. Remove one.")
    if "ewc" in methods:
        from .trainer import _is_sharded

        if _is_sharded(trainer):
            raise GeReConfigError("gere_ewc_lambda: EWC reads whole parameters by name, which FSDP / DeepSpeed ZeRO-3 shard. Use DDP or ZeRO-2.")
    if ("flow" in methods or "ewc" in methods) and getattr(trainer, "train_dataset", None) is None:
        raise GeReConfigError(f"{keys}: the trainer needs its train_dataset (FLOW and EWC read the task samples).")


class TaskStep:
    """FLOW, KL to the base on task rows and EWC for one trainer (see the module docstring).

    Args:
        trainer: the trainer it serves (built, optimizer not created yet).
        gere_args: object with the ``gere_*`` keys.
        ref_model: the frozen model the task KL compares against (``gere_ref_model``); ``None`` = the
            replay step's reference if it keeps one, else the adapter-disabled model (PEFT) or a frozen copy.
        replay_step: the trainer's :class:`~gere_plugin.trainer.ReplayStep`, or ``None``.
    """

    def __init__(self, trainer: Any, gere_args: Any, ref_model: Optional[torch.nn.Module] = None, replay_step: Any = None) -> None:
        from .trainer import _unwrap

        self.methods = task_methods(gere_args)
        check_task_methods(trainer, gere_args, self.methods)
        model = _unwrap(trainer, trainer.model)
        self.has_replay = replay_step is not None
        self.flow: Optional[FlowTable] = None
        self.flow_action = ""
        if "flow" in self.methods:
            self.flow, self.flow_action = prepare_flow(trainer, gere_args, model)
        self.kl_weight = float(gere_args.gere_task_kl) if "task_kl" in self.methods else 0.0
        self.ref_model: Optional[torch.nn.Module] = None
        self.ref_source = ""
        if self.kl_weight:
            from .trainer import _is_peft, frozen_copy

            shared = getattr(replay_step, "ref_model", None) or getattr(replay_step, "_own_ref", None)
            if ref_model is not None:
                self.ref_model, self.ref_source = ref_model, "gere_ref_model"
            elif shared is not None:
                self.ref_model, self.ref_source = shared, "the replay regularizer's reference"
            elif _is_peft(model):
                self.ref_source = "the adapter-disabled model"
            else:
                self.ref_model, self.ref_source = frozen_copy(model), "a frozen copy of the model at trainer init"
        self.ewc: Optional[EWCTerm] = EWCTerm(model, gere_args) if "ewc" in self.methods else None
        keys = ["gere/task_ce", "gere/flow_weight", "gere/flow_ce", "gere/task_kl", "gere/ewc_penalty"]
        if not self.has_replay:
            keys.insert(0, "gere/task_loss")
        self.metrics = MetricBuffer(tuple(keys))
        self._step, self._micro = -1, 0

    @property
    def owns_task_loss(self) -> bool:
        """FLOW or the task KL compute the task loss (one forward of their own instead of the parent's)."""
        return self.flow is not None or self.kl_weight > 0

    # -- the task loss --------------------------------------------------------------------------
    def _scaling(self, trainer: Any, num_items_in_batch: Any) -> Any:
        from .trainer import StepScaling, trainer_divides_by_accumulation

        acc = int(getattr(trainer, "current_gradient_accumulation_steps", 0) or trainer.args.gradient_accumulation_steps)
        world = trainer.accelerator.num_processes if getattr(trainer, "accelerator", None) else 1
        return StepScaling(acc, world, trainer_divides_by_accumulation(trainer, num_items_in_batch))

    def denominator(self, trainer: Any, local_tokens: torch.Tensor, num_items_in_batch: Any) -> Any:
        """What the parent trainer divides its summed token CE by (see the module docstring)."""
        scaling = self._scaling(trainer, num_items_in_batch)
        if num_items_in_batch is not None and not scaling.divides:
            spread = scaling.world_size if getattr(trainer.args, "average_tokens_across_devices", False) else 1
            return torch.as_tensor(num_items_in_batch, device=local_tokens.device, dtype=torch.float32) / max(spread, 1)
        # a micro-batch mean; a Trainer that does not divide by the accumulation steps gets it pre-divided
        return local_tokens.float() * (1 if scaling.divides else scaling.accumulation)

    def _base_logits(self, trainer: Any, model: torch.nn.Module, fwd: dict[str, torch.Tensor]) -> torch.Tensor:
        from .trainer import _unwrap

        with torch.no_grad():
            if self.ref_model is not None:
                return self.ref_model(**fwd, use_cache=False).logits
            unwrapped = _unwrap(trainer, model)
            with unwrapped.disable_adapter():
                return unwrapped(**fwd, use_cache=False).logits

    def task_loss(self, trainer: Any, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool,
                  num_items_in_batch: Any) -> Any:
        """The task loss of one training micro-batch (FLOW-weighted CE + task KL), scaled like the parent's."""
        if "labels" not in inputs:
            raise GeReConfigError("gere_flow / gere_task_kl need labels in the training batches (an SFT collator).")
        labels = inputs["labels"]
        fwd = {k: inputs[k] for k in FORWARD_KEYS if k in inputs}
        outputs = model(**fwd, use_cache=False)  # the policy forward first: see GeReTrainerMixin._gere_refreeze
        logits = outputs.logits
        sums, counts = per_row_ce(logits, labels)
        tokens = counts.sum()
        if self.flow is not None:
            weights = self.flow.lookup(batch_digests(inputs)).to(sums.device)
            has_target = counts > 0
            self.metrics.add("gere/flow_weight", (weights * has_target).sum() / has_target.sum().clamp_min(1))
        else:
            weights = torch.ones_like(sums)
        numerator = (weights * sums).sum()
        task_ce = sums.detach().sum() / tokens.clamp_min(1)
        self.metrics.add("gere/task_ce", task_ce)
        if self.flow is not None:  # the older name of the same value, kept for FLOW runs
            self.metrics.add("gere/flow_ce", task_ce)
        if self.kl_weight:
            kl = per_row_kl(logits, self._base_logits(trainer, model, fwd), labels).sum()
            numerator = numerator + self.kl_weight * kl
            self.metrics.add("gere/task_kl", kl.detach() / tokens.clamp_min(1))
        # (a micro-batch without trained tokens gives 0, still connected to every parameter through ``sums``)
        loss = numerator / self.denominator(trainer, tokens, num_items_in_batch).clamp_min(1e-12)
        return (loss, outputs) if return_outputs else loss

    # -- after the replay terms: EWC, bookkeeping ------------------------------------------------
    def add_terms(self, trainer: Any, loss: torch.Tensor, task_loss: torch.Tensor, num_items_in_batch: Any) -> torch.Tensor:
        """Add the EWC penalty (once per optimizer step in total) and record the micro-batch's metrics.

        ``task_loss`` is the task term as the parent (or :meth:`task_loss`) returned it, for ``gere/task_loss``.
        """
        scaling = self._scaling(trainer, num_items_in_batch)
        if not self.has_replay:
            self.metrics.add("gere/task_loss", task_loss.detach().float() * scaling.task_unscale)
        if self.ewc is not None and self.ewc.active:
            penalty = self.ewc.penalty()
            share = scaling.extra_factor / (scaling.accumulation * scaling.world_size)
            loss = loss + (share * penalty).to(loss.dtype)
            self.metrics.add("gere/ewc_penalty", penalty)
        step = int(trainer.state.global_step)
        if step != self._step:
            self._step, self._micro = step, 0
        self._micro += 1
        if self._micro >= scaling.accumulation:
            self.metrics.flush(trainer)
            self._micro = 0
        return loss

    def on_train_end(self, trainer: Any) -> None:
        """EWC: estimate this task's Fisher and write the state next to the model."""
        if self.ewc is not None:
            from .trainer import _unwrap

            self.ewc.finish(trainer, _unwrap(trainer, trainer.model))

    def describe(self) -> str:
        """One line part for the train-start announcement."""
        parts = []
        if self.flow is not None:
            s = self.flow.summary()
            parts.append(
                f"FLOW weights exp(-base_loss/{s['tau']:.4g}) over {len(self.flow.losses)} samples (base losses "
                f"{self.flow_action}; weight min/median/max {s['weight_min']:.3g}/{s['weight_median']:.3g}/"
                f"{s['weight_max']:.3g}, mean {s['weight_mean']:.3g}, effective samples "
                f"{100 * s['effective_sample_fraction']:.0f}%)"
            )
        if self.kl_weight:
            parts.append(f"task KL(base || model) weight {self.kl_weight:g} against {self.ref_source}")
        if self.ewc is not None:
            parts.append(self.ewc.describe())
        return "; ".join(parts)
