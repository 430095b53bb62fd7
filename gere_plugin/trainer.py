"""GeRe for TRL: the shared replay step and the thin SFT / DPO / GRPO trainers built on it.

:class:`ReplayStep` is the ONE implementation of GeRe's per-step work (pick the replay rows of this
micro-batch, one extra forward with hidden states, replay CE + regularizer, combine with the task
loss with the right scaling for gradient accumulation and data parallelism, log ``gere/*``
metrics). :class:`GeReTrainerMixin` wires it into any ``transformers.Trainer`` whose
``compute_loss`` returns the task loss; :func:`with_gere` makes such a class on the fly.

Loss per optimizer step (``k`` replay rows spread over its micro-batches and ranks), by the loss
family of the trainer (:mod:`gere_plugin.families`)::

    SFT:  loss = mean(CE_task, CE_replay) + w * R,  w = mean(CE_task, CE_replay) / (R + 1e-8)
    DPO:  loss = L_dpo + CE_replay + w * R,         w = L_dpo / (R + 1e-8)
    GRPO: loss = L_grpo + CE_replay + w * R,        w = CE_replay / (R + 1e-8)   (never negative)

(``R`` = tm | l1 | l2 | kl, or 0 for none; weights detached; a fixed ``gere_weight`` replaces ``w``.)

``CE_replay`` is the token mean over all replay tokens of the step and ``R`` the row-weighted mean
of the per-micro-batch regularizers, so the result does not depend on how rows are split over
micro-batches or ranks. The replay forward returns hidden states only; ``CE_replay`` and ``kl`` apply
the model's logit head to them a chunk of tokens at a time (:mod:`gere_plugin.logits`), so the replay
rows never hold full-vocabulary logits.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import sys
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from transformers import TrainerCallback

from .config import GeReArguments, GeReConfigError, parse_weight, resolve_replay_per_step
from .families import COMBINE_FAMILIES, FAMILIES, LossFamily, family_for, prompts_per_step
from .freeze import check_freeze_depth, freeze_bottom, prepare_for_gradient_checkpointing
from .logits import (
    LogitHead,
    chunk_tokens,
    chunked_kl,
    chunked_token_ce,
    head_mismatch,
    kl_chunk_tokens,
    num_chunks,
    replay_logit_head,
)
from .losses import kl_loss, masked_feature_loss, replay_ce_weight, resolve_weight, tm_loss, token_ce
from .mixing import ReplaySchedule, uneven_micro_batches
from .replay import ReplaySet
from .resume import resolve_resume_checkpoint
from .states import (
    StateCache,
    build_state_cache,
    check_layer_indices,
    ensure_state_cache,
    forward_hidden,
    hidden_size_of,
    state_cache_folder,
)
from .task_replay import TaskReplay, Tokenization

logger = logging.getLogger(__name__)

GERE_STATE_FILE = "gere_state.json"


def _unwrap(trainer: Any, model: torch.nn.Module) -> torch.nn.Module:
    acc = getattr(trainer, "accelerator", None)
    if acc is not None:
        with contextlib.suppress(Exception):
            return acc.unwrap_model(model)
    return model


def _is_peft(model: torch.nn.Module) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def _zero_stage(trainer: Any) -> Optional[int]:
    """DeepSpeed's ZeRO stage through accelerate, or None without DeepSpeed."""
    plugin = getattr(getattr(getattr(trainer, "accelerator", None), "state", None), "deepspeed_plugin", None)
    return None if plugin is None else getattr(plugin, "zero_stage", None)


def _is_zero3(trainer: Any) -> bool:
    return _zero_stage(trainer) == 3


def _is_sharded(trainer: Any) -> bool:
    """Parameters are sharded across ranks (FSDP or DeepSpeed ZeRO-3)."""
    return bool(getattr(trainer, "is_fsdp_enabled", False)) or _is_zero3(trainer)


def forward_collectives(trainer: Any, world_size: int) -> Optional[str]:
    """Why a replay forward talks to the other ranks (None when it does not).

    Then every rank must run the replay forward in the same micro-batches, or the ranks' collectives
    no longer pair up and training hangs. Under FSDP and ZeRO-3 the forward all-gathers parameters.
    Under DDP (and ZeRO-1/2) the replay forwards run through the unwrapped model
    (:meth:`ReplayStep.forward_module`), which has no collective: DDP's wrapped forward broadcasts the
    model's buffers (the rotary ``inv_freq``), and a replay forward through it on some ranks only hung
    (measured: 2 CPU processes, one replay row per step).
    """
    if world_size > 1 and _is_sharded(trainer):
        return "DeepSpeed ZeRO-3 / FSDP all-gather the parameters in every forward"
    return None


def _autocast(trainer: Any) -> contextlib.AbstractContextManager:
    """The mixed-precision autocast accelerate wraps the model's forward in (a no-op without one)."""
    acc = getattr(trainer, "accelerator", None)
    return acc.autocast() if acc is not None and hasattr(acc, "autocast") else contextlib.nullcontext()


def _tokenizer_of(processing_class: Any) -> Any:
    return getattr(processing_class, "tokenizer", None) or processing_class


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


@dataclass
class ReplayForward:
    """A micro-batch's replay rows and their (not yet combined) terms: :meth:`ReplayStep.replay_forward`."""

    step: int
    micro: int
    rows: list[int]
    scaling: StepScaling
    ce: Optional[torch.Tensor] = None  # token-mean replay CE of these rows
    earlier: Optional[torch.Tensor] = None  # this micro-batch's scaled earlier-task CE term (gere_task_replay)
    reg: Optional[torch.Tensor] = None
    out_of_state: Optional[torch.Tensor] = None


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen, independent copy of a ``PreTrainedModel`` (re-instantiated from its config).

    ``copy.deepcopy`` is not used: on transformers 5 the copy keeps output-recording hooks bound to
    the original modules, so its ``hidden_states`` silently come from the model being trained.
    """
    param = next(model.parameters())
    if hasattr(model, "config") and hasattr(type(model), "_from_config"):
        ref = type(model)._from_config(copy.deepcopy(model.config), dtype=param.dtype)
        missing, unexpected = ref.load_state_dict(model.state_dict(), strict=False)
        if unexpected or [m for m in missing if "rotary" not in m]:
            raise RuntimeError(f"gere: could not copy the base model (missing {missing[:3]}, unexpected {unexpected[:3]})")
        ref.to(param.device)
    else:
        ref = copy.deepcopy(model)
    return ref.eval().requires_grad_(False)


def _check_ref_model(ref: torch.nn.Module, model: torch.nn.Module, regularizer: str) -> torch.nn.Module:
    """Validate a user-given l1/l2/kl reference and put it, frozen, on the model's device."""
    if not isinstance(ref, torch.nn.Module):
        raise GeReConfigError(f"gere_ref_model must be a torch.nn.Module (a loaded model), got {type(ref).__name__}.")
    want, got = hidden_size_of(model), hidden_size_of(ref)
    if want is not None and got is not None and want != got:
        raise GeReConfigError(
            f"gere_ref_model has hidden size {got} but the trained model has {want}: the reference must be the "
            "same architecture (normally the original base model the sequence started from)."
        )
    if regularizer not in ("l1", "l2", "kl"):
        logger.warning("gere: gere_ref_model is only read by gere_regularizer l1/l2/kl (this run uses %s); "
                       "TM reads the base states of the state cache instead.", regularizer)
    device = next(model.parameters()).device
    if next(ref.parameters()).device != device:
        ref = ref.to(device)
    return ref.eval().requires_grad_(False)


class ReplayStep:
    """GeRe's replay work for one trainer. Built once; called from ``compute_loss`` every micro-batch.

    Args:
        trainer: the ``transformers.Trainer`` it serves (read for state, accelerator, args, metrics).
        gere_args: object with the ``gere_*`` attributes (a GeRe config or :class:`GeReArguments`).
        combine: older spelling of ``family``: ``"mean"`` (the ``sft`` family) or ``"sum"`` (``dpo``).
        tokenizer: tokenizer of the model (defaults to the trainer's processing class).
        ref_model: frozen reference model for l1/l2/kl (the ``gere_ref_model`` trainer argument, else
            DPO's reference when it has one, else a frozen copy of the model at trainer init, or for a
            PEFT model the base with adapters disabled).
        family: the trainer's loss family (``sft`` / ``dpo`` / ``grpo`` or a :class:`LossFamily`): how
            the task loss, replay CE and regularizer combine, which dynamic weight applies and what the
            default ``gere_replay_per_step`` counts. Default: from ``combine``, else :func:`resolve_family`.
    """

    def __init__(
        self,
        trainer: Any,
        gere_args: Any,
        combine: Optional[str] = None,
        tokenizer: Any = None,
        ref_model: Optional[torch.nn.Module] = None,
        family: Optional[Any] = None,
    ) -> None:
        if combine is not None and combine not in COMBINE_FAMILIES:
            raise ValueError("combine must be 'mean' or 'sum'")
        if isinstance(family, LossFamily):
            self.family = family
        elif family is not None or combine is None:
            self.family = resolve_family(trainer, family)
        else:
            self.family = FAMILIES[COMBINE_FAMILIES[combine]]
        self.args = gere_args
        self.combine = self.family.combine
        #: the general replay (gere_replay) is on; off when only earlier tasks are replayed (gere_task_replay)
        self.general = gere_args.gere_replay is not None
        self.regularizer = gere_args.gere_regularizer if self.general else "none"
        self.fixed_weight = parse_weight(gere_args.gere_weight)
        self.weight_cap: Optional[float] = getattr(gere_args, "gere_weight_max", None)
        #: diagnostic mode (off by default; costs two extra backward passes per replay micro-batch):
        #: log the gradient norms of the task/CE part and of the regularizer part, see grad_balance()
        self.grad_diagnostics = bool(os.environ.get("GERE_GRAD_DIAGNOSTICS"))
        self.layers = list(gere_args.gere_layers)
        tok = _tokenizer_of(tokenizer if tokenizer is not None else getattr(trainer, "processing_class", None))
        if tok is None:
            raise GeReConfigError("GeRe needs the tokenizer: pass processing_class=tokenizer to the trainer.")
        self.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        targs = trainer.args
        world = trainer.accelerator.num_processes if getattr(trainer, "accelerator", None) else 1
        self.rank = trainer.accelerator.process_index if getattr(trainer, "accelerator", None) else 0
        self.world_size = world
        global_batch = targs.per_device_train_batch_size * targs.gradient_accumulation_steps * world
        basis = None  # the default counts the parent's batch unit: GRPO's batch counts completions, not prompts
        if self.family.batch_unit == "prompts" and gere_args.gere_replay_per_step is None:
            basis = prompts_per_step(trainer, global_batch)
        self.per_step = (resolve_replay_per_step(gere_args.gere_replay_per_step, global_batch, default_basis=basis)
                         if self.general else 0)
        self.task_replay: Optional[TaskReplay] = None
        if getattr(gere_args, "gere_task_replay", None):
            self.task_replay = TaskReplay.from_args(gere_args, tok, Tokenization.of_trainer_args(targs), global_batch)
        self._task_rows_now: list[int] = []
        self._step_task_rows = 0
        talks = forward_collectives(trainer, world)
        accumulation = targs.gradient_accumulation_steps
        for key, count in (("gere_replay_per_step", self.per_step),
                           ("gere_task_replay_per_step", self.task_replay.per_step if self.task_replay else 0)):
            if talks and uneven_micro_batches(count, world, accumulation):
                # A micro-batch without replay rows skips the extra forward; when forwards talk to the other
                # ranks, every rank must run the same forwards in every micro-batch or training hangs.
                raise GeReConfigError(
                    f"{key}={count} would give replay rows to some ranks but not others in one micro-batch "
                    f"({world} processes x {accumulation} accumulation steps), and {talks}: training would hang. "
                    f"Use a multiple of the number of processes ({world}) or at least processes x "
                    f"gradient_accumulation_steps ({world * accumulation}), or DDP / DeepSpeed ZeRO-1/2."
                )
        self.replay: Optional[ReplaySet] = ReplaySet.from_args(gere_args, tok) if self.general else None
        self.schedule = ReplaySchedule(len(self.replay), self.per_step, gere_args.gere_seed) if self.replay else None
        model = _unwrap(trainer, trainer.model)
        self.hidden_size = hidden_size_of(model)
        self.autocast_dtype = torch.bfloat16 if getattr(targs, "bf16", False) else (torch.float16 if getattr(targs, "fp16", False) else None)
        self.states: Optional[StateCache] = None
        self.cache_action = "not needed"  # TM only: "reused" / "built" / "rebuilt"
        if self.regularizer == "tm":
            self.states = self._get_states(trainer, model)
        self.ref_model = ref_model
        self._own_ref: Optional[torch.nn.Module] = None
        if self.regularizer in ("l1", "l2", "kl") and ref_model is None and not _is_peft(model):
            # Full fine-tune without a reference: keep a frozen copy of the base model.
            self._own_ref = frozen_copy(model)
        # Replay CE (and KL) from hidden states, a chunk of tokens at a time (logits.py); None = full logits.
        # The same head serves the earlier-task rows' CE.
        if self.replay is not None and len(self.replay):
            sample: Sequence[int] = self.replay.input_ids[0]
        else:
            sample = self.task_replay.rows.input_ids[0] if self.task_replay is not None and len(self.task_replay.rows) else []
        self.logit_head = replay_logit_head(model, sample, verify=not _is_zero3(trainer))
        self._base_head: Optional[LogitHead] = None
        if self.logit_head is not None and self.regularizer == "kl":
            self._base_head = self._kl_base_head(model, sample)
            if self._base_head is None:
                self.logit_head = None
        self.logit_chunk = chunk_tokens(self.logit_head.vocab_size) if self.logit_head is not None else 0
        self._cur_step = -1
        self._step_targets = 0
        self._micro = 0
        self._step_rows = 0
        self._pending: dict[str, list[tuple[torch.Tensor, Optional[torch.Tensor]]]] = defaultdict(list)
        self.history: list[dict] = []
        self._log_path = os.environ.get("GERE_REPLAY_LOG")
        if self.replay is not None:
            logger.info(
                "gere: %d replay samples (%d tokens), %d rows per optimizer step, regularizer=%s, weight=%s",
                len(self.replay), self.replay.num_tokens, self.per_step, self.regularizer, gere_args.gere_weight,
            )
        if self.task_replay is not None:
            logger.info("gere: %s", self.task_replay.describe())

    # -- base-model states -----------------------------------------------------------------------
    def cache_dir(self, trainer: Any) -> str:
        return str(state_cache_folder(self.args.gere_state_cache, trainer.args.output_dir))

    def _get_states(self, trainer: Any, model: torch.nn.Module) -> StateCache:
        folder = self.cache_dir(trainer)
        sigma = float(self.args.gere_sigma)

        def build() -> StateCache:
            base_ctx = model.disable_adapter() if _is_peft(model) else contextlib.nullcontext()
            with base_ctx:
                return build_state_cache(
                    model,
                    self.replay,
                    self.layers,
                    sigma,
                    batch_size=self.args.gere_state_batch_size,
                    pad_token_id=self.pad_token_id,
                    autocast_dtype=self.autocast_dtype if next(model.parameters()).dtype == torch.float32 else None,
                    progress=trainer.args.disable_tqdm is not True and trainer.is_world_process_zero(),
                )

        ctx = trainer.args.main_process_first(desc="gere state cache") if hasattr(trainer.args, "main_process_first") else contextlib.nullcontext()
        with ctx:
            plan = ensure_state_cache(
                folder, self.replay, self.hidden_size, self.layers, sigma, build, save=trainer.is_world_process_zero()
            )
        self.cache_action = {"reuse": "reused", "build": "built", "rebuild": "rebuilt"}[plan.action]
        assert plan.cache is not None
        return plan.cache

    # -- the per-micro-batch work ---------------------------------------------------------------
    def _scaling(self, trainer: Any, num_items_in_batch: Any) -> StepScaling:
        acc = int(getattr(trainer, "current_gradient_accumulation_steps", 0) or trainer.args.gradient_accumulation_steps)
        return StepScaling(acc, self.world_size, trainer_divides_by_accumulation(trainer, num_items_in_batch))

    def _target_count(self, rows: Sequence[int]) -> int:
        """Predicted tokens of replay ``rows`` (host ints, no device sync): n - 1 for a row of n tokens."""
        return sum(int(self.replay.lengths[i]) - 1 for i in rows)

    def rows_now(self, trainer: Any, accumulation: int) -> tuple[int, int, list[int]]:
        """Advance the micro-batch counter; return ``(step, micro, replay indices)`` for this call."""
        step = int(trainer.state.global_step)
        if step != self._cur_step:
            self._cur_step, self._micro, self._step_rows, self._step_task_rows = step, 0, 0, 0
            # target tokens of the whole step's replay rows (host ints: no device sync), for CE shares
            self._step_targets = self._target_count(self.schedule.rows_for_step(step)) if self.schedule else 0
        micro = self._micro
        self._micro += 1
        if micro >= accumulation:
            raise RuntimeError(
                f"gere: micro-batch {micro} of optimizer step {step} exceeds the {accumulation} accumulation steps; "
                "compute_loss was called more often than the Trainer's loop expects."
            )
        rows = self.schedule.rows_for_micro(step, micro, accumulation, self.rank, self.world_size) if self.schedule else []
        return step, micro, rows

    @staticmethod
    def forward_module(trainer: Any, model: torch.nn.Module) -> torch.nn.Module:
        """The module the extra (replay) forwards run through: the unwrapped model unless parameters are
        sharded. A DDP-wrapped forward broadcasts buffers (e.g. rotary ``inv_freq``) to every rank, so a
        forward that only some ranks run (replay rows not a multiple of the ranks) waited forever for the
        others; gradients of the unwrapped forward still reach DDP's reducer through the parameters.
        ZeRO-3 / FSDP need the wrapped forward (it gathers the parameters) and all-or-none rows per
        micro-batch over ranks (:func:`uneven_micro_batches`)."""
        return model if _is_sharded(trainer) else _unwrap(trainer, model)

    @property
    def task_coef(self) -> float:
        """Coefficient ``c`` of the task term: 0.5 in SFT's ``mean(task, replay CE)``, else 1."""
        return 0.5 if self.combine == "mean" and self.general else 1.0

    def earlier_tasks(self, trainer: Any, model: torch.nn.Module, step: int, micro: int, scaling: StepScaling,
                      device: torch.device) -> Optional[torch.Tensor]:
        """This micro-batch's part of ``c * rho * CE_earlier`` (``None`` without earlier-task rows here).

        The rows come from the earlier-task schedule (their own per-step count, never counted against
        ``gere_replay_per_step``); one forward; cross-entropy only, so the regularizer stays on the general
        replay rows. The CE is chunked from hidden states like the general replay CE when the logit head
        allows it (no full-vocabulary logits), else taken from the model's logits.
        """
        tr = self.task_replay
        self._task_rows_now = [] if tr is None else tr.schedule.rows_for_micro(
            step, micro, scaling.accumulation, self.rank, self.world_size)
        if not self._task_rows_now:
            return None
        assert tr is not None
        module = self.forward_module(trainer, model)
        if self.logit_head is None:
            ce_micro = tr.cross_entropy(module, self._task_rows_now, self.pad_token_id, device)
        else:
            pad_to = self._chunks_over_ranks(tr.schedule, lambda i: int(tr.rows.targets[i]), step, micro,
                                             scaling.accumulation, self.logit_chunk)
            with _autocast(trainer):
                ce_micro = tr.cross_entropy(module, self._task_rows_now, self.pad_token_id, device,
                                            self.logit_head.in_fsdp_unit(model), self.logit_chunk, pad_to)
        self._metric(trainer, "gere/task_replay_ce", ce_micro)
        return scaling.extra_factor * self.task_coef * tr.weight * tr.share(step, self._task_rows_now) * ce_micro

    def _base_forward(self, trainer: Any, model: torch.nn.Module, batch: dict, need_logits: bool,
                      layers: Optional[list[int]] = None):
        unwrapped = _unwrap(trainer, model)
        layers = self.layers if layers is None else layers
        with torch.no_grad():
            if self.ref_model is not None:
                return forward_hidden(self.ref_model, batch["input_ids"], batch["attention_mask"], layers, need_logits)
            if self._own_ref is not None:
                return forward_hidden(self._own_ref, batch["input_ids"], batch["attention_mask"], layers, need_logits)
            with unwrapped.disable_adapter():
                return forward_hidden(unwrapped, batch["input_ids"], batch["attention_mask"], layers, need_logits)

    def _kl_base_head(self, model: torch.nn.Module, sample: Sequence[int]) -> Optional[LogitHead]:
        """The KL reference's logit head (checked like the model's), or None for full-logit KL."""
        ref = self.ref_model if self.ref_model is not None else self._own_ref
        if ref is not None:
            return replay_logit_head(ref, sample)
        assert self.logit_head is not None
        with model.disable_adapter():  # PEFT: the base is the model with adapters bypassed
            reason = head_mismatch(model, self.logit_head.without_adapters(), torch.tensor([list(sample)[:16]]))
        if reason:
            logger.warning("gere: kl uses full-vocabulary logits: the adapter-free head does not match (%s).", reason)
            return None
        return self.logit_head.without_adapters()

    def _chunks_over_ranks(self, schedule: ReplaySchedule, tokens_of: Callable[[int], int], step: int, micro: int,
                           accumulation: int, chunk: int) -> int:
        """Head calls the busiest rank makes for this micro-batch's rows of ``schedule`` (``tokens_of(row)``
        tokens reach the head per row; host ints, no communication).

        Every rank makes as many (empty chunks pad), since a sharded head all-gathers on every call.
        """
        if self.world_size == 1:
            return 0
        most = max(
            sum(tokens_of(i) for i in schedule.rows_for_micro(step, micro, accumulation, r, self.world_size))
            for r in range(self.world_size)
        )
        return num_chunks(most, chunk)

    def regularize(self, trainer: Any, model: torch.nn.Module, rows: list[int], batch: dict, logits, hidden,
                   last: Optional[torch.Tensor] = None, kl_chunks: int = 0):
        """The regularizer over this micro-batch's replay rows: ``(value, out_of_state)``.

        ``logits`` is None on the chunked path; then ``last`` (``hidden_states[-1]``) feeds a chunked KL.
        """
        mask = batch["attention_mask"]
        if self.regularizer == "none":
            z = torch.zeros((), device=mask.device)
            return z, z
        if self.regularizer == "tm":
            assert self.states is not None
            labels = self.states.labels_for(rows, mask.shape[1], device=mask.device)  # [B, T, L, H]
            vals, oos = [], []
            for li in range(len(self.layers)):
                r = tm_loss(hidden[li], labels[:, :, li], self.states.pos[li], self.states.neg[li], mask, self.args.gere_tm_reduction)
                vals.append(r.loss)
                oos.append(r.out_of_state)
            return torch.stack(vals).mean(), torch.stack(oos).mean()
        if self.regularizer == "kl" and logits is None:
            assert self.logit_head is not None and self._base_head is not None and last is not None
            _, (base_last,) = self._base_forward(trainer, model, batch, need_logits=False, layers=[-1])
            with _autocast(trainer):
                r = chunked_kl(self.logit_head.in_fsdp_unit(model), self._base_head.in_fsdp_unit(model), last, base_last,
                               mask, kl_chunk_tokens(self.logit_chunk), kl_chunks)
            return r.loss, r.out_of_state
        base_logits, base_hidden = self._base_forward(trainer, model, batch, need_logits=self.regularizer == "kl")
        if self.regularizer == "kl":
            r = kl_loss(logits, base_logits, mask)
            return r.loss, r.out_of_state
        p = 1 if self.regularizer == "l1" else 2
        vals = [masked_feature_loss(h, b, mask, p).loss for h, b in zip(hidden, base_hidden)]
        return torch.stack(vals).mean(), torch.zeros((), device=mask.device)

    def replay_forward(self, trainer: Any, model: torch.nn.Module, num_items_in_batch: Any = None) -> ReplayForward:
        """Pick this micro-batch's replay rows and build their CE and regularizer (forward only).

        :class:`GeReTrainerMixin` calls it BEFORE the parent's task forward. Autograd runs nodes built
        later first, so the replay rows' backward then comes after the task rows': no replay gradient
        (every weight's, the embedding's included) waits in memory while the task activations are
        still alive (measured: otherwise one extra embedding gradient in the peak, benchmarks/memory.py).
        """
        scaling = self._scaling(trainer, num_items_in_batch)
        step, micro, rows = self.rows_now(trainer, scaling.accumulation)
        device = getattr(getattr(trainer, "args", None), "device", None) or next(model.parameters()).device
        out = ReplayForward(step, micro, rows, scaling)
        out.earlier = self.earlier_tasks(trainer, model, step, micro, scaling, device)
        if not rows:
            return out
        assert self.replay is not None and self.schedule is not None
        batch = self.replay.collate(rows, self.pad_token_id, device=device)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        chunked = self.logit_head is not None
        logits, hidden = forward_hidden(self.forward_module(trainer, model), ids, mask, [*self.layers, -1],
                                        need_logits=not chunked)
        last = hidden.pop()  # hidden_states[-1], the logit head's input
        lengths = self.replay.lengths
        if chunked:
            assert self.logit_head is not None
            head = self.logit_head.in_fsdp_unit(model)
            pad_to = self._chunks_over_ranks(self.schedule, lambda i: int(lengths[i]) - 1, step, micro,
                                             scaling.accumulation, self.logit_chunk)
            with _autocast(trainer):  # the autocast accelerate wraps the model's forward in
                ce_sum, ce_count = chunked_token_ce(head, last, ids, mask, self.logit_chunk, pad_to)
        else:
            ce_sum, ce_count = token_ce(logits, ids, mask)
        kl_chunks = (self._chunks_over_ranks(self.schedule, lambda i: int(lengths[i]), step, micro, scaling.accumulation,
                                             kl_chunk_tokens(self.logit_chunk))
                     if chunked and self.regularizer == "kl" else 0)
        out.ce = ce_sum / ce_count.clamp_min(1)
        out.reg, out.out_of_state = self.regularize(trainer, model, rows, batch, logits, hidden, last, kl_chunks)
        return out

    def __call__(self, trainer: Any, model: torch.nn.Module, task_loss: torch.Tensor, num_items_in_batch: Any = None,
                 replay: Optional[ReplayForward] = None) -> torch.Tensor:
        """The micro-batch's loss: task loss + scaled replay terms (``replay`` from :meth:`replay_forward`,
        computed here when not given)."""
        r = replay if replay is not None else self.replay_forward(trainer, model, num_items_in_batch)
        step, micro, rows, scaling = r.step, r.micro, r.rows, r.scaling
        # the task term: c * task loss, or with earlier tasks c * ((1 - rho) * task loss + rho * CE_earlier)
        task_factor = self.task_coef * (1.0 - self.task_replay.weight if self.task_replay else 1.0)
        self._metric(trainer, "gere/task_loss", task_loss.detach().float() * scaling.task_unscale)
        if r.earlier is not None:
            task_loss_scaled = task_factor * task_loss + r.earlier.to(task_loss.dtype)
        else:
            task_loss_scaled = task_factor * task_loss
        if not rows:
            self._record(trainer, step, micro, rows, scaling)
            return task_loss_scaled
        assert r.ce is not None and r.reg is not None and r.out_of_state is not None
        ce_micro, reg, out_of_state = r.ce, r.reg, r.out_of_state
        ce_share = self._target_count(rows) / max(self._step_targets, 1)
        reg_share = len(rows) / self.per_step
        task_micro = task_loss.detach().float() * scaling.task_unscale
        primary = 0.5 * (task_micro + ce_micro.detach()) if self.combine == "mean" else task_micro
        if self.regularizer == "none":
            weight = torch.zeros((), device=reg.device)
        elif self.family.weight_basis == "replay_ce":
            # GRPO-like parent losses can be ~0 or negative: match w * R to the replay CE instead (w >= 0)
            weight = replay_ce_weight(self.fixed_weight, ce_micro, reg, self.weight_cap)
        else:
            weight = resolve_weight(self.fixed_weight, primary, reg, self.weight_cap)
        ce_factor = 0.5 if self.combine == "mean" else 1.0
        ce_part = scaling.extra_factor * ce_factor * ce_share * ce_micro
        reg_part = scaling.extra_factor * reg_share * weight * reg
        if self.grad_diagnostics and torch.is_grad_enabled() and self.regularizer != "none":
            for key, value in grad_balance(model, task_loss_scaled + ce_part, reg_part,
                                           getattr(trainer.args, "max_grad_norm", None)).items():
                self._metric(trainer, key, value)
        loss = task_loss_scaled + (ce_part + reg_part).to(task_loss.dtype)
        self._metric(trainer, "gere/replay_ce", ce_micro)
        self._metric(trainer, "gere/reg_loss", reg)
        self._metric(trainer, "gere/weight", weight, keep=reg.detach() != 0)  # meaningless where R == 0
        if self.regularizer == "tm":
            self._metric(trainer, "gere/out_of_state", out_of_state)
        self._record(trainer, step, micro, rows, scaling)
        return loss

    # -- bookkeeping ------------------------------------------------------------------------------
    METRIC_KEYS = ("gere/task_loss", "gere/replay_ce", "gere/reg_loss", "gere/weight", "gere/out_of_state",
                   "gere/grad_norm_ce", "gere/grad_norm_reg", "gere/grad_norm_total", "gere/clip_coef",
                   "gere/grad_cosine", "gere/task_replay_ce")

    def _metric(self, trainer: Any, key: str, value: torch.Tensor, keep: Optional[torch.Tensor] = None) -> None:
        # Kept on the device until the end of the optimizer step (no host sync per micro-batch), then
        # averaged over ranks in one all-reduce (see _flush_metrics). ``keep`` (a 0-dim bool tensor)
        # drops the value from the step's mean without a host sync; a step where nothing is kept on any
        # rank does not log the key at all.
        v = value.detach().float().reshape(())
        if keep is None:
            self._pending[key].append((v, None))
        else:
            k = keep.detach().float().reshape(())
            self._pending[key].append((v * k, k))

    def _flush_metrics(self, trainer: Any) -> None:
        """Once per optimizer step on every rank (the same number of calls everywhere, rows or not):
        one all-reduce turns this rank's gere/* values into means over all replay micro-batches of the
        step, and gere/replay_rows into the step's rows over all ranks."""
        acc = getattr(trainer, "accelerator", None)
        device = next((v[0][0].device for v in self._pending.values() if v), torch.device("cpu"))
        if acc is not None and acc.num_processes > 1:
            device = acc.device
        zero = torch.zeros((), dtype=torch.float32, device=device)
        local: list[torch.Tensor] = []
        for key in self.METRIC_KEYS:
            vals = self._pending.get(key, [])
            if not vals:
                local += [zero, zero]
                continue
            total = torch.stack([v for v, _ in vals]).to(device).sum()
            count = sum((zero + 1 if k is None else k.to(device) for _, k in vals), zero)
            local += [total, count]
        local.append(zero + self._step_rows)
        local.append(zero + self._step_task_rows)
        self._pending.clear()
        totals = torch.stack(local)
        if acc is not None and acc.num_processes > 1:
            totals = acc.reduce(totals, reduction="sum")
        totals = totals.cpu()  # the one host sync of the step
        store = getattr(trainer, "_metrics", None)
        if store is None:
            return
        for i, key in enumerate(self.METRIC_KEYS):
            if totals[2 * i + 1] > 0:
                store["train"][key].append(float(totals[2 * i] / totals[2 * i + 1]))
        if self.general:
            store["train"]["gere/replay_rows"].append(float(totals[-2]))
        if self.task_replay is not None:
            store["train"]["gere/task_replay_rows"].append(float(totals[-1]))

    def _record(self, trainer: Any, step: int, micro: int, rows: list[int], scaling: StepScaling) -> None:
        self._step_rows += len(rows)
        entry: dict[str, Any] = {"step": step, "micro": micro, "rank": self.rank, "rows": rows}
        if self.task_replay is not None:
            self._step_task_rows += len(self._task_rows_now)
            entry["task_rows"] = self._task_rows_now
        self.history.append(entry)
        if self._log_path:
            path = self._log_path.replace("{rank}", str(self.rank))
            with open(path, "a") as fh:
                fh.write(json.dumps(entry) + "\n")
        if micro == scaling.accumulation - 1:
            self._flush_metrics(trainer)

    def state_dict(self) -> dict:
        out = {
            "schedule": self.schedule.state_dict() if self.schedule else None,
            "replay_fingerprint": self.replay.fingerprint if self.replay else None,
            "regularizer": self.regularizer,
            "cache_meta": {k: (self.states.meta.get(k) if self.states else None) for k in ("replay_fingerprint", "base_model", "sigma")},
        }
        if self.task_replay is not None:
            out["task_replay"] = self.task_replay.state_dict()
        return out


def grad_balance(
    model: torch.nn.Module, ce_term: torch.Tensor, reg_term: torch.Tensor, max_grad_norm: Optional[float]
) -> dict[str, torch.Tensor]:
    """Gradient norms of the CE part (task + replay CE) and of the regularizer part of one micro-batch.

    Diagnostic only: two extra backward passes through the retained graph. Returns ``gere/grad_norm_ce``,
    ``gere/grad_norm_reg``, ``gere/grad_norm_total`` (of their sum), ``gere/grad_cosine`` (between the two)
    and ``gere/clip_coef``, the factor gradient clipping at ``max_grad_norm`` would apply to this
    micro-batch's gradient (1 = no clipping): after clipping the CE part's norm is ``clip_coef x
    grad_norm_ce``. With gradient accumulation these are per micro-batch (the benchmark uses none).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    zero = torch.zeros((), device=ce_term.device)
    if not params:
        return {}

    def grads(term: torch.Tensor) -> list[torch.Tensor]:
        if not term.requires_grad:
            return [torch.zeros_like(p) for p in params]
        got = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
        return [g if g is not None else torch.zeros_like(p) for g, p in zip(got, params)]

    g_ce, g_reg = grads(ce_term), grads(reg_term)
    ce_sq = sum(((g.float() ** 2).sum() for g in g_ce), zero)
    reg_sq = sum(((g.float() ** 2).sum() for g in g_reg), zero)
    dot = sum(((a.float() * b.float()).sum() for a, b in zip(g_ce, g_reg)), zero)
    total = (ce_sq + reg_sq + 2 * dot).clamp_min(0).sqrt()
    ce_n, reg_n = ce_sq.sqrt(), reg_sq.sqrt()
    clip = torch.ones((), device=total.device)
    if max_grad_norm:
        clip = (float(max_grad_norm) / (total + 1e-6)).clamp(max=1.0)
    return {
        "gere/grad_norm_ce": ce_n,
        "gere/grad_norm_reg": reg_n,
        "gere/grad_norm_total": total,
        "gere/grad_cosine": dot / (ce_n * reg_n + 1e-12),
        "gere/clip_coef": clip,
    }


class GeReCheckpointCallback(TrainerCallback):
    """Writes the replay schedule state next to every checkpoint; the schedule itself is a function of
    ``global_step``, so a resumed run replays exactly what an uninterrupted run would."""

    def __init__(self, step: ReplayStep) -> None:
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if ckpt.exists():
                data = dict(self.step.state_dict(), global_step=state.global_step)
                tmp = ckpt / f".{GERE_STATE_FILE}.tmp"
                tmp.write_text(json.dumps(data, indent=1))
                os.replace(tmp, ckpt / GERE_STATE_FILE)
        return control


def check_resume(step: ReplayStep, checkpoint: str) -> None:
    """Refuse to resume a checkpoint written with another replay set or schedule."""
    if not Path(checkpoint).is_dir():
        return  # the Trainer reports a missing checkpoint itself
    path = Path(checkpoint) / GERE_STATE_FILE
    if not path.exists():
        logger.warning("gere: %s has no %s; resuming without checking the replay schedule.", checkpoint, GERE_STATE_FILE)
        return
    saved = json.loads(path.read_text())
    now = step.state_dict()
    if saved.get("replay_fingerprint") != now["replay_fingerprint"] or saved.get("schedule") != now["schedule"]:
        raise GeReConfigError(
            f"Checkpoint {checkpoint} was trained with another replay set or schedule "
            f"(saved {saved.get('schedule')}, now {now['schedule']}). Resume with the same gere_replay, "
            "gere_replay_size, gere_replay_max_length, gere_replay_per_step and gere_seed, or start a new run."
        )
    if saved.get("task_replay") != now.get("task_replay"):
        raise GeReConfigError(
            f"Checkpoint {checkpoint} was trained with other earlier-task replay (saved {saved.get('task_replay')}, "
            f"now {now.get('task_replay')}). Resume with the same gere_task_replay, gere_task_replay_size, "
            "gere_task_replay_per_step, gere_task_replay_weight, max_length and gere_seed, or start a new run."
        )


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

    ``gere_family`` (class attribute: ``sft`` / ``dpo`` / ``grpo``, see :mod:`gere_plugin.families`) says
    how the parent's loss combines with replay; unset, it is derived from the parent class, and a TRL
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
        task = getattr(self, "gere_task", None)  # FLOW / task KL / EWC (task_step.py)
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
            task.on_train_end(self)  # EWC: this task's Fisher, written next to the model
        return out

    def log(self, logs: dict, *args: Any, **kwargs: Any) -> None:
        own = getattr(self, "_gere_own_metrics", False)
        if own and self.model.training:
            for k, v in self._metrics["train"].items():
                if v:
                    logs[k] = sum(v) / len(v)
            self._metrics["train"].clear()
        super().log(logs, *args, **kwargs)


def announce(line: str) -> None:
    """Show ``line`` once: as an INFO record where ``gere_plugin`` INFO records are shown (the ``gere``
    command, the Axolotl plugin, a user's logging set-up), else on stderr, so that it is visible at
    TRL's default log level too."""
    if logger.isEnabledFor(logging.INFO) and logger.hasHandlers():
        logger.info(line)
    else:
        print(line, file=sys.stderr, flush=True)


def _describe_frozen(trainer: Any, gere_args: Any) -> str:
    names = getattr(trainer, "gere_frozen", None) or []
    if not names:
        return "nothing frozen"
    what = []
    if gere_args.gere_freeze_embeddings:
        what.append("embeddings")
    if gere_args.gere_freeze_layers:
        what.append(f"bottom {gere_args.gere_freeze_layers} decoder layers")
    return f"frozen: {' + '.join(what)} ({len(names)} tensors)"


def describe_gere(trainer: Any, checkpoint: Optional[str] = None) -> str:
    """The one line GeRe prints at train start: what it replays, how it regularizes, what it froze."""
    gere_args = getattr(trainer, "gere_args", None) or trainer.args
    step: Optional[ReplayStep] = getattr(trainer, "gere_step", None)
    frozen = _describe_frozen(trainer, gere_args)
    task = getattr(trainer, "gere_task", None)
    if task is not None:
        frozen = f"{task.describe()}; {frozen}"
    monitor = getattr(trainer, "gere_monitor", None)
    watching = f"; {monitor.describe()}" if monitor is not None else ""
    if step is None:
        return f"gere: no replay (gere_replay is not set); {frozen}{watching}"
    weight = f" with weight {gere_args.gere_weight}"
    if step.family.weight_basis == "replay_ce" and step.fixed_weight is None:
        weight += " (w*R matched to the replay CE: the task loss may be negative)"
    parts = []
    if step.replay is not None:
        parts += [
            f"{step.per_step} replay rows per optimizer step from {len(step.replay)} samples "
            f"({step.replay.num_tokens} tokens) of {step.replay.source}",
            f"regularizer {step.regularizer}" + ("" if step.regularizer == "none" else weight),
        ]
    else:
        parts.append("no general replay (gere_replay is not set)")
    if step.task_replay is not None:
        parts.append(step.task_replay.describe())
    parts.append(f"loss family {step.family.name}")
    if step.states is not None:
        parts.append(f"state cache {step.cache_dir(trainer)} {step.cache_action}")
    parts.append(frozen)
    if checkpoint is not None:
        parts.append(f"resuming {checkpoint} (replay settings checked)")
    task = "task" if step.task_replay is None else "((1-rho)*task + rho*CE_earlier)"
    if step.replay is None:
        total = task
    else:
        total = f"mean({task}, replay CE)" if step.combine == "mean" else f"{task} + replay CE"
    parts.append(f"logged loss = {total}{'' if step.regularizer == 'none' else ' + w*R'}; task term alone: gere/task_loss")
    return "gere: " + "; ".join(parts) + watching


def resolve_family(trainer: Any, family: Optional[str] = None) -> LossFamily:
    """The loss family of ``trainer``: ``family``, else its ``gere_family``, else its older ``gere_combine``
    attribute, else derived from its class (:func:`gere_plugin.families.family_for`, which refuses
    TRL trainers GeRe has no rule for, naming them)."""
    family = family if family is not None else getattr(trainer, "gere_family", None)
    combine = None if family is not None else getattr(trainer, "gere_combine", None)
    return family_for(type(trainer), family=family, combine=combine)


def setup_gere(
    trainer: Any, gere_args: Optional[Any] = None, ref_model: Optional[torch.nn.Module] = None, family: Optional[str] = None
) -> Optional[ReplayStep]:
    """Attach GeRe to a built trainer: freeze layers, build/load the state cache, create the replay step.

    Must run before training starts (the optimizer must not exist yet for the freeze to matter).
    ``family``: the loss family (default: :func:`resolve_family`).
    """
    gere_args = gere_args if gere_args is not None else trainer.args
    if not hasattr(gere_args, "gere_replay"):
        raise GeReConfigError(
            "GeRe settings missing: use GeReSFTConfig/GeReDPOConfig/GeReGRPOConfig or pass gere_args=GeReArguments(...)."
        )
    loss_family = resolve_family(trainer, family)
    trainer.gere_family, trainer.gere_combine = loss_family.name, loss_family.combine
    model = _unwrap(trainer, trainer.model)
    # Every check that needs the model but no forward pass runs here, before the state build.
    check_freeze_depth(model, gere_args.gere_freeze_layers)
    if gere_args.gere_replay is not None:
        check_layer_indices(model, gere_args.gere_layers)
    task_replay = getattr(gere_args, "gere_task_replay", None)
    trainer.gere_args = gere_args
    if getattr(trainer, "_metrics", None) is None:
        trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        trainer._gere_own_metrics = True
    from .config import task_methods

    methods = task_methods(gere_args)
    if methods:  # the FLOW / EWC / task-KL checks need no forward pass: before the state build
        from .task_step import check_task_methods

        check_task_methods(trainer, gere_args, methods)
    step: Optional[ReplayStep] = None
    monitoring = getattr(gere_args, "gere_monitor", None) is not None
    if gere_args.gere_replay is None and not task_replay:
        if monitoring and not methods:
            logger.info("gere: gere_replay is not set: no replay; the forgetting monitor (gere_monitor) watches the run.")
        elif not methods:
            logger.warning("gere: gere_replay is not set; training WITHOUT replay (plain parent trainer behaviour).")
    else:
        if ref_model is not None:  # the user's gere_ref_model (a DPO reference needs no check)
            ref_model = _check_ref_model(ref_model, model, "kl" if "task_kl" in methods else gere_args.gere_regularizer)
        else:
            ref_model = getattr(trainer, "ref_model", None)
        # Built BEFORE freezing: PEFT's disable_adapter() (used for the base states) re-enables
        # requires_grad on adapter weights when it exits.
        step = ReplayStep(trainer, gere_args, ref_model=ref_model, family=loss_family)
        trainer.add_callback(GeReCheckpointCallback(step))
    trainer.gere_step = step
    trainer.gere_monitor = None
    if monitoring:
        from .monitor import ForgettingMonitor

        general = step.replay if step is not None else None
        trainer.gere_monitor = ForgettingMonitor(
            trainer, gere_args, _tokenizer_of(getattr(trainer, "processing_class", None)),
            replay_texts=general.texts if general is not None else None,
            replay_source=general.source if general is not None else "",
            states=step.states if step is not None else None,
            sharded=_is_sharded(trainer),
        )
        trainer.add_callback(trainer.gere_monitor)
    trainer.gere_frozen = []
    trainer._gere_frozen_params = []
    if gere_args.gere_freeze_layers or gere_args.gere_freeze_embeddings:
        trainer.gere_frozen = freeze_bottom(model, gere_args.gere_freeze_layers, gere_args.gere_freeze_embeddings)
        params = dict(model.named_parameters())
        trainer._gere_frozen_params = [params[n] for n in trainer.gere_frozen if n in params]
        prepare_for_gradient_checkpointing(model, trainer.args)
    trainer.gere_task = None
    if methods:  # after the freeze: EWC anchors exactly the parameters that train
        from .task_step import TaskStep

        if step is not None:
            task_ref = step.ref_model
        else:
            task_ref = _check_ref_model(ref_model, model, "kl") if ref_model is not None else None
        trainer.gere_task = TaskStep(trainer, gere_args, ref_model=task_ref, replay_step=step)
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
