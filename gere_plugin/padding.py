"""Moved to :mod:`gere_plugin.ops.padding`; this path keeps old imports working."""

from .ops.padding import pad_sequences  # noqa: F401
