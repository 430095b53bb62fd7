"""Moved to :mod:`gere_plugin.cli.flags` (flags from dataclass fields, old spellings, model-folder checks); this
path keeps old imports working."""

from .cli.flags import (  # noqa: F401
    add_deprecated_flag,
    add_field_flags,
    add_ignored_flags,
    check_model_source,
    load_tokenizer_and_config,
    str_to_bool,
)
