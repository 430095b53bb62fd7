"""Which folders are GeRe state caches, and which ones GeRe may write to (standard library only).

The rule every entry point follows (trainers, ``gere cache-states``, ``axolotl gere build-cache``,
``axolotl gere check``): GeRe writes a cache only into an absent or empty folder, or replaces a folder
that IS a GeRe cache (a ``meta.json`` written by GeRe and nothing but the cache's own files), and
the latter only when asked to (``--force``). Anything else (user files, a model folder, a cache mixed
with other files, a file, a symbolic link) is refused with a message naming ``gere_state_cache``.
:mod:`gere_plugin.states` builds, loads and saves caches on top of these rules.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from .config import GeReConfigError

FORMAT_VERSION = 2
META = "meta.json"
THRESHOLDS = "thresholds.safetensors"
LABELS = "labels.bin"
CACHE_FILES = (META, THRESHOLDS, LABELS)
#: The one default-folder rule: ``gere_state_cache``, else ``<output_dir>/<DEFAULT_CACHE_NAME>``.
DEFAULT_CACHE_NAME = "gere_states"


class StateCacheError(GeReConfigError):
    """The state cache does not match this run or is damaged; the message says how to rebuild it."""


def state_cache_folder(gere_state_cache: Optional[str | os.PathLike], output_dir: Optional[str | os.PathLike]) -> Path:
    """The one default-folder rule: ``gere_state_cache`` when set, else ``<output_dir>/gere_states``."""
    if gere_state_cache:
        return Path(os.path.expanduser(str(gere_state_cache)))
    return Path(os.path.expanduser(str(output_dir or "."))) / DEFAULT_CACHE_NAME


def _read_meta(folder: Path) -> Optional[dict]:
    try:
        meta = json.loads((folder / META).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # missing, unreadable, not JSON, not UTF-8
        return None
    return meta if isinstance(meta, dict) else None


def _is_gere_meta(meta: Optional[dict]) -> bool:
    keys = ("replay_fingerprint", "tokenizer_fingerprint", "hidden_size", "layers")
    return isinstance(meta, dict) and isinstance(meta.get("format_version"), int) and all(k in meta for k in keys)


def _entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _listing(names: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} entries)" if len(names) > limit else "")


def is_state_cache(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` IS a GeRe state cache: a real folder whose ``meta.json`` was written by GeRe
    (format version and fingerprints) and that holds nothing but the cache's own files. Only such a
    folder is ever replaced."""
    folder = Path(folder)
    if folder.is_symlink() or not folder.is_dir():
        return False
    names = set(_entries(folder))
    return META in names and names <= set(CACHE_FILES) and _is_gere_meta(_read_meta(folder))


def _foreign_error(folder: Path) -> StateCacheError:
    where = str(folder)
    if not folder.is_dir():
        return StateCacheError(
            f"gere_state_cache={where!r} is a file, not a folder. GeRe never replaces what it did not create: "
            "point gere_state_cache at a new folder."
        )
    names = _entries(folder)
    if folder.is_symlink():
        return StateCacheError(
            f"gere_state_cache={where!r} is a symbolic link; GeRe replaces only a real cache folder. Point "
            "gere_state_cache at the folder itself or at a new one."
        )
    meta = _read_meta(folder)
    if META in names and meta is None and set(names) <= set(CACHE_FILES):
        return StateCacheError(
            f"gere_state_cache={where!r}: its {META} is unreadable, so GeRe cannot tell that the folder is a cache "
            "and will not remove it. If it is a GeRe cache, delete it yourself; otherwise point gere_state_cache at "
            "a new folder."
        )
    if _is_gere_meta(meta):
        extra = [n for n in names if n not in CACHE_FILES]
        return StateCacheError(
            f"gere_state_cache={where!r} holds a GeRe cache together with other files ({_listing(extra)}). GeRe "
            "only removes what it created: move those files out, or point gere_state_cache at a new folder."
        )
    return StateCacheError(
        f"gere_state_cache={where!r} is not empty and holds no GeRe state cache (no GeRe meta.json; found: "
        f"{_listing(names)}). GeRe "
        "never deletes or overwrites files it did not create: point gere_state_cache at an empty or new folder."
    )


def check_replaceable(folder: str | os.PathLike) -> None:
    """Raise :class:`StateCacheError` unless writing a cache to ``folder`` destroys nothing GeRe did not
    create: the folder must be absent, empty, or a GeRe cache (:func:`is_state_cache`)."""
    folder = Path(folder)
    if not folder.exists() and not folder.is_symlink():
        return
    if folder.is_dir() and not folder.is_symlink() and not any(folder.iterdir()):
        return
    if not is_state_cache(folder):
        raise _foreign_error(folder)


def state_cache_problem(folder: str | os.PathLike) -> Optional[str]:
    """Why GeRe would refuse ``folder`` as a cache folder before looking at its contents, or ``None``.

    ``None`` for an absent or empty folder and for anything that looks like a GeRe cache (whether it
    fits a run is decided later, with the model and the replay set).
    """
    folder = Path(folder)
    if not folder.exists() and not folder.is_symlink():
        return None
    if not folder.is_dir():
        return str(_foreign_error(folder))
    names = set(_entries(folder))
    if not names:
        return None
    if META in names and (_is_gere_meta(_read_meta(folder)) or names <= set(CACHE_FILES)):
        return None
    return str(_foreign_error(folder))
