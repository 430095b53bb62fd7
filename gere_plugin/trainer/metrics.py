"""``gere/*`` metrics of one optimizer step: kept on the device, reduced once, logged by the trainer."""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Optional

import torch


class MetricBuffer:
    """Values of one optimizer step, kept on the device until its last micro-batch (no host sync per
    micro-batch), then averaged over the step's micro-batches and ranks in ONE all-reduce and appended to
    the trainer's ``_metrics["train"]``.

    Args:
        keys: the mean keys, in a fixed order (the same on every rank). A key with no value on any rank
            is not logged for that step.
        totals: keys logged as the step's SUM over ranks (e.g. rows replayed), always logged.
    """

    def __init__(self, keys: tuple[str, ...], totals: tuple[str, ...] = ()) -> None:
        self.keys = keys
        self.totals = totals
        self.pending: dict[str, list[tuple[torch.Tensor, Optional[torch.Tensor]]]] = defaultdict(list)
        self.counts: dict[str, float] = defaultdict(float)

    def add(self, key: str, value: torch.Tensor, keep: Optional[torch.Tensor] = None) -> None:
        """Record ``value`` for the step's mean of ``key``. ``keep`` (a 0-dim bool tensor) drops it from the
        mean without a host sync; a step where nothing is kept on any rank does not log the key."""
        v = value.detach().float().reshape(())
        if keep is None:
            self.pending[key].append((v, None))
        else:
            k = keep.detach().float().reshape(())
            self.pending[key].append((v * k, k))

    def count(self, key: str, n: float) -> None:
        """Add ``n`` to this rank's part of the total ``key``."""
        self.counts[key] += n

    def flush(self, trainer: Any) -> None:
        """Once per optimizer step on every rank (the same number of calls everywhere)."""
        acc = getattr(trainer, "accelerator", None)
        multi = acc is not None and acc.num_processes > 1
        device = acc.device if multi else next((v[0][0].device for v in self.pending.values() if v), torch.device("cpu"))
        zero = torch.zeros((), dtype=torch.float32, device=device)
        local: list[torch.Tensor] = []
        for key in self.keys:
            vals = self.pending.get(key, [])
            if not vals:
                local += [zero, zero]
                continue
            total = torch.stack([v for v, _ in vals]).to(device).sum()
            count = sum((zero + 1 if k is None else k.to(device) for _, k in vals), zero)
            local += [total, count]
        local += [zero + self.counts.get(key, 0.0) for key in self.totals]
        self.pending.clear()
        self.counts.clear()
        if not local:
            return
        totals = torch.stack(local)
        if multi:
            totals = acc.reduce(totals, reduction="sum")
        totals = totals.cpu()  # the one host sync of the step
        store = getattr(trainer, "_metrics", None)
        if store is None:
            return
        for i, key in enumerate(self.keys):
            if totals[2 * i + 1] > 0:
                store["train"][key].append(float(totals[2 * i] / totals[2 * i + 1]))
        for j, key in enumerate(self.totals):
            store["train"][key].append(float(totals[2 * len(self.keys) + j]))
