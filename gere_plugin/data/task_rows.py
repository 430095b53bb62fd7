"""Earlier-task rows: read from the ``gere_task_replay`` sources and tokenized the way TRL tokenizes the
trainer's own rows (:func:`tokenize_row`), then kept as token ids and loss masks (:class:`TaskReplaySet`).

How those rows enter training (schedule, shares, cross-entropy) is :class:`gere_plugin.task_replay.TaskReplay`.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch

from ..ops.padding import pad_sequences
from .sources import ReplayError, load_records

logger = logging.getLogger(__name__)

KEY = "gere_task_replay"
ROW_FORMATS = (
    "prompt + completion (strings or chat messages), messages (chat), text, prompt + chosen (+ rejected: CE on "
    "chosen), or input_ids (+ completion_mask or labels)"
)


@dataclass(frozen=True)
class Tokenization:
    """How the trainer turns its own rows into tokens, mirrored for earlier-task rows (TRL's rules)."""

    add_eos: bool = True  # TRL appends EOS to non-conversational completions and texts
    completion_only: bool = True  # loss on the completion of prompt/completion rows (TRL's default)
    assistant_only: bool = False  # loss on assistant tokens of chat rows (TRL's assistant_only_loss)
    text_field: str = "text"
    max_length: Optional[int] = None
    keep_end: bool = False  # truncation_mode="keep_end"

    @classmethod
    def of_trainer_args(cls, args: Any) -> Tokenization:
        """The rules a TRL SFT / DPO config (or Axolotl's training arguments) implies."""
        max_length = getattr(args, "max_length", None) or getattr(args, "max_seq_length", None)
        return cls(
            add_eos=True,
            completion_only=getattr(args, "completion_only_loss", None) is not False,
            assistant_only=bool(getattr(args, "assistant_only_loss", False)),
            text_field=getattr(args, "dataset_text_field", None) or "text",
            max_length=int(max_length) if max_length else None,
            keep_end=getattr(args, "truncation_mode", "keep_start") == "keep_end",
        )


def is_chat(value: Any) -> bool:
    """A chat conversation: a non-empty list of message dicts with a ``role``."""
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) and "role" in m for m in value)


def chat_ids(tokenizer: Any, messages: list, **kwargs: Any) -> dict[str, list[int]]:
    """``input_ids`` (and ``assistant_masks`` when asked) of ``messages`` through the chat template."""
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)
    return {k: list(v) for k, v in out.items() if k in ("input_ids", "assistant_masks")}


def _with_eos(text: str, tokenizer: Any, how: Tokenization) -> str:
    eos = getattr(tokenizer, "eos_token", None)
    if how.add_eos and eos and not text.endswith(eos):
        return text + eos
    return text


def tokenize_row(row: dict, tokenizer: Any, how: Tokenization) -> Optional[tuple[list[int], list[int]]]:
    """``(input_ids, loss_mask)`` of one row in a TRL dataset format, tokenized as TRL tokenizes the
    trainer's rows, or ``None`` when the row has none of the accepted formats (:data:`ROW_FORMATS`).

    ``loss_mask[t] == 1`` marks token ``t`` as a target (TRL's ``labels[t] != -100``); truncation is applied
    by the caller. The formats, tried in this order:

    * ``input_ids`` (pre-tokenized, what ``gere sequence`` keeps on disk): the mask from ``labels``
      (``!= -100``), else ``completion_mask`` (with ``how.completion_only``), else ``assistant_masks``, else
      every token;
    * ``prompt`` + ``completion`` (or + ``chosen``: a DPO pair, cross-entropy on the chosen answer, ``rejected``
      ignored), both strings (EOS appended to the answer as TRL does) or both chat message lists (through the
      chat template); the loss starts after the prompt with ``how.completion_only``, and is restricted to
      assistant tokens with ``how.assistant_only``;
    * ``messages`` (chat, through the chat template; assistant tokens only with ``how.assistant_only``);
    * ``how.text_field`` (default ``text``): language modelling on every token, EOS appended.
    """
    if "input_ids" in row:
        ids = [int(x) for x in row["input_ids"]]
        if "labels" in row and row["labels"] is not None:
            mask = [int(x != -100) for x in row["labels"]]
        elif how.completion_only and row.get("completion_mask") is not None:
            mask = [int(bool(x)) for x in row["completion_mask"]]
        elif row.get("assistant_masks") is not None:
            mask = [int(bool(x)) for x in row["assistant_masks"]]
        else:
            mask = [1] * len(ids)
        if len(mask) != len(ids):
            raise ValueError(f"input_ids has {len(ids)} tokens but its mask has {len(mask)}")
        return ids, mask
    answer_key = "completion" if "completion" in row else ("chosen" if "chosen" in row else None)
    if "prompt" in row and answer_key is not None:
        prompt, answer = row["prompt"], row[answer_key]
        if is_chat(prompt) and is_chat(answer):
            prompt_ids = chat_ids(tokenizer, prompt, add_generation_prompt=True)["input_ids"]
            full = chat_ids(tokenizer, prompt + answer, return_assistant_tokens_mask=how.assistant_only)
            ids = full["input_ids"]
        elif isinstance(prompt, str) and isinstance(answer, str):
            prompt_ids = list(tokenizer(text=prompt)["input_ids"])
            ids = list(tokenizer(text=prompt + _with_eos(answer, tokenizer, how))["input_ids"])
            full = {}
        else:
            return None
        if ids[: len(prompt_ids)] != prompt_ids:
            logger.warning("gere: an earlier-task prompt tokenizes differently once its answer is appended (as TRL "
                           "warns too); the loss still starts after the prompt's token count.")
        mask = [0] * len(prompt_ids) + [1] * (len(ids) - len(prompt_ids)) if how.completion_only else [1] * len(ids)
        if "assistant_masks" in full:
            mask = [int(a and b) for a, b in zip(mask, full["assistant_masks"])]
        return ids, mask
    if is_chat(row.get("messages")):
        full = chat_ids(tokenizer, row["messages"], return_assistant_tokens_mask=how.assistant_only)
        ids = full["input_ids"]
        return ids, list(full.get("assistant_masks", [1] * len(ids)))
    text = row.get(how.text_field)
    if isinstance(text, str):
        ids = list(tokenizer(text=_with_eos(text, tokenizer, how))["input_ids"])
        return ids, [1] * len(ids)
    return None


def _truncate(ids: list[int], mask: list[int], how: Tokenization) -> tuple[list[int], list[int]]:
    n = how.max_length
    if n is None or len(ids) <= n:
        return ids, mask
    return (ids[-n:], mask[-n:]) if how.keep_end else (ids[:n], mask[:n])


@dataclass
class TaskReplaySet:
    """The kept earlier-task rows: token ids, loss masks and which source (task) each row came from."""

    input_ids: list[list[int]]
    loss_masks: list[list[int]]
    task_of: list[int]
    sources: list[str]
    kept: list[int]  # rows kept per source
    fingerprint: str
    records: list[int] = field(default_factory=list)  # each row's index in its source (logit snapshots)
    targets: np.ndarray = field(init=False)  # target tokens per row (what the CE counts)

    def __post_init__(self) -> None:
        self.targets = np.asarray([sum(m[1:]) for m in self.loss_masks], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.input_ids)

    @classmethod
    def from_sources(
        cls,
        sources: Sequence[str],
        tokenizer: Any,
        how: Tokenization,
        size: int,
        seed: int,
        split: str = "train",
    ) -> TaskReplaySet:
        """Draw (seeded) at most ``size`` usable rows from each source; keep them in source order."""
        ids_all: list[list[int]] = []
        masks_all: list[list[int]] = []
        task_of: list[int] = []
        records_all: list[int] = []
        kept: list[int] = []
        for index, source in enumerate(sources):
            records = load_records(source, split, key=KEY)
            if not records:
                raise ReplayError(f"{KEY}: {source!r} holds no rows. Point it at an earlier task's training data.")
            order = np.random.default_rng([seed, index]).permutation(len(records))
            drawn: list[tuple[int, list[int], list[int]]] = []
            no_target = 0
            for i in order:
                try:
                    got = tokenize_row(records[int(i)], tokenizer, how)
                except (TypeError, ValueError) as e:
                    raise ReplayError(f"{KEY}: row {int(i)} of {source!r} cannot be tokenized ({e}).") from None
                if got is None:
                    raise ReplayError(
                        f"{KEY}: row {int(i)} of {source!r} has none of the accepted formats (fields "
                        f"{sorted(records[int(i)])}). Accepted: {ROW_FORMATS}."
                    )
                ids, mask = _truncate(*got, how)
                if sum(mask[1:]) == 0:
                    no_target += 1
                    continue
                drawn.append((int(i), ids, mask))
                if len(drawn) == size:
                    break
            if not drawn:
                raise ReplayError(
                    f"{KEY}: no row of {source!r} has a token to learn after tokenization and truncation to "
                    f"max_length={how.max_length} ({no_target} rows without target tokens)."
                )
            if no_target:
                logger.warning("gere: %d rows of %s have no target token after truncation and were skipped.",
                               no_target, source)
            if len(drawn) < size:
                logger.warning("gere: %s has %d usable rows, fewer than gere_task_replay_size=%d: all of them are "
                               "replayed.", source, len(drawn), size)
            drawn.sort(key=lambda r: r[0])
            for record, ids, mask in drawn:
                records_all.append(record)
                ids_all.append(ids)
                masks_all.append(mask)
                task_of.append(index)
            kept.append(len(drawn))
        h = hashlib.sha256()
        for ids, mask in zip(ids_all, masks_all):
            h.update(np.asarray(ids, dtype=np.int64).tobytes())
            h.update(b"|")
            h.update(np.asarray(mask, dtype=np.int8).tobytes())
            h.update(b"#")
        return cls(ids_all, masks_all, task_of, list(sources), kept, h.hexdigest()[:32], records_all)

    def collate(self, indices: Sequence[int], pad_token_id: int, device: Optional[torch.device] = None) -> dict[str, torch.Tensor]:
        """Right-padded ``input_ids`` / ``attention_mask`` / ``target_mask`` (0 on padding and non-targets)."""
        ids, attention = pad_sequences([self.input_ids[i] for i in indices], pad_token_id)
        target, _ = pad_sequences([self.loss_masks[i] for i in indices], 0)
        out = {"input_ids": ids, "attention_mask": attention, "target_mask": target * attention}
        if device is not None:
            out = {k: v.to(device, non_blocking=True) for k, v in out.items()}
        return out
