"""Moved to :mod:`gere_plugin.trainer.dpo`; this path keeps old imports working."""

from .trainer.dpo import GeReDPOConfig, GeReDPOTrainer  # noqa: F401
