"""Where replay rows come from: read records from a file, a folder of files, a ``datasets`` folder or hub id.

Sources (``gere_replay``, ``gere_task_replay``): a ``.jsonl`` / ``.json`` / ``.parquet`` / ``.txt`` file, a
folder of such files, a folder written by ``datasets.save_to_disk``, or a ``datasets`` hub id (which must be
in the local cache when offline). Every failure raises :class:`ReplayError` naming the key and the fix.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from ..config import GeReConfigError

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


def read_jsonl(path: Path, key: str = "gere_replay") -> list[dict]:
    return [obj for _, obj in read_jsonl_objects(path, key, '{"text": "..."}', ReplayError)]


def read_json(path: Path, key: str = "gere_replay") -> list[dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as e:
        raise ReplayError(f"{key}: {path} is not UTF-8 text ({e.reason}). Re-encode it as UTF-8.") from None
    except json.JSONDecodeError as e:
        # Maybe it is JSON lines with a .json suffix.
        try:
            return read_jsonl(path, key)
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


def read_txt(path: Path, key: str = "gere_replay") -> list[dict]:
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as e:
        raise ReplayError(f"{key}: {path} is not UTF-8 text ({e.reason}). Re-encode it as UTF-8.") from None
    return [{"text": line} for line in lines]


def read_parquet(path: Path, key: str = "gere_replay") -> list[dict]:
    try:
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises many types for unreadable files
        raise ReplayError(f"{key}: {path} could not be read as parquet ({e}).") from None


READERS = {".jsonl": read_jsonl, ".json": read_json, ".txt": read_txt, ".parquet": read_parquet}


def read_file(path: Path, source: str, key: str = "gere_replay") -> list[dict]:
    """Read one replay file; OS errors (permissions, I/O) become a :class:`ReplayError` naming the file."""
    try:
        return READERS[path.suffix.lower()](path, key)
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
        if suffix not in READERS:
            raise ReplayError(
                f"{key}={source!r}: unsupported file type {suffix!r}; use one of {', '.join(FILE_SUFFIXES)}."
            )
        return read_file(path, source, key)
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            return _load_hf(str(path), split, from_disk=True, key=key)
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in READERS)
        if not files:
            raise ReplayError(
                f"{key}={source!r} is a folder without {'replay' if key == 'gere_replay' else 'data'} files ({', '.join(FILE_SUFFIXES)}) and is "
                "not a datasets folder."
            )
        records: list[dict] = []
        for f in files:
            records.extend(read_file(f, source, key))
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
