"""Moved to :mod:`gere_plugin.cli.sequence` (``gere sequence``); this path keeps old imports working."""

from .cli.sequence import (  # noqa: F401
    DEPRECATED_FLAGS,
    GERE_SETTING_FLAGS,
    TRAIN_FLAGS,
    load_test_items,
    load_train_rows,
    sequence_main,
    sequence_parser,
)
