"""Pure loss functions: threshold-margin (TM), L1/L2 feature distillation, logit KL, and weighting.

Two dynamic weights exist, chosen by the trainer's loss family (:mod:`gere_plugin.families`):
:func:`resolve_weight` matches ``w * R`` to the primary (CE-like, non-negative) term, the paper's rule for
SFT and the DPO rule; :func:`replay_ce_weight` matches it to the replay CE, for parent losses of any sign
(GRPO), and is never negative.

All functions take a ``mask`` of shape ``[batch, seq]`` (1 = real token, 0 = padding) and never
touch padded positions. State labels use the integer codes of :mod:`gere_plugin.cache.labels`:
``NEG = 0``, ``INACTIVE = 1``, ``POS = 2``.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

NEG, INACTIVE, POS = 0, 1, 2
EPS = 1e-8


class RegOutput(NamedTuple):
    """A regularizer value and the diagnostics logged next to it."""

    loss: torch.Tensor
    out_of_state: torch.Tensor  # fraction of (token, dim) elements outside their base state (TM only)


def tm_loss(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    pos: torch.Tensor,
    neg: torch.Tensor,
    mask: torch.Tensor,
    reduction: str = "violations",
) -> RegOutput:
    """Threshold-margin loss of GeRe.

    For every element with base state ``s`` and current activation ``h``:

    * ``s = NEG``:      ``relu(h - neg)``
    * ``s = INACTIVE``: ``relu(h - pos) + relu(neg - h)``
    * ``s = POS``:      ``relu(pos - h)``

    Args:
        hidden: current hidden states ``[B, T, H]`` (any float dtype; computed in fp32).
        labels: base-model state codes ``[B, T, H]`` (integers 0/1/2).
        pos: upper thresholds ``mu + k*sigma``, ``[H]``.
        neg: lower thresholds ``mu - k*sigma``, ``[H]``.
        mask: ``[B, T]``, 1 for real tokens.
        reduction: ``violations`` = sum / (number of non-zero elements + 1e-8) (the reference);
            ``mean`` = sum / number of unmasked elements.
    """
    h = hidden.float()
    pos = pos.to(h.device, torch.float32)
    neg = neg.to(h.device, torch.float32)
    real = mask.to(h.device).bool()
    # Each state asks h to lie in an interval [lower, upper]; the violation is the distance to it:
    #   NEG:      (-inf, neg]  -> relu(h - neg)
    #   INACTIVE: [neg, pos]   -> relu(h - pos) + relu(neg - h)
    #   POS:      [pos, +inf)  -> relu(pos - h)
    # Padding gets code 3 = (-inf, +inf), i.e. never a violation, so no mask multiply is needed.
    # One gather per bound from [4, H] tables and ``|h - clamp(h, lower, upper)|`` give exactly the
    # same values and gradients as the three-branch formula with far fewer [B, T, H] temporaries.
    inf = torch.full_like(pos, float("inf"))
    lower_table = torch.stack([-inf, neg, pos, -inf])  # [4, H], rows = NEG, INACTIVE, POS, padding
    upper_table = torch.stack([neg, pos, inf, inf])
    codes = labels.to(h.device).masked_fill(~real.unsqueeze(-1), 3).long().unsqueeze(-2)  # [B, T, 1, H]
    shape = (*codes.shape[:-2], 4, h.shape[-1])
    lower = torch.gather(lower_table.expand(shape), -2, codes).squeeze(-2)
    upper = torch.gather(upper_table.expand(shape), -2, codes).squeeze(-2)
    viol = (h - torch.clamp(h, lower, upper)).abs()
    total = viol.sum()
    nonzero = (viol > 0).sum()
    n_elem = real.sum().to(h.dtype) * h.shape[-1]
    if reduction == "violations":
        loss = total / (nonzero.to(h.dtype) + EPS)
    elif reduction == "mean":
        loss = total / (n_elem + EPS)
    else:
        raise ValueError(f"gere_tm_reduction={reduction!r} is not one of violations, mean.")
    frac = nonzero.detach().to(torch.float32) / (n_elem.detach().to(torch.float32) + EPS)
    return RegOutput(loss, frac)


def masked_feature_loss(hidden: torch.Tensor, base: torch.Tensor, mask: torch.Tensor, p: int) -> RegOutput:
    """Mean absolute (``p=1``) or squared (``p=2``) difference to the base hidden states over real tokens."""
    h = hidden.float()
    b = base.to(h.device, torch.float32)
    m = mask.to(h.device, h.dtype).unsqueeze(-1)
    diff = (h - b).abs() if p == 1 else (h - b).pow(2)
    n_elem = m.sum() * h.shape[-1]
    loss = (diff * m).sum() / (n_elem + EPS)
    return RegOutput(loss, torch.zeros((), device=h.device))


def kl_loss(logits: torch.Tensor, base_logits: torch.Tensor, mask: torch.Tensor) -> RegOutput:
    """Token-mean ``KL(p_base || p_model)`` over real tokens (forward KL, as in distillation)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    logq = F.log_softmax(base_logits.to(logits.device).float(), dim=-1)
    kl = (logq.exp() * (logq - logp)).sum(-1)  # [B, T]
    m = mask.to(kl.device, kl.dtype)
    loss = (kl * m).sum() / (m.sum() + EPS)
    return RegOutput(loss, torch.zeros((), device=kl.device))


def token_ce(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal-LM cross-entropy summed over real next-token targets; returns ``(sum, count)``."""
    shift_logits = logits[:, :-1, :].float()
    targets = input_ids[:, 1:].to(logits.device)
    tmask = (mask[:, 1:] * mask[:, :-1]).to(logits.device).bool()
    ce = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), targets.reshape(-1), reduction="none")
    ce = ce.view_as(targets) * tmask
    return ce.sum(), tmask.sum()


def target_ce(logits: torch.Tensor, input_ids: torch.Tensor, target_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal-LM cross-entropy summed over the tokens marked in ``target_mask`` (as TRL's labels: token ``t``
    is a target when ``target_mask[t] == 1``, predicted from position ``t - 1``); returns ``(sum, count)``.

    ``target_mask`` is 0 on padding and, for completion-only loss, on the prompt."""
    shift_logits = logits[:, :-1, :].float()
    targets = input_ids[:, 1:].to(logits.device)
    keep = target_mask[:, 1:].to(logits.device).bool()
    ce = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), targets.reshape(-1), reduction="none")
    ce = ce.view_as(targets) * keep
    return ce.sum(), keep.sum()


def dynamic_weight(primary: torch.Tensor, reg: torch.Tensor) -> torch.Tensor:
    """GeRe's dynamic weight ``primary.detach() / (reg.detach() + 1e-8)`` (so ``w * reg`` matches ``primary``)."""
    return primary.detach() / (reg.detach() + EPS)


def resolve_weight(
    fixed: Optional[float], primary: torch.Tensor, reg: torch.Tensor, cap: Optional[float] = None
) -> torch.Tensor:
    """The regularizer weight: the fixed number, or the dynamic weight when ``fixed is None``, bounded
    above by ``cap`` when given (``min(primary / reg, cap)``)."""
    if fixed is None:
        w = dynamic_weight(primary, reg)
        return w if cap is None else w.clamp(max=float(cap))
    return torch.tensor(float(fixed), device=reg.device, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# Per-row task terms (FLOW's weighted CE, the KL to the base on task rows)
# ---------------------------------------------------------------------------------------------
IGNORE_INDEX = -100


def per_row_ce(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal-LM cross-entropy per row: ``(sums [B], counts [B])`` over the trained targets.

    Position ``t`` predicts ``labels[:, t + 1]``; targets equal to ``-100`` are not trained (the SFT
    collators' prompt and padding marks). Computed in fp32.
    """
    shift_logits = logits[:, :-1, :].float()
    targets = labels[:, 1:].to(logits.device)
    ce = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    ).view_as(targets)
    counts = (targets != IGNORE_INDEX).sum(1)
    return ce.sum(1), counts


def per_row_kl(logits: torch.Tensor, base_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``KL(p_base || p_model)`` summed per row over the positions whose next token is trained: ``[B]``.

    The same direction as :func:`kl_loss` (forward KL, as in distillation and LLaMA-Factory's ASFT), on the
    distributions the task CE trains (position ``t`` with ``labels[:, t + 1] != -100``).
    """
    keep = (labels[:, 1:] != IGNORE_INDEX).to(logits.device)
    logp = F.log_softmax(logits[:, :-1, :].float(), dim=-1)
    logq = F.log_softmax(base_logits[:, :-1, :].to(logits.device).float(), dim=-1)
    kl = (logq.exp() * (logq - logp)).sum(-1)  # [B, T-1]
    return (kl * keep).sum(1)
def replay_ce_weight(
    fixed: Optional[float], replay_ce: torch.Tensor, reg: torch.Tensor, cap: Optional[float] = None
) -> torch.Tensor:
    """The regularizer weight of the ``grpo`` loss family: the fixed number, or ``CE_replay / (R + 1e-8)``.

    For parent losses that are not positive CE-like quantities (the GRPO policy loss is near 0 and often
    negative) the paper's ``primary / R`` would be tiny or negative. Here ``w * R`` is matched to the
    replay cross-entropy of the same rows instead, so the weight never depends on the sign of the parent
    loss and is never negative (both inputs are clamped at 0: CE and every regularizer are >= 0 anyway).
    Both values are detached; ``cap`` bounds the dynamic weight from above (``gere_weight_max``).
    """
    if fixed is not None:
        return torch.tensor(float(fixed), device=reg.device, dtype=torch.float32)
    w = replay_ce.detach().float().clamp_min(0) / (reg.detach().float().clamp_min(0) + EPS)
    return w if cap is None else w.clamp(max=float(cap))
