"""The forgetting monitor's ``TrainerCallback``: the row sets it scores, the step-0 base snapshot
(kept in memory and in every checkpoint), the metrics and the guard (see :mod:`gere_plugin.monitor`).

:data:`TOP_K` is read here only (scoring, snapshot metadata and fingerprint): patch it on this module.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from transformers import TrainerCallback

from ..cache.labels import label_states, pack_trits, unpack_trits
from ..data.trainer_rows import task_sample
from ..model.introspection import pad_token_id, unwrap, world_of
from ..ops.losses import tm_loss
from .kl import rest_logmass, topk_kl
from .texts import MonitorError, PaddedBatch, check_disjoint, load_monitor_texts, make_batches

logger = logging.getLogger("gere_plugin.monitor")

#: Base log-probabilities kept per scored position; the rest of the vocabulary is one bucket.
TOP_K = 64
#: Positions per log-softmax (bounds the float32 ``[positions, vocabulary]`` temporaries).
POSITIONS_PER_CHUNK = 512
#: The file a checkpoint gets per rank, so that a resumed run keeps comparing with the base.
SNAPSHOT_FILE = "gere_monitor_rank{rank}.safetensors"
METRIC_KEYS = (
    "gere/monitor_ppl", "gere/monitor_ppl_rise", "gere/monitor_kl", "gere/monitor_task_kl",
    "gere/monitor_out_of_state",
)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------
@dataclass
class StateRef:
    """GeRe's thresholds (from the state cache) for ``gere/monitor_out_of_state``."""

    layers: list[int]
    pos: torch.Tensor  # [L, H]
    neg: torch.Tensor


@dataclass
class RowSet:
    """One set of rows the monitor scores, and the base snapshot taken over it at step 0."""

    batches: list[PaddedBatch]
    hidden_states: bool = False  # also label the hidden states (general texts, with a state cache)
    snapshot: list[dict[str, torch.Tensor]] = field(default_factory=list)

    def score(self, model: torch.nn.Module, device: torch.device, take: bool, states: Optional[StateRef],
              autocast: Any) -> torch.Tensor:
        """``[nll_sum, positions, kl_sum, out_of_state_sum, elements]`` over the rows (float64, on ``device``)."""
        sums = torch.zeros(5, dtype=torch.float64, device=device)
        if take:
            self.snapshot = []
        for b, batch in enumerate(self.batches):
            ids = batch.input_ids.to(device)
            mask = (torch.arange(ids.shape[1]).unsqueeze(0) < torch.tensor(batch.lengths).unsqueeze(1)).long().to(device)
            need_hidden = self.hidden_states and states is not None
            with autocast():
                out = model(input_ids=ids, attention_mask=mask, use_cache=False, output_hidden_states=need_hidden)
            snap = {} if take else self.snapshot[b]
            for r, length in enumerate(batch.lengths):
                sums += self._score_row(out.logits[r, : length - 1], ids[r, 1:length], snap, f"{r}", take)
                if need_hidden:
                    assert states is not None
                    sums += self._out_of_state(out.hidden_states, r, length, states, snap, f"{r}", take)
            if take:
                self.snapshot.append(snap)
        return sums

    @staticmethod
    def _score_row(logits: torch.Tensor, targets: torch.Tensor, snap: dict, key: str, take: bool) -> torch.Tensor:
        nll = torch.zeros((), dtype=torch.float64, device=logits.device)
        kl = torch.zeros((), dtype=torch.float64, device=logits.device)
        vals, idx, rests = [], [], []
        for c in range(0, logits.shape[0], POSITIONS_PER_CHUNK):
            logp = torch.log_softmax(logits[c : c + POSITIONS_PER_CHUNK].float(), dim=-1)
            nll -= logp.gather(-1, targets[c : c + POSITIONS_PER_CHUNK, None]).double().sum()
            if take:
                v, i = logp.topk(min(TOP_K, logp.shape[-1]), dim=-1)
                i = i.int()
                rest = rest_logmass(logp, i)
                vals.append(v)
                idx.append(i)
                rests.append(rest)
            else:
                v = snap[f"v{key}"][c : c + POSITIONS_PER_CHUNK]
                i = snap[f"i{key}"][c : c + POSITIONS_PER_CHUNK]
                rest = snap[f"r{key}"][c : c + POSITIONS_PER_CHUNK]
            kl += topk_kl(v, logp.gather(-1, i.long()), rest, rest_logmass(logp, i)).sum()
        if take:
            snap[f"v{key}"], snap[f"i{key}"], snap[f"r{key}"] = torch.cat(vals), torch.cat(idx), torch.cat(rests)
        zero = torch.zeros((), dtype=torch.float64, device=logits.device)
        return torch.stack([nll, torch.tensor(float(logits.shape[0]), dtype=torch.float64, device=logits.device),
                            kl, zero, zero])

    @staticmethod
    def _out_of_state(hidden: Sequence[torch.Tensor], r: int, length: int, states: StateRef, snap: dict, key: str,
                      take: bool) -> torch.Tensor:
        device = hidden[0].device
        frac_sum = torch.zeros((), dtype=torch.float64, device=device)
        elements = 0
        for li, layer in enumerate(states.layers):
            h = hidden[layer][r, :length].float()  # [T, H]
            pos, neg = states.pos[li].to(device), states.neg[li].to(device)
            name = f"s{key}_{li}"
            if take:
                snap[name] = pack_trits(label_states(h, pos, neg))
            labels = unpack_trits(snap[name], h.shape[-1])
            res = tm_loss(h.unsqueeze(0), labels.unsqueeze(0), pos, neg, torch.ones(1, length, device=device))
            frac_sum += res.out_of_state.double() * h.numel()
            elements += h.numel()
        zero = torch.zeros((), dtype=torch.float64, device=device)
        return torch.stack([zero, zero, zero, frac_sum, torch.tensor(float(elements), dtype=torch.float64, device=device)])


@contextlib.contextmanager
def eval_no_grad(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode and ``no_grad`` for the block; every module's own training flag is restored afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, was in flags:
            m.training = was



# ---------------------------------------------------------------------------------------------
# The callback
# ---------------------------------------------------------------------------------------------
class ForgettingMonitor(TrainerCallback):
    """Measures general-ability drift while training (see the module docstring); attached by
    :func:`gere_plugin.trainer.setup_gere` when ``gere_monitor`` is set.

    Args:
        trainer: the ``transformers.Trainer`` it watches (model, accelerator, metrics store, log).
        gere_args: object with the ``gere_monitor*`` attributes.
        tokenizer: tokenizer of the model.
        replay_texts / replay_source: the replay set's texts, which must not include a monitor text.
        states: GeRe's state cache (for ``gere/monitor_out_of_state``), or ``None``.
        sharded: parameters are sharded over ranks (FSDP / ZeRO-3): every rank runs every forward.
    """

    def __init__(
        self,
        trainer: Any,
        gere_args: Any,
        tokenizer: Any,
        replay_texts: Optional[Sequence[str]] = None,
        replay_source: str = "",
        states: Any = None,
        sharded: bool = False,
    ) -> None:
        if tokenizer is None:
            raise MonitorError("gere_monitor needs the tokenizer: pass processing_class=tokenizer to the trainer.")
        self.trainer = trainer
        self.every = int(gere_args.gere_monitor_steps)
        self.max_rise: Optional[float] = gere_args.gere_monitor_max_ppl_rise
        self.action = gere_args.gere_monitor_action
        self.texts = load_monitor_texts(gere_args, tokenizer)
        if replay_texts is not None:
            check_disjoint(self.texts, replay_texts, replay_source)
        pad = pad_token_id(tokenizer)
        self.world_size, self.rank = world_of(trainer)
        self.sharded = sharded
        task_rows = task_sample(getattr(trainer, "train_dataset", None), tokenizer, int(gere_args.gere_monitor_task_size),
                                int(gere_args.gere_seed), int(gere_args.gere_monitor_max_length))
        self.num_task_rows = len(task_rows)
        self.states: Optional[StateRef] = None
        if states is not None:
            self.states = StateRef(list(states.layers), states.pos.float(), states.neg.float())
        self.general = RowSet(make_batches(self._mine(self.texts.input_ids), pad), hidden_states=True)
        self.task = RowSet(make_batches(self._mine(task_rows), pad))
        self.fingerprint = _fingerprint(self.texts.input_ids, task_rows, self.world_size, self.rank)
        self.base_nll: Optional[float] = None
        self.resume_checkpoint: Optional[str] = None
        self.history: list[dict[str, float]] = []
        self.seconds: list[tuple[int, float]] = []  # (step, wall seconds of the pass)
        self.tripped: Optional[dict[str, float]] = None
        self._last_step = -1

    def _mine(self, rows: Sequence[list[int]]) -> list[list[int]]:
        if self.sharded or self.world_size == 1:
            return list(rows)  # sharded: every rank runs every forward (only rank 0's sums count)
        return [r for i, r in enumerate(rows) if i % self.world_size == self.rank]

    def describe(self) -> str:
        task = f" + {self.num_task_rows} training rows" if self.num_task_rows else ""
        guard = (f"; guard gere_monitor_max_ppl_rise={self.max_rise} ({self.action})"
                 if self.max_rise is not None else "")
        return (f"monitor: {len(self.texts.texts)} texts ({self.texts.num_tokens} tokens) of {self.texts.source}{task} "
                f"at step 0, every {self.every} steps and at the end{guard}")

    # -- measuring --------------------------------------------------------------------------------
    def _model(self) -> torch.nn.Module:
        return unwrap(self.trainer, self.trainer.model)

    def _autocast(self) -> Any:
        ctx = getattr(self.trainer, "autocast_smart_context_manager", None)
        return ctx if callable(ctx) else contextlib.nullcontext

    def measure(self, step: int, snapshot: bool = False) -> dict[str, float]:
        """One pass (all ranks together): the ``gere/monitor_*`` values at ``step``. ``snapshot=True``
        takes the base snapshot from the model as it is (step 0)."""
        t0 = time.perf_counter()
        model = self._model()
        device = next(model.parameters()).device
        with eval_no_grad(model):
            gen = self.general.score(model, device, snapshot, self.states, self._autocast())
            task = self.task.score(model, device, snapshot, None, self._autocast())
        local = torch.cat([gen, task[[1, 2]]])  # nll, n, kl, oos, elements, task n, task kl
        if self.sharded and self.rank != 0:
            local = torch.zeros_like(local)
        acc = getattr(self.trainer, "accelerator", None)
        if acc is not None and acc.num_processes > 1:
            local = acc.reduce(local.to(acc.device), reduction="sum")
        nll, n, kl, oos, elements, task_n, task_kl = local.cpu().tolist()  # the one host sync of the pass
        nll_mean = nll / max(n, 1.0)
        if snapshot:
            self.base_nll = nll_mean
        assert self.base_nll is not None
        values = {
            "gere/monitor_ppl": math.exp(nll_mean),
            "gere/monitor_ppl_rise": math.exp(nll_mean - self.base_nll) - 1.0,
            "gere/monitor_kl": kl / max(n, 1.0),
        }
        if task_n > 0:
            values["gere/monitor_task_kl"] = task_kl / task_n
        if elements > 0:
            values["gere/monitor_out_of_state"] = oos / elements
        self.seconds.append((step, time.perf_counter() - t0))
        self.history.append({"step": float(step), **values})
        self._last_step = step
        return values

    def _guard(self, values: dict[str, float], step: int, control: Any) -> None:
        rise = values["gere/monitor_ppl_rise"]
        if self.max_rise is None or not rise > self.max_rise:
            return
        base_ppl = math.exp(self.base_nll or 0.0)
        message = (
            f"gere_monitor_max_ppl_rise={self.max_rise:g} crossed at step {step}: held-out perplexity rose "
            f"{rise:+.1%} over the base model ({values['gere/monitor_ppl']:.3f} vs {base_ppl:.3f} on gere_monitor)."
        )
        if self.action == "stop":
            control.should_training_stop = True
            message += (" Stopping training (gere_monitor_action=stop). Lower the learning rate, replay general "
                        "text (gere_replay), or raise gere_monitor_max_ppl_rise.")
        else:
            message += (" Training continues (gere_monitor_action=warn; set it to stop to end the run here). Lower "
                        "the learning rate or replay general text (gere_replay).")
        if self.tripped is None:
            self.tripped = {"step": float(step), "ppl_rise": rise}
        logger.warning("gere: %s", message)

    # -- Trainer hooks ----------------------------------------------------------------------------
    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if state.global_step > 0 and self._load_snapshot():
            return control
        if state.global_step > 0:
            logger.warning(
                "gere: resuming at step %d without the monitor's base snapshot (%s in the checkpoint): "
                "gere/monitor_ppl_rise and the KL metrics are relative to the resumed model from here on.",
                state.global_step, SNAPSHOT_FILE.format(rank=self.rank))
        values = self.measure(state.global_step, snapshot=True)
        # No Trainer log happens before the first step: log step 0 now (every report_to backend).
        self.trainer.log(dict(values))
        return control

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        step = state.global_step
        if step == self._last_step or (step % self.every and step < state.max_steps):
            return control
        values = self.measure(step)
        store = getattr(self.trainer, "_metrics", None)
        if store is not None:
            for key, value in values.items():
                store["train"][key].append(value)
        control.should_log = True  # logged at exactly this step
        self._guard(values, step, control)
        return control

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if ckpt.is_dir() and self.base_nll is not None:
            self._save_snapshot(ckpt)
        return control

    # -- checkpoint ---------------------------------------------------------------------------------
    def _save_snapshot(self, folder: Path) -> None:
        from safetensors.torch import save_file

        tensors = {}
        for name, rowset in (("g", self.general), ("t", self.task)):
            for b, snap in enumerate(rowset.snapshot):
                for k, v in snap.items():
                    tensors[f"{name}{b}.{k}"] = v.detach().contiguous().cpu()
        meta = {"fingerprint": self.fingerprint, "base_nll": repr(self.base_nll), "top_k": str(TOP_K)}
        path = folder / SNAPSHOT_FILE.format(rank=self.rank)
        tmp = path.with_name(f".{path.name}.tmp")
        save_file(tensors, str(tmp), metadata=meta)
        tmp.replace(path)

    def _load_snapshot(self) -> bool:
        if not self.resume_checkpoint:
            return False
        path = Path(self.resume_checkpoint) / SNAPSHOT_FILE.format(rank=self.rank)
        if not path.is_file():
            return False
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            if meta.get("fingerprint") != self.fingerprint or meta.get("top_k") != str(TOP_K):
                logger.warning("gere: %s was written for other monitor rows (gere_monitor*, gere_seed, processes).", path)
                return False
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        device = next(self._model().parameters()).device
        for name, rowset in (("g", self.general), ("t", self.task)):
            rowset.snapshot = [
                {k.split(".", 1)[1]: v.to(device) for k, v in tensors.items() if k.split(".", 1)[0] == f"{name}{b}"}
                for b in range(len(rowset.batches))
            ]
        self.base_nll = float(meta["base_nll"])
        logger.info("gere: monitor base snapshot loaded from %s", path)
        return True


def _fingerprint(general: Sequence[Sequence[int]], task: Sequence[Sequence[int]], world: int, rank: int) -> str:
    h = hashlib.sha256(json.dumps([world, rank, TOP_K]).encode())
    for rows in (general, task):
        for ids in rows:
            h.update(np.asarray(ids, dtype=np.int64).tobytes())
            h.update(b"|")
        h.update(b"#")
    return h.hexdigest()[:32]

