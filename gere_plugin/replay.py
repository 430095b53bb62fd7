"""The replay set: load general texts from any source, sample N (seeded), tokenize, fingerprint.

Sources (``gere_replay``): a ``.jsonl`` / ``.json`` / ``.parquet`` / ``.txt`` file, a folder of such
files, a folder written by ``datasets.save_to_disk``, or a ``datasets`` hub id (which must be in the
local cache when offline). Every failure raises :class:`ReplayError` naming the key and the fix.
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

from .config import DEFAULT_REPLAY_SIZE, GeReConfigError
from .padding import pad_sequences

logger = logging.getLogger(__name__)

FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".txt")
PREFERENCE_FIELDS = ("chosen", "rejected")


class ReplayError(GeReConfigError):
    """The replay source cannot be used. The message names the ``gere_replay*`` key and the fix."""


# ---------------------------------------------------------------------------------------------
# Loading raw records
# ---------------------------------------------------------------------------------------------
def read_jsonl_objects(
    path: Path, owner: str, example: str, error: type[GeReConfigError] = GeReConfigError
) -> list[tuple[int, dict]]:
    """``(line number, object)`` for every non-blank line of a JSON-lines file (UTF-8, BOM allowed).

    Invalid JSON, a line that is not an object, or non-UTF-8 bytes raise ``error`` with a message that
    starts with ``owner`` (the key or option that named the file), gives the line, and shows ``example``.
    """
    records: list[tuple[int, dict]] = []
    try:
        with open(path, encoding="utf-8-sig") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise error(
                        f"{owner}: {path} line {lineno} is not valid JSON ({e.msg}). Each line of a .jsonl "
                        f"file must be one JSON object such as {example}."
                    ) from None
                if not isinstance(obj, dict):
                    raise error(
                        f"{owner}: {path} line {lineno} is a {type(obj).__name__}, not a JSON object. "
                        f"Write one object per line, e.g. {example}."
                    )
                records.append((lineno, obj))
    except UnicodeDecodeError as e:
        raise error(
            f"{owner}: {path} is not UTF-8 text (byte {e.start}: {e.reason}). Re-encode it as UTF-8, "
            "e.g. `iconv -f latin1 -t utf-8`."
        ) from None
    return records


def _read_jsonl(path: Path, key: str = "gere_replay") -> list[dict]:
    return [obj for _, obj in read_jsonl_objects(path, key, '{"text": "..."}', ReplayError)]


def _read_json(path: Path, key: str = "gere_replay") -> list[dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as e:
        raise ReplayError(f"{key}: {path} is not UTF-8 text ({e.reason}). Re-encode it as UTF-8.") from None
    except json.JSONDecodeError as e:
        # Maybe it is JSON lines with a .json suffix.
        try:
            return _read_jsonl(path, key)
        except ReplayError:
            raise ReplayError(f"{key}: {path} is not valid JSON ({e.msg} at line {e.lineno}).") from None
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if "data" in data and isinstance(data["data"], list):
            data = data["data"]
        elif len(lists) == 1:
            data = lists[0]
    if not isinstance(data, list):
        raise ReplayError(
            f"{key}: {path} must hold a JSON list of objects (or strings), e.g. [{{\"text\": \"...\"}}]."
        )
    return [x if isinstance(x, dict) else {"text": x} for x in data]


def _read_txt(path: Path, key: str = "gere_replay") -> list[dict]:
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as e:
        raise ReplayError(f"{key}: {path} is not UTF-8 text ({e.reason}). Re-encode it as UTF-8.") from None
    return [{"text": line} for line in lines]


def _read_parquet(path: Path, key: str = "gere_replay") -> list[dict]:
    try:
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises many types for unreadable files
        raise ReplayError(f"{key}: {path} could not be read as parquet ({e}).") from None


_READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".txt": _read_txt, ".parquet": _read_parquet}


def _read_file(path: Path, source: str, key: str = "gere_replay") -> list[dict]:
    """Read one replay file; OS errors (permissions, I/O) become a :class:`ReplayError` naming the file."""
    try:
        return _READERS[path.suffix.lower()](path, key)
    except PermissionError:
        raise ReplayError(
            f"{key}={source!r}: {path} cannot be read (permission denied). Make it readable by the "
            "training user (e.g. `chmod a+r`) or copy it somewhere readable."
        ) from None
    except OSError as e:
        raise ReplayError(f"{key}={source!r}: {path} cannot be read ({e.strerror or e}).") from None


def _load_hf(source: str, split: str, from_disk: bool, key: str = "gere_replay") -> list[dict]:
    import datasets

    try:
        if from_disk:
            ds = datasets.load_from_disk(source)
        else:
            ds = datasets.load_dataset(source, split=split)
    except Exception as e:
        where = "folder" if from_disk else "datasets id (there is no local file or folder of that name)"
        raise ReplayError(
            f"{key}={source!r} could not be loaded as a {where} ({type(e).__name__}: {str(e)[:300]}). "
            "Offline, only local files and datasets already in the local cache work: export it with "
            "`gere build-replay --from CORPUS --out replay.jsonl` where the data is available, or point "
            f"{key} at a local jsonl/json/parquet/txt file."
        ) from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ReplayError(
                f"{key}_split={split!r} is not in {source!r}; available splits: {', '.join(ds.keys())}."
            )
        ds = ds[split]
    return ds.to_list()


def load_records(source: str, split: str = "train", key: str = "gere_replay") -> list[dict]:
    """Read every record of a replay source as a list of dicts. ``key`` is the setting that named the
    source (``gere_replay`` or ``gere_task_replay``): every error message names it."""
    if source is None:
        raise ReplayError(f"{key} is not set: point it at a {'general-text ' if key == 'gere_replay' else ''}file, folder or datasets id.")
    path = Path(os.path.expanduser(source))
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix not in _READERS:
            raise ReplayError(
                f"{key}={source!r}: unsupported file type {suffix!r}; use one of {', '.join(FILE_SUFFIXES)}."
            )
        return _read_file(path, source, key)
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            return _load_hf(str(path), split, from_disk=True, key=key)
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in _READERS)
        if not files:
            raise ReplayError(
                f"{key}={source!r} is a folder without {'replay' if key == 'gere_replay' else 'data'} files ({', '.join(FILE_SUFFIXES)}) and is "
                "not a datasets folder."
            )
        records: list[dict] = []
        for f in files:
            records.extend(_read_file(f, source, key))
        return records
    looks_like_path = source.startswith((".", "/", "~")) or source.endswith(FILE_SUFFIXES) or source.count("/") > 1
    if looks_like_path:
        raise ReplayError(f"{key}={source!r} does not exist. Check the path (relative paths start at the working directory: {os.getcwd()}).")
    return _load_hf(source, split, from_disk=False, key=key)


def extract_texts(records: Sequence[dict], text_field: str, source: str) -> tuple[list[str], int]:
    """Pull ``text_field`` out of every record; return ``(texts, n_empty_dropped)``."""
    if not records:
        raise ReplayError(f"gere_replay={source!r} is empty: it holds no records. Point it at general text.")
    keys = set()
    for r in records[:1000]:
        keys.update(r.keys())
    if all(text_field not in r for r in records):
        if all(k in keys for k in PREFERENCE_FIELDS):
            raise ReplayError(
                f"gere_replay={source!r} looks like a preference dataset (fields {sorted(keys)}). The replay set "
                "must be GENERAL text (e.g. web or Wikipedia documents), not the preference data you train on. "
                "Build one with `gere build-replay --from CORPUS --out replay.jsonl`."
            )
        raise ReplayError(
            f"gere_replay_text_field={text_field!r} is not a field of {source!r}; fields found: {sorted(keys)}. "
            "Set gere_replay_text_field to the column with the text."
        )
    texts, empty = [], 0
    for i, r in enumerate(records):
        t = r.get(text_field)
        if t is None:
            empty += 1
            continue
        if not isinstance(t, str):
            raise ReplayError(
                f"gere_replay={source!r}: record {i} has a {type(t).__name__} in gere_replay_text_field={text_field!r}; "
                "every value must be a string."
            )
        if not t.strip():
            empty += 1
            continue
        texts.append(t)
    return texts, empty


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
