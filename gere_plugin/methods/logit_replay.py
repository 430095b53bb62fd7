"""Logit replay of earlier tasks (dark-experience-replay style, ``gere_task_replay_logit_weight``).

Earlier-task replay (:mod:`gere_plugin.methods.earlier_tasks`) trains on a few rows of every earlier task
by cross-entropy. Logit replay adds, on those same rows, a KL from the distribution the model had when
that earlier task ENDED to the model's current one, at the rows' target positions::

    earlier-task part of the task term = c * rho * (CE_earlier + beta * KL_earlier)

``KL_earlier`` is summed over the target tokens of the step's earlier-task rows and divided by the same
count ``N`` as their CE (a token of a row without a snapshot adds 0 to the sum), so it is scaled exactly
like the CE over micro-batches, accumulation and ranks (:class:`~gere_plugin.methods.earlier_tasks.TaskReplay`).

**The snapshot.** When a task ends, :func:`write_logit_snapshot` stores, for every kept row of its
``gere_task_replay`` file and every target position (``mask[t] == 1`` for ``t >= 1``, predicted from
position ``t - 1``), the model's ``k`` largest log-probabilities, their token ids and the log of the mass
on every other token (:func:`topk_snapshot`), in ``<file stem>.topk.safetensors`` beside the file
(:func:`snapshot_path`), written atomically. Each row carries a 64-bit digest of its token ids and loss
mask, so a snapshot of other rows (another tokenizer, ``max_length`` or file) is refused by name.

**The KL** is the monitor's top-k KL (:func:`gere_plugin.monitor.kl.topk_kl`): the exact KL of the two
distributions coarse-grained to the snapshot's ``k`` tokens plus one "rest" bucket. It is exactly the
full-vocabulary KL when ``k`` is the vocabulary size, and otherwise ``0 <= topk_kl <= KL``: it only
ignores how the stored rest mass is spread over the other tokens (``k = 32`` keeps almost all mass of a
trained model's next-token distribution). The model's side needs its logits at the target positions
only: the hidden states of those positions go through the logit head a chunk at a time (never
``[rows, tokens, vocab]``), CE and KL from the same log-softmax.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint

from ..config import GeReConfigError
from ..data.task_rows import TaskReplaySet, Tokenization
from ..monitor.kl import rest_logmass, topk_kl
from ..ops.logits import LogitHead, num_chunks

logger = logging.getLogger(__name__)

KEY = "gere_task_replay_logit_weight"
#: Suffix of a snapshot file beside its earlier-task file (``0_sst2.jsonl`` -> ``0_sst2.topk.safetensors``).
SNAPSHOT_SUFFIX = ".topk.safetensors"
FORMAT_VERSION = "1"


def snapshot_path(source: str | Path) -> Path:
    """Where the snapshot of the earlier-task file ``source`` lives (beside it)."""
    p = Path(source)
    return p.with_name(p.stem + SNAPSHOT_SUFFIX)


def row_digest(ids: Sequence[int], mask: Sequence[int]) -> int:
    """64-bit digest of one row's token ids and loss mask (what a snapshot row must match)."""
    h = hashlib.sha256(np.asarray(ids, dtype=np.int64).tobytes())
    h.update(b"|")
    h.update(np.asarray(mask, dtype=np.int8).tobytes())
    return int.from_bytes(h.digest()[:8], "little", signed=True)


def target_positions(target_mask: torch.Tensor) -> torch.Tensor:
    """``[B, T-1]`` bool: position ``t - 1`` predicts target ``t`` (``target_mask[t] == 1``, ``t >= 1``).

    Boolean indexing with it orders the positions row by row, left to right: the snapshot's order."""
    return target_mask[:, 1:].bool()


def topk_snapshot(logits: torch.Tensor, target_mask: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top-``k`` log-probabilities at the target positions of ``logits`` (``[B, T, V]``).

    Returns ``(values [N, k] float32, indices [N, k] int32, log_rest [N] float32)`` for the ``N`` target
    positions (:func:`target_positions` order); ``log_rest`` is the log of the mass on every other token
    (:func:`~gere_plugin.monitor.kl.rest_logmass`). ``k`` is capped at the vocabulary size."""
    keep = target_positions(target_mask).to(logits.device)
    logp = torch.log_softmax(logits[:, :-1][keep].float(), dim=-1)
    values, indices = logp.topk(min(k, logp.shape[-1]), dim=-1)
    return values, indices.int(), rest_logmass(logp, indices).float()


def position_ce_kl(logits: torch.Tensor, targets: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
                   log_rest: torch.Tensor, has: torch.Tensor) -> torch.Tensor:
    """Per position ``[n, 2]``: the CE of ``targets`` under ``logits`` (``[n, V]``) and the top-k
    ``KL(stored || model)`` against a snapshot (0 where ``has`` is false), from one log-softmax."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    ce = -logp.gather(-1, targets[:, None]).squeeze(-1)
    idx = indices.long()
    kl = topk_kl(values, logp.gather(-1, idx), log_rest, rest_logmass(logp, idx)).to(ce.dtype)
    return torch.stack([ce, torch.where(has, kl, torch.zeros_like(kl))], dim=-1)


def _head_chunk(head: LogitHead, hidden: torch.Tensor, targets: torch.Tensor, values: torch.Tensor,
                indices: torch.Tensor, log_rest: torch.Tensor, has: torch.Tensor) -> torch.Tensor:
    return position_ce_kl(head(hidden), targets, values, indices, log_rest, has)


# ---------------------------------------------------------------------------------------------
# The snapshot file
# ---------------------------------------------------------------------------------------------
@dataclass
class LogitSnapshot:
    """One earlier-task file's stored top-k log-probabilities: the positions of row ``r`` are
    ``offsets[r]:offsets[r+1]``; ``records[r]`` is the row's index in the file, ``digests[r]`` its
    :func:`row_digest`."""

    values: torch.Tensor  # [P, k] float32
    indices: torch.Tensor  # [P, k] int32
    log_rest: torch.Tensor  # [P] float32
    offsets: torch.Tensor  # [R + 1] int64
    records: torch.Tensor  # [R] int64
    digests: torch.Tensor  # [R] int64
    meta: dict[str, str]

    @property
    def k(self) -> int:
        return int(self.values.shape[1])

    @property
    def fingerprint(self) -> str:
        """sha256 (32 hex) of the rows' digests: which rows the snapshot is of."""
        return hashlib.sha256(self.digests.numpy().tobytes()).hexdigest()[:32]

    @property
    def content_hash(self) -> str:
        """sha256 (32 hex) of everything stored: another model's snapshot of the same rows differs here."""
        h = hashlib.sha256()
        for t in (self.values, self.indices, self.log_rest, self.offsets, self.records, self.digests):
            h.update(t.contiguous().numpy().tobytes())
        return h.hexdigest()[:32]

    def to_bytes(self) -> bytes:
        from safetensors.torch import save

        tensors = {"values": self.values, "indices": self.indices, "log_rest": self.log_rest,
                   "offsets": self.offsets, "records": self.records, "digests": self.digests}
        meta = dict(self.meta, format=FORMAT_VERSION, k=str(self.k), fingerprint=self.fingerprint)
        return save({n: t.contiguous().cpu() for n, t in tensors.items()}, metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> LogitSnapshot:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
                tensors = {n: f.get_tensor(n) for n in ("values", "indices", "log_rest", "offsets", "records", "digests")}
        except Exception as e:  # a truncated or foreign file
            raise GeReConfigError(
                f"{KEY}: the logit snapshot {path} cannot be read ({type(e).__name__}: {e}). Delete it to replay that "
                "task by cross-entropy only, or write it again (gere_plugin.methods.logit_replay.write_logit_snapshot)."
            ) from None
        if meta.get("format") != FORMAT_VERSION:
            raise GeReConfigError(
                f"{KEY}: the logit snapshot {path} has format {meta.get('format')!r}, this version reads "
                f"{FORMAT_VERSION!r}. Write it again or delete it."
            )
        return cls(**tensors, meta=meta)


def take_snapshot(model: torch.nn.Module, rows: TaskReplaySet, k: int, pad_token_id: int, batch_size: int = 8,
                  autocast_dtype: Optional[torch.dtype] = None) -> LogitSnapshot:
    """The top-``k`` snapshot of ``model`` on every row of ``rows`` (one source), in eval mode, no gradient."""
    if len(rows.sources) != 1:
        raise ValueError("take_snapshot takes the rows of one earlier-task source")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    vals, idxs, rests = [], [], []
    try:
        with torch.no_grad():
            for start in range(0, len(rows), batch_size):
                batch = rows.collate(range(start, min(start + batch_size, len(rows))), pad_token_id, device=device)
                with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                   use_cache=False).logits
                v, i, r = topk_snapshot(logits, batch["target_mask"], k)
                vals.append(v.cpu())
                idxs.append(i.cpu())
                rests.append(r.cpu())
    finally:
        model.train(was_training)
    offsets = torch.zeros(len(rows) + 1, dtype=torch.int64)
    offsets[1:] = torch.as_tensor(rows.targets, dtype=torch.int64).cumsum(0)
    digests = torch.tensor([row_digest(i, m) for i, m in zip(rows.input_ids, rows.loss_masks)], dtype=torch.int64)
    return LogitSnapshot(torch.cat(vals), torch.cat(idxs), torch.cat(rests), offsets,
                         torch.as_tensor(rows.records, dtype=torch.int64), digests,
                         meta={"source": Path(rows.sources[0]).name,
                               "model": str(getattr(getattr(model, "config", None), "_name_or_path", ""))})


def write_logit_snapshot(model: torch.nn.Module, source: str | Path, tokenizer: Any, how: Tokenization, k: int,
                         pad_token_id: int, batch_size: int = 8, autocast_dtype: Optional[torch.dtype] = None,
                         key: Optional[str] = None) -> Path:
    """Take the snapshot of ``model`` on every usable row of the earlier-task file ``source`` (tokenized and
    truncated by ``how``, as :class:`~gere_plugin.data.task_rows.TaskReplaySet` reads it later) and write it
    atomically to :func:`snapshot_path`; return that path. ``key``: the setting a failed write names."""
    from ..cache.io import write_file_atomically
    from ..data.sources import load_records

    count = len(load_records(str(source), "train", key="gere_task_replay"))
    rows = TaskReplaySet.from_sources([str(source)], tokenizer, how, max(count, 1), seed=0)
    snap = take_snapshot(model, rows, k, pad_token_id, batch_size, autocast_dtype)
    path = snapshot_path(source)
    write_file_atomically(path, snap.to_bytes(), "the logit snapshot of an earlier task", key=key)
    return path


# ---------------------------------------------------------------------------------------------
# The snapshots of a trainer's earlier-task rows, and their loss
# ---------------------------------------------------------------------------------------------
class LogitReplay:
    """The stored top-k targets of a :class:`~gere_plugin.data.task_rows.TaskReplaySet`'s rows, and the
    CE + KL of a micro-batch's rows against them (built by the earlier-task term when ``beta > 0``)."""

    def __init__(self, rows: TaskReplaySet, weight: float, k: int, vocab_size: int = 0) -> None:
        self.rows = rows
        self.weight = weight
        self.k = min(k, vocab_size) if vocab_size else k  # a snapshot keeps at most the vocabulary
        self.snapshots: dict[int, LogitSnapshot] = {}
        self.where: list[Optional[tuple[int, int]]] = [None] * len(rows)  # row -> (source, snapshot row)
        for index, source in enumerate(rows.sources):
            path = snapshot_path(source)
            if not path.is_file():
                logger.warning("gere: %s has no logit snapshot (%s): its rows are replayed by cross-entropy only.",
                               source, path)
                continue
            snap = LogitSnapshot.load(path)
            if snap.k < self.k:
                raise GeReConfigError(
                    f"{KEY}: the logit snapshot {path} keeps the top {snap.k} tokens but gere_task_replay_topk={k}. "
                    f"Set gere_task_replay_topk <= {snap.k} or write the snapshot again with k={k}."
                )
            if vocab_size and snap.indices.numel() and int(snap.indices.max()) >= vocab_size:
                raise GeReConfigError(
                    f"{KEY}: the logit snapshot {path} holds token ids up to {int(snap.indices.max())}, the model's "
                    f"vocabulary has {vocab_size}: it was taken with another model. Write it again or delete it."
                )
            self.snapshots[index] = snap
            self._match(index, snap, path)

    def _match(self, index: int, snap: LogitSnapshot, path: Path) -> None:
        at = {int(r): j for j, r in enumerate(snap.records.tolist())}
        for i, (src, record) in enumerate(zip(self.rows.task_of, self.rows.records)):
            if src != index:
                continue
            j = at.get(int(record))
            stored = None if j is None else int(snap.digests[j])
            if stored != row_digest(self.rows.input_ids[i], self.rows.loss_masks[i]):
                raise GeReConfigError(
                    f"{KEY}: the logit snapshot {path} does not hold row {record} of {self.rows.sources[index]} as "
                    "the trainer tokenizes it (other token ids, loss mask or max_length than when the snapshot was "
                    "taken). Write the snapshot again with this tokenizer and max_length, or delete it to replay that "
                    "task by cross-entropy only."
                )
            self.where[i] = (index, j)  # type: ignore[assignment]

    @property
    def covered(self) -> int:
        """Rows with a snapshot."""
        return sum(w is not None for w in self.where)

    def targets_of(self, rows: Sequence[int], device: torch.device) -> tuple[torch.Tensor, ...]:
        """``(values, indices, log_rest, has)`` of the target positions of ``rows`` in their order (zeros and
        ``has = False`` for a row without a snapshot)."""
        vals, idxs, rests, has = [], [], [], []
        for i in rows:
            n = int(self.rows.targets[i])
            w = self.where[i]
            if w is None:
                vals.append(torch.zeros(n, self.k))
                idxs.append(torch.zeros(n, self.k, dtype=torch.int32))
                rests.append(torch.zeros(n))
                has.append(torch.zeros(n, dtype=torch.bool))
                continue
            snap = self.snapshots[w[0]]
            a, b = int(snap.offsets[w[1]]), int(snap.offsets[w[1] + 1])
            vals.append(snap.values[a:b, : self.k])
            idxs.append(snap.indices[a:b, : self.k])
            rests.append(self._rest(snap, a, b))
            has.append(torch.ones(n, dtype=torch.bool))
        return tuple(torch.cat(t).to(device, non_blocking=True) for t in (vals, idxs, rests, has))

    def _rest(self, snap: LogitSnapshot, a: int, b: int) -> torch.Tensor:
        """The stored rest mass, widened by the dropped tokens when fewer than the stored ``k`` are used."""
        if self.k >= snap.k:
            return snap.log_rest[a:b]
        return torch.cat([snap.log_rest[a:b, None], snap.values[a:b, self.k :]], dim=1).logsumexp(-1)

    def snapshot_tokens(self, rows: Sequence[int]) -> int:
        """Target tokens of ``rows`` that have a snapshot (host ints)."""
        return sum(int(self.rows.targets[i]) for i in rows if self.where[i] is not None)

    def ce_kl_of(self, rows: Sequence[int], batch: dict[str, torch.Tensor], last: Optional[torch.Tensor],
                 logits: Optional[torch.Tensor], head: Optional[LogitHead] = None, chunk: int = 0,
                 min_chunks: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """``(CE sum, KL sum)`` over the target tokens of ``rows`` (collated as ``batch``) from a forward already
        run over them: their final hidden states ``last`` with ``head``, else their ``logits``, each ``[rows,
        batch width, ...]`` (the KL sum counts only rows with a snapshot). With ``head`` only the target
        positions' hidden states reach it, ``chunk`` of them at a time (each chunk checkpointed; ``min_chunks``
        head calls at least, for sharded heads). A chunk holds its logits, their log-softmax and one more copy
        for the rest mass: take ``chunk`` from :func:`~gere_plugin.ops.logits.kl_chunk_tokens` (half the CE
        chunk)."""
        keep = target_positions(batch["target_mask"])
        targets = batch["input_ids"][:, 1:][keep]
        stored = self.targets_of(rows, batch["input_ids"].device)
        if head is None:
            assert logits is not None
            per = position_ce_kl(logits[:, :-1][keep], targets, *stored)
        else:
            assert last is not None
            per = self._chunked(head, last[:, :-1][keep], targets, stored, chunk, min_chunks)
        return per[:, 0].sum(), per[:, 1].sum()

    @staticmethod
    def _chunked(head: LogitHead, hidden: torch.Tensor, targets: torch.Tensor, stored: tuple[torch.Tensor, ...],
                 chunk: int, min_chunks: int) -> torch.Tensor:
        parts = []
        for c in range(max(num_chunks(hidden.shape[0], chunk), min_chunks, 1)):
            pieces = [t[c * chunk : (c + 1) * chunk] for t in (hidden, targets, *stored)]
            if torch.is_grad_enabled():
                parts.append(checkpoint(_head_chunk, head, *pieces, use_reentrant=False, preserve_rng_state=False))
            else:
                parts.append(_head_chunk(head, *pieces))
        return torch.cat(parts)

    def describe(self) -> str:
        return (f"logit replay beta {self.weight:g}: KL(top-{self.k} snapshot || model) on {self.covered} of "
                f"{len(self.rows)} earlier-task rows ({len(self.snapshots)} of {len(self.rows.sources)} tasks with a "
                "snapshot)")

    def state_dict(self) -> dict[str, Any]:
        return {"weight": self.weight, "topk": self.k,
                "snapshots": {self.rows.sources[i]: s.content_hash for i, s in sorted(self.snapshots.items())}}


def snapshot_summary(path: str | Path) -> dict[str, Any]:
    """What a snapshot file holds (rows, positions, k, fingerprint), for records and reports."""
    snap = LogitSnapshot.load(path)
    return {"path": str(path), "rows": int(snap.records.numel()), "positions": int(snap.values.shape[0]), "k": snap.k,
            "fingerprint": snap.fingerprint, "content_hash": snap.content_hash}
