"""Which folders are GeRe state caches, and which ones GeRe may write to (standard library only).

The rule every entry point follows (trainers, ``gere cache-states``, ``axolotl gere build-cache``,
``axolotl gere check``): GeRe writes a cache only into an absent or empty folder, or replaces a folder
that IS a GeRe cache (a ``meta.json`` written by GeRe and nothing but the cache's own files), and
the latter only when asked to (``--force``). Anything else (user files, a model folder, a cache mixed
with other files, a file, a symbolic link) is refused with a message naming ``gere_state_cache``.
The same rules, through :class:`CacheKind`, govern FLOW's base losses and the EWC state.
:mod:`gere_plugin.cache.io` writes and reads such folders atomically; :mod:`gere_plugin.cache.state_cache`
builds, loads and saves the state cache on top of both.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..config import GeReConfigError

FORMAT_VERSION = 2
META = "meta.json"
THRESHOLDS = "thresholds.safetensors"
LABELS = "labels.bin"
CACHE_FILES = (META, THRESHOLDS, LABELS)
#: The one default-folder rule: ``gere_state_cache``, else ``<output_dir>/<DEFAULT_CACHE_NAME>``.
DEFAULT_CACHE_NAME = "gere_states"


class CacheFolderError(GeReConfigError):
    """A folder GeRe writes (the state cache, FLOW's base losses, an EWC state) cannot be used: it does not
    match this run, is damaged, is not GeRe's to replace, or cannot be written. The message names the key
    that sets the folder and the fix."""


#: The older name, kept: raised for every kind of cache folder, not only the state cache.
StateCacheError = CacheFolderError


@dataclass(frozen=True)
class CacheKind:
    """One kind of folder GeRe writes (the state cache, FLOW's base losses, an EWC state) and the rules
    that say whether a folder IS one: a ``meta.json`` whose ``identity`` keys are present (and, for the
    newer kinds, whose ``kind`` field names it) and no file other than ``files``."""

    key: str  # the config key naming the folder, used in every message
    files: tuple[str, ...]  # every file the folder may hold (``meta.json`` included)
    identity: tuple[str, ...]  # meta.json keys that mark a folder written by GeRe
    what: str  # "a GeRe cache", in messages
    label: str = ""  # the ``kind`` field of meta.json ("" = none: the state cache predates it)

    def owns(self, meta: Optional[dict]) -> bool:
        """Whether ``meta`` (a parsed ``meta.json``) was written by GeRe for this kind of folder."""
        if not (isinstance(meta, dict) and isinstance(meta.get("format_version"), int)):
            return False
        if self.label and meta.get("kind") != self.label:
            return False
        return all(k in meta for k in self.identity)


#: The base-model state cache (``gere_state_cache``).
STATE_CACHE = CacheKind(
    key="gere_state_cache",
    files=(META, THRESHOLDS, LABELS),
    identity=("replay_fingerprint", "tokenizer_fingerprint", "hidden_size", "layers"),
    what="GeRe cache",
)
FLOW_LOSSES = "losses.safetensors"
#: FLOW's per-sample base losses (``gere_flow_cache``, default ``<output_dir>/gere_flow``).
FLOW_CACHE = CacheKind(
    key="gere_flow_cache",
    files=(META, FLOW_LOSSES),
    identity=("model_fingerprint", "tokenizer_fingerprint", "rows_fingerprint"),
    what="GeRe FLOW base-loss cache",
    label="gere_flow",
)
DEFAULT_FLOW_FOLDER = "gere_flow"
EWC_TENSORS = "ewc.safetensors"
#: An EWC state: Fisher + anchor (read through ``gere_ewc_state``; every EWC run writes ``<output_dir>/gere_ewc``).
EWC_STATE = CacheKind(
    key="gere_ewc_state",
    files=(META, EWC_TENSORS),
    identity=("names", "tasks"),
    what="GeRe EWC state",
    label="gere_ewc",
)
DEFAULT_EWC_FOLDER = "gere_ewc"


def run_folder(value: Optional[str | os.PathLike], output_dir: Optional[str | os.PathLike], name: str) -> Path:
    """The one default-folder rule of every folder GeRe writes: ``value`` when set, else ``<output_dir>/<name>``."""
    if value:
        return Path(os.path.expanduser(str(value)))
    return Path(os.path.expanduser(str(output_dir or "."))) / name


def state_cache_folder(gere_state_cache: Optional[str | os.PathLike], output_dir: Optional[str | os.PathLike]) -> Path:
    """The one default-folder rule: ``gere_state_cache`` when set, else ``<output_dir>/gere_states``."""
    return run_folder(gere_state_cache, output_dir, DEFAULT_CACHE_NAME)


def read_meta(folder: Path) -> Optional[dict]:
    """The parsed ``meta.json`` of ``folder``, or ``None`` when it is missing, unreadable or not a JSON object."""
    try:
        meta = json.loads((folder / META).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # missing, unreadable, not JSON, not UTF-8
        return None
    return meta if isinstance(meta, dict) else None


def is_gere_meta(meta: Optional[dict], kind: CacheKind = STATE_CACHE) -> bool:
    """Whether ``meta`` was written by GeRe for ``kind`` (:meth:`CacheKind.owns`)."""
    return kind.owns(meta)


def folder_entries(folder: Path) -> list[str]:
    """The sorted names in ``folder``."""
    return sorted(p.name for p in folder.iterdir())


def listing(names: Sequence[str], limit: int = 5) -> str:
    """The first ``limit`` of ``names`` for a message, with the total when there are more."""
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} entries)" if len(names) > limit else "")


def is_state_cache(folder: str | os.PathLike, kind: CacheKind = STATE_CACHE) -> bool:
    """Whether ``folder`` IS a GeRe state cache (or another ``kind`` of GeRe folder): a real folder whose
    ``meta.json`` was written by GeRe (format version and fingerprints) and that holds nothing but the
    folder's own files. Only such a folder is ever replaced."""
    folder = Path(folder)
    if folder.is_symlink() or not folder.is_dir():
        return False
    names = set(folder_entries(folder))
    return META in names and names <= set(kind.files) and kind.owns(read_meta(folder))


def foreign_error(folder: Path, kind: CacheKind = STATE_CACHE) -> CacheFolderError:
    """The refusal of a folder GeRe did not create (a file, a link, user files, a cache mixed with others)."""
    where, key = str(folder), kind.key
    if not folder.is_dir():
        return CacheFolderError(
            f"{key}={where!r} is a file, not a folder. GeRe never replaces what it did not create: "
            f"point {key} at a new folder."
        )
    names = folder_entries(folder)
    if folder.is_symlink():
        return CacheFolderError(
            f"{key}={where!r} is a symbolic link; GeRe replaces only a real cache folder. Point "
            f"{key} at the folder itself or at a new one."
        )
    meta = read_meta(folder)
    if META in names and meta is None and set(names) <= set(kind.files):
        return CacheFolderError(
            f"{key}={where!r}: its {META} is unreadable, so GeRe cannot tell that the folder is a cache "
            f"and will not remove it. If it is a {kind.what}, delete it yourself; otherwise point {key} at "
            "a new folder."
        )
    if kind.owns(meta):
        extra = [n for n in names if n not in kind.files]
        return CacheFolderError(
            f"{key}={where!r} holds a {kind.what} together with other files ({listing(extra)}). GeRe "
            f"only removes what it created: move those files out, or point {key} at a new folder."
        )
    none = "no GeRe state cache" if kind is STATE_CACHE else f"no {kind.what}"
    return CacheFolderError(
        f"{key}={where!r} is not empty and holds {none} (no GeRe meta.json; found: "
        f"{listing(names)}). GeRe "
        f"never deletes or overwrites files it did not create: point {key} at an empty or new folder."
    )


def check_replaceable(folder: str | os.PathLike, kind: CacheKind = STATE_CACHE) -> None:
    """Raise :class:`CacheFolderError` unless writing a cache to ``folder`` destroys nothing GeRe did not
    create: the folder must be absent, empty, or a GeRe folder of this ``kind`` (:func:`is_state_cache`)."""
    folder = Path(folder)
    if not folder.exists() and not folder.is_symlink():
        return
    if folder.is_dir() and not folder.is_symlink() and not any(folder.iterdir()):
        return
    if not is_state_cache(folder, kind):
        raise foreign_error(folder, kind)


def state_cache_problem(folder: str | os.PathLike, kind: CacheKind = STATE_CACHE) -> Optional[str]:
    """Why GeRe would refuse ``folder`` as a cache folder before looking at its contents, or ``None``.

    ``None`` for an absent or empty folder and for anything that looks like a GeRe cache (whether it
    fits a run is decided later, with the model and the replay set).
    """
    folder = Path(folder)
    if not folder.exists() and not folder.is_symlink():
        return None
    if not folder.is_dir():
        return str(foreign_error(folder, kind))
    names = set(folder_entries(folder))
    if not names:
        return None
    if META in names and (kind.owns(read_meta(folder)) or names <= set(kind.files)):
        return None
    return str(foreign_error(folder, kind))
