"""Log-likelihood primitives for causal language models: the building blocks of every evaluation.

* :func:`perplexity` -- token-weighted perplexity of a list of texts (batched, padding-aware).
* :func:`continuation_logprobs` -- sum of log-probabilities of a continuation given a context, for a
  list of ``(context, continuation)`` pairs (batched, longest first, left-truncated contexts).
* :func:`greedy_generate` -- batched greedy decoding (left padding) for exact-match tasks.

Everything runs under ``torch.inference_mode`` and restores the model's train/eval mode afterwards.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch

from ..model.introspection import model_device, pad_token_id
from ..ops.padding import pad_sequences

__all__ = [
    "ContinuationScore",
    "continuation_logprobs",
    "encode_texts",
    "eval_mode",
    "greedy_generate",
    "next_token_logprobs",
    "perplexity",
]


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode (and inference mode) for the block, then restore its training flag."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def _encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens (BOS is added separately where wanted)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _bos(tokenizer: Any) -> list[int]:
    """``[bos_token_id]`` when the tokenizer prepends a BOS token by itself, else ``[]``."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    return [int(bos)] if probe and probe[0] == bos else []


def _batches(order: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    for start in range(0, len(order), batch_size):
        yield list(order[start : start + batch_size])


def _token_logprobs(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``out[b, t]`` = log p(ids[b, t+1] | ids[b, :t+1]) in float32; shape ``[B, L-1]``."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1, :].float()
    logp = torch.log_softmax(logits, dim=-1)
    return logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)


def encode_texts(tokenizer: Any, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids of ``texts`` as :func:`perplexity` scores them: BOS when the tokenizer adds one, no other
    special tokens, truncated to ``max_length`` tokens (texts of fewer than 2 tokens included)."""
    bos = _bos(tokenizer)
    return [(bos + _encode(tokenizer, t))[:max_length] for t in texts]


def perplexity(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    max_length: int = 256,
    batch_size: int = 8,
) -> dict[str, float]:
    """Token-weighted perplexity ``exp(sum NLL / sum predicted tokens)`` over ``texts``.

    Each text is tokenized (with BOS when the tokenizer adds one), truncated to ``max_length`` tokens
    and every token after the first is predicted. Padding is masked out, so the result does not
    depend on ``batch_size``. Returns ``{"ppl", "nll" (mean per token), "tokens", "texts"}``.
    """
    if not texts:
        raise ValueError("perplexity needs at least one text")
    seqs = [s for s in encode_texts(tokenizer, texts, max_length) if len(s) >= 2]
    if not seqs:
        raise ValueError("no text has 2 or more tokens")
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    device, pad = model_device(model), pad_token_id(tokenizer)
    total_nll, total_tokens = 0.0, 0
    with eval_mode(model):
        for idx in _batches(order, batch_size):
            ids, mask = pad_sequences([seqs[i] for i in idx], pad)
            ids, mask = ids.to(device), mask.to(device)
            lp = _token_logprobs(model, ids, mask)
            target_mask = mask[:, 1:].float()
            total_nll += float(-(lp * target_mask).sum())
            total_tokens += int(target_mask.sum())
    nll = total_nll / total_tokens
    return {"ppl": math.exp(nll), "nll": nll, "tokens": float(total_tokens), "texts": float(len(seqs))}


@dataclass(frozen=True)
class ContinuationScore:
    """Log-likelihood of one continuation: ``logprob`` summed over its ``n_tokens`` tokens.

    ``greedy`` is True when every continuation token is the model's argmax prediction.
    """

    logprob: float
    n_tokens: int
    n_chars: int
    greedy: bool


def continuation_logprobs(
    model: torch.nn.Module,
    tokenizer: Any,
    pairs: Sequence[tuple[str, str]],
    max_length: int = 512,
    batch_size: int = 16,
) -> list[ContinuationScore]:
    """Score ``log p(continuation | context)`` for every ``(context, continuation)`` pair.

    Context and continuation are tokenized separately and concatenated (so the continuation's tokens
    do not depend on the context); a continuation usually starts with a space (``" Paris"``). When
    the pair is longer than ``max_length`` the context is cut from the left. An empty context is
    scored after the BOS/EOS token so that the first continuation token is predicted too.
    """
    bos = _bos(tokenizer)
    fallback_start = bos or [int(getattr(tokenizer, "eos_token_id", 0) or 0)]
    encoded: list[tuple[list[int], int]] = []
    for context, continuation in pairs:
        cont = _encode(tokenizer, continuation)
        if not cont:
            raise ValueError(f"continuation {continuation!r} has no tokens")
        ctx = bos + _encode(tokenizer, context) if context else list(fallback_start)
        if not ctx:
            ctx = list(fallback_start)
        seq = (ctx + cont)[-max_length:]
        if len(seq) <= len(cont):
            raise ValueError(f"continuation {continuation!r} does not fit in max_length={max_length}")
        encoded.append((seq, len(cont)))
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
    device, pad = model_device(model), pad_token_id(tokenizer)
    results: list[Optional[ContinuationScore]] = [None] * len(encoded)
    with eval_mode(model):
        for idx in _batches(order, batch_size):
            ids, mask = pad_sequences([encoded[i][0] for i in idx], pad)
            ids, mask = ids.to(device), mask.to(device)
            logits = model(input_ids=ids, attention_mask=mask).logits
            for row, i in enumerate(idx):
                seq, n_cont = encoded[i]
                # the token at position p is predicted by the logits at p-1; normalise only those rows
                logp = torch.log_softmax(logits[row, len(seq) - n_cont - 1 : len(seq) - 1].float(), dim=-1)
                targets = ids[row, len(seq) - n_cont : len(seq)]
                lp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
                greedy = bool((logp.argmax(-1) == targets).all())
                results[i] = ContinuationScore(
                    logprob=float(lp.sum()), n_tokens=n_cont, n_chars=len(pairs[i][1]), greedy=greedy
                )
    return [r for r in results if r is not None]


def next_token_logprobs(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    token_ids: Sequence[int],
    max_length: int = 512,
    batch_size: int = 16,
) -> torch.Tensor:
    """``out[n, k]`` = log p(token_ids[k] | prompts[n]): one forward per prompt (left-truncated).

    Equals :func:`continuation_logprobs` for single-token continuations at a fraction of the cost
    (one sequence per prompt instead of one per candidate).
    """
    bos = _bos(tokenizer)
    seqs = [(bos + _encode(tokenizer, p))[-max_length:] for p in prompts]
    if any(not s for s in seqs):
        raise ValueError("every prompt needs at least one token")
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    device, pad = model_device(model), pad_token_id(tokenizer)
    wanted = torch.tensor(list(token_ids), dtype=torch.long, device=device)
    out = torch.empty((len(seqs), len(token_ids)), dtype=torch.float32)
    with eval_mode(model):
        for idx in _batches(order, batch_size):
            ids, mask = pad_sequences([seqs[i] for i in idx], pad)
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            for row, i in enumerate(idx):
                logp = torch.log_softmax(logits[row, len(seqs[i]) - 1].float(), dim=-1)
                out[i] = logp[wanted].cpu()
    return out


def greedy_generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int = 16,
    batch_size: int = 8,
    max_length: int = 512,
) -> list[str]:
    """Greedy continuations of ``prompts`` (decoded, special tokens skipped), batched with left padding."""
    bos = _bos(tokenizer)
    device, pad = model_device(model), pad_token_id(tokenizer)
    eos = getattr(tokenizer, "eos_token_id", None)
    encoded = [(bos + _encode(tokenizer, p))[-(max_length - max_new_tokens) :] for p in prompts]
    outputs: list[str] = [""] * len(prompts)
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    with eval_mode(model):
        for idx in _batches(order, batch_size):
            ids, mask = pad_sequences([encoded[i] for i in idx], pad, left=True)
            width = ids.shape[1]
            gen = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
                eos_token_id=eos,
            )
            for row, i in enumerate(idx):
                outputs[i] = tokenizer.decode(gen[row, width:], skip_special_tokens=True)
    return outputs
