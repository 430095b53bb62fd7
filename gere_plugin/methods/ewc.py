"""EWC (elastic weight consolidation, online form) for task sequences.

Kirkpatrick et al. (2017), online accumulation as in Schwarz et al. (2018). What this module computes,
exactly:

* **diagonal Fisher of a task** (empirical, estimated when a run ends): for ``N = gere_ewc_samples``
  task samples drawn without replacement (seed = the training seed), ``g_i`` is the gradient of the
  sample's own loss (its token-mean cross-entropy over its trained tokens, the loss SFT trains) with
  respect to the trainable parameters, one sample at a time; ``F_j = (1/N) sum_i g_ij^2`` (fp32).
  Samples without a trained token are skipped (and not counted).
* **online accumulation**: the state written at the end of task ``k`` holds
  ``F = gamma * F(gere_ewc_state) + F(task k)`` and the anchor ``theta*`` = the weights at the end of
  task ``k``.
* **penalty** while training task ``k + 1``: ``lambda / 2 * sum_j F_j (theta_j - theta*_j)^2`` over the
  trainable parameters the state covers (LoRA adapters or the full model), added once per optimizer
  step whatever the gradient accumulation and number of ranks.

Memory: the anchor is one extra copy of the trainable parameters and the Fisher another, both fp32 on
the parameters' device (for a full fine-tune of a 1B model: 8 GB); LoRA keeps it to the adapters. The
state is written atomically to ``<output_dir>/gere_ewc`` (next to the model the run saves) and read by
the next task through ``gere_ewc_state``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ..cache.folders import DEFAULT_EWC_FOLDER, EWC_STATE, EWC_TENSORS, StateCacheError, run_folder
from ..config import GeReConfigError
from ..data.trainer_rows import FORWARD_KEYS, dataset_rows
from ..model.introspection import is_sharded
from ..ops.losses import per_row_ce
from .base import Term, register

logger = logging.getLogger(__name__)

EWC_FORMAT_VERSION = 1


# ---------------------------------------------------------------------------------------------
# Pure math
# ---------------------------------------------------------------------------------------------
def ewc_penalty(
    params: Sequence[torch.Tensor], anchors: Sequence[torch.Tensor], fisher: Sequence[torch.Tensor], lam: float
) -> torch.Tensor:
    """``lam / 2 * sum_j F_j (theta_j - theta*_j)^2`` (fp32), differentiable in ``params``."""
    if not params:
        return torch.zeros(())
    total = torch.zeros((), device=params[0].device, dtype=torch.float32)
    for p, a, f in zip(params, anchors, fisher):
        total = total + (f * (p.float() - a).pow(2)).sum()
    return 0.5 * float(lam) * total


def accumulate_fisher(
    previous: Optional[Mapping[str, torch.Tensor]], current: Mapping[str, torch.Tensor], gamma: float
) -> dict[str, torch.Tensor]:
    """Online EWC: ``gamma * previous + current`` per parameter (``current`` alone without a previous state)."""
    if previous is None:
        return {k: v.clone() for k, v in current.items()}
    return {k: float(gamma) * previous[k].to(v.device) + v for k, v in current.items()}


def estimate_fisher(
    model: torch.nn.Module,
    params: Mapping[str, torch.nn.Parameter],
    batches: Iterable[dict[str, torch.Tensor]],
    autocast: Any = None,
) -> tuple[dict[str, torch.Tensor], int]:
    """The empirical diagonal Fisher over ``batches`` (each row one sample): mean over samples of the
    squared gradient of the sample's token-mean CE. Returns ``(fisher per name, samples counted)``.

    Uses ``torch.autograd.grad`` (no ``.grad`` is touched, so DDP hooks and the optimizer state stay out
    of it); the model runs in eval mode (no dropout) and is put back as it was.
    """
    names = list(params)
    tensors = [params[n] for n in names]
    sums = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in tensors]
    device = tensors[0].device if tensors else torch.device("cpu")
    counted = 0
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            for batch in batches:
                fwd = {k: batch[k].to(device) for k in FORWARD_KEYS if k in batch}
                with autocast() if autocast is not None else contextlib.nullcontext():
                    logits = model(**fwd, use_cache=False).logits
                ce, counts = per_row_ce(logits, batch["labels"].to(device))
                for r in range(ce.shape[0]):
                    if int(counts[r]) == 0:
                        continue
                    loss = ce[r] / counts[r]
                    grads = torch.autograd.grad(loss, tensors, retain_graph=r < ce.shape[0] - 1, allow_unused=True)
                    for s, g in zip(sums, grads):
                        if g is not None:
                            s.add_(g.detach().float().pow(2))
                    counted += 1
    finally:
        model.train(was_training)
    if counted == 0:
        raise GeReConfigError("gere_ewc_lambda: no task sample has a trained token, so the Fisher cannot be estimated.")
    return {n: s / counted for n, s in zip(names, sums)}, counted


# ---------------------------------------------------------------------------------------------
# The state: Fisher + anchor, saved next to the model
# ---------------------------------------------------------------------------------------------
@dataclass
class EWCState:
    """Diagonal Fisher and anchor weights per trainable-parameter name (fp32, CPU when loaded)."""

    fisher: dict[str, torch.Tensor]
    anchor: dict[str, torch.Tensor]
    meta: dict

    def save(self, folder: str | Path) -> None:
        from safetensors.torch import save_file

        from ..cache.io import save_folder_atomically

        def write(tmp: Path) -> None:
            tensors = {f"fisher.{k}": v.detach().float().cpu().contiguous() for k, v in self.fisher.items()}
            tensors.update({f"anchor.{k}": v.detach().float().cpu().contiguous() for k, v in self.anchor.items()})
            save_file(tensors, str(tmp / EWC_TENSORS))

        meta = dict(self.meta, kind=EWC_STATE.label, format_version=EWC_FORMAT_VERSION, names=sorted(self.fisher))
        save_folder_atomically(folder, EWC_STATE, write, meta, (EWC_TENSORS,))

    @classmethod
    def load(cls, folder: str | Path) -> EWCState:
        from safetensors.torch import load_file

        from ..cache.io import load_verified_meta

        folder = Path(folder)
        if not folder.is_dir():
            raise GeReConfigError(
                f"gere_ewc_state={str(folder)!r} does not exist. Point it at the gere_ewc folder the previous task's run "
                "wrote (<its output_dir>/gere_ewc), or drop it for the first task."
            )
        advice = "Point gere_ewc_state at the gere_ewc folder written by the previous task's run."
        meta = load_verified_meta(folder, EWC_STATE, EWC_FORMAT_VERSION, advice)
        t = load_file(str(folder / EWC_TENSORS))
        fisher = {k[len("fisher."):]: v for k, v in t.items() if k.startswith("fisher.")}
        anchor = {k[len("anchor."):]: v for k, v in t.items() if k.startswith("anchor.")}
        if set(fisher) != set(anchor) or sorted(fisher) != list(meta["names"]):
            raise StateCacheError(f"gere_ewc_state={str(folder)!r}: Fisher and anchor do not cover the same parameters. {advice}")
        return cls(fisher, anchor, meta)


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The parameters the optimizer trains (``requires_grad``), by name."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


@register
class EWCTerm(Term):
    """EWC inside one trainer: the penalty against ``gere_ewc_state`` (if given) every step, and the
    Fisher estimate + state written at the end of training."""

    name = "ewc"
    key = "gere_ewc_lambda"
    metrics = ("gere/ewc_penalty",)

    @classmethod
    def check(cls, trainer: Any, gere_args: Any) -> None:
        if is_sharded(trainer):
            raise GeReConfigError("gere_ewc_lambda: EWC reads whole parameters by name, which FSDP / DeepSpeed ZeRO-3 shard. Use DDP or ZeRO-2.")

    @classmethod
    def build(cls, res: Any, trainer: Any) -> EWCTerm:
        return cls(res.model, res.args)

    def __init__(self, model: torch.nn.Module, gere_args: Any) -> None:
        self.lam = float(gere_args.gere_ewc_lambda)
        self.gamma = float(gere_args.gere_ewc_gamma)
        self.samples = int(gere_args.gere_ewc_samples)
        self.previous: Optional[EWCState] = None
        self.names: list[str] = []
        self.params: list[torch.nn.Parameter] = []
        self.anchors: list[torch.Tensor] = []
        self.fisher: list[torch.Tensor] = []
        self.written: Optional[Path] = None
        self.uncovered = 0
        if gere_args.gere_ewc_state:
            self.previous = EWCState.load(gere_args.gere_ewc_state)
            self._bind(model, str(gere_args.gere_ewc_state))

    def _bind(self, model: torch.nn.Module, where: str) -> None:
        """Match the state to the model's trainable parameters by name and shape; tensors to their devices."""
        assert self.previous is not None
        trainable = trainable_parameters(model)
        missing = [n for n in self.previous.fisher if n not in trainable]
        if missing:
            raise GeReConfigError(
                f"gere_ewc_state={where!r} anchors {len(missing)} parameter(s) this model does not train (e.g. "
                f"{missing[0]!r}). EWC needs the same trainable parameters in every task: the same model family and, "
                "with LoRA, the same adapter carried on (not a new adapter per task)."
            )
        for n, f in self.previous.fisher.items():
            p = trainable[n]
            if tuple(f.shape) != tuple(p.shape):
                raise GeReConfigError(
                    f"gere_ewc_state={where!r}: {n} has shape {tuple(f.shape)} there but {tuple(p.shape)} in this model."
                )
            self.names.append(n)
            self.params.append(p)
            self.fisher.append(f.to(p.device, torch.float32))
            self.anchors.append(self.previous.anchor[n].to(p.device, torch.float32))
        self.uncovered = sum(1 for n in trainable if n not in self.previous.fisher)
        if self.uncovered:
            logger.warning("gere: %d trainable parameter tensors are not in gere_ewc_state and are not anchored by EWC.",
                           self.uncovered)

    @property
    def active(self) -> bool:
        """A penalty applies (a previous state was given)."""
        return bool(self.params)

    def penalty(self) -> torch.Tensor:
        return ewc_penalty(self.params, self.anchors, self.fisher, self.lam)

    def step_penalty(self) -> Optional[torch.Tensor]:
        return self.penalty() if self.active else None

    def after_task(self, trainer: Any, model: torch.nn.Module) -> None:
        self.finish(trainer, model)

    def describe(self) -> str:
        anchored = sum(p.numel() for p in self.params)
        if self.active:
            what = f"EWC lambda {self.lam:g} against {len(self.params)} tensors ({anchored} weights) of gere_ewc_state"
        else:
            what = f"EWC lambda {self.lam:g}: no gere_ewc_state (first task), no penalty"
        return f"{what}; Fisher of this task from {self.samples} samples at the end"

    def finish(self, trainer: Any, model: torch.nn.Module) -> Optional[Path]:
        """Estimate this task's Fisher, accumulate it with the previous state, write ``<output_dir>/gere_ewc``
        (main process only). Returns the folder written."""
        if not trainer.is_world_process_zero():
            return None
        t0 = time.perf_counter()
        dataset, collator = trainer.train_dataset, trainer.data_collator
        n = len(dataset)
        rng = np.random.default_rng(int(getattr(trainer.args, "seed", 0)))
        picked = rng.choice(n, size=min(self.samples, n), replace=False).tolist()
        params = trainable_parameters(model)
        batches = (collator(dataset_rows(dataset, [i])) for i in picked)
        autocast = getattr(trainer, "compute_loss_context_manager", None)
        fisher, counted = estimate_fisher(model, params, batches, autocast)
        previous = None
        if self.previous is not None:
            previous = {n: self.previous.fisher[n] for n in fisher if n in self.previous.fisher}
            for n in fisher:
                previous.setdefault(n, torch.zeros_like(fisher[n]))
        total = accumulate_fisher(previous, fisher, self.gamma)
        anchor = {n: p.detach().float().clone() for n, p in params.items()}
        tasks = int(self.previous.meta.get("tasks", 0)) + 1 if self.previous is not None else 1
        state = EWCState(total, anchor, {
            "tasks": tasks, "gamma": self.gamma, "samples": counted, "lambda_used": self.lam,
            "seconds": time.perf_counter() - t0, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "weights": int(sum(v.numel() for v in fisher.values())),
        })
        folder = run_folder(None, trainer.args.output_dir, DEFAULT_EWC_FOLDER)
        state.save(folder)
        self.written = folder
        logger.info("gere: EWC state (Fisher of %d samples, %d task(s) accumulated) written to %s in %.1fs",
                    counted, tasks, folder, time.perf_counter() - t0)
        return folder
