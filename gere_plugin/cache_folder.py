"""Moved to :mod:`gere_plugin.cache.folders`; this path keeps old imports working."""

from .cache.folders import (  # noqa: F401
    CACHE_FILES,
    DEFAULT_CACHE_NAME,
    DEFAULT_EWC_FOLDER,
    DEFAULT_FLOW_FOLDER,
    EWC_STATE,
    EWC_TENSORS,
    FLOW_CACHE,
    FLOW_LOSSES,
    FORMAT_VERSION,
    LABELS,
    META,
    STATE_CACHE,
    THRESHOLDS,
    CacheKind,
    StateCacheError,
    check_replaceable,
    is_state_cache,
    run_folder,
    state_cache_folder,
    state_cache_problem,
)
