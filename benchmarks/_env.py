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
        info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


#: x86 CPU flags (``/proc/cpuinfo``) under which bf16 matrix products run natively (oneDNN); without them (AVX2
#: and older) a bf16 matmul falls back to a reference kernel: 0.3 GFLOP/s against 177 in fp32 on a 2-core
#: AMD EPYC VM whose flags stop at AVX2 (measured with torch 2.13.0)
FAST_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def slow_bf16_warning(cpu_flags: str | None = None) -> str | None:
    """A warning to print when bf16 autocast would run on an x86 CPU without native bf16 matmuls, else None.

    Timings and forgetting runs made in bf16 on such a machine take hours instead of minutes, and their
    step-time ratios weigh whatever runs in bf16 far more than a GPU would; run those in fp32 there.
    ``cpu_flags`` defaults to this machine's ``flags`` line; None (no such line: not x86 Linux) or a CUDA device
    gives no warning."""
    import torch

    if torch.cuda.is_available():
        return None
    flags = _proc_value("/proc/cpuinfo", "flags") if cpu_flags is None else cpu_flags
    if flags is None or any(f in flags.split() for f in FAST_BF16_FLAGS):
        return None
    return ("bf16 on this CPU (no avx512_bf16 / amx_bf16 flag: no native bf16 matmuls) is hundreds of times "
            "slower than fp32: run in fp32 here (method_cost.py --precision fp32, forgetting.py --no-bf16), or "
            "on a CPU that has them")


if __name__ == "__main__":
    import json

    print(json.dumps(environment_info(), indent=2))
