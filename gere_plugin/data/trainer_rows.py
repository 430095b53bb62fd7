"""The trainer's own (already tokenized) task rows, read back for the methods that need them: FLOW's
base losses and EWC's Fisher go through the trainer's collator, one sample or one batch at a time."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from ..config import GeReConfigError

#: Batch columns handed to the trainer's collator (any other column is dropped).
COLLATOR_COLUMNS = ("input_ids", "attention_mask", "labels", "completion_mask", "assistant_masks", "position_ids")
#: Batch keys passed to the model's forward by FLOW, the task KL and EWC.
FORWARD_KEYS = ("input_ids", "attention_mask", "position_ids")


def dataset_rows(dataset: Any, indices: Sequence[int]) -> list[dict[str, Any]]:
    """Rows ``indices`` of ``dataset`` with only the collator's columns (``None`` values dropped)."""
    rows = []
    for i in indices:
        row = dataset[int(i)]
        rows.append({k: row[k] for k in COLLATOR_COLUMNS if k in row and row[k] is not None})
    return rows


def task_batches(dataset: Any, collator: Any, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """The task samples of ``dataset`` through the trainer's ``collator``, longest first (less padding)."""
    n = len(dataset)
    if n == 0:
        raise GeReConfigError("gere_flow: the training dataset is empty.")
    columns = getattr(dataset, "column_names", None)
    if columns is not None and "input_ids" not in columns:
        raise GeReConfigError(
            f"gere_flow needs the trainer's tokenized dataset (an input_ids column); it has {columns}."
        )
    lengths = np.array([len(dataset[i]["input_ids"]) for i in range(n)])
    order = np.argsort(-lengths, kind="stable")
    for start in range(0, n, batch_size):
        yield collator(dataset_rows(dataset, order[start : start + batch_size].tolist()))
