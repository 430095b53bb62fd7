"""Moved to :mod:`gere_plugin.continual.baselines` (TRL's SDFT and PEFT's OSF as sequence presets); this path
keeps old imports working."""

from .continual.baselines import (  # noqa: F401
    BASELINES,
    SDFT_MAX_COMPLETION,
    SDFT_TEMPLATE,
    baseline_problem,
    build_baseline_trainer,
    model_after_training,
    osf_preserved_fraction,
    sdft_rows,
)
