"""Check an Axolotl YAML for GeRe mistakes that stock Axolotl does not report.

Axolotl 0.19 only validates keys that some loaded plugin declared; every other key is dropped
without a word. So when the ``plugins:`` line that loads GeRe is missing or wrong, the ``gere_*``
keys vanish and the run trains WITHOUT GeRe. Once the plugin is loaded, its schema catches bad
values itself, but nothing inside Axolotl can notice that the plugin was never loaded: that is what
:func:`check_config` is for (``axolotl gere check CONFIG.yml``, or a CI step). It reads the YAML
only, imports neither Axolotl nor torch, and catches:

* ``gere_*`` keys while ``plugins:`` has no GeRe entry (the silent drop);
* a GeRe-looking entry that does not load the plugin: a bare ``gere`` (Axolotl crashes splitting it),
  a wrong class or module name such as ``gere_plugin.GerePlugin`` or ``gere_plugins.GeRePlugin``;
* the plugin listed without ``gere_replay``;
* unknown ``gere_*`` keys (with the closest valid name) and out-of-range values;
* training modes GeRe does not wrap (``rl`` other than ``dpo``/``ipo``, reward models).
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from ..config import GeReConfigError, validate_gere_values
from .args import PLUGIN_PATH, PLUGIN_PATHS, check_training_mode, is_gere_plugin_entry


@dataclass
class ConfigCheck:
    """What :func:`check_config` found in one config."""

    source: str
    plugin_entry: Optional[str] = None
    gere_keys: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def uses_gere(self) -> bool:
        """The config loads the GeRe plugin (correctly)."""
        return self.plugin_entry is not None

    def report(self) -> str:
        if self.ok:
            if self.uses_gere:
                return (
                    f"{self.source}: OK (GeRe plugin {self.plugin_entry}, {len(self.gere_keys)} gere_* keys)"
                )
            return f"{self.source}: OK (no GeRe plugin and no gere_* keys)"
        lines = [f"{self.source}: {len(self.problems)} problem(s)"]
        lines += [f"  - {p}" for p in self.problems]
        return "\n".join(lines)


def _looks_like_gere(entry: str) -> bool:
    return "gere" in entry.lower()


def _misspelled_message(entry: str) -> str:
    if "." not in entry:
        return (
            f"plugins: entry {entry!r} is not a dotted path. Axolotl 0.19 loads training plugins only by dotted "
            f"path (it does `rsplit('.', 1)` and crashes on a bare name; entry-point names are not looked up). "
            f"Write `plugins: [{PLUGIN_PATH}]`."
        )
    close = difflib.get_close_matches(entry, PLUGIN_PATHS, n=1, cutoff=0.5)
    hint = close[0] if close else PLUGIN_PATH
    return (
        f"plugins: entry {entry!r} does not load the GeRe plugin (did you mean {hint!r}?). Depending on the typo "
        "Axolotl either crashes or only logs the import error and trains WITHOUT GeRe, dropping every gere_* key."
    )


def _load(config: Union[str, os.PathLike, Mapping]) -> tuple[str, Mapping]:
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


def check_config(config: Union[str, os.PathLike, Mapping], raise_on_error: bool = True) -> ConfigCheck:
    """Check an Axolotl config (YAML path or mapping) for GeRe mistakes Axolotl would not report.

    Returns a :class:`ConfigCheck`. With ``raise_on_error`` (the default) any problem raises
    :class:`~gere_plugin.GeReConfigError` listing all of them.
    """
    source, data = _load(config)
    result = ConfigCheck(source=source)
    result.gere_keys = sorted(k for k in data if isinstance(k, str) and k.startswith("gere_"))

    plugins = data.get("plugins") or []
    if isinstance(plugins, str):
        plugins = [plugins]
    if not isinstance(plugins, (list, tuple)):
        result.problems.append(
            f"plugins: must be a list of dotted paths, e.g. [{PLUGIN_PATH}], not {plugins!r}."
        )
        plugins = []
    misspelled = []
    for entry in plugins:
        if is_gere_plugin_entry(entry):
            result.plugin_entry = str(entry).strip()
        elif isinstance(entry, str) and _looks_like_gere(entry):
            misspelled.append(entry)
            result.problems.append(_misspelled_message(entry))

    if result.gere_keys and result.plugin_entry is None and not misspelled:
        result.problems.append(
            f"{len(result.gere_keys)} gere_* key(s) ({', '.join(result.gere_keys[:4])}"
            f"{', ...' if len(result.gere_keys) > 4 else ''}) but plugins: does not load the GeRe plugin. Stock Axolotl "
            f"silently drops keys no loaded plugin declares, so this run would train WITHOUT GeRe. Add "
            f"`plugins: [{PLUGIN_PATH}]`."
        )
    if result.plugin_entry is not None and data.get("gere_replay") in (None, ""):
        result.problems.append(
            f"plugins: lists {result.plugin_entry} but gere_replay is not set: point it at a general-text replay file "
            "(jsonl/json/parquet/txt), a folder, or a datasets id."
        )
    if result.gere_keys:
        values = {k: data[k] for k in result.gere_keys if data[k] is not None}
        try:
            validate_gere_values(values)
        except GeReConfigError as e:
            result.problems.append(str(e))
    if result.plugin_entry is not None:
        try:
            check_training_mode(dict(data))
        except GeReConfigError as e:
            result.problems.append(str(e))

    if result.problems and raise_on_error:
        raise GeReConfigError(result.report())
    return result


def plugin_is_loadable(entry: Any = PLUGIN_PATH) -> bool:
    """Whether Axolotl's loader would turn ``entry`` into the GeRe plugin (imports Axolotl)."""
    from axolotl.integrations.base import load_plugin

    from .plugin import GeRePlugin

    try:
        return isinstance(load_plugin(entry), GeRePlugin)
    except (ImportError, AttributeError, ValueError):
        return False
