"""GeRe wired into any ``transformers.Trainer``: :class:`GeReTrainerMixin`, :func:`with_gere`,
:func:`enable_gere` and :func:`setup_gere` (thin wiring over :class:`~gere_plugin.trainer.resources.Resources`,
:class:`~gere_plugin.trainer.step.ReplayStep` and :class:`~gere_plugin.trainer.task_terms.TaskTerms`)."""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any, Optional

import torch

from ..config import GeReArguments
from ..model.introspection import unwrap
from .announce import announce, describe_gere
from .checkpoint import GeReCheckpointCallback, check_resume
from .families import family_for
from .resources import Resources
from .resume import resolve_resume_checkpoint
from .step import ReplayStep

logger = logging.getLogger("gere_plugin.trainer")


class GeReTrainerMixin:
    """Adds GeRe to a ``transformers.Trainer`` subclass (put it first in the bases).

    The trainer's own ``compute_loss`` computes the task loss; the mixin adds the replay rows of
    this micro-batch. ``gere_args`` defaults to ``self.args`` (the GeRe configs carry the keys);
    pass a :class:`~gere_plugin.GeReArguments` to use it with any other ``TrainingArguments``.
    With ``gere_replay=None`` the trainer behaves exactly like its parent.

    ``gere_ref_model`` is the frozen model that l1/l2/kl compare against. Without it that is the
    model as it is when the trainer is built (DPO: TRL's reference), which on the second task of a
    sequence is the first task's result; pass the original base model to keep every task anchored
    to it. TM does not read it: its anchor is the base-state cache (``gere_state_cache``).

    ``gere_family`` (class attribute: ``sft`` / ``dpo`` / ``grpo``, see :mod:`gere_plugin.trainer.families`)
    says how the parent's loss combines with replay; unset, it is derived from the parent class, and a TRL
    trainer GeRe has no rule for is refused when the trainer is built.
    """

    gere_family: Optional[str] = None

    def __init__(
        self,
        *args: Any,
        gere_args: Optional[GeReArguments] = None,
        gere_ref_model: Optional[torch.nn.Module] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        setup_gere(self, gere_args, ref_model=gere_ref_model)

    def _gere_refreeze(self) -> None:
        # PEFT's disable_adapter() (TRL's DPO reference, our l1/l2/kl base) sets requires_grad=True on
        # adapter weights when it exits; keep frozen layers out of every forward graph.
        for p in getattr(self, "_gere_frozen_params", ()):
            if p.requires_grad:
                p.requires_grad_(False)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        step: Optional[ReplayStep] = getattr(self, "gere_step", None)
        active = step is not None and model.training
        self._gere_refreeze()
        # The replay rows' forward runs first, so that their backward runs last (ReplayStep.replay_forward).
        replay = step.replay_forward(self, model, num_items_in_batch) if active else None
        self._gere_refreeze()
        task = getattr(self, "gere_task", None)  # FLOW / task KL / EWC (task_terms.py)
        if task is not None and task.owns_task_loss and model.training:
            out = task.task_loss(self, model, inputs, return_outputs, num_items_in_batch)
        else:
            out = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        self._gere_refreeze()
        if (step is None and task is None) or not model.training:
            return out
        loss, outputs = out if return_outputs else (out, None)
        task_term = loss
        if active:
            loss = step(self, model, loss, num_items_in_batch, replay=replay)
            self._gere_refreeze()
        if task is not None:
            loss = task.add_terms(self, loss, task_term, num_items_in_batch)
        return (loss, outputs) if return_outputs else loss

    def train(self, resume_from_checkpoint=None, *args: Any, **kwargs: Any):
        # Every form of resume is checked: a path, True (the newest checkpoint of output_dir), and
        # Axolotl's resume_from_checkpoint / auto_resume_from_checkpoints (it passes the path here).
        step: Optional[ReplayStep] = getattr(self, "gere_step", None)
        checkpoint = resolve_resume_checkpoint(self.args.output_dir, resume_from_checkpoint)
        if step is not None and checkpoint is not None:
            check_resume(step, checkpoint)
        monitor = getattr(self, "gere_monitor", None)
        if monitor is not None:
            monitor.resume_checkpoint = checkpoint  # its base snapshot travels with the checkpoint
        if hasattr(self, "gere_frozen") and self.is_world_process_zero():
            announce(describe_gere(self, checkpoint))
        out = super().train(resume_from_checkpoint, *args, **kwargs)
        task = getattr(self, "gere_task", None)
        if task is not None:
            task.on_train_end(self, unwrap(self, self.model))  # EWC: this task's Fisher, written next to the model
        return out

    def log(self, logs: dict, *args: Any, **kwargs: Any) -> None:
        own = getattr(self, "_gere_own_metrics", False)
        if own and self.model.training:
            for k, v in self._metrics["train"].items():
                if v:
                    logs[k] = sum(v) / len(v)
            self._metrics["train"].clear()
        super().log(logs, *args, **kwargs)


def setup_gere(
    trainer: Any, gere_args: Optional[Any] = None, ref_model: Optional[torch.nn.Module] = None, family: Optional[str] = None
) -> Optional[ReplayStep]:
    """Attach GeRe to a built trainer: the set-up pass (:meth:`Resources.resolve`: checks, replay set, state
    cache, reference, monitor, freeze, task terms), then the replay step and callbacks.

    Must run before training starts (the optimizer must not exist yet for the freeze to matter).
    ``family``: the loss family (default: :func:`~gere_plugin.trainer.resources.resolve_family`).
    """
    gere_args = gere_args if gere_args is not None else trainer.args
    trainer.gere_args = gere_args
    if getattr(trainer, "_metrics", None) is None:
        trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        trainer._gere_own_metrics = True
    res = Resources.resolve(trainer, gere_args, ref_model=ref_model, family=family)
    trainer.gere_resources = res
    step: Optional[ReplayStep] = None
    if res.replays:
        step = ReplayStep(res)
        trainer.add_callback(GeReCheckpointCallback(step))
    elif getattr(gere_args, "gere_monitor", None) is not None and not res.methods:
        logger.info("gere: gere_replay is not set: no replay; the forgetting monitor (gere_monitor) watches the run.")
    elif not res.methods:
        logger.warning("gere: gere_replay is not set; training WITHOUT replay (plain parent trainer behaviour).")
    trainer.gere_step = step
    trainer.gere_monitor = res.monitor
    if res.monitor is not None:
        trainer.add_callback(res.monitor)
    trainer.gere_frozen = res.frozen
    trainer._gere_frozen_params = res.frozen_params
    trainer.gere_task = res.task
    return step


_GERE_CLASSES: dict[tuple[type, str], type] = {}


def with_gere(trainer_cls: type, combine: Optional[str] = None, family: Optional[str] = None) -> type:
    """A subclass of ``trainer_cls`` with GeRe (cached per class and family).

    The loss family (how the parent's loss combines with replay, which dynamic weight applies) comes
    from ``trainer_cls``: TRL's ``SFTTrainer`` / ``DPOTrainer`` / ``GRPOTrainer`` and their subclasses get
    their own, any other ``transformers.Trainer`` is treated as a language-model CE trainer (``sft``),
    and every other TRL trainer (KTO, ORPO, online DPO, RLOO, ...) is refused with a
    :class:`GeReConfigError` naming it. ``family`` (``sft`` / ``dpo`` / ``grpo``) states it explicitly;
    ``combine`` is the older spelling (``mean`` = ``sft``, ``sum`` = ``dpo``).
    """
    if issubclass(trainer_cls, GeReTrainerMixin):
        return trainer_cls
    chosen = family_for(trainer_cls, family=family, combine=combine)
    key = (trainer_cls, chosen.name)
    if key not in _GERE_CLASSES:
        _GERE_CLASSES[key] = type(
            f"GeRe{trainer_cls.__name__}", (GeReTrainerMixin, trainer_cls), {"gere_family": chosen.name}
        )
    return _GERE_CLASSES[key]


def enable_gere(
    trainer: Any,
    gere_args: Any,
    combine: Optional[str] = None,
    ref_model: Optional[torch.nn.Module] = None,
    family: Optional[str] = None,
) -> Optional[ReplayStep]:
    """Turn an already built trainer into a GeRe trainer in place (class swap + :func:`setup_gere`).

    ``ref_model``: the l1/l2/kl reference (see :class:`GeReTrainerMixin`, ``gere_ref_model``).
    ``family`` / ``combine``: as for :func:`with_gere` (an unknown TRL trainer is refused, naming it).
    """
    if not isinstance(trainer, GeReTrainerMixin):
        trainer.__class__ = with_gere(type(trainer), combine=combine, family=family)
    elif family is not None or combine is not None:
        trainer.gere_family = family_for(type(trainer), family=family, combine=combine).name
    return setup_gere(trainer, gere_args, ref_model=ref_model)
