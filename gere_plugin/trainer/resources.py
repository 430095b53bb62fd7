"""The ONE set-up pass: every setting checked, then every resource built once, before any training forward.

:meth:`Resources.resolve` runs when a GeRe trainer is built (``GeReTrainerMixin.__init__``, ``enable_gere``,
the Axolotl plugin). Phase 1 checks everything that needs no forward pass (loss family, freeze depth,
hidden-state indices, the task methods, the regularizer name, the tokenizer, per-step counts against ranks
and accumulation, the user's reference model), so that a wrong value fails in seconds. Phase 2 builds, in
this order: the general replay set and its schedule, the earlier-task rows, the base-state cache (TM), the
reference model, the logit heads of the chunked replay CE / KL, the forgetting monitor, the bottom-layer
freeze (after the state build: PEFT's ``disable_adapter()`` re-enables adapter gradients on exit), and the
task-side terms (after the freeze: EWC anchors exactly what trains). The replay step, the terms and the
monitor receive the result; none of them fetches a resource of its own.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from ..cache.folders import state_cache_folder
from ..cache.state_cache import StateCache, build_state_cache, ensure_state_cache
from ..config import (
    GeReConfigError,
    parse_weight,
    resolve_replay_per_step,
    resolve_task_replay_per_step,
    task_methods,
)
from ..data.replay_set import ReplaySet
from ..data.schedule import ReplaySchedule, uneven_micro_batches
from ..methods.base import Term, task_terms, term_class
from ..methods.regularizers import Regularizer, regularizer_class
from ..model.freeze import check_freeze_depth, freeze_bottom, prepare_for_gradient_checkpointing
from ..model.hidden import check_layer_indices
from ..model.introspection import (
    hidden_size_of,
    is_peft,
    is_sharded,
    is_zero3,
    pad_token_id,
    tokenizer_of,
    unwrap,
    world_of,
)
from ..model.reference import Reference, check_ref_model, resolve_reference
from ..ops.logits import LogitHead, chunk_tokens, head_mismatch, replay_logit_head
from .families import LossFamily, family_for, prompts_per_step
from .scaling import forward_collectives
from .task_terms import TaskTerms, check_task_methods

logger = logging.getLogger(__name__)


def resolve_family(trainer: Any, family: Optional[Any] = None) -> LossFamily:
    """The loss family of ``trainer``: ``family``, else its ``gere_family``, else its older ``gere_combine``
    attribute, else derived from its class (:func:`gere_plugin.trainer.families.family_for`, which refuses
    TRL trainers GeRe has no rule for, naming them)."""
    if isinstance(family, LossFamily):
        return family
    family = family if family is not None else getattr(trainer, "gere_family", None)
    combine = None if family is not None else getattr(trainer, "gere_combine", None)
    return family_for(type(trainer), family=family, combine=combine)


@dataclass
class Resources:
    """What one GeRe trainer works with, resolved once (see the module docstring)."""

    args: Any
    family: LossFamily
    model: torch.nn.Module  # unwrapped
    tokenizer: Any
    pad_token_id: int
    world_size: int
    rank: int
    global_batch: int
    general: bool  # the general replay (gere_replay) is on
    per_step: int
    layers: list[int]
    hidden_size: Optional[int]
    autocast_dtype: Optional[torch.dtype]
    methods: list[str] = field(default_factory=list)
    replay: Optional[ReplaySet] = None
    schedule: Optional[ReplaySchedule] = None
    earlier: Optional[Term] = None  # methods.earlier_tasks.EarlierTasks
    states: Optional[StateCache] = None
    cache_dir: Optional[str] = None
    cache_action: str = "not needed"  # TM only: "reused" / "built" / "rebuilt"
    reference: Reference = field(default_factory=lambda: Reference(None, "none"))
    regularizer: Optional[Regularizer] = None
    logit_head: Optional[LogitHead] = None
    base_head: Optional[LogitHead] = None
    logit_chunk: int = 0
    monitor: Any = None
    frozen: list[str] = field(default_factory=list)
    frozen_params: list[torch.nn.Parameter] = field(default_factory=list)
    task: Optional[TaskTerms] = None

    @property
    def replays(self) -> bool:
        """A replay step runs (general replay or earlier tasks)."""
        return self.general or self.earlier is not None

    # -- phase 1: checks ---------------------------------------------------------------------------
    @classmethod
    def resolve(cls, trainer: Any, gere_args: Any, ref_model: Optional[torch.nn.Module] = None,
                family: Optional[Any] = None) -> Resources:
        """Check every setting, then build every resource (see the module docstring)."""
        if not hasattr(gere_args, "gere_replay"):
            raise GeReConfigError(
                "GeRe settings missing: use GeReSFTConfig/GeReDPOConfig/GeReGRPOConfig or pass gere_args=GeReArguments(...)."
            )
        loss_family = resolve_family(trainer, family)
        trainer.gere_family, trainer.gere_combine = loss_family.name, loss_family.combine
        model = unwrap(trainer, trainer.model)
        check_freeze_depth(model, gere_args.gere_freeze_layers)
        general = gere_args.gere_replay is not None
        if general:
            check_layer_indices(model, gere_args.gere_layers)
        methods = task_methods(gere_args)
        if methods:  # the FLOW / EWC / task-KL checks need no forward pass: before the state build
            check_task_methods(trainer, gere_args, methods)
        earlier_on = bool(getattr(gere_args, "gere_task_replay", None))
        replays = general or earlier_on
        reg_cls = regularizer_class(gere_args.gere_regularizer if general else "none")
        tok = tokenizer_of(getattr(trainer, "processing_class", None))
        if replays and tok is None:
            raise GeReConfigError("GeRe needs the tokenizer: pass processing_class=tokenizer to the trainer.")
        targs = trainer.args
        world, rank = world_of(trainer)
        accumulation = targs.gradient_accumulation_steps
        global_batch = targs.per_device_train_batch_size * accumulation * world
        per_step = 0
        if general:
            basis = None  # the default counts the parent's batch unit: GRPO's batch counts completions, not prompts
            if loss_family.batch_unit == "prompts" and gere_args.gere_replay_per_step is None:
                basis = prompts_per_step(trainer, global_batch)
            per_step = resolve_replay_per_step(gere_args.gere_replay_per_step, global_batch, default_basis=basis)
        task_per_step = (resolve_task_replay_per_step(gere_args.gere_task_replay_per_step, global_batch)
                         if earlier_on else 0)
        talks = forward_collectives(trainer, world)
        for key, count in (("gere_replay_per_step", per_step), ("gere_task_replay_per_step", task_per_step)):
            if talks and uneven_micro_batches(count, world, accumulation):
                # A micro-batch without replay rows skips the extra forward; when forwards talk to the other
                # ranks, every rank must run the same forwards in every micro-batch or training hangs.
                raise GeReConfigError(
                    f"{key}={count} would give replay rows to some ranks but not others in one micro-batch "
                    f"({world} processes x {accumulation} accumulation steps), and {talks}: training would hang. "
                    f"Use a multiple of the number of processes ({world}) or at least processes x "
                    f"gradient_accumulation_steps ({world * accumulation}), or DDP / DeepSpeed ZeRO-1/2."
                )
        given = None
        if ref_model is not None:  # the user's gere_ref_model (a DPO reference needs no check)
            used_by = "kl" if "task_kl" in methods or not replays else gere_args.gere_regularizer
            given = check_ref_model(ref_model, model, used_by)
        res = cls(
            args=gere_args, family=loss_family, model=model, tokenizer=tok,
            pad_token_id=pad_token_id(tok) if tok is not None else 0, world_size=world, rank=rank,
            global_batch=global_batch, general=general, per_step=per_step, layers=list(gere_args.gere_layers),
            hidden_size=hidden_size_of(model),
            autocast_dtype=torch.bfloat16 if getattr(targs, "bf16", False) else (
                torch.float16 if getattr(targs, "fp16", False) else None),
            methods=methods,
        )
        res._build(trainer, reg_cls, earlier_on, given)
        return res

    # -- phase 2: builds ---------------------------------------------------------------------------
    def _build(self, trainer: Any, reg_cls: type[Regularizer], earlier_on: bool, given: Optional[torch.nn.Module]) -> None:
        args, model = self.args, self.model
        if earlier_on:
            self.earlier = term_class("task_replay").build(self, trainer)
        if self.general:
            self.replay = ReplaySet.from_args(args, self.tokenizer)
            self.schedule = ReplaySchedule(len(self.replay), self.per_step, args.gere_seed)
        if reg_cls.needs_states:
            self.states = self._state_cache(trainer)
        classes = task_terms(args) if self.methods else []
        needed = reg_cls.needs_reference or any(c.needs_reference for c in classes)
        trainer_ref = getattr(trainer, "ref_model", None) if self.replays else None
        self.reference = resolve_reference(model, given, trainer_ref, needed)
        if self.replays:
            self._logit_heads(trainer, reg_cls)
            self.regularizer = reg_cls(self)
        if getattr(args, "gere_monitor", None) is not None:
            self.monitor = self._monitor(trainer)
        self._freeze(trainer)
        if classes:  # after the freeze: EWC anchors exactly the parameters that train
            self.task = TaskTerms([c.build(self, trainer) for c in classes], has_replay=self.replays)
        if self.replay is not None:
            logger.info(
                "gere: %d replay samples (%d tokens), %d rows per optimizer step, regularizer=%s, weight=%s",
                len(self.replay), self.replay.num_tokens, self.per_step, reg_cls.name, args.gere_weight,
            )
        if self.earlier is not None:
            logger.info("gere: %s", self.earlier.describe())

    def _state_cache(self, trainer: Any) -> StateCache:
        """Reuse or build the base-state cache (its folder's one owner decides; the main process writes)."""
        args, model = self.args, self.model
        folder = str(state_cache_folder(args.gere_state_cache, trainer.args.output_dir))
        self.cache_dir = folder
        sigma = float(args.gere_sigma)
        autocast = self.autocast_dtype if next(model.parameters()).dtype == torch.float32 else None

        def build() -> StateCache:
            base_ctx = model.disable_adapter() if is_peft(model) else contextlib.nullcontext()
            with base_ctx:
                return build_state_cache(
                    model, self.replay, self.layers, sigma, batch_size=args.gere_state_batch_size,
                    pad_token_id=self.pad_token_id, autocast_dtype=autocast,
                    progress=trainer.args.disable_tqdm is not True and trainer.is_world_process_zero(),
                )

        ctx = (trainer.args.main_process_first(desc="gere state cache") if hasattr(trainer.args, "main_process_first")
               else contextlib.nullcontext())
        with ctx:
            plan = ensure_state_cache(folder, self.replay, self.hidden_size, self.layers, sigma, build,
                                      save=trainer.is_world_process_zero())
        self.cache_action = {"reuse": "reused", "build": "built", "rebuild": "rebuilt"}[plan.action]
        assert plan.cache is not None
        return plan.cache

    def _logit_heads(self, trainer: Any, reg_cls: type[Regularizer]) -> None:
        """Replay CE (and KL) from hidden states, a chunk of tokens at a time (ops/logits.py); ``None`` = full
        logits. The same head serves the earlier-task rows' CE."""
        sample: Sequence[int]
        if self.replay is not None and len(self.replay):
            sample = self.replay.input_ids[0]
        else:
            rows = self.earlier.replay.rows if self.earlier is not None else None  # type: ignore[attr-defined]
            sample = rows.input_ids[0] if rows is not None and len(rows) else []
        self.logit_head = replay_logit_head(self.model, sample, verify=not is_zero3(trainer))
        if self.logit_head is not None and reg_cls.name == "kl":
            self.base_head = self._kl_base_head(sample)
            if self.base_head is None:
                self.logit_head = None
        self.logit_chunk = chunk_tokens(self.logit_head.vocab_size) if self.logit_head is not None else 0

    def _kl_base_head(self, sample: Sequence[int]) -> Optional[LogitHead]:
        """The KL reference's logit head (checked like the model's), or None for full-logit KL."""
        if self.reference.module is not None:
            return replay_logit_head(self.reference.module, sample)
        assert self.logit_head is not None
        with self.model.disable_adapter():  # PEFT: the base is the model with adapters bypassed
            reason = head_mismatch(self.model, self.logit_head.without_adapters(), torch.tensor([list(sample)[:16]]))
        if reason:
            logger.warning("gere: kl uses full-vocabulary logits: the adapter-free head does not match (%s).", reason)
            return None
        return self.logit_head.without_adapters()

    def _monitor(self, trainer: Any) -> Any:
        from ..monitor import ForgettingMonitor

        return ForgettingMonitor(
            trainer, self.args, tokenizer_of(getattr(trainer, "processing_class", None)),
            replay_texts=self.replay.texts if self.replay is not None else None,
            replay_source=self.replay.source if self.replay is not None else "",
            states=self.states,
            sharded=is_sharded(trainer),
        )

    def _freeze(self, trainer: Any) -> None:
        args = self.args
        if args.gere_freeze_layers or args.gere_freeze_embeddings:
            self.frozen = freeze_bottom(self.model, args.gere_freeze_layers, args.gere_freeze_embeddings)
            params = dict(self.model.named_parameters())
            self.frozen_params = [params[n] for n in self.frozen if n in params]
            prepare_for_gradient_checkpointing(self.model, trainer.args)

    # -- shared with the step --------------------------------------------------------------------
    @property
    def fixed_weight(self) -> Optional[float]:
        return parse_weight(self.args.gere_weight)

    @property
    def grad_diagnostics(self) -> bool:
        """Diagnostic mode (``GERE_GRAD_DIAGNOSTICS``; two extra backward passes per replay micro-batch)."""
        return bool(os.environ.get("GERE_GRAD_DIAGNOSTICS"))
