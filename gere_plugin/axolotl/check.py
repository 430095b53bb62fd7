"""Check an Axolotl YAML for GeRe mistakes that stock Axolotl does not report.

What Axolotl does with a GeRe config depends on its version (:mod:`.compat`):

* **0.19 / 0.20** validate only keys that some loaded plugin declared and drop every other key
  without a word. When the ``plugins:`` line that loads GeRe is missing or names a module that does
  not exist, the ``gere_*`` keys vanish and the run trains WITHOUT GeRe; nothing inside Axolotl can
  notice, because none of this package's code runs.
* **>= 0.21** loads this package's entry point for every config, so the ``gere_*`` keys alone turn
  GeRe on, every plugin spelling works (dotted or ``module:Class``), and a misspelled plugin module
  makes Axolotl raise.

:func:`check_config` (``axolotl gere check CONFIG.yml``, or a CI step) gives the advice that is true
for the installed Axolotl (or the version passed in). It reads the YAML only, imports neither Axolotl
nor torch, lists every problem at once, and catches:

* ``gere_*`` keys while nothing loads the plugin (the silent drop on 0.19 / 0.20, or 0.21 without
  the installed entry point);
* a GeRe-looking entry that does not load the plugin: a bare ``gere`` (Axolotl crashes splitting it),
  a wrong class or module name such as ``gere_plugin.GerePlugin`` or ``gere_plugins.GeRePlugin``, a
  ``module:Class`` spelling on an Axolotl older than 0.21;
* GeRe asked for without ``gere_replay`` (and without FLOW / EWC / task KL, which need none), or keys
  that act on replay rows only set without it; FLOW / EWC / task KL with ``rl:``;
* unknown ``gere_*`` keys (with the closest valid name) and out-of-range values;
* training modes GeRe does not wrap (``rl`` other than ``dpo``/``ipo``/``grpo``, asynchronous or
  sequence-parallel GRPO, reward models).
* what training would only find later (:func:`setup_problems`): ``gere_replay_per_step`` not below
  the global batch, or giving rows to some ranks and not others in a micro-batch under DeepSpeed
  ZeRO-3 / FSDP (neither a multiple of the processes nor at least processes x accumulation);
  ``gere_freeze_layers`` / ``gere_layers`` beyond the depth of a local ``base_model``; a
  ``gere_state_cache``, ``gere_flow_cache`` or EWC folder GeRe would refuse (user files, a model folder, ...).
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from ..config import GeReConfigError, gere_value_problems, resolve_replay_per_step
from ..data.schedule import uneven_micro_batches
from .args import PLUGIN_PATH, PLUGIN_PATHS, check_gere_request, is_gere_plugin_entry
from .compat import AxolotlFacts, axolotl_facts


@dataclass
class ConfigCheck:
    """What :func:`check_config` found in one config."""

    source: str
    plugin_entry: Optional[str] = None
    gere_keys: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    #: the installed Axolotl (or the version the check was asked about) and its plugin behaviour
    axolotl: Optional[AxolotlFacts] = None
    #: GeRe runs without a ``plugins:`` line, through the entry point (Axolotl >= 0.21)
    via_entry_point: bool = False

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def uses_gere(self) -> bool:
        """GeRe will run for this config: a working plugin line, or the entry point (Axolotl >= 0.21)."""
        return self.plugin_entry is not None or self.via_entry_point

    def report(self) -> str:
        where = self.axolotl.describe() if self.axolotl is not None else "Axolotl"
        if self.ok:
            if self.plugin_entry is not None:
                return (
                    f"{self.source}: OK on {where} (GeRe plugin {self.plugin_entry}, {len(self.gere_keys)} gere_* keys)"
                )
            if self.via_entry_point:
                return (
                    f"{self.source}: OK on {where} (no plugins: line; GeRe runs through its entry point, "
                    f"{len(self.gere_keys)} gere_* keys). Add `plugins: [{PLUGIN_PATH}]` if this YAML must "
                    "also run on Axolotl 0.19 / 0.20."
                )
            return f"{self.source}: OK on {where} (no GeRe plugin and no gere_* keys)"
        lines = [f"{self.source}: {len(self.problems)} problem(s)"]
        lines += [f"  - {p}" for p in self.problems]
        return "\n".join(lines)


def _looks_like_gere(entry: str) -> bool:
    return "gere" in entry.lower()


def _misspelled_message(entry: str, facts: AxolotlFacts) -> str:
    if "." not in entry and ":" not in entry:
        return (
            f"plugins: entry {entry!r} is not a plugin path. Axolotl loads training plugins by path "
            f"(`module.Class`; a bare name makes its loader crash splitting it). Write `plugins: [{PLUGIN_PATH}]`"
            + (", or drop the line: the gere_* keys alone enable GeRe on this Axolotl." if facts.keys_alone_enable_gere else ".")
        )
    close = difflib.get_close_matches(entry, PLUGIN_PATHS, n=1, cutoff=0.5)
    hint = close[0] if close else PLUGIN_PATH
    if facts.required_plugins:
        effect = f"{facts.describe()} raises at start-up (configured plugins are required)"
    elif facts.known:
        effect = (
            f"{facts.describe()} either crashes or only logs the import error and trains WITHOUT GeRe, dropping "
            "every gere_* key"
        )
    else:
        effect = (
            "Axolotl 0.19 / 0.20 either crash or only log the import error and train WITHOUT GeRe; 0.21 raises"
        )
    return f"plugins: entry {entry!r} does not load the GeRe plugin (did you mean {hint!r}?). Depending on the typo {effect}."


def _colon_message(entry: str, facts: AxolotlFacts) -> str:
    dotted = entry.replace(":", ".")
    return (
        f"plugins: entry {entry!r} uses the module:Class form, which {facts.describe()} does not understand (its "
        f"loader splits at the last '.', so the run crashes). Write `{dotted}` (or `{PLUGIN_PATH}`); the colon "
        "form needs Axolotl >= 0.21."
    )


def _no_plugin_message(keys: list[str], facts: AxolotlFacts) -> str:
    listed = f"{len(keys)} gere_* key(s) ({', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''})"
    fix = f"Add `plugins: [{PLUGIN_PATH}]`."
    if facts.loads_entry_points and not facts.entry_point:
        return (
            f"{listed} but plugins: does not load the GeRe plugin, and gere-plugin's entry point is not installed "
            f"(is it on PYTHONPATH without `pip install`?), so {facts.describe()} would not load it and would "
            f"silently drop the keys. {fix} (or `pip install` gere-plugin)."
        )
    if facts.known:
        return (
            f"{listed} but plugins: does not load the GeRe plugin. {facts.describe()} silently drops keys no loaded "
            f"plugin declares, so this run would train WITHOUT GeRe. {fix} (Axolotl >= 0.21 loads the plugin by "
            "itself.)"
        )
    return (
        f"{listed} but plugins: does not load the GeRe plugin. Axolotl 0.19 / 0.20 silently drop keys no loaded "
        f"plugin declares and would train WITHOUT GeRe (0.21 loads the plugin by itself). {fix}"
    )


def load_config_mapping(config: Union[str, os.PathLike, Mapping]) -> tuple[str, Mapping]:
    """``(source, mapping)`` of an Axolotl config given as a YAML path or a mapping; unreadable files,
    invalid YAML and non-mapping documents raise :class:`~gere_plugin.GeReConfigError`."""
    if isinstance(config, Mapping):
        return "<config>", config
    path = Path(config)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise GeReConfigError(f"cannot read Axolotl config {str(path)!r}: {e.strerror or e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise GeReConfigError(f"{path} is not valid YAML: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise GeReConfigError(
            f"{path} must hold a YAML mapping (key: value lines), not a {type(data).__name__}."
        )
    return str(path), data


def check_config(
    config: Union[str, os.PathLike, Mapping],
    raise_on_error: bool = True,
    axolotl: Optional[AxolotlFacts] = None,
    num_processes: Optional[int] = None,
) -> ConfigCheck:
    """Check an Axolotl config (YAML path or mapping) for GeRe mistakes Axolotl would not report.

    Args:
        config: the YAML path or the config mapping.
        raise_on_error: raise :class:`~gere_plugin.GeReConfigError` listing every problem.
        axolotl: judge for this Axolotl version and entry-point state (default: the installed
            Axolotl and gere-plugin metadata, :func:`~gere_plugin.axolotl.compat.axolotl_facts`; when
            Axolotl is not installed the advice holds for every supported version).
        num_processes: the number of training processes (default ``$WORLD_SIZE`` or 1), for the
            batch-layout checks.

    Returns:
        A :class:`ConfigCheck`.
    """
    facts = axolotl if axolotl is not None else axolotl_facts()
    source, data = load_config_mapping(config)
    result = ConfigCheck(source=source, axolotl=facts)
    result.gere_keys = sorted(k for k in data if isinstance(k, str) and k.startswith("gere_"))

    plugins = data.get("plugins") or []
    if isinstance(plugins, str):
        plugins = [plugins]
    if not isinstance(plugins, (list, tuple)):
        result.problems.append(
            f"plugins: must be a list of plugin paths, e.g. [{PLUGIN_PATH}], not {plugins!r}."
        )
        plugins = []
    broken = []
    for entry in plugins:
        if is_gere_plugin_entry(entry):
            if ":" in entry and not facts.accepts_colon_form and facts.known:
                broken.append(entry)
                result.problems.append(_colon_message(entry, facts))
            elif result.plugin_entry is None:
                result.plugin_entry = str(entry).strip()
        elif isinstance(entry, str) and _looks_like_gere(entry):
            broken.append(entry)
            result.problems.append(_misspelled_message(entry, facts))

    set_keys = [k for k in result.gere_keys if data[k] is not None]
    if set_keys and result.plugin_entry is None and not broken:
        if facts.keys_alone_enable_gere:
            result.via_entry_point = True
        else:
            result.problems.append(_no_plugin_message(result.gere_keys, facts))
    if result.gere_keys:
        values = {k: data[k] for k in result.gere_keys if data[k] is not None}
        result.problems.extend(gere_value_problems(values))  # one message per bad key, not only the first
    try:
        check_gere_request(dict(data))
    except GeReConfigError as e:
        result.problems.append(str(e))
    if result.gere_keys:
        result.problems.extend(setup_problems(data, num_processes))

    if result.problems and raise_on_error:
        raise GeReConfigError(result.report())
    return result


# ---------------------------------------------------------------------------------------------
# Checks of what training would only find later (each a small function; YAML and local files only)
# ---------------------------------------------------------------------------------------------
def _int_or(value: Any, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else default


def accumulation_steps(data: Mapping) -> int:
    """Gradient accumulation as Axolotl derives it: the key, else ``batch_size / micro_batch_size``, else 1."""
    if data.get("gradient_accumulation_steps"):
        return _int_or(data.get("gradient_accumulation_steps"), 1)
    micro = _int_or(data.get("micro_batch_size"), 1)
    batch = _int_or(data.get("batch_size"), 0)
    return max(1, batch // micro) if batch else 1


def sharding_of(data: Mapping) -> Optional[str]:
    """``"DeepSpeed ZeRO-3"`` / ``"FSDP"`` when the config shards parameters across ranks, else ``None``."""
    if data.get("fsdp") or data.get("fsdp_config") or data.get("fsdp_version"):
        return "FSDP"
    ds = data.get("deepspeed")
    if isinstance(ds, Mapping):
        stage = (ds.get("zero_optimization") or {}).get("stage")
    elif isinstance(ds, str) and ds:
        stage = None
        try:
            stage = (json.loads(Path(ds).read_text(encoding="utf-8")).get("zero_optimization") or {}).get("stage")
        except (OSError, ValueError, AttributeError):
            stage = 3 if "zero3" in ds.replace("_", "").lower() else None  # a bundled name such as zero3_bf16.json
    else:
        return None
    return "DeepSpeed ZeRO-3" if stage == 3 else None


def batch_problems(data: Mapping, num_processes: Optional[int] = None) -> list[str]:
    """``gere_replay_per_step`` (and ``gere_task_replay_per_step``) against the batch layout.

    Under DeepSpeed ZeRO-3 / FSDP no micro-batch may hold replay rows on some ranks and none on others
    (the trainer's rule, :func:`gere_plugin.mixing.uneven_micro_batches`): a multiple of the number of
    processes, or at least processes x accumulation. A YAML does not say how many processes will run:
    ``num_processes``, else ``$WORLD_SIZE``; unknown, the layout is checked for the smallest uneven case,
    2 processes, with a hint to pass the real number. Against the global batch ``gere_replay_per_step``
    is checked only when the number of processes is known.
    """
    per_step = data.get("gere_replay_per_step")
    if per_step is not None and (not isinstance(per_step, int) or isinstance(per_step, bool) or per_step < 1):
        return []  # reported by the value checks
    env_world = os.environ.get("WORLD_SIZE", "")
    known = num_processes or (int(env_world) if env_world.isdigit() and int(env_world) > 0 else None)
    procs = known or 2
    accum = accumulation_steps(data)
    problems = []
    if known and isinstance(data.get("micro_batch_size"), int):
        try:
            per_step = resolve_replay_per_step(per_step, data["micro_batch_size"] * accum * known)
        except GeReConfigError as e:
            return [f"{e} (micro_batch_size x gradient_accumulation_steps x {known} process(es))"]
    sharded = sharding_of(data)
    task_per_step = data.get("gere_task_replay_per_step")
    for key, count in (("gere_replay_per_step", per_step), ("gere_task_replay_per_step", task_per_step)):
        if not sharded or not isinstance(count, int) or isinstance(count, bool) or count < 1:
            continue
        if uneven_micro_batches(count, procs, accum):
            problems.append(
                f"{key}={count} would give replay rows to some ranks but not others in one micro-batch "
                f"({procs} processes x {accum} accumulation steps) under {sharded}: the parameter all-gathers of "
                f"the replay forward would hang. Use a multiple of the number of processes ({procs}) or at least "
                f"processes x gradient_accumulation_steps ({procs * accum})"
                + ("." if known else f"; {procs} processes assumed: pass the number of training processes with "
                   "--num-processes to check the real layout.")
            )
    return problems


def _local_model_config(data: Mapping) -> Optional[dict]:
    src = data.get("base_model_config") or data.get("base_model")
    if not isinstance(src, str):
        return None
    try:
        cfg = json.loads((Path(os.path.expanduser(src)) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # a hub id, or unreadable: the model load reports it
    if isinstance(cfg.get("text_config"), dict):
        cfg = {**cfg, **cfg["text_config"]}
    return cfg if isinstance(cfg, dict) else None


def model_problems(data: Mapping) -> list[str]:
    """``gere_freeze_layers`` and ``gere_layers`` against the depth of a local ``base_model``."""
    cfg = _local_model_config(data)
    depth = next((cfg[k] for k in ("num_hidden_layers", "n_layer", "num_layers") if isinstance(cfg.get(k), int)), None) if cfg else None
    if depth is None:
        return []
    problems = []
    freeze = data.get("gere_freeze_layers")
    if isinstance(freeze, int) and not isinstance(freeze, bool) and freeze > depth:
        problems.append(
            f"gere_freeze_layers={freeze} but base_model has only {depth} decoder layers: use a value from 0 to {depth}."
        )
    layers = data.get("gere_layers")
    layers = [layers] if isinstance(layers, int) else layers
    if isinstance(layers, list):
        bad = [i for i in layers if isinstance(i, int) and not -(depth + 1) <= i <= depth]
        if bad:
            problems.append(
                f"gere_layers contains {bad[0]}, but base_model returns {depth + 1} hidden states "
                f"(valid: {-(depth + 1)}..{depth})."
            )
    return problems


def cache_folder_problems(data: Mapping) -> list[str]:
    """A folder GeRe would refuse to write: ``gere_state_cache`` (default ``<output_dir>/gere_states``) when
    replaying, ``gere_flow_cache`` (default ``<output_dir>/gere_flow``) with FLOW, ``<output_dir>/gere_ewc``
    with EWC; and a ``gere_ewc_state`` that exists but is not an EWC state.

    (A replay file or EWC state that does not exist yet is not reported: recipes are checked before the
    replay file is built or the previous task has run, and training names a missing one before any model work.)
    """
    from ..cache.folders import (
        DEFAULT_EWC_FOLDER,
        DEFAULT_FLOW_FOLDER,
        EWC_STATE,
        FLOW_CACHE,
        run_folder,
        state_cache_folder,
        state_cache_problem,
    )
    from ..config import task_methods

    def folder_value(key: str) -> Any:
        value = data.get(key)
        return value if value is None or (isinstance(value, str) and value.strip()) else False

    problems = []
    methods = task_methods(data)
    cache = folder_value("gere_state_cache")
    if data.get("gere_replay") and cache is not False:
        problems.append(state_cache_problem(state_cache_folder(cache, data.get("output_dir"))))
    flow = folder_value("gere_flow_cache")
    if "flow" in methods and flow is not False:
        problems.append(state_cache_problem(run_folder(flow, data.get("output_dir"), DEFAULT_FLOW_FOLDER), FLOW_CACHE))
    if "ewc" in methods:
        problems.append(state_cache_problem(run_folder(None, data.get("output_dir"), DEFAULT_EWC_FOLDER), EWC_STATE))
        state = folder_value("gere_ewc_state")
        if state:
            problems.append(state_cache_problem(run_folder(state, None, DEFAULT_EWC_FOLDER), EWC_STATE))
    return [p for p in problems if p]


def setup_problems(data: Mapping, num_processes: Optional[int] = None) -> list[str]:
    """Every check of what training would only find later (see the module docstring)."""
    batch = batch_problems(data, num_processes) if data.get("gere_replay") else []
    return batch + model_problems(data) + cache_folder_problems(data)


def plugin_is_loadable(entry: Any = PLUGIN_PATH) -> bool:
    """Whether Axolotl's loader would turn ``entry`` into the GeRe plugin (imports Axolotl)."""
    from axolotl.integrations.base import load_plugin

    from .plugin import GeRePlugin

    try:
        return isinstance(load_plugin(entry), GeRePlugin)
    except (ImportError, AttributeError, ValueError):
        return False
