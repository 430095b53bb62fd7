"""Weight-space interpolation toward the weights a task started from (WiSE-FT, Wortsman et al., CVPR 2022),
after every task: ``gere_wise_alpha``.

What this module computes, exactly:

* **snapshot** (when the trainer is built, after the freeze): a CPU copy of every trainable parameter
  (``requires_grad``), in its own dtype: ``theta_before``. Frozen parameters do not change in training and
  are not copied.
* **interpolation** (when ``train()`` returns, before the model is saved or handed to the next task), in
  place and without gradients, per tensor in fp32 and cast back to the parameter's dtype once::

      theta <- (1 - alpha) * theta_before + alpha * theta_after

  ``alpha = 1`` is the trained model (the term is then not built at all); smaller ``alpha`` keeps that
  share of the task's weight change.
* **LoRA**: the adapter weights are what trains, so they are what is interpolated. The merged weight of
  an adapter is bilinear in its two factors (``W0 + s * B @ A``), so interpolating both factors does not
  interpolate the merged weight. For a **fresh** adapter one factor is all zeros before the task (PEFT's
  default: ``lora_B`` of a linear layer, ``lora_embedding_A`` of an embedding); that factor is
  interpolated (so it becomes ``alpha`` times its trained value) and its partner keeps its trained value,
  which makes the adapter's update exactly ``alpha * s * B_after @ A_after``: WiSE-FT of the merged
  weights. An adapter carried over from an earlier task (both factors non-zero before) has both factors
  interpolated, which is WiSE-FT of the adapter's own weights, not of the merged weight (no rank-``r``
  adapter holds the latter). Other trainable tensors (``modules_to_save``, DoRA magnitudes, biases) are
  interpolated as they are.

Memory: one copy of the trainable parameters in host memory (a full fine-tune of a 1B model in bf16:
2 GB; LoRA: its adapters), none on the accelerator; every process of a data-parallel run holds its own
copy. The interpolation works one tensor at a time on the parameter's device (at most two fp32 copies of
the largest trainable tensor extra). Checkpoints written during training hold the trained (not interpolated) weights; a resumed run
snapshots the model it is built from, i.e. the weights the task started from, as the first run did.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any, Optional

import torch

from ..config import GeReConfigError
from ..model.introspection import is_sharded
from .base import Term, register

logger = logging.getLogger(__name__)

#: The two factors of a PEFT LoRA update, as they appear in parameter names.
LORA_FACTOR_PAIRS = ((".lora_A.", ".lora_B."), (".lora_embedding_A.", ".lora_embedding_B."))


# ---------------------------------------------------------------------------------------------
# Pure functions
# ---------------------------------------------------------------------------------------------
def trainable_snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy (own dtype) of every parameter with ``requires_grad``, by name (tied weights once)."""
    return {n: p.detach().to(device="cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}


def lora_partner(name: str) -> Optional[str]:
    """The name of the other factor of a LoRA update (``...lora_A.x.weight`` <-> ``...lora_B.x.weight``), or
    ``None`` for a tensor that is not a LoRA factor."""
    for a, b in LORA_FACTOR_PAIRS:
        if a in name:
            return name.replace(a, b)
        if b in name:
            return name.replace(b, a)
    return None


def fresh_adapter_partners(before: Mapping[str, torch.Tensor]) -> set[str]:
    """The LoRA factors that keep their trained value: those whose partner was all zeros before the task
    (a fresh adapter) while they were not. Interpolating only the zero factor scales the update by
    ``alpha`` exactly (see the module docstring)."""
    keep = set()
    for name, value in before.items():
        partner = lora_partner(name)
        if partner is None or partner not in before:
            continue
        if not bool(before[partner].eq(0).all()) or bool(value.eq(0).all()):
            continue
        keep.add(name)
    return keep


@torch.no_grad()
def interpolate_(
    params: Mapping[str, torch.nn.Parameter],
    before: Mapping[str, torch.Tensor],
    alpha: float,
    keep: frozenset[str] | set[str] = frozenset(),
) -> float:
    """``p <- (1 - alpha) * before + alpha * p`` in place for every ``p`` of ``params`` except those named in
    ``keep`` (fp32 arithmetic, one cast back to the parameter's dtype); ``before`` is not changed, so it can
    be applied again. Returns the L2 norm of the task's change ``||theta_after - theta_before||`` over the
    interpolated tensors (fp32)."""
    squares = 0.0
    for name, p in params.items():
        if name in keep:
            continue
        start = before[name].to(device=p.device, dtype=torch.float32, copy=True)  # ``before`` stays as it is
        after = p.detach().float()
        squares += float((after - start).pow(2).sum())
        p.copy_(start.mul_(1.0 - alpha).add_(after, alpha=alpha))
    return squares**0.5


# ---------------------------------------------------------------------------------------------
# The term
# ---------------------------------------------------------------------------------------------
@register
class WiSE(Term):
    """WiSE-FT inside one trainer: the snapshot at build, the interpolation when training returns."""

    name = "wise"
    key = "gere_wise_alpha"
    moves_weights = True

    @classmethod
    def wanted(cls, gere_args: Any) -> bool:
        alpha = getattr(gere_args, cls.key, None)
        return isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and 0 < alpha < 1

    @classmethod
    def check(cls, trainer: Any, gere_args: Any) -> None:
        if is_sharded(trainer):
            raise GeReConfigError(
                "gere_wise_alpha: the interpolation reads and writes whole parameters by name, which FSDP / DeepSpeed "
                "ZeRO-3 shard. Use DDP or ZeRO-2, or drop gere_wise_alpha and interpolate the saved checkpoints."
            )

    @classmethod
    def build(cls, res: Any, trainer: Any) -> WiSE:
        return cls(float(res.args.gere_wise_alpha), res.model)

    def __init__(self, alpha: float, model: torch.nn.Module) -> None:
        self.alpha = alpha
        self.before = trainable_snapshot(model)
        self.keep = fresh_adapter_partners(self.before)
        self.tensors = len(self.before)
        self.weights = sum(v.numel() for v in self.before.values())
        self.snapshot_bytes = sum(v.numel() * v.element_size() for v in self.before.values())
        self.summary: dict[str, Any] = {}

    def after_task(self, trainer: Any, model: torch.nn.Module) -> None:
        self.apply(model)

    def apply(self, model: torch.nn.Module) -> dict[str, Any]:
        """Interpolate ``model``'s trainable parameters toward the snapshot (once; the snapshot is freed)."""
        if not self.before:
            return self.summary
        t0 = time.perf_counter()
        named = dict(model.named_parameters())
        missing = [n for n in self.before if n not in named]
        if missing:
            raise GeReConfigError(
                f"gere_wise_alpha: {len(missing)} parameter(s) snapshotted when the trainer was built are gone from the "
                f"trained model (e.g. {missing[0]!r}); was the model replaced or merged during training? Drop "
                "gere_wise_alpha for this set-up."
            )
        untracked = sum(1 for n, p in named.items() if p.requires_grad and n not in self.before)
        if untracked:
            logger.warning("gere: %d trainable tensors were not trainable when the trainer was built; gere_wise_alpha "
                           "leaves them as trained.", untracked)
        norm = interpolate_({n: named[n] for n in self.before}, self.before, self.alpha, self.keep)
        self.before = {}  # the host copy is released as soon as it is used
        self.summary = {
            "alpha": self.alpha, "tensors": self.tensors, "weights": self.weights, "snapshot_bytes": self.snapshot_bytes,
            "lora_factors_kept": len(self.keep), "update_norm": norm, "untracked_tensors": untracked,
            "seconds": time.perf_counter() - t0,
        }
        logger.info("gere: WiSE-FT alpha %g applied to %d tensors (task update norm %.4g) in %.2fs",
                    self.alpha, self.tensors, norm, self.summary["seconds"])
        return self.summary

    def describe(self) -> str:
        lora = f"; {len(self.keep)} fresh-adapter factors keep their trained value (update scaled exactly)" if self.keep else ""
        return (
            f"WiSE-FT after training: theta <- {1 - self.alpha:g} * theta_before + {self.alpha:g} * theta_after over "
            f"{self.tensors} trainable tensors ({self.weights} weights, snapshot {self.snapshot_bytes / 2**20:.1f} MiB "
            f"in host memory){lora}"
        )
