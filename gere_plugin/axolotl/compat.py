"""What differs between the Axolotl versions the plugin supports, in one place.

Nothing here imports Axolotl (or torch): versions and entry points come from package metadata, so
``axolotl gere check`` stays fast and works where Axolotl is not installed.

============================ =========================== ===========================================
                             Axolotl 0.19 / 0.20         Axolotl >= 0.21
============================ =========================== ===========================================
``axolotl.plugins`` entry    ignored                     loaded for EVERY config (named by the dotted
points                                                   form of their target)
``plugins:`` line            required for GeRe           optional: the ``gere_*`` keys alone turn
                                                         GeRe on (through the entry point)
``module:Class`` form        not understood (crash)      accepted
misspelled plugin module     logged, training goes on    raises (configured plugins are required)
                             WITHOUT the plugin
keys no loaded plugin        dropped silently            dropped silently (but GeRe's schema is
declares                                                 always loaded, via the entry point)
============================ =========================== ===========================================

Axolotl 0.20 (Python >= 3.12) behaves like 0.19 for plugins; it is not tested here.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import metadata
from typing import Optional

from .args import ENTRY_POINT_PATH, normalize_plugin_entry

#: First Axolotl release that loads ``axolotl.plugins`` entry points for every config.
ENTRY_POINTS_SINCE = (0, 21)


def parse_version(text: str) -> tuple[int, ...]:
    """``"0.21.0"`` -> ``(0, 21, 0)``; stops at the first non-numeric part (``"0.22.0.dev1"`` -> ``(0, 22, 0)``)."""
    out: list[int] = []
    for part in text.split("."):
        digits = ""
        for ch in part:
            if not ch.isdigit():
                break
            digits += ch
        if not digits:
            break
        out.append(int(digits))
        if len(digits) != len(part):
            break
    return tuple(out)


def installed_axolotl_version() -> Optional[str]:
    """The installed Axolotl version string, or ``None`` when Axolotl is not installed."""
    try:
        return metadata.version("axolotl")
    except metadata.PackageNotFoundError:
        return None


def entry_point_installed() -> bool:
    """Whether this package's ``axolotl.plugins`` entry point is in the installed metadata.

    It is missing when gere-plugin is used from a source folder on ``PYTHONPATH`` without
    ``pip install``; then even Axolotl >= 0.21 needs the ``plugins:`` line.
    """
    points = metadata.entry_points(group="axolotl.plugins")
    return any(normalize_plugin_entry(p.value) == ENTRY_POINT_PATH for p in points)


@dataclass(frozen=True)
class AxolotlFacts:
    """How the installed (or a given) Axolotl version treats the GeRe plugin."""

    version: Optional[str]
    entry_point: bool  # this package's entry point is installed

    @property
    def known(self) -> bool:
        return self.version is not None

    @property
    def parsed(self) -> tuple[int, ...]:
        return parse_version(self.version) if self.version else ()

    @property
    def loads_entry_points(self) -> bool:
        """Axolotl loads ``axolotl.plugins`` entry points for every config (>= 0.21)."""
        return self.known and self.parsed >= ENTRY_POINTS_SINCE

    @property
    def keys_alone_enable_gere(self) -> bool:
        """``gere_*`` keys without a ``plugins:`` line still run GeRe."""
        return self.loads_entry_points and self.entry_point

    @property
    def accepts_colon_form(self) -> bool:
        """Axolotl's loader understands ``module:Class`` plugin entries (>= 0.21)."""
        return self.loads_entry_points

    @property
    def required_plugins(self) -> bool:
        """A configured plugin that fails to import raises instead of being skipped (>= 0.21)."""
        return self.loads_entry_points

    def describe(self) -> str:
        if not self.known:
            return "Axolotl is not installed"
        return f"Axolotl {self.version}"


def axolotl_facts(version: Optional[str] = None, entry_point: Optional[bool] = None) -> AxolotlFacts:
    """Facts for ``version`` (default: the installed Axolotl) and the entry point (default: installed?)."""
    return AxolotlFacts(
        version=version if version is not None else installed_axolotl_version(),
        entry_point=entry_point_installed() if entry_point is None else entry_point,
    )
