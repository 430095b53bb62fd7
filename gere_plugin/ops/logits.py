"""Replay cross-entropy and logit KL from hidden states, a chunk of tokens at a time.

The replay forward asks the model for its hidden states only (``logits_to_keep=1``); the
language-model head is then applied here to ``chunk`` tokens at a time, each chunk under
``torch.utils.checkpoint`` so that its ``[chunk, vocab]`` logits are freed right after their
per-token losses are taken and rebuilt in the backward pass. The peak memory of the replay rows then
holds one chunk of logits instead of ``[rows, tokens, vocab]`` logits and their fp32 copy (over 1 GB
per 2 x 512 replay tokens at Llama-3's 128,256-token vocabulary).

:class:`LogitHead` is the model's own map from the last hidden state (``hidden_states[-1]``, after the
final norm) to logits: ``model.get_output_embeddings()`` (tied or not, LoRA-wrapped under PEFT) and
the post-processing its architecture applies (Gemma-2's ``final_logit_softcapping``, Cohere's
``logit_scale``, Granite's ``logits_scaling``). :func:`head_mismatch` checks on a few tokens that it
reproduces the model's own logits; a model whose head it does not reproduce is served by the
full-logit path (:func:`gere_plugin.ops.losses.token_ce` / :func:`gere_plugin.ops.losses.kl_loss`).

Values and gradients equal the full-logit functions up to float summation order (tests/test_logits.py).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..model.introspection import text_config
from .losses import EPS, RegOutput

logger = logging.getLogger(__name__)

#: Elements of one chunk's ``[tokens, vocab]`` logits (64 MiB in fp32): 130 tokens at a 128,256 vocabulary.
CHUNK_ELEMENTS = 2**24
#: At most this many tokens per chunk (TRL's ``chunked_nll`` task loss uses 256): small vocabularies.
MAX_CHUNK_TOKENS = 256
#: Environment override: tokens per chunk, or 0 for the full-logit path.
CHUNK_ENV = "GERE_LOGITS_CHUNK"

PostOp = tuple[str, float]  # ("mul" | "div" | "softcap", value), applied in order after the head module


@dataclass(frozen=True)
class LogitHead:
    """``hidden [..., H] -> logits [..., V]`` exactly as the model's forward computes them."""

    module: torch.nn.Module
    post: tuple[PostOp, ...] = ()
    owner: Any = field(default=None, compare=False)  # FSDP2 unit holding the head's weight (in_fsdp_unit)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.owner is not None and _is_dtensor(getattr(self.module, "weight", None)):
            self.owner.unshard()  # resharded after the forward: gather it back (a collective on every rank)
        logits = self.module(hidden)
        for op, value in self.post:
            if op == "mul":
                logits = logits * value
            elif op == "div":
                logits = logits / value
            elif op == "softcap":  # Gemma-2: logits / cap -> tanh -> * cap
                logits = torch.tanh(logits / value) * value
            else:
                raise ValueError(f"unknown logit post-processing {op!r}")
        return logits

    @property
    def vocab_size(self) -> int:
        weight = getattr(self.module, "weight", None)
        if weight is None and hasattr(self.module, "get_base_layer"):
            weight = getattr(self.module.get_base_layer(), "weight", None)
        return int(getattr(self.module, "out_features", 0) or (weight.shape[0] if weight is not None else 0))

    def in_fsdp_unit(self, root: torch.nn.Module) -> LogitHead:
        """This head, told which FSDP2 unit (``fully_shard``) holds its weight when that is not itself.

        With ``reshard_after_forward=True`` the unit holding the head (usually the root) is resharded
        when the replay forward returns, leaving a sharded DTensor weight; calling the head then first
        unshards that unit (``FSDPModule.unshard``), so the chunks use the unit's own unsharded
        parameters and their gradients go through FSDP's reduce-scatter. A head that is an FSDP unit of
        its own gathers itself through its hooks on every call.
        """
        if _is_fsdp_unit(self.module) or not isinstance(self.module, torch.nn.Module):
            return self
        owner = None
        for m in root.modules():  # pre-order: a deeper unit that holds the head comes later
            if _is_fsdp_unit(m) and any(sub is self.module for sub in m.modules()):
                owner = m
        return self if owner is None else replace(self, owner=owner)

    def without_adapters(self) -> LogitHead:
        """The same head with PEFT adapters bypassed (what ``disable_adapter()`` computes)."""
        module = self.module
        if hasattr(module, "original_module") and hasattr(module, "modules_to_save"):  # PEFT ModulesToSaveWrapper
            module = module.original_module
        elif hasattr(module, "get_base_layer"):  # a PEFT tuner layer (LoRA, ...)
            module = module.get_base_layer()
        return LogitHead(module, self.post, self.owner)


def _is_dtensor(t: Any) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(t, DTensor)


def _is_fsdp_unit(module: Any) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return False
    return isinstance(module, FSDPModule)


def _transformers_model(model: torch.nn.Module) -> torch.nn.Module:
    get_base = getattr(model, "get_base_model", None)  # PEFT
    return get_base() if callable(get_base) else model


def _number(value: Any) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def logit_head(model: torch.nn.Module) -> Optional[LogitHead]:
    """The model's logit head (output embeddings + architecture post-processing), or None without one."""
    inner = _transformers_model(model)
    get = getattr(inner, "get_output_embeddings", None)
    module = get() if callable(get) else None
    if not isinstance(module, torch.nn.Module):
        return None
    cfg = text_config(inner) if getattr(inner, "config", None) is not None else None
    post: list[PostOp] = []
    scale = _number(getattr(inner, "logit_scale", None))  # Cohere: logits * logit_scale
    if scale is not None:
        post.append(("mul", scale))
    divide = _number(getattr(cfg, "logits_scaling", None))  # Granite: logits / logits_scaling
    if divide is not None:
        post.append(("div", divide))
    cap = _number(getattr(cfg, "final_logit_softcapping", None))  # Gemma-2/3
    if cap is not None:
        post.append(("softcap", cap))
    return LogitHead(module, tuple(post))


@torch.no_grad()
def head_mismatch(model: torch.nn.Module, head: LogitHead, input_ids: torch.Tensor) -> Optional[str]:
    """None when ``head(hidden_states[-1])`` reproduces ``model(input_ids).logits``, else the reason.

    Runs one forward in eval mode on ``input_ids`` (``[1, T]``, a few tokens); module training flags
    are restored afterwards.
    """
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        ids = input_ids.to(next(model.parameters()).device)
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True, use_cache=False)
        if getattr(out, "logits", None) is None or not getattr(out, "hidden_states", None):
            return "the forward returns no logits or hidden states"
        mine = head(out.hidden_states[-1])
    finally:
        for m, training in flags:
            m.training = training
    ref = out.logits
    if mine.shape != ref.shape:
        return f"head output shape {tuple(mine.shape)} differs from the model's logits {tuple(ref.shape)}"
    diff = float((mine.float() - ref.float()).abs().max())
    scale = max(float(ref.float().abs().max()), 1.0)
    tol = 1e-5 if ref.dtype == torch.float32 else 2e-2
    if not diff <= tol * scale:  # also catches NaN
        return f"head(hidden_states[-1]) differs from the model's logits by up to {diff:.3g} (logits up to {scale:.3g})"
    return None


def replay_logit_head(model: torch.nn.Module, sample_ids: Sequence[int], verify: bool = True) -> Optional[LogitHead]:
    """The head for chunked replay losses, or None (full-vocabulary logits), with one log line saying which.

    ``sample_ids``: a few token ids for the check (:func:`head_mismatch`); ``verify=False`` skips it
    (DeepSpeed ZeRO-3, where the model is partitioned before the engine exists).
    """
    head = logit_head(model)
    reason = None
    if head is None:
        reason = "the model has no output embeddings (get_output_embeddings() is None)"
    elif chunk_tokens(head.vocab_size or 1) == 0:
        reason = f"{CHUNK_ENV}=0"
    elif verify and len(sample_ids) > 0:
        ids = torch.tensor([list(sample_ids)[:16]], dtype=torch.long)
        try:
            reason = head_mismatch(model, head, ids)
        except Exception as err:  # noqa: BLE001 - e.g. parameters not materialised on this rank yet
            logger.warning("gere: could not check the logit head on this model (%s: %s); using it as %s.",
                           type(err).__name__, err, describe(head))
    if reason is not None or head is None:
        logger.warning("gere: replay cross-entropy uses full-vocabulary logits: %s.", reason)
        return None
    logger.info("gere: replay cross-entropy from hidden states, %d tokens per chunk (vocabulary %d, head %s).",
                chunk_tokens(head.vocab_size), head.vocab_size, describe(head))
    return head


def describe(head: LogitHead) -> str:
    ops = "".join(f" -> {op} {value:g}" for op, value in head.post)
    return f"{type(head.module).__name__}{ops}"


def chunk_tokens(vocab_size: int) -> int:
    """Tokens per chunk: ``GERE_LOGITS_CHUNK`` if set (0 = full logits), else ``CHUNK_ELEMENTS // vocab``
    capped at ``MAX_CHUNK_TOKENS``, so a replay chunk is never larger than TRL's own task-loss chunk."""
    env = os.environ.get(CHUNK_ENV, "").strip()
    if env:
        try:
            value = int(env)
        except ValueError as err:
            raise ValueError(f"{CHUNK_ENV}={env!r} must be a whole number of tokens (0 = full-vocabulary logits)") from err
        if value < 0:
            raise ValueError(f"{CHUNK_ENV}={env!r} must be >= 0 (0 = full-vocabulary logits)")
        return value
    return max(1, min(MAX_CHUNK_TOKENS, CHUNK_ELEMENTS // max(int(vocab_size), 1)))


def kl_chunk_tokens(chunk: int) -> int:
    """Tokens per KL chunk: half the CE chunk, since a KL chunk holds two log-softmaxes (model and base)."""
    return max(1, chunk // 2)


def num_chunks(tokens: int, chunk: int) -> int:
    return -(-tokens // chunk) if tokens > 0 else 0


def _chunked(fn: Callable[..., torch.Tensor], head_args: tuple, tensors: Sequence[torch.Tensor], chunk: int,
             min_chunks: int) -> torch.Tensor:
    """``cat([fn(*head_args, *[t[s:s+chunk] for t in tensors]) for each chunk])``, each chunk checkpointed.

    ``min_chunks`` pads with empty chunks so that every rank calls the head the same number of times
    (a sharded head all-gathers its weight on every call).
    """
    n = tensors[0].shape[0]
    count = max(num_chunks(n, chunk), min_chunks, 1)
    parts = []
    for i in range(count):
        pieces = [t[i * chunk : (i + 1) * chunk] for t in tensors]
        if torch.is_grad_enabled():
            parts.append(checkpoint(fn, *head_args, *pieces, use_reentrant=False, preserve_rng_state=False))
        else:
            parts.append(fn(*head_args, *pieces))
    return torch.cat(parts)


def _ce_chunk(head: LogitHead, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="none")


def _chunked_ce(head: LogitHead, hidden: torch.Tensor, input_ids: torch.Tensor, keep: torch.Tensor, chunk: int,
                min_chunks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CE of the next tokens at the positions ``keep`` (``[B, T-1]``) marks, chunked: ``(sum, count)``."""
    keep = keep.to(hidden.device).bool()
    rows = hidden[:, :-1][keep]  # [N, H]: only real targets reach the head
    targets = input_ids[:, 1:].to(hidden.device)[keep]
    ce = _chunked(_ce_chunk, (head,), (rows, targets), chunk, min_chunks)
    return ce.sum(), keep.sum()


def chunked_token_ce(
    head: LogitHead,
    hidden: torch.Tensor,
    input_ids: torch.Tensor,
    mask: torch.Tensor,
    chunk: int,
    min_chunks: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`~gere_plugin.ops.losses.token_ce` of ``head(hidden)`` without building the full logits.

    Args:
        head: the model's logit head.
        hidden: last hidden states ``[B, T, H]`` (``hidden_states[-1]``).
        input_ids: ``[B, T]``; targets are the next tokens.
        mask: ``[B, T]``, 1 for real tokens; a target counts when it and its position are real.
        chunk: target tokens per chunk.
        min_chunks: call the head at least this many times (empty chunks; see :func:`_chunked`).

    Returns ``(sum of per-token CE, number of targets)``.
    """
    return _chunked_ce(head, hidden, input_ids, mask[:, 1:] * mask[:, :-1], chunk, min_chunks)


def chunked_target_ce(
    head: LogitHead,
    hidden: torch.Tensor,
    input_ids: torch.Tensor,
    target_mask: torch.Tensor,
    chunk: int,
    min_chunks: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`~gere_plugin.ops.losses.target_ce` of ``head(hidden)`` without building the full logits (earlier-task
    rows: token ``t`` counts when ``target_mask[t] == 1``); arguments as :func:`chunked_token_ce`."""
    return _chunked_ce(head, hidden, input_ids, target_mask[:, 1:], chunk, min_chunks)


def _kl_chunk(head: LogitHead, base_head: LogitHead, hidden: torch.Tensor, base_hidden: torch.Tensor) -> torch.Tensor:
    logp = F.log_softmax(head(hidden).float(), dim=-1)
    with torch.no_grad():
        logq = F.log_softmax(base_head(base_hidden).float(), dim=-1)
    return (logq.exp() * (logq - logp)).sum(-1)


def chunked_kl(
    head: LogitHead,
    base_head: LogitHead,
    hidden: torch.Tensor,
    base_hidden: torch.Tensor,
    mask: torch.Tensor,
    chunk: int,
    min_chunks: int = 0,
) -> RegOutput:
    """:func:`~gere_plugin.ops.losses.kl_loss` of ``head(hidden)`` against ``base_head(base_hidden)``, chunked.

    The base side runs under ``no_grad`` (also when the chunk is rebuilt in the backward pass).
    """
    real = mask.to(hidden.device).bool()
    rows = hidden[real]
    base_rows = base_hidden.to(hidden.device)[real]
    kl = _chunked(_kl_chunk, (head, base_head), (rows, base_rows), chunk, min_chunks)
    count = real.sum().to(kl.dtype)
    return RegOutput(kl.sum() / (count + EPS), torch.zeros((), device=kl.device))
