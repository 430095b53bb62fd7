"""What ``R`` is in GeRe's ``w * R`` on the general replay rows: one class per ``gere_regularizer`` value.

======  =============================================================  ===================================
name    value on the micro-batch's replay rows                         reads
======  =============================================================  ===================================
``tm``  threshold-margin loss of the hidden states against the base    the base-state cache (labels,
        model's states (positive / inactive / negative), per layer     thresholds)
``kl``  KL(base || model) of the next-token distributions              the reference (or adapter-free head)
``l1``  mean absolute difference of hidden states to the reference     the reference model
``l2``  mean squared difference of hidden states to the reference      the reference model
none    0 (vanilla replay: CE only)                                    nothing
======  =============================================================  ===================================

Each returns ``(value, out_of_state)``; ``out_of_state`` is the fraction of elements outside their
state (TM), of tokens whose KL is non-zero (KL), else 0. The math itself lives in
:mod:`gere_plugin.ops.losses` and :mod:`gere_plugin.ops.logits` (tested against naive references).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Optional

import torch

from ..config import GeReConfigError
from ..model.introspection import autocast_of, unwrap
from ..model.reference import base_forward
from ..ops.logits import chunked_kl, kl_chunk_tokens
from ..ops.losses import kl_loss, masked_feature_loss, tm_loss

if TYPE_CHECKING:  # pragma: no cover
    from ..trainer.resources import Resources


@dataclass
class ReplayBatch:
    """One micro-batch's general replay rows after their forward (hidden states of ``gere_layers``)."""

    trainer: Any
    model: torch.nn.Module
    rows: list[int]
    batch: dict[str, torch.Tensor]  # input_ids, attention_mask
    logits: Optional[torch.Tensor]  # None on the chunked path
    hidden: list[torch.Tensor]  # one per gere_layers entry
    last: Optional[torch.Tensor]  # hidden_states[-1], the logit head's input
    kl_chunks: int = 0  # head calls every rank makes (sharded heads), 0 = as many as needed


class Regularizer:
    """``R`` of one run; built once from the set-up pass's resources."""

    name: ClassVar[str] = ""
    needs_states: ClassVar[bool] = False
    needs_reference: ClassVar[bool] = False

    def __init__(self, res: Resources) -> None:
        self.res = res

    def __call__(self, rb: ReplayBatch) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _base(self, rb: ReplayBatch, need_logits: bool, layers: Optional[list[int]] = None) -> Any:
        layers = self.res.layers if layers is None else layers
        return base_forward(self.res.reference, unwrap(rb.trainer, rb.model), rb.batch["input_ids"],
                            rb.batch["attention_mask"], layers, need_logits)


class NoRegularizer(Regularizer):
    name = "none"

    def __call__(self, rb: ReplayBatch) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.zeros((), device=rb.batch["attention_mask"].device)
        return z, z


class TMRegularizer(Regularizer):
    name = "tm"
    needs_states = True

    def __call__(self, rb: ReplayBatch) -> tuple[torch.Tensor, torch.Tensor]:
        states = self.res.states
        assert states is not None
        mask = rb.batch["attention_mask"]
        labels = states.labels_for(rb.rows, mask.shape[1], device=mask.device)  # [B, T, L, H]
        vals, oos = [], []
        for li in range(len(self.res.layers)):
            r = tm_loss(rb.hidden[li], labels[:, :, li], states.pos[li], states.neg[li], mask, self.res.args.gere_tm_reduction)
            vals.append(r.loss)
            oos.append(r.out_of_state)
        return torch.stack(vals).mean(), torch.stack(oos).mean()


class KLRegularizer(Regularizer):
    name = "kl"
    needs_reference = True

    def __call__(self, rb: ReplayBatch) -> tuple[torch.Tensor, torch.Tensor]:
        mask = rb.batch["attention_mask"]
        res = self.res
        if rb.logits is None:  # chunked: the heads applied to hidden states a chunk of tokens at a time
            assert res.logit_head is not None and res.base_head is not None and rb.last is not None
            _, (base_last,) = self._base(rb, need_logits=False, layers=[-1])
            with autocast_of(rb.trainer):
                r = chunked_kl(res.logit_head.in_fsdp_unit(rb.model), res.base_head.in_fsdp_unit(rb.model), rb.last,
                               base_last, mask, kl_chunk_tokens(res.logit_chunk), rb.kl_chunks)
            return r.loss, r.out_of_state
        base_logits, _ = self._base(rb, need_logits=True)
        r = kl_loss(rb.logits, base_logits, mask)
        return r.loss, r.out_of_state


class FeatureRegularizer(Regularizer):
    """L1 / L2 distance of the hidden states to the reference's."""

    needs_reference = True
    p: ClassVar[int] = 2

    def __call__(self, rb: ReplayBatch) -> tuple[torch.Tensor, torch.Tensor]:
        mask = rb.batch["attention_mask"]
        _, base_hidden = self._base(rb, need_logits=False)
        vals = [masked_feature_loss(h, b, mask, self.p).loss for h, b in zip(rb.hidden, base_hidden)]
        return torch.stack(vals).mean(), torch.zeros((), device=mask.device)


class L1Regularizer(FeatureRegularizer):
    name = "l1"
    p = 1


class L2Regularizer(FeatureRegularizer):
    name = "l2"
    p = 2


REGULARIZERS: dict[str, type[Regularizer]] = {
    cls.name: cls for cls in (TMRegularizer, KLRegularizer, L1Regularizer, L2Regularizer, NoRegularizer)
}


def regularizer_class(name: str) -> type[Regularizer]:
    """The class of ``gere_regularizer`` ``name``; an unknown name is refused, naming the known ones."""
    if name not in REGULARIZERS:
        raise GeReConfigError(f"gere_regularizer={name!r} is not one of {', '.join(REGULARIZERS)}.")
    return REGULARIZERS[name]
