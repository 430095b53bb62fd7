"""Moved to :mod:`gere_plugin.trainer.sft`; this path keeps old imports working."""

from .trainer.sft import GeReSFTConfig, GeReSFTTrainer  # noqa: F401
