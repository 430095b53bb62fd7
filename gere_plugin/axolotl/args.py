"""The Axolotl config schema of the GeRe plugin, generated from :class:`~gere_plugin.GeReArguments`.

Axolotl merges every plugin's pydantic model into its config schema (``get_input_args``) and
silently drops keys the schema does not declare, so every ``gere_*`` knob is declared here, with
``None`` as the schema default ("not set": :func:`gere_arguments_from_cfg` then uses the
:class:`~gere_plugin.GeReArguments` default). The fields are generated from
:func:`gere_plugin.config.gere_fields`, so a knob added to the dataclass appears here by itself.

Validation (same messages as the TRL configs, each naming the key):

* ``before``: a ``gere_*`` key the schema does not know (a typo) is an error with the closest valid
  name, instead of being dropped like any other unknown Axolotl key;
* ``after``: every set key goes through :func:`~gere_plugin.config.validate_gere_values`; when the
  config asks for GeRe (lists the plugin, or sets any ``gere_*`` key: :func:`gere_requested`),
  ``gere_replay`` (or ``gere_task_replay``, earlier tasks only) is required unless a method that needs no
  replay is on (FLOW, EWC, task KL; then keys that act on general replay rows only are an error) or the
  config only watches forgetting (``gere_monitor`` and its keys alone), and the training mode must be one
  GeRe supports (SFT, ``rl: dpo``, ``rl: ipo`` or ``rl: grpo``; the methods without replay: SFT only), so
  GeRe never runs
  half-configured or silently off.

This module imports pydantic only (not Axolotl), so ``GeReArgs`` can be used and tested on its own.
"""

from __future__ import annotations

import typing
from typing import Any, Optional, Union

from pydantic import BaseModel, Field, create_model, model_validator

from ..config import (
    ANY_FAMILY_TASK_METHODS,
    MONITOR_KEYS,
    REPLAY_ONLY_KEYS,
    GeReArguments,
    GeReConfigError,
    check_guard_has_monitor,
    check_key_combinations,
    gere_defaults,
    gere_fields,
    task_methods,
    validate_gere_values,
)

#: Dotted paths that load the plugin in ``plugins:`` (Axolotl imports ``module`` and takes ``Class``).
PLUGIN_PATHS = (
    "gere_plugin.GeRePlugin",
    "gere_plugin.axolotl.GeRePlugin",
    "gere_plugin.axolotl.plugin.GeRePlugin",
)
#: The form the docs and recipes use (it works on every supported Axolotl version).
PLUGIN_PATH = PLUGIN_PATHS[0]
#: The ``module:Class`` spellings of the same paths (understood by Axolotl >= 0.21 only).
PLUGIN_COLON_PATHS = tuple(":".join(p.rsplit(".", 1)) for p in PLUGIN_PATHS)
#: The target of this package's ``axolotl.plugins`` entry point (see pyproject.toml), dotted.
ENTRY_POINT_PATH = "gere_plugin.axolotl.plugin.GeRePlugin"

#: ``rl:`` values GeRe supports (DPO / IPO use Axolotl's DPO trainer, GRPO its GRPO trainer); ``None`` = SFT.
SUPPORTED_RL = ("dpo", "ipo", "grpo")
#: The loss family (:mod:`gere_plugin.families`) of each supported ``rl:`` value; SFT is ``sft``.
RL_FAMILIES = {"dpo": "dpo", "ipo": "dpo", "grpo": "grpo"}
#: ``trl:`` keys that switch Axolotl's GRPO to its asynchronous trainer (a data producer that generates
#: ahead of the optimizer steps), which GeRe has not been checked against.
ASYNC_GRPO_KEYS = ("async_prefetch", "use_data_producer")

# YAML gives ``gere_weight: 100`` as an int and ``gere_layers: -1`` as a scalar; both are accepted
# (and normalised by validate_gere_values), so their schema types are wider than the dataclass's.
_TYPE_OVERRIDES: dict[str, Any] = {
    "gere_weight": Union[float, str],
    "gere_layers": Union[list[int], int],
    "gere_task_replay": Union[list[str], str],
}


def normalize_plugin_entry(entry: Any) -> Optional[str]:
    """A ``plugins:`` entry in dotted form (``module:Class`` -> ``module.Class``), or ``None`` if not a string."""
    if not isinstance(entry, str):
        return None
    module, sep, cls = entry.strip().partition(":")
    return f"{module}.{cls}" if sep else entry.strip()


def is_gere_plugin_entry(entry: Any) -> bool:
    """Whether a ``plugins:`` entry names the GeRe plugin (dotted or ``module:Class`` form)."""
    return normalize_plugin_entry(entry) in PLUGIN_PATHS


def lists_gere_plugin(plugins: Any) -> bool:
    return isinstance(plugins, (list, tuple)) and any(is_gere_plugin_entry(p) for p in plugins)


def gere_keys_set(values: Any) -> list[str]:
    """The ``gere_*`` keys of a config mapping that hold a value (``None`` = not set)."""
    getter = values.get if hasattr(values, "get") else (lambda k, d=None: getattr(values, k, d))
    return [f.name for f in gere_fields() if getter(f.name) is not None]


def gere_requested(values: Any) -> bool:
    """Whether a config asks for GeRe: ``plugins:`` names the plugin, or any ``gere_*`` key is set.

    Axolotl >= 0.21 loads the plugin through its entry point for every config, so the keys alone must
    turn GeRe on; on older versions the plugin only runs when ``plugins:`` loads it, and then the same
    rule holds for that config.
    """
    getter = values.get if hasattr(values, "get") else (lambda k, d=None: getattr(values, k, d))
    return lists_gere_plugin(getter("plugins")) or bool(gere_keys_set(values))


#: The switch of each method that needs no replay (:func:`gere_plugin.config.task_methods`).
TASK_METHOD_SWITCHES = {"flow": "gere_flow", "ewc": "gere_ewc_lambda", "task_kl": "gere_task_kl", "wise": "gere_wise_alpha"}

#: Keys a monitor-only config (``gere_monitor`` without ``gere_replay``) may set: the monitor's own, and
#: the ones its texts are read and sampled with.
MONITOR_ONLY_KEYS = (*MONITOR_KEYS, "gere_replay_text_field", "gere_replay_split", "gere_seed")


def check_gere_request(values: Any) -> None:
    """Raise :class:`GeReConfigError` when a config asks for GeRe but cannot run it, or a training mode
    GeRe does not wrap. A config that does not ask for GeRe passes untouched.

    Without ``gere_replay`` a config runs when it replays earlier tasks (``gere_task_replay``), when it
    switches on a method that needs no replay (``gere_flow``, ``gere_ewc_lambda``, ``gere_task_kl``: SFT
    only; ``gere_wise_alpha``: any training mode) and sets no key that acts on replay rows only (:data:`~gere_plugin.config.REPLAY_ONLY_KEYS`), or
    when it only watches forgetting (``gere_monitor`` with :data:`MONITOR_ONLY_KEYS`).
    """
    if not gere_requested(values):
        return
    getter = values.get if hasattr(values, "get") else (lambda k, d=None: getattr(values, k, d))
    check_guard_has_monitor(values)
    methods = task_methods(values)
    task_replay = getter("gere_task_replay")
    monitor = getter("gere_monitor") not in (None, "")
    if getter("gere_replay") in (None, ""):
        keys = gere_keys_set(values)
        if methods:
            # gere_seed also seeds the earlier-task replay schedule and the monitor's samples; the monitor
            # reads its texts with the replay's field and split keys
            allowed = set(MONITOR_ONLY_KEYS) if monitor else ({"gere_seed"} if task_replay else set())
            replay_keys = [k for k in keys if k in REPLAY_ONLY_KEYS and k not in allowed]
            if replay_keys:
                raise GeReConfigError(
                    f"gere_replay is not set, but the config sets {', '.join(replay_keys)}, which only act on replay "
                    f"rows of gere_replay (this run uses {', '.join(TASK_METHOD_SWITCHES[m] for m in methods)}, which "
                    "need no replay). Set gere_replay to a general-text replay file, or remove those keys."
                )
        elif not task_replay:
            if not monitor:
                why = (
                    f"plugins: lists {PLUGIN_PATH}"
                    if lists_gere_plugin(getter("plugins"))
                    else f"the config sets {', '.join(keys)}"
                )
                raise GeReConfigError(
                    f"gere_replay is not set, but {why}, so GeRe cannot run. Point gere_replay at a general-text "
                    "replay file (jsonl/json/parquet/txt), a folder or a datasets id (and/or gere_task_replay at "
                    "earlier tasks' data), or switch on a method that needs no replay (gere_flow: true, "
                    "gere_ewc_lambda > 0, gere_task_kl > 0, gere_wise_alpha < 1), or only watch forgetting (gere_monitor with held-out "
                    "general texts), or remove the gere_* keys and the plugin line."
                )
            replay_keys = [k for k in keys if k not in MONITOR_ONLY_KEYS]
            if replay_keys:
                raise GeReConfigError(
                    f"gere_replay is not set, but the config sets {', '.join(replay_keys)}, which only act with "
                    "replay. Point gere_replay at a general-text replay file, or remove those keys (gere_monitor "
                    "alone runs the forgetting monitor without replay)."
                )
    check_training_mode({k: getter(k) for k in ("rl", "reward_model", "process_reward_model", "trl", "context_parallel_size")})
    sft_only = [m for m in methods if m not in ANY_FAMILY_TASK_METHODS]  # WiSE-FT works with every family
    if sft_only and rl_name(getter("rl")) is not None:
        raise GeReConfigError(
            f"{', '.join(TASK_METHOD_SWITCHES[m] for m in sft_only)} {'is' if len(sft_only) == 1 else 'are'} supported "
            f"for SFT only, not rl: {rl_name(getter('rl'))}. Remove {'it' if len(sft_only) == 1 else 'them'} from "
            "this config (replay and its regularizers work with DPO and GRPO)."
        )


def rl_name(rl: Any) -> Optional[str]:
    """The ``rl:`` value of a config as a lower-case string (``None`` for SFT); accepts Axolotl's enum."""
    if rl is None or rl is False:
        return None
    return str(getattr(rl, "value", rl)).lower()


def loss_family_for_rl(rl: Any) -> str:
    """The GeRe loss family of an Axolotl training mode: ``sft`` (no ``rl``), ``dpo`` (dpo/ipo), ``grpo``."""
    name = rl_name(rl)
    return "sft" if name is None else RL_FAMILIES[name]


def _value(obj: Any, key: str) -> Any:
    if obj is None:
        return None
    if isinstance(obj, dict):
        return obj.get(key)
    return getattr(obj, key, None)


def check_training_mode(values: dict[str, Any]) -> None:
    """Raise :class:`GeReConfigError` when the Axolotl config asks for a mode GeRe cannot wrap."""
    rl = rl_name(values.get("rl"))
    if rl is not None and rl not in SUPPORTED_RL:
        raise GeReConfigError(
            f"rl: {rl} is not supported by the GeRe plugin: use it for SFT (no rl key), rl: dpo / rl: ipo or rl: grpo. "
            f"GeRe has no defined way to combine replay with the {rl} loss (see docs/axolotl.md)."
        )
    if rl == "grpo":
        async_keys = [f"trl.{k}" for k in ASYNC_GRPO_KEYS if _value(values.get("trl"), k)]
        if async_keys:
            raise GeReConfigError(
                f"{', '.join(async_keys)}: true switches Axolotl to its asynchronous GRPO trainer, which the GeRe plugin "
                "does not support (untested): remove it for synchronous rl: grpo."
            )
        if (values.get("context_parallel_size") or 1) > 1:
            raise GeReConfigError(
                "context_parallel_size > 1 with rl: grpo uses Axolotl's sequence-parallel GRPO trainer, which the GeRe "
                "plugin does not support (untested): set context_parallel_size: 1."
            )
    for key in ("reward_model", "process_reward_model"):
        if values.get(key):
            raise GeReConfigError(
                f"{key}: true is not supported by the GeRe plugin (it trains a reward head, not an LM)."
            )


class _GeReArgsBase(BaseModel):
    """Validators shared by the generated :class:`GeReArgs` (inherited by Axolotl's merged schema)."""

    @model_validator(mode="before")
    @classmethod
    def _gere_unknown_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            known = {f.name for f in gere_fields()}
            unknown = {
                k: v
                for k, v in data.items()
                if isinstance(k, str) and k.startswith("gere_") and k not in known
            }
            if unknown:
                validate_gere_values(unknown)  # raises, naming the closest valid key
        return data

    @model_validator(mode="after")
    def _gere_values(self) -> Any:
        names = [f.name for f in gere_fields()]
        values = {n: getattr(self, n, None) for n in names}
        given = {k: v for k, v in values.items() if v is not None}
        normalised = validate_gere_values(given)
        check_key_combinations(normalised)
        for key, value in normalised.items():
            if value != given[key]:
                # plain attribute write: the schema's validate_assignment (if any) must not re-run us
                self.__dict__[key] = value
        check_gere_request(self)
        return self


def _schema_fields() -> dict[str, Any]:
    hints = typing.get_type_hints(GeReArguments)
    defaults = gere_defaults()
    out: dict[str, Any] = {}
    for f in gere_fields():
        typ = _TYPE_OVERRIDES.get(f.name, hints[f.name])
        help_text = f.metadata.get("help", "")
        choices = f.metadata.get("choices")
        if choices:
            help_text += f" One of: {', '.join(choices)}."
        help_text += f" (GeRe default when unset: {defaults[f.name]!r})"
        out[f.name] = (Optional[typ], Field(default=None, description=help_text))
    return out


GeReArgs = create_model(  # type: ignore[call-overload]
    "GeReArgs",
    __base__=_GeReArgsBase,
    __module__=__name__,
    __doc__="Every ``gere_*`` key of the GeRe Axolotl plugin (``None`` = the GeReArguments default).",
    **_schema_fields(),
)


def gere_arguments_from_cfg(cfg: Any) -> GeReArguments:
    """A :class:`~gere_plugin.GeReArguments` from an Axolotl config (dict or ``DictDefault``).

    Keys that are absent or ``None`` take the dataclass default; the result is validated.
    """
    getter = cfg.get if hasattr(cfg, "get") else (lambda k, d=None: getattr(cfg, k, d))
    kwargs = {f.name: getter(f.name) for f in gere_fields()}
    return GeReArguments(**{k: v for k, v in kwargs.items() if v is not None})
