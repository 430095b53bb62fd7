"""Moved to :mod:`gere_plugin.trainer.families`; this path keeps old imports working."""

from .trainer.families import (  # noqa: F401
    COMBINE_FAMILIES,
    FAMILIES,
    TRL_FAMILIES,
    LossFamily,
    detect_family,
    family_for,
    prompts_per_step,
)
