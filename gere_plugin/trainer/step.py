"""GeRe's per-micro-batch replay work: :class:`ReplayStep`.

Loss per optimizer step (``k`` replay rows spread over its micro-batches and ranks), by the loss family of
the trainer (:mod:`gere_plugin.trainer.families`)::

    SFT:  loss = mean(CE_task, CE_replay) + w * R,  w = mean(CE_task, CE_replay) / (R + 1e-8)
    DPO:  loss = L_dpo + CE_replay + w * R,         w = L_dpo / (R + 1e-8)
    GRPO: loss = L_grpo + CE_replay + w * R,        w = CE_replay / (R + 1e-8)   (never negative)

(``R`` = tm | l1 | l2 | kl, or 0 for none, :mod:`gere_plugin.methods.regularizers`; weights detached; a
fixed ``gere_weight`` replaces ``w``.) ``CE_replay`` is the token mean over all replay tokens of the step and
``R`` the row-weighted mean of the per-micro-batch regularizers, so the result does not depend on how rows
are split over micro-batches or ranks. The replay forward returns hidden states only; ``CE_replay`` and
``kl`` apply the model's logit head to them a chunk of tokens at a time (:mod:`gere_plugin.logits`), so the
replay rows never hold full-vocabulary logits. Earlier-task rows (``gere_task_replay``) are the
:class:`~gere_plugin.methods.earlier_tasks.EarlierTasks` term's: a micro-batch with both kinds runs them in
one forward (general rows first, :attr:`ReplayStep.pack_replay_rows`) and hands the term its rows' slice.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch

from ..data.schedule import ReplaySchedule
from ..methods.regularizers import ReplayBatch
from ..model.hidden import forward_hidden
from ..model.introspection import autocast_of, is_sharded, unwrap
from ..ops.logits import chunked_token_ce, kl_chunk_tokens, num_chunks
from ..ops.losses import replay_ce_weight, resolve_weight, token_ce
from ..ops.padding import stack_right_padded
from .diagnostics import grad_balance
from .metrics import MetricBuffer
from .resources import Resources
from .scaling import StepScaling, step_scaling

logger = logging.getLogger(__name__)


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


class ReplayStep:
    """GeRe's replay work for one trainer. Built once by the set-up pass; called from ``compute_loss``
    every micro-batch. Everything it reads comes from ``res`` (:class:`~gere_plugin.trainer.resources.Resources`).
    """

    METRIC_KEYS = ("gere/task_loss", "gere/replay_ce", "gere/reg_loss", "gere/weight", "gere/out_of_state",
                   "gere/grad_norm_ce", "gere/grad_norm_reg", "gere/grad_norm_total", "gere/clip_coef",
                   "gere/grad_cosine", "gere/task_replay_ce", "gere/task_replay_kl")

    #: Run a micro-batch's earlier-task rows in the general replay rows' forward when it has both (one
    #: forward less per micro-batch; the same losses up to float rounding). False gives each kind its own
    #: forward: what benchmarks/method_cost.py sets to measure what packing saves, not a user setting.
    pack_replay_rows: bool = True

    def __init__(self, res: Resources) -> None:
        self.res = res
        self.args = res.args
        self.family = res.family
        self.combine = res.family.combine
        self.general = res.general
        self.regularizer = self.args.gere_regularizer if res.general else "none"
        self.fixed_weight = res.fixed_weight
        self.weight_cap: Optional[float] = getattr(self.args, "gere_weight_max", None)
        self.grad_diagnostics = res.grad_diagnostics
        self.layers = res.layers
        self.pad_token_id = res.pad_token_id
        self.world_size, self.rank = res.world_size, res.rank
        self.per_step = res.per_step
        self.earlier = res.earlier
        self.replay = res.replay
        self.schedule = res.schedule
        self.hidden_size = res.hidden_size
        self.states = res.states
        self.cache_action = res.cache_action
        self.logit_head = res.logit_head
        self.logit_chunk = res.logit_chunk
        self.metrics = MetricBuffer(self.METRIC_KEYS, totals=(
            (("gere/replay_rows",) if self.general else ()) + (("gere/task_replay_rows",) if self.earlier else ())))
        self._cur_step = -1
        self._step_targets = 0
        self._micro = 0
        self.history: list[dict] = []
        self._log_path = os.environ.get("GERE_REPLAY_LOG")

    # -- what earlier versions exposed --------------------------------------------------------------
    @property
    def task_replay(self) -> Any:
        """The earlier-task rows and schedule (:class:`~gere_plugin.task_replay.TaskReplay`), or None."""
        return None if self.earlier is None else self.earlier.replay  # type: ignore[attr-defined]

    @property
    def ref_model(self) -> Optional[torch.nn.Module]:
        """The reference handed in (``gere_ref_model`` or the trainer's own), None if GeRe made a copy."""
        return self.res.reference.given

    @property
    def _own_ref(self) -> Optional[torch.nn.Module]:
        return self.res.reference.copy

    def cache_dir(self, trainer: Any = None) -> Optional[str]:
        return self.res.cache_dir

    # -- the per-micro-batch work ---------------------------------------------------------------
    def _target_count(self, rows: Sequence[int]) -> int:
        """Predicted tokens of replay ``rows`` (host ints, no device sync): n - 1 for a row of n tokens."""
        assert self.replay is not None
        return sum(int(self.replay.lengths[i]) - 1 for i in rows)

    def rows_now(self, trainer: Any, accumulation: int) -> tuple[int, int, list[int]]:
        """Advance the micro-batch counter; return ``(step, micro, replay indices)`` for this call."""
        step = int(trainer.state.global_step)
        if step != self._cur_step:
            self._cur_step, self._micro = step, 0
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
        micro-batch over ranks (:func:`~gere_plugin.data.schedule.uneven_micro_batches`)."""
        return model if is_sharded(trainer) else unwrap(trainer, model)

    @property
    def task_coef(self) -> float:
        """Coefficient ``c`` of the task term: 0.5 in SFT's ``mean(task, replay CE)``, else 1."""
        return 0.5 if self.combine == "mean" and self.general else 1.0

    def chunks_over_ranks(self, schedule: ReplaySchedule, tokens_of: Callable[[int], int], step: int, micro: int,
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

    def replay_forward(self, trainer: Any, model: torch.nn.Module, num_items_in_batch: Any = None) -> ReplayForward:
        """Pick this micro-batch's replay rows and build their CE and regularizer (forward only).

        :class:`~gere_plugin.trainer.mixin.GeReTrainerMixin` calls it BEFORE the parent's task forward.
        Autograd runs nodes built later first, so the replay rows' backward then comes after the task rows':
        no replay gradient (every weight's, the embedding's included) waits in memory while the task
        activations are still alive (measured: otherwise one extra embedding gradient in the peak,
        benchmarks/memory.py).
        """
        scaling = step_scaling(trainer, num_items_in_batch)
        step, micro, rows = self.rows_now(trainer, scaling.accumulation)
        device = getattr(getattr(trainer, "args", None), "device", None) or next(model.parameters()).device
        out = ReplayForward(step, micro, rows, scaling)
        earlier = self.earlier
        # the earlier-task schedule is asked here only when packing is possible; replay_loss asks it otherwise
        packed = bool(rows and self.pack_replay_rows and earlier is not None
                      and earlier.rows_for(self, step, micro, scaling))  # type: ignore[attr-defined]
        if earlier is not None and not packed:
            out.earlier = earlier.replay_loss(self, trainer, model, step, micro, scaling, device)  # type: ignore[attr-defined]
        if not rows:
            return out
        assert self.replay is not None and self.schedule is not None and self.res.regularizer is not None
        batch = self.replay.collate(rows, self.pad_token_id, device=device)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        chunked = self.logit_head is not None
        if packed:  # the earlier-task rows ride in the same forward, after the general rows
            assert earlier is not None
            earlier_batch = earlier.collate(self.pad_token_id, device)  # type: ignore[attr-defined]
            fwd_ids, fwd_mask = stack_right_padded(
                [(ids, mask), (earlier_batch["input_ids"], earlier_batch["attention_mask"])], self.pad_token_id)
        else:
            fwd_ids, fwd_mask = ids, mask
        logits, hidden = forward_hidden(self.forward_module(trainer, model), fwd_ids, fwd_mask, [*self.layers, -1],
                                        need_logits=not chunked)
        last = hidden.pop()  # hidden_states[-1], the logit head's input
        if packed:
            assert earlier is not None
            n, width, e_width = ids.shape[0], ids.shape[1], earlier_batch["input_ids"].shape[1]
            out.earlier = earlier.loss_of(  # type: ignore[attr-defined]
                self, trainer, model, step, micro, scaling, earlier_batch, last[n:, :e_width],
                None if logits is None else logits[n:, :e_width])
            last, hidden = last[:n, :width], [h[:n, :width] for h in hidden]
            logits = None if logits is None else logits[:n, :width]
        lengths = self.replay.lengths
        if chunked:
            assert self.logit_head is not None
            head = self.logit_head.in_fsdp_unit(model)
            pad_to = self.chunks_over_ranks(self.schedule, lambda i: int(lengths[i]) - 1, step, micro,
                                            scaling.accumulation, self.logit_chunk)
            with autocast_of(trainer):  # the autocast accelerate wraps the model's forward in
                ce_sum, ce_count = chunked_token_ce(head, last, ids, mask, self.logit_chunk, pad_to)
        else:
            ce_sum, ce_count = token_ce(logits, ids, mask)
        kl_chunks = (self.chunks_over_ranks(self.schedule, lambda i: int(lengths[i]), step, micro, scaling.accumulation,
                                            kl_chunk_tokens(self.logit_chunk))
                     if chunked and self.regularizer == "kl" else 0)
        out.ce = ce_sum / ce_count.clamp_min(1)
        out.reg, out.out_of_state = self.res.regularizer(
            ReplayBatch(trainer, model, rows, batch, logits, hidden, last, kl_chunks))
        return out

    def __call__(self, trainer: Any, model: torch.nn.Module, task_loss: torch.Tensor, num_items_in_batch: Any = None,
                 replay: Optional[ReplayForward] = None) -> torch.Tensor:
        """The micro-batch's loss: task loss + scaled replay terms (``replay`` from :meth:`replay_forward`,
        computed here when not given)."""
        r = replay if replay is not None else self.replay_forward(trainer, model, num_items_in_batch)
        step, micro, rows, scaling = r.step, r.micro, r.rows, r.scaling
        # the task term: c * task loss, or with earlier tasks c * ((1 - rho) * task loss + rho * CE_earlier)
        task_replay = self.task_replay
        task_factor = self.task_coef * (1.0 - task_replay.weight if task_replay is not None else 1.0)
        self.metrics.add("gere/task_loss", task_loss.detach().float() * scaling.task_unscale)
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
                self.metrics.add(key, value)
        loss = task_loss_scaled + (ce_part + reg_part).to(task_loss.dtype)
        self.metrics.add("gere/replay_ce", ce_micro)
        self.metrics.add("gere/reg_loss", reg)
        self.metrics.add("gere/weight", weight, keep=reg.detach() != 0)  # meaningless where R == 0
        if self.regularizer == "tm":
            self.metrics.add("gere/out_of_state", out_of_state)
        self._record(trainer, step, micro, rows, scaling)
        return loss

    # -- bookkeeping ------------------------------------------------------------------------------
    def _record(self, trainer: Any, step: int, micro: int, rows: list[int], scaling: StepScaling) -> None:
        if self.general:
            self.metrics.count("gere/replay_rows", len(rows))
        entry: dict[str, Any] = {"step": step, "micro": micro, "rank": self.rank, "rows": rows}
        if self.earlier is not None:
            task_rows = self.earlier.rows_now  # type: ignore[attr-defined]
            self.metrics.count("gere/task_replay_rows", len(task_rows))
            entry["task_rows"] = task_rows
        self.history.append(entry)
        if self._log_path:
            path = self._log_path.replace("{rank}", str(self.rank))
            with open(path, "a") as fh:
                fh.write(json.dumps(entry) + "\n")
        if micro == scaling.accumulation - 1:
            self.metrics.flush(trainer)

    def state_dict(self) -> dict:
        out = {
            "schedule": self.schedule.state_dict() if self.schedule else None,
            "replay_fingerprint": self.replay.fingerprint if self.replay else None,
            "regularizer": self.regularizer,
            "cache_meta": {k: (self.states.meta.get(k) if self.states else None) for k in ("replay_fingerprint", "base_model", "sigma")},
        }
        if self.earlier is not None:
            out["task_replay"] = self.earlier.state_dict()
        return out
