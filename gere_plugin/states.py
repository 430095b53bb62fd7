"""Moved to :mod:`gere_plugin.cache` (:mod:`~gere_plugin.cache.state_cache`: the state cache, its build and
its owner; :mod:`~gere_plugin.cache.labels`: label packing; :mod:`~gere_plugin.cache.io`: atomic folder
I/O; :mod:`~gere_plugin.cache.folders`: the folder rules) and :mod:`gere_plugin.model.hidden` (hidden-state
forward); this path keeps old imports working."""

from .cache.folders import (  # noqa: F401
    CACHE_FILES,
    DEFAULT_CACHE_NAME,
    FORMAT_VERSION,
    LABELS,
    META,
    STATE_CACHE,
    THRESHOLDS,
    CacheKind,
    StateCacheError,
    check_replaceable,
    is_state_cache,
    state_cache_folder,
)
from .cache.io import (  # noqa: F401
    CachePlan,
    load_verified_meta,
    plan_folder,
    remove_stale_temporaries,
    save_folder_atomically,
)
from .cache.labels import (  # noqa: F401
    INACTIVE,
    NEG,
    POS,
    TRITS_PER_BYTE,
    label_states,
    pack_2bit,
    pack_trits,
    packed_width,
    unpack_2bit,
    unpack_trits,
)
from .cache.state_cache import (  # noqa: F401
    REPLACE_ADVICE,
    StateCache,
    build_state_cache,
    ensure_state_cache,
    plan_state_cache,
)
from .config import GeReConfigError  # noqa: F401
from .data.replay_set import ReplaySet  # noqa: F401
from .model.hidden import check_layer_indices, forward_hidden  # noqa: F401
from .model.introspection import hidden_size_of, num_hidden_states_of  # noqa: F401
