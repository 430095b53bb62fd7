"""Moved to :mod:`gere_plugin.methods.ewc`; this path keeps old imports working."""

from .methods.ewc import (  # noqa: F401
    EWC_FORMAT_VERSION,
    EWCState,
    EWCTerm,
    accumulate_fisher,
    estimate_fisher,
    ewc_penalty,
    trainable_parameters,
)
