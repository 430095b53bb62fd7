"""Moved to :mod:`gere_plugin.ops.losses`; this path keeps old imports working."""

from .ops.losses import (  # noqa: F401
    EPS,
    IGNORE_INDEX,
    INACTIVE,
    NEG,
    POS,
    RegOutput,
    dynamic_weight,
    kl_loss,
    masked_feature_loss,
    per_row_ce,
    per_row_kl,
    replay_ce_weight,
    resolve_weight,
    target_ce,
    tm_loss,
    token_ce,
)
