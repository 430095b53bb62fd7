"""What a stage costs: the memory it adds (:class:`PeakMemory`), each optimizer step's wall time
(:func:`step_clock`), and the process-memory readings the benchmarks' probes share (:func:`rss_bytes`,
:func:`reset_peak_rss`, :func:`peak_rss`)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Optional

import torch

__all__ = ["PeakMemory", "max_rss_bytes", "peak_rss", "release_free_heap", "reset_peak_rss", "rss_bytes", "step_clock"]


def release_free_heap() -> None:
    """Return the C heap's free pages to the system (glibc ``malloc_trim``; a no-op elsewhere)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def rss_bytes() -> Optional[int]:
    """The process's resident set size in bytes (``/proc/self/statm``), or ``None`` where it cannot be read."""
    try:
        with open("/proc/self/statm") as fh:
            pages = int(fh.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE")


def max_rss_bytes() -> int:
    """The process's all-time peak RSS in bytes (``ru_maxrss``, which nothing resets)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def reset_peak_rss() -> int:
    """Reset the kernel's peak-RSS mark (Linux ``clear_refs`` 5) and return the current RSS in bytes.

    Without the reset, the peak of model loading and dataset preparation hides the steps' own peak.
    Falls back to ``ru_maxrss`` (never reset) where ``/proc`` is not writable.
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _status_kib("VmRSS") * 1024
    except (OSError, KeyError):
        return max_rss_bytes()


def peak_rss() -> int:
    """Peak RSS in bytes since :func:`reset_peak_rss` (``VmHWM``)."""
    try:
        return _status_kib("VmHWM") * 1024
    except (OSError, KeyError):
        return max_rss_bytes()


class PeakMemory:
    """The memory a stage adds while its trainer is built and trains: ``peak - before``, in MiB.

    On CUDA: ``torch.cuda.max_memory_allocated`` (peak reset on entry). On CPU: the process's resident
    set size, read from ``/proc/self/statm`` every ``interval`` seconds by a background thread (peaks
    shorter than that can be missed); ``None`` where neither is available. ``before`` excludes what is
    already in memory (the model, the evaluation data), so methods compare on what they add: optimizer
    state, gradients, activations, EWC's anchor and Fisher, reference copies made by the trainer. The
    runner's frozen copy of the original base (``kl``/``l1``/``l2``/``task_kl``) is made once before the
    first stage and is NOT in it: add one model's size for those methods. On CPU the free C heap is
    returned to the system on entry (``malloc_trim``), so memory freed by an earlier run in the same
    process does not hide this stage's growth.
    """

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.kind: Optional[str] = None
        self.before = self.peak = 0.0
        self._stop: Any = None
        self._thread: Any = None

    @staticmethod
    def _rss_mb() -> Optional[float]:
        rss = rss_bytes()
        return None if rss is None else rss / 2**20

    def __enter__(self) -> PeakMemory:
        if torch.cuda.is_available():
            self.kind = "cuda_allocated"
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.before = self.peak = torch.cuda.memory_allocated() / 2**20
            return self
        release_free_heap()  # else memory freed by an earlier run stays resident and hides this one's growth
        rss = self._rss_mb()
        if rss is None:
            return self
        import threading

        self.kind, self.before, self.peak = "cpu_rss", rss, rss
        self._stop = threading.Event()

        def sample() -> None:
            while not self._stop.wait(self.interval):
                now = self._rss_mb()
                if now is not None and now > self.peak:
                    self.peak = now

        self._thread = threading.Thread(target=sample, name="gere-peak-memory", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.kind == "cuda_allocated":
            torch.cuda.synchronize()
            self.peak = max(self.peak, torch.cuda.max_memory_allocated() / 2**20)
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            now = self._rss_mb()
            self.peak = max(self.peak, now or 0.0)

    def record(self) -> Optional[dict[str, Any]]:
        """``{"kind", "before_mb", "peak_mb", "added_mb"}`` or ``None`` when nothing could be measured."""
        if self.kind is None:
            return None
        return {"kind": self.kind, "before_mb": self.before, "peak_mb": self.peak, "added_mb": self.peak - self.before}


def step_clock() -> Any:
    """A Trainer callback that records the wall seconds of every optimizer step in ``.seconds``.

    A step runs from the end of the previous one (the start of training for the first) to its own end,
    so batch loading, the replay forward and the optimizer update count; one-off work before the first
    step (trainer set-up, caches) and after the last (EWC's Fisher pass, the final save) does not. The
    median of ``.seconds`` is therefore the steady-state step time, and ``train_seconds - sum(.seconds)``
    what a run spends once per task inside ``train()``.
    """
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.seconds: list[float] = []
            self._last: Optional[float] = None

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self._last = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            now = time.perf_counter()
            if self._last is not None:
                self.seconds.append(now - self._last)
            self._last = now

    return StepClock()

