"""Task rows as the token ids a stage trains on, and the seeded samples of finished tasks that methods with
earlier-task replay keep (:func:`keep_task_sample`)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..cache.io import write_file_atomically
from .presets import SequenceTask
from .settings import TrainSettings

__all__ = ["keep_task_sample", "tokenized_for_training", "tokenized_without_eos"]


def tokenized_without_eos(rows: Sequence[dict[str, str]], tokenizer: Any) -> list[dict[str, Any]]:
    """Prompt/completion rows as TRL's pre-tokenized format (``input_ids`` + ``completion_mask``) without the
    EOS that TRL would append, so the loss falls on the completion's tokens only; ``text`` rows unchanged
    apart from tokenization. Tokenized exactly as TRL does (prompt, then prompt + completion)."""
    out = []
    for row in rows:
        if "prompt" in row:
            prompt_ids = tokenizer(row["prompt"])["input_ids"]
            ids = tokenizer(row["prompt"] + row["completion"])["input_ids"]
            if ids[: len(prompt_ids)] != prompt_ids:
                raise ValueError(f"prompt tokens change when the completion is appended: {row['prompt']!r}")
            out.append({"input_ids": ids, "completion_mask": [0] * len(prompt_ids) + [1] * (len(ids) - len(prompt_ids))})
        else:
            out.append({"input_ids": tokenizer(row["text"])["input_ids"]})
    return out


def tokenized_for_training(rows: Sequence[dict[str, str]], tokenizer: Any, settings: TrainSettings) -> list[dict[str, Any]]:
    """Rows as token ids, tokenized exactly as the task's trainer tokenizes them: without EOS
    (:func:`tokenized_without_eos`) or, with ``completion_eos``, TRL's own rules (EOS appended)."""
    if not settings.completion_eos:
        return tokenized_without_eos(rows, tokenizer)
    from ..data.task_rows import Tokenization, tokenize_row

    out = []
    for row in rows:
        got = tokenize_row(row, tokenizer, Tokenization(add_eos=True))
        assert got is not None, f"not a prompt/completion or text row: {sorted(row)}"
        ids, mask = got
        out.append({"input_ids": ids, "completion_mask": mask} if "prompt" in row else {"input_ids": ids})
    return out


def keep_task_sample(task: SequenceTask, tokenizer: Any, settings: TrainSettings, seed: int, index: int,
                     folder: Path) -> tuple[Path, int]:
    """Write a seeded sample of at most ``gere_task_replay_size`` of ``task``'s training rows, as the token
    ids the task trained on, to ``folder/<index>_<name>.jsonl`` (atomically); return ``(path, rows kept)``.

    Only these ids are kept for later tasks (not a copy of the dataset), so memory and disk grow with the
    per-task budget, not with the tasks' sizes."""
    import numpy as np

    n = min(settings.gere_task_replay_size, len(task.train))
    chosen = sorted(np.random.default_rng([seed, index]).choice(len(task.train), size=n, replace=False).tolist())
    rows = tokenized_for_training([task.train[i] for i in chosen], tokenizer, settings)
    path = folder / f"{index}_{task.name}.jsonl"
    # a failed write (disk full, no permission) stops here, naming the folder, with nothing left there
    write_file_atomically(path, "".join(json.dumps(row) + "\n" for row in rows), "the kept earlier-task rows",
                          key="--out")
    return path, n

