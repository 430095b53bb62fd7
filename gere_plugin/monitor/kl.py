"""The monitor's KL math (pure functions on log-probabilities; no model, no trainer).

:func:`topk_kl` is the exact KL of two distributions coarse-grained to the base's top-k tokens plus
one bucket for the rest of the vocabulary (:func:`rest_logmass`); :func:`full_kl` is the full-vocabulary
KL it approximates.
"""

from __future__ import annotations

import torch

#: Clamp of log tail masses (the same on both sides, so equal distributions give exactly 0).
LOG_TINY = -700.0


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
    log_rb = base_log_rest.double().clamp(min=LOG_TINY)
    log_rm = model_log_rest.double().clamp(min=LOG_TINY)
    return head + log_rb.exp() * (log_rb - log_rm)


def full_kl(base_logits: torch.Tensor, model_logits: torch.Tensor) -> torch.Tensor:
    """Per-position ``KL(base || model)`` over the whole vocabulary (float64): what :func:`topk_kl`
    approximates (used by tests and the benchmark to measure the approximation)."""
    b = torch.log_softmax(base_logits.double(), -1)
    m = torch.log_softmax(model_logits.double(), -1)
    return (b.exp() * (b - m)).sum(-1)
