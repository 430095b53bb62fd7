"""Moved to :mod:`gere_plugin.trainer.grpo`; this path keeps old imports working."""

from .trainer.grpo import GeReGRPOConfig, GeReGRPOTrainer  # noqa: F401
