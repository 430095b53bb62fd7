"""Moved to :mod:`gere_plugin.ops.logits`; this path keeps old imports working."""

from .ops.logits import (  # noqa: F401
    CHUNK_ELEMENTS,
    CHUNK_ENV,
    MAX_CHUNK_TOKENS,
    LogitHead,
    PostOp,
    chunk_tokens,
    chunked_kl,
    chunked_target_ce,
    chunked_token_ce,
    describe,
    head_mismatch,
    kl_chunk_tokens,
    logit_head,
    num_chunks,
    replay_logit_head,
)
