"""Moved to :mod:`gere_plugin.trainer.resume`; this path keeps old imports working."""

from .trainer.resume import checkpoint_steps, resolve_resume_checkpoint, script_resume_checkpoint  # noqa: F401
