"""GeRe for Axolotl: the plugin, its config schema, and config checks.

Load it in an Axolotl YAML with ``plugins: [gere_plugin.GeRePlugin]`` plus ``gere_*`` keys (on
Axolotl >= 0.21 the keys alone are enough: the package's entry point loads the plugin).
Imports are lazy: ``check_config`` and ``GeReArgs`` work without importing Axolotl (and fast);
``GeRePlugin`` imports Axolotl when first used.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "GeRePlugin": ".plugin",
    "GeReArgs": ".args",
    "gere_arguments_from_cfg": ".args",
    "PLUGIN_PATH": ".args",
    "PLUGIN_PATHS": ".args",
    "check_config": ".check",
    "axolotl_facts": ".compat",
    "AxolotlFacts": ".compat",
    "ConfigCheck": ".check",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    from .. import missing_attribute_error

    raise missing_attribute_error(__name__, name, _EXPORTS)


def __dir__() -> list[str]:
    return __all__
