"""Moved to :mod:`gere_plugin.data.sources` (reading records) and :mod:`gere_plugin.data.replay_set`
(the replay set, its fingerprints, ``build_replay_file``); this path keeps old imports working."""

from .data.replay_set import ReplaySet, build_replay_file, replay_fingerprint, tokenizer_fingerprint  # noqa: F401
from .data.sources import (  # noqa: F401
    FILE_SUFFIXES,
    PREFERENCE_FIELDS,
    ReplayError,
    extract_texts,
    load_records,
    read_jsonl_objects,
)
