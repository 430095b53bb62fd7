"""Diagnostic only (``GERE_GRAD_DIAGNOSTICS=1``): the gradient balance of the CE part and the regularizer."""

from __future__ import annotations

from typing import Optional

import torch


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
