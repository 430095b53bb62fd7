"""Moved to :mod:`gere_plugin.model.freeze`; this path keeps old imports working."""

from .model.freeze import (  # noqa: F401
    LayerFreezeCallback,
    check_freeze_depth,
    count_trainable,
    find_decoder_layers,
    freeze_bottom,
    layer_index_of,
    prepare_for_gradient_checkpointing,
    snapshot,
)
