"""FLOW: weight every task sample by how easy the model already finds it (no replay data needed).

Sanyal et al., "Upweighting Easy Samples in Fine-Tuning Mitigates Forgetting" (ICML 2025). What this
module computes, exactly:

* **base loss** of task sample ``i``: ``l_i`` = the token-mean cross-entropy, over the sample's trained
  tokens (labels != -100), of the model as it is handed to the trainer (before any step), in eval mode;
  computed once before training, batched, and cached (:data:`FLOW_CACHE`);
* **temperature** ``tau`` = the median of ``l_i`` over the task samples (``gere_flow_tau`` overrides it);
* **weight** ``w_i = exp(-l_i / tau)`` (all <= 1; the median sample gets ``exp(-1) = 0.37``), or with
  ``gere_flow_normalize`` ``w_i / mean_j w_j`` (mean 1, so the learning rate keeps its meaning);
* **weighted task loss**: every trained token of sample ``i`` counts ``w_i`` times in the numerator of
  the parent trainer's token mean, the denominator is unchanged:
  ``L = sum_i w_i * sum_t ce_{i,t} / N`` with ``N`` the number of trained tokens the parent trainer
  divides by (the optimizer step's tokens over all ranks when it averages over ``num_items_in_batch``,
  else the micro-batch's). This is the reference code's ``sequence`` weighting, and with all
  ``w_i = 1`` it is exactly TRL's SFT loss. Samples with no trained token keep weight 1 (they add 0).

Samples are recognised in the training batches by a digest of their real tokens and labels (no extra
dataset column, so TRL's and Axolotl's collators work unchanged); a training row whose digest was not
in the base-loss pass is an error, never a silent weight.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ..cache.folders import DEFAULT_FLOW_FOLDER, FLOW_CACHE, FLOW_LOSSES, StateCacheError, run_folder
from ..config import GeReConfigError
from ..data.trainer_rows import COLLATOR_COLUMNS, FORWARD_KEYS, task_batches  # noqa: F401 (older import path)
from ..ops.losses import per_row_ce
from .base import TaskBatch, TaskLossPart, Term, register

logger = logging.getLogger(__name__)

FLOW_FORMAT_VERSION = 1


# ---------------------------------------------------------------------------------------------
# Pure math
# ---------------------------------------------------------------------------------------------
def median_tau(base_losses: Sequence[float] | np.ndarray | torch.Tensor) -> float:
    """The paper's temperature: the median of the finite base losses (NaN = a sample with no trained token).

    With an even count this is the mean of the two middle values (``numpy.median``).
    """
    values = np.asarray(torch.as_tensor(base_losses, dtype=torch.float64).cpu())
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        raise GeReConfigError("gere_flow: no task sample has a trained token (every label is -100), so FLOW has nothing to weight.")
    return float(np.median(finite))


def flow_weights(
    base_losses: Sequence[float] | np.ndarray | torch.Tensor, tau: Optional[float] = None, normalize: bool = False
) -> tuple[torch.Tensor, float]:
    """``(w, tau)``: ``w_i = exp(-l_i / tau)`` (fp64), ``tau`` = the median base loss unless given.

    ``normalize`` divides by the mean weight. NaN losses (no trained token) get weight 1 before the
    normalisation and are not counted in its mean.
    """
    losses = torch.as_tensor(base_losses, dtype=torch.float64).cpu()
    if tau is None:
        tau = median_tau(losses)
    if not (math.isfinite(tau) and tau > 0):
        raise GeReConfigError(
            f"gere_flow: the temperature is {tau!r} (the median base loss), but it must be > 0: the base model already "
            "predicts the trained tokens perfectly. Set gere_flow_tau to a positive number."
        )
    finite = torch.isfinite(losses)
    w = torch.where(finite, torch.exp(-losses.nan_to_num(0.0) / tau), torch.ones_like(losses))
    if normalize and bool(finite.any()):
        w = torch.where(finite, w / w[finite].mean(), w)
    return w, float(tau)


def weighted_task_loss(row_ce_sums: torch.Tensor, row_weights: torch.Tensor, denominator: Any) -> torch.Tensor:
    """FLOW's task loss ``sum_i w_i * ce_sum_i / N`` (see the module docstring for ``N``)."""
    w = row_weights.to(row_ce_sums.device, row_ce_sums.dtype)
    denom = torch.as_tensor(denominator, device=row_ce_sums.device, dtype=row_ce_sums.dtype).clamp_min(1)
    return (w * row_ce_sums).sum() / denom


def weight_summary(weights: torch.Tensor, tau: float) -> dict[str, float]:
    """The weight distribution as logged: tau, min / p10 / median / p90 / max / mean, and the effective
    sample size ``(sum w)^2 / (n * sum w^2)`` as a fraction of the samples (1 = uniform weights)."""
    w = weights.double()
    q = torch.quantile(w, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
    return {
        "tau": float(tau),
        "weight_min": float(w.min()),
        "weight_p10": float(q[0]),
        "weight_median": float(q[1]),
        "weight_p90": float(q[2]),
        "weight_max": float(w.max()),
        "weight_mean": float(w.mean()),
        "effective_sample_fraction": float(w.sum() ** 2 / (w.numel() * (w**2).sum())),
    }


# ---------------------------------------------------------------------------------------------
# Recognising samples in batches
# ---------------------------------------------------------------------------------------------
def row_digest(input_ids: np.ndarray, labels: np.ndarray) -> int:
    """A 64-bit digest of one sample's real tokens and labels (as signed int64)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(np.ascontiguousarray(input_ids, dtype=np.int64).tobytes())
    h.update(b"|")
    h.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    return int.from_bytes(h.digest(), "little", signed=True)


def batch_digests(batch: dict[str, torch.Tensor]) -> list[int]:
    """Digests of the rows of a padded SFT batch (``input_ids``, ``attention_mask``, ``labels``)."""
    if "attention_mask" not in batch or "labels" not in batch:
        raise GeReConfigError(
            "gere_flow needs padded batches with attention_mask and labels; this batch has "
            f"{sorted(batch)} (padding-free or packed batches: set padding_free=False / packing=False, "
            "Axolotl: sample_packing: false)."
        )
    ids = batch["input_ids"].detach().cpu().numpy()
    mask = batch["attention_mask"].detach().cpu().numpy().astype(bool)
    labels = batch["labels"].detach().cpu().numpy()
    return [row_digest(ids[r][mask[r]], labels[r][mask[r]]) for r in range(ids.shape[0])]


def rows_fingerprint(digests: Sequence[int] | np.ndarray) -> str:
    """Fingerprint of a set of task samples, independent of their order."""
    arr = np.sort(np.asarray(digests, dtype=np.int64))
    return hashlib.sha256(arr.tobytes()).hexdigest()[:16]


@torch.no_grad()
def weights_fingerprint(model: torch.nn.Module) -> str:
    """Fingerprint of a model's weights: name, shape, dtype, sum and sum of squares (fp64) of every parameter.

    Computed on the parameters' device (one reduction each, no copy to the host), so it costs far less
    than the base-loss pass it keys; any training step changes it.
    """
    h = hashlib.sha256()
    stats = []
    for name, p in model.named_parameters():
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype};".encode())
        x = p.detach().double()
        stats.append(torch.stack([x.sum(), x.pow(2).sum()]))
    if stats:
        h.update(torch.stack(stats).cpu().numpy().tobytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# The base-loss table and its cache
# ---------------------------------------------------------------------------------------------
@dataclass
class FlowTable:
    """Base losses of the task samples, in dataset order, and the derived weights."""

    digests: np.ndarray  # int64 [N]
    losses: np.ndarray  # float64 [N], NaN = no trained token
    tokens: np.ndarray  # int64 [N] trained tokens per sample
    meta: dict
    tau: float = 0.0
    weights: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))
    _index: dict[int, int] = field(default_factory=dict, repr=False)

    def finish(self, tau: Optional[float], normalize: bool) -> FlowTable:
        """Compute tau and the weights; index the digests."""
        self.weights, self.tau = flow_weights(self.losses, tau, normalize)
        self._index = {int(d): i for i, d in enumerate(self.digests)}
        return self

    def lookup(self, digests: Sequence[int]) -> torch.Tensor:
        """The weights of rows with these digests (fp32); an error naming the cache when one is unknown."""
        try:
            idx = [self._index[int(d)] for d in digests]
        except KeyError:
            raise GeReConfigError(
                "gere_flow: a training row was not in the base-loss pass (its tokens or labels differ from every task "
                "sample the pass saw). FLOW reads the trainer's own train_dataset through its data collator: do not "
                "change the dataset, max_length or the collator after the trainer is built, and do not use packing."
            ) from None
        return self.weights[idx].float()

    def summary(self) -> dict[str, float]:
        return weight_summary(self.weights, self.tau)

    def save(self, folder: str | Path) -> None:
        from safetensors.torch import save_file

        from ..cache.io import save_folder_atomically

        def write(tmp: Path) -> None:
            save_file(
                {
                    "digests": torch.from_numpy(self.digests.astype(np.int64)),
                    "losses": torch.from_numpy(self.losses.astype(np.float64)),
                    "tokens": torch.from_numpy(self.tokens.astype(np.int64)),
                },
                str(tmp / FLOW_LOSSES),
            )

        save_folder_atomically(folder, FLOW_CACHE, write, self.meta, (FLOW_LOSSES,))

    @classmethod
    def load(cls, folder: str | Path, expect: dict[str, str]) -> FlowTable:
        """Load a cache and check it was built for this model, tokenizer and task rows (``expect``)."""
        from safetensors.torch import load_file

        from ..cache.io import load_verified_meta

        advice = f"Delete {folder} or point gere_flow_cache at a new folder: FLOW rebuilds it from the model."
        meta = load_verified_meta(folder, FLOW_CACHE, FLOW_FORMAT_VERSION, advice)
        for key, want in expect.items():
            if meta.get(key) != want:
                what = {"model_fingerprint": "model weights", "tokenizer_fingerprint": "tokenizer",
                        "rows_fingerprint": "task samples"}.get(key, key)
                raise StateCacheError(
                    f"gere_flow_cache={str(folder)!r} holds the base losses of other {what} ({key} {meta.get(key)}, "
                    f"this run {want}). {advice} (In a task sequence every task has its own starting model: give each "
                    "task its own gere_flow_cache, e.g. the default <output_dir>/gere_flow.)"
                )
        t = load_file(str(Path(folder) / FLOW_LOSSES))
        return cls(t["digests"].numpy(), t["losses"].numpy(), t["tokens"].numpy(), meta)


@torch.no_grad()
def compute_base_losses(
    model: torch.nn.Module, batches: Iterator[dict[str, torch.Tensor]], autocast: Any = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(digests, token-mean losses, trained tokens)`` of every row of ``batches`` under ``model`` (eval mode)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    digests: list[int] = []
    losses: list[float] = []
    tokens: list[int] = []
    try:
        for batch in batches:
            digests += batch_digests(batch)
            fwd = {k: batch[k].to(device) for k in FORWARD_KEYS if k in batch}
            with autocast() if autocast is not None else contextlib.nullcontext():
                logits = model(**fwd, use_cache=False).logits
            sums, counts = per_row_ce(logits, batch["labels"].to(device))
            mean = torch.where(counts > 0, sums.double() / counts.clamp_min(1), torch.full_like(sums, float("nan"), dtype=torch.float64))
            losses += mean.cpu().tolist()
            tokens += counts.cpu().tolist()
    finally:
        model.train(was_training)
    return np.asarray(digests, dtype=np.int64), np.asarray(losses, dtype=np.float64), np.asarray(tokens, dtype=np.int64)


def flow_folder(gere_args: Any, output_dir: Any) -> Path:
    """``gere_flow_cache``, else ``<output_dir>/gere_flow``."""
    return run_folder(getattr(gere_args, "gere_flow_cache", None), output_dir, DEFAULT_FLOW_FOLDER)


def prepare_flow(trainer: Any, gere_args: Any, model: torch.nn.Module) -> tuple[FlowTable, str]:
    """Reuse or build the base losses of the trainer's task samples; returns the table (weights ready)
    and what happened to the cache (``reused`` / ``built``). The main process builds and writes; the
    other ranks wait and load (``main_process_first``)."""
    from ..cache.io import plan_folder
    from ..data.replay_set import tokenizer_fingerprint

    folder = flow_folder(gere_args, trainer.args.output_dir)
    dataset, collator = trainer.train_dataset, trainer.data_collator
    if dataset is None or collator is None:
        raise GeReConfigError("gere_flow needs the trainer's train_dataset and data_collator (an SFT trainer).")
    tok = getattr(trainer, "processing_class", None)
    tok = getattr(tok, "tokenizer", None) or tok
    batch_size = int(gere_args.gere_flow_batch_size)
    t0 = time.perf_counter()
    # The row digests come from the collator alone (no forward pass), so the cache key is known first.
    all_digests = np.concatenate([np.asarray(batch_digests(b), dtype=np.int64) for b in task_batches(dataset, collator, batch_size)])
    expect = {
        "model_fingerprint": weights_fingerprint(model),
        "tokenizer_fingerprint": tokenizer_fingerprint(tok) if tok is not None else "none",
        "rows_fingerprint": rows_fingerprint(all_digests),
    }
    ctx = trainer.args.main_process_first(desc="gere flow losses") if hasattr(trainer.args, "main_process_first") else contextlib.nullcontext()
    with ctx:
        plan = plan_folder(folder, FLOW_CACHE, lambda: FlowTable.load(folder, expect))
        if plan.action == "reuse":
            table = plan.cache
            action = "reused"
        else:
            autocast = getattr(trainer, "compute_loss_context_manager", None)
            digests, losses, tokens = compute_base_losses(model, task_batches(dataset, collator, batch_size), autocast)
            meta = dict(expect, kind=FLOW_CACHE.label, format_version=FLOW_FORMAT_VERSION, num_samples=int(len(losses)),
                        base_model=getattr(getattr(model, "config", None), "_name_or_path", None),
                        build_seconds=time.perf_counter() - t0, created=time.strftime("%Y-%m-%dT%H:%M:%S"),
                        median_base_loss=median_tau(losses))
            table = FlowTable(digests, losses, tokens, meta)
            if trainer.is_world_process_zero():
                table.save(folder)
            action = "built"
    table.finish(getattr(gere_args, "gere_flow_tau", None), bool(getattr(gere_args, "gere_flow_normalize", False)))
    logger.info("gere: FLOW base losses of %d samples %s (%s); %s", len(table.losses), action, folder, table.summary())
    return table, action


# ---------------------------------------------------------------------------------------------
# The term
# ---------------------------------------------------------------------------------------------
@register
class Flow(Term):
    """FLOW inside one trainer: each task row's CE weighted by ``exp(-base_loss / tau)``."""

    name = "flow"
    key = "gere_flow"
    metrics = ("gere/flow_weight",)
    needs_task_logits = True

    def __init__(self, table: FlowTable, action: str) -> None:
        self.table = table
        self.action = action

    @classmethod
    def wanted(cls, gere_args: Any) -> bool:
        return getattr(gere_args, "gere_flow", None) is True

    @classmethod
    def build(cls, res: Any, trainer: Any) -> Flow:
        return cls(*prepare_flow(trainer, res.args, res.model))

    def task_loss(self, batch: TaskBatch) -> TaskLossPart:
        weights = self.table.lookup(batch_digests(batch.inputs)).to(batch.row_sums.device)
        has_target = batch.row_counts > 0
        mean_weight = (weights * has_target).sum() / has_target.sum().clamp_min(1)
        return TaskLossPart(weights=weights, logs={"gere/flow_weight": mean_weight})

    def describe(self) -> str:
        s = self.table.summary()
        return (
            f"FLOW weights exp(-base_loss/{s['tau']:.4g}) over {len(self.table.losses)} samples (base losses "
            f"{self.action}; weight min/median/max {s['weight_min']:.3g}/{s['weight_median']:.3g}/"
            f"{s['weight_max']:.3g}, mean {s['weight_mean']:.3g}, effective samples "
            f"{100 * s['effective_sample_fraction']:.0f}%)"
        )
