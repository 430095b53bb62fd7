"""The general replay set: sample N texts (seeded), tokenize, fingerprint; and ``gere build-replay``'s file.

The fingerprints (tokenizer and replay set) are the keys of the base-model state cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ..config import DEFAULT_REPLAY_SIZE
from ..ops.padding import pad_sequences
from .sources import ReplayError, extract_texts, load_records

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Fingerprints
# ---------------------------------------------------------------------------------------------
def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of what decides token ids: class, vocabulary, special tokens, normaliser/pre-tokenizer."""
    h = hashlib.sha256()
    h.update(type(tokenizer).__name__.replace("Fast", "").encode())
    vocab = tokenizer.get_vocab()
    h.update(json.dumps(sorted(vocab.items()), ensure_ascii=False).encode())
    h.update(json.dumps(sorted((k, str(v)) for k, v in tokenizer.special_tokens_map.items())).encode())
    probe = "Hello world! Ünïcödé 123\n\tdone."
    h.update(json.dumps(tokenizer(probe, add_special_tokens=False)["input_ids"]).encode())
    return h.hexdigest()[:32]


def replay_fingerprint(input_ids: Sequence[Sequence[int]], tok_fp: str, max_length: int) -> str:
    h = hashlib.sha256()
    h.update(tok_fp.encode())
    h.update(str(max_length).encode())
    for ids in input_ids:
        h.update(np.asarray(ids, dtype=np.int64).tobytes())
        h.update(b"|")
    return h.hexdigest()[:32]


# ---------------------------------------------------------------------------------------------
# The replay set
# ---------------------------------------------------------------------------------------------
@dataclass
class ReplaySet:
    """Tokenized replay samples (no special tokens, truncated) and their fingerprints."""

    input_ids: list[list[int]]
    texts: list[str]
    max_length: int
    tokenizer_fingerprint: str
    fingerprint: str
    source: str = ""
    dropped_empty: int = 0
    dropped_short: int = 0
    lengths: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.lengths = np.asarray([len(x) for x in self.input_ids], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())

    @classmethod
    def from_texts(
        cls,
        texts: Sequence[str],
        tokenizer: Any,
        size: int,
        max_length: int,
        seed: int = 42,
        min_tokens: int = 2,
        source: str = "",
        dropped_empty: int = 0,
        require_size: bool = True,
    ) -> ReplaySet:
        """Shuffle ``texts`` with ``seed`` and keep the first ``size`` that tokenize to >= ``min_tokens``.

        Fewer usable texts than ``size`` is an error, unless ``require_size=False`` (``size`` is then
        an upper bound: ``gere_replay_size`` not set).

        The kept samples are stored in their source order, so the set (and its fingerprint, the key
        of the state cache) depends on the seed only through *which* texts are drawn: a replay file
        used whole gives the same set, and can share one cache, under every ``gere_seed``. The seed
        still orders the replay schedule.
        """
        order = np.random.default_rng(seed).permutation(len(texts))
        ids_out: list[list[int]] = []
        kept: list[str] = []
        source_index: list[int] = []
        short = 0
        chunk = 256
        for start in range(0, len(order), chunk):
            idx = order[start : start + chunk]
            batch = [texts[i] for i in idx]
            enc = tokenizer(batch, add_special_tokens=False, truncation=True, max_length=max_length)["input_ids"]
            for i, t, ids in zip(idx, batch, enc):
                if len(ids) < min_tokens:
                    short += 1
                    continue
                ids_out.append(list(ids))
                kept.append(t)
                source_index.append(int(i))
                if len(ids_out) == size:
                    break
            if len(ids_out) == size:
                break
        if short:
            logger.warning("gere: dropped %d replay texts shorter than gere_replay_min_tokens=%d tokens.", short, min_tokens)
        if not ids_out:
            raise ReplayError(
                f"gere_replay={source!r}: no text has at least gere_replay_min_tokens={min_tokens} tokens "
                f"({short} too short, {dropped_empty} empty). Use longer general texts."
            )
        if len(ids_out) < size and not require_size:
            logger.warning(
                "gere: gere_replay_size is not set, so all %d usable texts of %s are the replay set (the default "
                "is at most %d).", len(ids_out), source, size,
            )
        elif len(ids_out) < size:
            raise ReplayError(
                f"gere_replay_size={size} but gere_replay={source!r} has only {len(ids_out)} usable texts "
                f"({dropped_empty} empty and {short} shorter than {min_tokens} tokens were dropped). Lower "
                f"gere_replay_size to {len(ids_out)} or add more general text."
            )
        by_source = sorted(range(len(ids_out)), key=source_index.__getitem__)
        ids_out, kept = [ids_out[j] for j in by_source], [kept[j] for j in by_source]
        tok_fp = tokenizer_fingerprint(tokenizer)
        return cls(
            input_ids=ids_out,
            texts=kept,
            max_length=max_length,
            tokenizer_fingerprint=tok_fp,
            fingerprint=replay_fingerprint(ids_out, tok_fp, max_length),
            source=source,
            dropped_empty=dropped_empty,
            dropped_short=short,
        )

    @classmethod
    def from_args(cls, args: Any, tokenizer: Any) -> ReplaySet:
        """Build from an object carrying the ``gere_replay*`` attributes (a config or GeReArguments)."""
        records = load_records(args.gere_replay, args.gere_replay_split)
        texts, empty = extract_texts(records, args.gere_replay_text_field, args.gere_replay)
        if empty:
            logger.warning(
                "gere: dropped %d replay records whose %r field is missing or empty from %s.",
                empty, args.gere_replay_text_field, args.gere_replay,
            )
        if not texts:
            raise ReplayError(f"gere_replay={args.gere_replay!r} holds only empty texts. Point it at general text.")
        return cls.from_texts(
            texts,
            tokenizer,
            size=args.gere_replay_size if args.gere_replay_size is not None else DEFAULT_REPLAY_SIZE,
            require_size=args.gere_replay_size is not None,
            max_length=args.gere_replay_max_length,
            seed=args.gere_seed,
            min_tokens=args.gere_replay_min_tokens,
            source=args.gere_replay,
            dropped_empty=empty,
        )

    def collate(self, indices: Sequence[int], pad_token_id: int, device: Optional[torch.device] = None) -> dict[str, torch.Tensor]:
        """Right-padded ``input_ids`` / ``attention_mask`` / ``labels`` (-100 on padding) for ``indices``."""
        ids, mask = pad_sequences([self.input_ids[i] for i in indices], pad_token_id)
        labels = ids.masked_fill(mask == 0, -100)
        out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        if device is not None:
            out = {k: v.to(device, non_blocking=True) for k, v in out.items()}
        return out


def build_replay_file(
    corpus: str,
    out: str,
    size: Optional[int] = None,
    seed: int = 42,
    text_field: str = "text",
    split: str = "train",
    min_chars: int = 1,
    replace: bool = False,
) -> int:
    """Sample ``size`` non-empty texts (seeded) from ``corpus`` and write them as ``{"text": ...}`` jsonl.

    ``size=None``: every usable text, at most 1,000 (as ``gere_replay_size``). The file is written
    atomically; an existing ``out`` is replaced only with ``replace=True`` (``--force``), a folder never.
    Returns the number of texts written.
    """
    out_path = Path(os.path.expanduser(out))
    if out_path.is_dir():
        raise ReplayError(
            f"--out {out!r} is a folder; give the path of the replay file to write, e.g. {str(out_path / 'replay.jsonl')!r}."
        )
    if out_path.exists() and not replace:
        raise ReplayError(
            f"--out {out!r} already exists and gere never overwrites a file unasked: choose another path, or pass "
            "--force to replace it (caches built from the old file will then no longer match)."
        )
    try:
        records = load_records(corpus, split)
        texts, _ = extract_texts(records, text_field, corpus)
    except ReplayError as e:  # the source of build-replay is --from (gere_replay is what it writes)
        raise ReplayError(f"--from {corpus!r}: {e}") from None
    texts = [t for t in texts if len(t.strip()) >= min_chars]
    if size is None:
        size = min(DEFAULT_REPLAY_SIZE, len(texts))
    if not texts:
        raise ReplayError(f"--from {corpus!r} holds no text of at least --min-chars {min_chars} characters.")
    if len(texts) < size:
        raise ReplayError(
            f"--gere_replay_size {size} is larger than the {len(texts)} usable texts in {corpus!r}: lower "
            "--gere_replay_size (or leave it unset to take every usable text, at most 1000)."
        )
    idx = np.random.default_rng(seed).choice(len(texts), size=size, replace=False)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        for i in sorted(idx.tolist()):
            fh.write(json.dumps({"text": texts[i]}, ensure_ascii=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, out_path)
    return size
