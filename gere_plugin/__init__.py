"""gere-plugin: GeRe anti-forgetting fine-tuning for TRL and Axolotl.

Imports are lazy: ``import gere_plugin`` loads neither TRL nor Axolotl until a name is used.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "GeReArguments": ".config",
    "GeReConfigError": ".config",
    "keys_markdown": ".config",
    "ReplaySet": ".data.replay_set",
    "ReplayError": ".data.sources",
    "build_replay_file": ".data.replay_set",
    "StateCache": ".cache.state_cache",
    "StateCacheError": ".cache.folders",
    "build_state_cache": ".cache.state_cache",
    "ReplaySchedule": ".data.schedule",
    "LayerFreezeCallback": ".model.freeze",
    "freeze_bottom": ".model.freeze",
    "ReplayStep": ".trainer.step",
    "GeReTrainerMixin": ".trainer.mixin",
    "with_gere": ".trainer.mixin",
    "enable_gere": ".trainer.mixin",
    "GeReSFTConfig": ".trainer.sft",
    "GeReSFTTrainer": ".trainer.sft",
    "GeReDPOConfig": ".trainer.dpo",
    "GeReDPOTrainer": ".trainer.dpo",
    "GeReGRPOConfig": ".trainer.grpo",
    "GeReGRPOTrainer": ".trainer.grpo",
    "GeRePlugin": ".axolotl.plugin",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        mod = importlib.import_module(_EXPORTS[name], __name__)
        value = getattr(mod, name)
        globals()[name] = value
        return value
    raise missing_attribute_error(__name__, name, _EXPORTS)


def missing_attribute_error(module: str, name: str, known: Any) -> AttributeError:
    """The AttributeError of a lazy module, with the closest name, or the plugin-spelling fix.

    Axolotl < 0.21 splits ``plugins:`` entries at the last ``.``, so the ``module:Class`` spelling
    ``gere_plugin.axolotl:GeRePlugin`` reaches us as a request for ``axolotl:GeRePlugin``.
    """
    if ":" in name:
        return AttributeError(
            f"module {module!r} has no attribute {name!r}: '{module}.{name}' is the module:Class plugin spelling, "
            "which this Axolotl (< 0.21) does not understand. Write `plugins: [gere_plugin.GeRePlugin]`."
        )
    import difflib

    close = difflib.get_close_matches(name, list(known), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return AttributeError(f"module {module!r} has no attribute {name!r}.{hint}")


def __dir__() -> list[str]:
    return __all__
