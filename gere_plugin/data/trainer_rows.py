"""The trainer's own (already prepared) task rows, read back for the parts that need them: FLOW's base
losses and EWC's Fisher go through the trainer's collator, one sample or one batch at a time; the forgetting
monitor reads a fixed sample's token ids (:func:`row_token_ids`, :func:`task_sample`)."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any, Optional

import numpy as np
import torch

from ..config import GeReConfigError
from .task_rows import chat_ids

logger = logging.getLogger("gere_plugin.monitor")

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


def _as_ids(value: Any) -> Optional[list[int]]:
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if isinstance(value, (list, tuple)) and value and all(isinstance(x, int) for x in value):
        return list(value)
    return None


def _chat_or_text(tokenizer: Any, value: Any) -> Optional[list[int]]:
    if isinstance(value, str):
        return list(tokenizer(value, add_special_tokens=False)["input_ids"])
    if isinstance(value, list) and value and all(isinstance(m, dict) and "content" in m for m in value):
        return _as_ids(chat_ids(tokenizer, value)["input_ids"])
    return None


def row_token_ids(row: dict, tokenizer: Any) -> Optional[list[int]]:
    """Token ids of one row of the trainer's dataset as the trainer prepared it (the forgetting monitor
    scores them as they are: no EOS or special tokens added; raw rows to TRAIN on are read by
    :func:`~gere_plugin.data.task_rows.tokenize_row` instead, with TRL's rules): ``input_ids`` (TRL SFT, Axolotl),
    ``prompt_ids`` + ``chosen_ids`` / ``completion_ids`` (TRL DPO), or raw ``text`` / ``messages`` /
    ``prompt`` (+ ``completion`` / ``chosen``) strings or conversations (e.g. GRPO prompts). ``None``
    when the row has none of these."""
    ids = _as_ids(row.get("input_ids"))
    if ids is not None:
        return ids
    prompt_ids = _as_ids(row.get("prompt_ids")) or _as_ids(row.get("prompt_input_ids"))
    if prompt_ids is not None:
        answer = next((_as_ids(row.get(k)) for k in ("chosen_ids", "completion_ids", "chosen_input_ids")
                       if _as_ids(row.get(k)) is not None), [])
        return prompt_ids + (answer or [])
    for key in ("text", "messages"):
        ids = _chat_or_text(tokenizer, row.get(key))
        if ids is not None:
            return ids
    prompt = row.get("prompt")
    answer = next((row.get(k) for k in ("completion", "chosen") if row.get(k) is not None), None)
    if isinstance(prompt, str) and (answer is None or isinstance(answer, str)):
        return _chat_or_text(tokenizer, prompt + (answer or ""))
    if isinstance(prompt, list):
        return _chat_or_text(tokenizer, prompt + (answer if isinstance(answer, list) else []))
    return None


def task_sample(dataset: Any, tokenizer: Any, size: int, seed: int, max_length: int) -> list[list[int]]:
    """Token ids of ``size`` training rows (fixed, seeded; read by index, so the training data order is
    untouched), truncated to ``max_length``. Empty when the dataset has no length or unknown fields."""
    if size <= 0 or dataset is None:
        return []
    try:
        n = len(dataset)
    except TypeError:
        logger.warning("gere: the training set has no length (an iterable dataset): gere/monitor_task_kl is not "
                       "measured (set gere_monitor_task_size: 0 to silence this).")
        return []
    if n == 0:
        return []
    picks = sorted(int(i) for i in np.random.default_rng(seed).choice(n, size=min(size, n), replace=False))
    rows = []
    for i in picks:
        row = dataset[i]
        ids = row_token_ids(dict(row), tokenizer) if hasattr(row, "keys") else None
        if ids is None:
            fields = sorted(row.keys()) if hasattr(row, "keys") else type(row).__name__
            logger.warning("gere: gere_monitor_task_size: cannot read token ids from training rows with fields %s; "
                           "gere/monitor_task_kl is not measured (set gere_monitor_task_size: 0 to silence this).",
                           fields)
            return []
        if len(ids[:max_length]) >= 2:
            rows.append(ids[:max_length])
    return rows
