"""Machine and library versions recorded next to every benchmark result."""

from __future__ import annotations

import importlib.metadata
import os
import platform
from typing import Any

#: Set before transformers / datasets are imported: benchmarks download nothing and report nowhere.
OFFLINE_DEFAULTS = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "WANDB_DISABLED": "true",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
}


def set_offline_defaults() -> None:
    """Apply :data:`OFFLINE_DEFAULTS` where the environment does not set them already."""
    for key, value in OFFLINE_DEFAULTS.items():
        os.environ.setdefault(key, value)


PACKAGES = ("torch", "transformers", "trl", "peft", "datasets", "accelerate", "gere-plugin")


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _proc_value(path: str, key: str) -> str | None:
    """The text after ``key:`` on the first matching line of a ``/proc`` file (None if absent)."""
    try:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                name, sep, value = line.partition(":")
                if sep and name.strip() == key:
                    return value.strip()
    except OSError:
        pass
    return None


def _ram_gib() -> float | None:
    total = _proc_value("/proc/meminfo", "MemTotal")  # e.g. "24641300 kB"
    return round(int(total.split()[0]) / 1024**2, 1) if total else None


def _cpu_model() -> str | None:
    return _proc_value("/proc/cpuinfo", "model name") or platform.processor() or None


def environment_info() -> dict[str, Any]:
    """Python/library versions, platform, CPU count and model, RAM (GiB), GPU name (or None)."""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "ram_gib": _ram_gib(),
        "gpu": None,
    }
    for dist in PACKAGES:
        info[dist.replace("-", "_")] = _version(dist)
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


if __name__ == "__main__":
    import json

    print(json.dumps(environment_info(), indent=2))
