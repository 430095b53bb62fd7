"""What the forgetting monitor scores: the held-out general texts (``gere_monitor``), a fixed sample of
the training set's own rows (``gere_monitor_task_size``), and their padded batches."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..config import GeReConfigError
from ..data.sources import ReplayError, extract_texts, load_records
from ..data.trainer_rows import row_token_ids, task_sample  # noqa: F401 (their home moved to data/)
from ..evaluation.scoring import encode_texts

logger = logging.getLogger("gere_plugin.monitor")

#: Padded tokens per monitor forward (rows are batched, longest first, up to this budget).
TOKENS_PER_FORWARD = 2048


class MonitorError(GeReConfigError):
    """The monitor cannot run as configured. The message names the ``gere_monitor*`` key and the fix."""


def _rekey(message: str, key: str) -> str:
    """A replay-reader message about ``gere_replay`` retold about ``key`` (shared keys stay as they are)."""
    return re.sub(r"\bgere_replay(?![_A-Za-z])", key, message)


@dataclass
class MonitorTexts:
    """The monitor's held-out texts as :func:`~gere_plugin.evaluation.scoring.perplexity` scores them."""

    texts: list[str]
    input_ids: list[list[int]]
    source: str

    @property
    def num_tokens(self) -> int:
        return sum(len(x) for x in self.input_ids)


def _normalise(text: str) -> str:
    return " ".join(text.split())


def load_monitor_texts(args: Any, tokenizer: Any) -> MonitorTexts:
    """Read ``gere_monitor`` with the replay readers and draw ``gere_monitor_size`` texts (seeded by
    ``gere_seed``) that have at least 2 tokens; kept in source order. Fewer usable texts: all of them."""
    source = args.gere_monitor
    try:
        records = load_records(source, args.gere_replay_split)
        texts, _ = extract_texts(records, args.gere_replay_text_field, source)
    except ReplayError as e:
        raise MonitorError(_rekey(str(e), "gere_monitor")) from None
    size, max_length = int(args.gere_monitor_size), int(args.gere_monitor_max_length)
    order = np.random.default_rng(int(args.gere_seed)).permutation(len(texts))
    chosen: list[int] = []
    for start in range(0, len(order), 256):
        part = [int(i) for i in order[start : start + 256]]
        for i, ids in zip(part, encode_texts(tokenizer, [texts[i] for i in part], max_length)):
            if len(ids) >= 2:
                chosen.append(i)
            if len(chosen) == size:
                break
        if len(chosen) == size:
            break
    if not chosen:
        raise MonitorError(f"gere_monitor={source!r}: no text has 2 or more tokens. Point it at general text.")
    if len(chosen) < size:
        logger.warning("gere: gere_monitor=%s has only %d usable texts; the monitor scores all of them "
                       "(gere_monitor_size=%d).", source, len(chosen), size)
    chosen.sort()
    kept = [texts[i] for i in chosen]
    return MonitorTexts(texts=kept, input_ids=encode_texts(tokenizer, kept, max_length), source=str(source))


def check_disjoint(monitor: MonitorTexts, replay_texts: Sequence[str], replay_source: str) -> None:
    """Raise when a monitor text is also a replay text (compared with whitespace collapsed)."""
    replayed = {_normalise(t) for t in replay_texts}
    shared = [t for t in monitor.texts if _normalise(t) in replayed]
    if shared:
        example = shared[0][:80] + ("..." if len(shared[0]) > 80 else "")
        raise MonitorError(
            f"gere_monitor={monitor.source!r}: {len(shared)} of its {len(monitor.texts)} texts are also in the replay "
            f"set (gere_replay={replay_source!r}), e.g. {example!r}. The monitor must measure text the model does not "
            "train on: point gere_monitor at held-out general texts, disjoint from gere_replay (split your corpus "
            "into two files)."
        )



# ---------------------------------------------------------------------------------------------
# Batching
# ---------------------------------------------------------------------------------------------
@dataclass
class PaddedBatch:
    """Rows right-padded into one ``[B, T]`` tensor, with each row's own length."""

    input_ids: torch.Tensor  # [B, T] right-padded (CPU until first use)
    lengths: list[int]


def make_batches(seqs: Sequence[Sequence[int]], pad_id: int, budget: int = TOKENS_PER_FORWARD) -> list[PaddedBatch]:
    """Rows grouped longest first into batches of at most ``budget`` padded tokens, padded with ``pad_id``."""
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    groups: list[list[int]] = []
    for i in order:
        if groups and len(seqs[groups[-1][0]]) * (len(groups[-1]) + 1) <= budget:
            groups[-1].append(i)
        else:
            groups.append([i])
    out = []
    for g in groups:
        width = len(seqs[g[0]])
        ids = torch.full((len(g), width), pad_id, dtype=torch.long)
        for r, i in enumerate(g):
            ids[r, : len(seqs[i])] = torch.tensor(list(seqs[i]), dtype=torch.long)
        out.append(PaddedBatch(ids, [len(seqs[i]) for i in g]))
    return out
