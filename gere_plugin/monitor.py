"""The forgetting monitor: general-ability drift measured while training, with or without replay.

Before the first update (step 0), every ``gere_monitor_steps`` optimizer steps and after the last step,
:class:`ForgettingMonitor` (a ``TrainerCallback``) runs the model in eval mode under ``torch.no_grad``
over a fixed set of held-out general texts (``gere_monitor``) and a fixed sample of the training set's
own rows, restores every module's training flag, and logs through the trainer's metrics store (so
every ``report_to`` backend gets them):

==================================  ====================================================================
``gere/monitor_ppl``                perplexity of the monitor texts (token-weighted, as
                                    :func:`gere_plugin.evaluation.scoring.perplexity`)
``gere/monitor_ppl_rise``           ``ppl / ppl_at_step_0 - 1`` (0.2 = +20% over the base model)
``gere/monitor_kl``                 token-mean ``KL(base || model)`` on the monitor texts
``gere/monitor_task_kl``            the same on ``gere_monitor_task_size`` training rows: the forward KL on
                                    the new task's own inputs, which "RL's Razor" (arXiv 2509.04259)
                                    found to predict how much a fine-tune forgets
``gere/monitor_out_of_state``       (when GeRe's state cache exists) fraction of hidden-state elements of
                                    the monitor texts outside the activation state they had at step 0
==================================  ====================================================================

**The base side needs no second model.** At step 0 the model *is* the base: the monitor keeps, per
scored position, the base's ``TOP_K`` largest log-probabilities and their token ids (8 bytes each:
64 x 8 + 4 = 516 bytes per position, about 4 MiB for 64 texts of 128 tokens), plus the base perplexity. Later
passes compare the model's distribution with that snapshot coarse-grained to ``TOP_K + 1`` outcomes
(the base's top-k tokens and one bucket for the rest of the vocabulary, whose base mass is kept too),
:func:`topk_kl`. That is the
exact KL of the coarse-grained distributions: never above the full KL (data-processing inequality),
equal to it up to the base's tail mass, and exactly 0 while the model equals the base. The same
snapshot serves full fine-tunes and LoRA (no adapter-disabled forward, so a pass costs one forward
per row for both, and "base" means the model before the first update in both).

Every rank scores its share of the rows (``i % world_size == rank``), and one all-reduce per pass
turns the partial sums into the same means on every rank. Under parameter sharding (FSDP, ZeRO-3)
every rank runs every row (the forwards gather parameters collectively) and only rank 0's sums count.
The pass uses no random numbers and does not touch parameters, gradients, the optimizer or the data
order, so training with and without the monitor gives the same weights (a test checks bit-identity).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from transformers import TrainerCallback

from .config import GeReConfigError
from .evaluation.scoring import encode_texts
from .losses import tm_loss
from .replay import ReplayError, extract_texts, load_records
from .states import label_states, pack_trits, unpack_trits

logger = logging.getLogger(__name__)

#: Base log-probabilities kept per scored position; the rest of the vocabulary is one bucket.
TOP_K = 64
#: Padded tokens per monitor forward (rows are batched, longest first, up to this budget).
TOKENS_PER_FORWARD = 2048
#: Positions per log-softmax (bounds the float32 ``[positions, vocabulary]`` temporaries).
POSITIONS_PER_CHUNK = 512
#: The file a checkpoint gets per rank, so that a resumed run keeps comparing with the base.
SNAPSHOT_FILE = "gere_monitor_rank{rank}.safetensors"
METRIC_KEYS = (
    "gere/monitor_ppl", "gere/monitor_ppl_rise", "gere/monitor_kl", "gere/monitor_task_kl",
    "gere/monitor_out_of_state",
)  # fmt: skip
#: Clamp of log tail masses (the same on both sides, so equal distributions give exactly 0).
_LOG_TINY = -700.0


class MonitorError(GeReConfigError):
    """The monitor cannot run as configured. The message names the ``gere_monitor*`` key and the fix."""


# ---------------------------------------------------------------------------------------------
# Pure functions
# ---------------------------------------------------------------------------------------------
def rest_logmass(logp: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``log`` of the probability mass outside the tokens ``idx`` (``[N, K]``) of log-probabilities ``logp``
    (``[N, V]``), summed directly over the other tokens (no ``1 - sum`` cancellation)."""
    return logp.scatter(-1, idx.long(), float("-inf")).logsumexp(-1)


def topk_kl(
    base_logp: torch.Tensor, model_logp: torch.Tensor, base_log_rest: torch.Tensor, model_log_rest: torch.Tensor
) -> torch.Tensor:
    """Per-position ``KL(base || model)`` over the base's top-k tokens plus one "rest" bucket.

    Args:
        base_logp: ``[N, K]`` the base's log-probabilities of its ``K`` most likely tokens.
        model_logp: ``[N, K]`` the model's log-probabilities of the same tokens.
        base_log_rest / model_log_rest: ``[N]`` log of each side's mass on every other token
            (:func:`rest_logmass`).

    Returns ``[N]`` float64: ``sum_k p_k (log p_k - log q_k) + r_p (log r_p - log r_q)``. This is the
    exact KL of the two distributions coarse-grained to ``K + 1`` outcomes, so ``0 <= result <=
    KL(base || model)``; it is exactly 0 where both sides are equal, and it differs from the full KL
    only through how the base's rest mass is spread over the other tokens.
    """
    b = base_logp.double()
    head = (b.exp() * (b - model_logp.double())).sum(-1)
    # the same clamp on both sides (an empty rest is -inf): equal inputs still give exactly 0
    log_rb = base_log_rest.double().clamp(min=_LOG_TINY)
    log_rm = model_log_rest.double().clamp(min=_LOG_TINY)
    return head + log_rb.exp() * (log_rb - log_rm)


def full_kl(base_logits: torch.Tensor, model_logits: torch.Tensor) -> torch.Tensor:
    """Per-position ``KL(base || model)`` over the whole vocabulary (float64): what :func:`topk_kl`
    approximates (used by tests and the benchmark to measure the approximation)."""
    b = torch.log_softmax(base_logits.double(), -1)
    m = torch.log_softmax(model_logits.double(), -1)
    return (b.exp() * (b - m)).sum(-1)


# ---------------------------------------------------------------------------------------------
# What the monitor scores
# ---------------------------------------------------------------------------------------------
def _rekey(message: str, key: str) -> str:
    """A replay-reader message about ``gere_replay`` retold about ``key`` (shared keys stay as they are)."""
    return re.sub(r"\bgere_replay(?![_A-Za-z])", key, message)


@dataclass
class MonitorTexts:
    """The monitor's held-out texts as :func:`~gere_plugin.evaluation.scoring.perplexity` scores them."""

    texts: list[str]
    input_ids: list[list[int]]
    source: str

    @property
    def num_tokens(self) -> int:
        return sum(len(x) for x in self.input_ids)


def _normalise(text: str) -> str:
    return " ".join(text.split())


def load_monitor_texts(args: Any, tokenizer: Any) -> MonitorTexts:
    """Read ``gere_monitor`` with the replay readers and draw ``gere_monitor_size`` texts (seeded by
    ``gere_seed``) that have at least 2 tokens; kept in source order. Fewer usable texts: all of them."""
    source = args.gere_monitor
    try:
        records = load_records(source, args.gere_replay_split)
        texts, _ = extract_texts(records, args.gere_replay_text_field, source)
    except ReplayError as e:
        raise MonitorError(_rekey(str(e), "gere_monitor")) from None
    size, max_length = int(args.gere_monitor_size), int(args.gere_monitor_max_length)
    order = np.random.default_rng(int(args.gere_seed)).permutation(len(texts))
    chosen: list[int] = []
    for start in range(0, len(order), 256):
        part = [int(i) for i in order[start : start + 256]]
        for i, ids in zip(part, encode_texts(tokenizer, [texts[i] for i in part], max_length)):
            if len(ids) >= 2:
                chosen.append(i)
            if len(chosen) == size:
                break
        if len(chosen) == size:
            break
    if not chosen:
        raise MonitorError(f"gere_monitor={source!r}: no text has 2 or more tokens. Point it at general text.")
    if len(chosen) < size:
        logger.warning("gere: gere_monitor=%s has only %d usable texts; the monitor scores all of them "
                       "(gere_monitor_size=%d).", source, len(chosen), size)
    chosen.sort()
    kept = [texts[i] for i in chosen]
    return MonitorTexts(texts=kept, input_ids=encode_texts(tokenizer, kept, max_length), source=str(source))


def check_disjoint(monitor: MonitorTexts, replay_texts: Sequence[str], replay_source: str) -> None:
    """Raise when a monitor text is also a replay text (compared with whitespace collapsed)."""
    replayed = {_normalise(t) for t in replay_texts}
    shared = [t for t in monitor.texts if _normalise(t) in replayed]
    if shared:
        example = shared[0][:80] + ("..." if len(shared[0]) > 80 else "")
        raise MonitorError(
            f"gere_monitor={monitor.source!r}: {len(shared)} of its {len(monitor.texts)} texts are also in the replay "
            f"set (gere_replay={replay_source!r}), e.g. {example!r}. The monitor must measure text the model does not "
            "train on: point gere_monitor at held-out general texts, disjoint from gere_replay (split your corpus "
            "into two files)."
        )


def _as_ids(value: Any) -> Optional[list[int]]:
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if isinstance(value, (list, tuple)) and value and all(isinstance(x, int) for x in value):
        return list(value)
    return None


def _chat_or_text(tokenizer: Any, value: Any) -> Optional[list[int]]:
    if isinstance(value, str):
        return list(tokenizer(value, add_special_tokens=False)["input_ids"])
    if isinstance(value, list) and value and all(isinstance(m, dict) and "content" in m for m in value):
        out = tokenizer.apply_chat_template(value, tokenize=True)
        out = out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out
        return _as_ids(out)
    return None


def row_token_ids(row: dict, tokenizer: Any) -> Optional[list[int]]:
    """Token ids of one training row, whatever the trainer prepared: ``input_ids`` (TRL SFT, Axolotl),
    ``prompt_ids`` + ``chosen_ids`` / ``completion_ids`` (TRL DPO), or raw ``text`` / ``messages`` /
    ``prompt`` (+ ``completion`` / ``chosen``) strings or conversations (e.g. GRPO prompts). ``None``
    when the row has none of these."""
    ids = _as_ids(row.get("input_ids"))
    if ids is not None:
        return ids
    prompt_ids = _as_ids(row.get("prompt_ids")) or _as_ids(row.get("prompt_input_ids"))
    if prompt_ids is not None:
        answer = next((_as_ids(row.get(k)) for k in ("chosen_ids", "completion_ids", "chosen_input_ids")
                       if _as_ids(row.get(k)) is not None), [])
        return prompt_ids + (answer or [])
    for key in ("text", "messages"):
        ids = _chat_or_text(tokenizer, row.get(key))
        if ids is not None:
            return ids
    prompt = row.get("prompt")
    answer = next((row.get(k) for k in ("completion", "chosen") if row.get(k) is not None), None)
    if isinstance(prompt, str) and (answer is None or isinstance(answer, str)):
        return _chat_or_text(tokenizer, prompt + (answer or ""))
    if isinstance(prompt, list):
        return _chat_or_text(tokenizer, prompt + (answer if isinstance(answer, list) else []))
    return None


def task_sample(dataset: Any, tokenizer: Any, size: int, seed: int, max_length: int) -> list[list[int]]:
    """Token ids of ``size`` training rows (fixed, seeded; read by index, so the training data order is
    untouched), truncated to ``max_length``. Empty when the dataset has no length or unknown fields."""
    if size <= 0 or dataset is None:
        return []
    try:
        n = len(dataset)
    except TypeError:
        logger.warning("gere: the training set has no length (an iterable dataset): gere/monitor_task_kl is not "
                       "measured (set gere_monitor_task_size: 0 to silence this).")
        return []
    if n == 0:
        return []
    picks = sorted(int(i) for i in np.random.default_rng(seed).choice(n, size=min(size, n), replace=False))
    rows = []
    for i in picks:
        row = dataset[i]
        ids = row_token_ids(dict(row), tokenizer) if hasattr(row, "keys") else None
        if ids is None:
            fields = sorted(row.keys()) if hasattr(row, "keys") else type(row).__name__
            logger.warning("gere: gere_monitor_task_size: cannot read token ids from training rows with fields %s; "
                           "gere/monitor_task_kl is not measured (set gere_monitor_task_size: 0 to silence this).",
                           fields)
            return []
        if len(ids[:max_length]) >= 2:
            rows.append(ids[:max_length])
    return rows


# ---------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------
@dataclass
class _Batch:
    input_ids: torch.Tensor  # [B, T] right-padded (CPU until first use)
    lengths: list[int]


def _make_batches(seqs: Sequence[Sequence[int]], pad_id: int, budget: int = TOKENS_PER_FORWARD) -> list[_Batch]:
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    groups: list[list[int]] = []
    for i in order:
        if groups and len(seqs[groups[-1][0]]) * (len(groups[-1]) + 1) <= budget:
            groups[-1].append(i)
        else:
            groups.append([i])
    out = []
    for g in groups:
        width = len(seqs[g[0]])
        ids = torch.full((len(g), width), pad_id, dtype=torch.long)
        for r, i in enumerate(g):
            ids[r, : len(seqs[i])] = torch.tensor(list(seqs[i]), dtype=torch.long)
        out.append(_Batch(ids, [len(seqs[i]) for i in g]))
    return out


@dataclass
class _StateRef:
    """GeRe's thresholds (from the state cache) for ``gere/monitor_out_of_state``."""

    layers: list[int]
    pos: torch.Tensor  # [L, H]
    neg: torch.Tensor


@dataclass
class _RowSet:
    """One set of rows the monitor scores, and the base snapshot taken over it at step 0."""

    batches: list[_Batch]
    hidden_states: bool = False  # also label the hidden states (general texts, with a state cache)
    snapshot: list[dict[str, torch.Tensor]] = field(default_factory=list)

    def score(self, model: torch.nn.Module, device: torch.device, take: bool, states: Optional[_StateRef],
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
    def _out_of_state(hidden: Sequence[torch.Tensor], r: int, length: int, states: _StateRef, snap: dict, key: str,
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
def _eval_no_grad(model: torch.nn.Module) -> Iterator[None]:
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
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        acc = getattr(trainer, "accelerator", None)
        self.world_size = acc.num_processes if acc is not None else 1
        self.rank = acc.process_index if acc is not None else 0
        self.sharded = sharded
        task_rows = task_sample(getattr(trainer, "train_dataset", None), tokenizer, int(gere_args.gere_monitor_task_size),
                                int(gere_args.gere_seed), int(gere_args.gere_monitor_max_length))
        self.num_task_rows = len(task_rows)
        self.states: Optional[_StateRef] = None
        if states is not None:
            self.states = _StateRef(list(states.layers), states.pos.float(), states.neg.float())
        self.general = _RowSet(_make_batches(self._mine(self.texts.input_ids), pad), hidden_states=True)
        self.task = _RowSet(_make_batches(self._mine(task_rows), pad))
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
        model = self.trainer.model
        acc = getattr(self.trainer, "accelerator", None)
        if acc is not None:
            with contextlib.suppress(Exception):
                model = acc.unwrap_model(model)
        return model

    def _autocast(self) -> Any:
        ctx = getattr(self.trainer, "autocast_smart_context_manager", None)
        return ctx if callable(ctx) else contextlib.nullcontext

    def measure(self, step: int, snapshot: bool = False) -> dict[str, float]:
        """One pass (all ranks together): the ``gere/monitor_*`` values at ``step``. ``snapshot=True``
        takes the base snapshot from the model as it is (step 0)."""
        t0 = time.perf_counter()
        model = self._model()
        device = next(model.parameters()).device
        with _eval_no_grad(model):
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

