"""Bad input must fail early with an error that names the ``gere_*`` key and says what to fix.

Three tables:

* every ``gere_*`` key (iterated from :func:`gere_plugin.config.gere_fields`, so a new key without bad
  values here fails :func:`test_every_key_rejects_bad_values`) with wrong types and out-of-range
  values, through the validator, the dataclass and TRL's command-line parser;
* replay sources that cannot be used (unreadable, not UTF-8, invalid JSON, mixed schema, empty,
  too short, too small, preference data, unknown dataset id offline, ...);
* ``gere_replay_per_step`` against the global batch and the replay-set size.

No training: only the per-step cases build a trainer (which fails before the first step).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gere_plugin.config import (
    GeReArguments,
    GeReConfigError,
    gere_fields,
    resolve_replay_per_step,
    validate_gere_values,
)
from gere_plugin.replay import ReplayError, ReplaySet

from .conftest import general_texts, sft_config, write_jsonl

NAN, INF = float("nan"), float("inf")

# Wrong types and out-of-range values for every key. Every value must be rejected with the key named.
BAD_VALUES: dict[str, list[Any]] = {
    "gere_replay": [123, "", "   ", ["a.jsonl"], True],
    "gere_replay_split": ["", 3, None, ["train"]],
    "gere_replay_text_field": ["", None, 1, ["text"]],
    "gere_replay_size": [0, -1, 1.5, "10", True, NAN],
    "gere_replay_max_length": [1, 0, 2.0, "512", None],
    "gere_replay_min_tokens": [1, 0, "2", 2.5, None],
    "gere_replay_per_step": [0, -3, 1.5, "4", True],
    "gere_task_replay": [123, "", "   ", [], [""], ["a.jsonl", "a.jsonl"], True, [1], {"a": 1}],
    "gere_task_replay_split": ["", 3, None, ["train"]],
    "gere_task_replay_size": [0, -1, 1.5, "10", True, None, NAN],
    "gere_task_replay_per_step": [0, -3, 1.5, "4", True],
    "gere_task_replay_logit_weight": [-0.5, NAN, INF, "0.5", True, None, [0.5]],
    "gere_task_replay_topk": [0, -1, 1.5, "32", True, None],
    "gere_task_replay_weight": [0, 1, -0.1, 1.5, NAN, INF, "0.3", True],
    "gere_regularizer": ["tmx", "", 1, None, "TM", ["tm"]],
    "gere_weight": ["dyn", "abc", -1, "-2", NAN, "nan", INF, True, None, []],
    "gere_weight_max": [0, -1, NAN, INF, "2", True],
    "gere_sigma": [0, -1, NAN, INF, "1.0", True, None],
    "gere_tm_reduction": ["sum", "", None, 1],
    "gere_layers": [[], [1.5], ["-1"], [-1, -1], None, True, [True], "-1", 1.5],
    "gere_state_cache": ["", "  ", 5, ["x"], True],
    "gere_state_batch_size": [0, -1, 1.5, None, "8"],
    "gere_freeze_layers": [-1, 1.5, "2", None, True],
    "gere_freeze_embeddings": ["yes", "true", 1, 0, None],
    "gere_seed": [-1, 1.5, "42", None, True],
    "gere_flow": ["yes", "true", 1, 0, None],
    "gere_flow_tau": [0, -1.0, NAN, INF, "1.0", True],
    "gere_flow_normalize": ["yes", 1, None],
    "gere_flow_cache": ["", "  ", 5, ["x"], True],
    "gere_flow_batch_size": [0, -1, 1.5, None, "8"],
    "gere_ewc_lambda": [-1, NAN, INF, "1", True, None],
    "gere_ewc_state": ["", "  ", 5, ["x"], True],
    "gere_ewc_gamma": [-0.1, 1.5, NAN, "1", True, None],
    "gere_ewc_samples": [0, -1, 1.5, None, "8"],
    "gere_task_kl": [-0.5, NAN, INF, "0.1", True, None],
    "gere_wise_alpha": [0, -0.5, 1.5, NAN, INF, "0.5", True, [0.5]],
    "gere_monitor": [123, "", "   ", ["a.jsonl"], True],
    "gere_monitor_size": [0, -1, 1.5, "64", None, True],
    "gere_monitor_steps": [0, -5, 2.5, "100", None, True],
    "gere_monitor_max_length": [1, 0, 2.0, "128", None],
    "gere_monitor_task_size": [-1, 1.5, "16", None, True],
    "gere_monitor_max_ppl_rise": [0, -0.1, NAN, INF, "0.2", True],
    "gere_monitor_action": ["halt", "", None, 1, "WARN"],
}


@pytest.mark.parametrize("key", [f.name for f in gere_fields()])
def test_every_key_rejects_bad_values(key: str) -> None:
    assert key in BAD_VALUES, f"{key} is a new gere_* key: add its wrong types / out-of-range values to BAD_VALUES"
    assert BAD_VALUES[key], f"BAD_VALUES[{key!r}] is empty"
    for value in BAD_VALUES[key]:
        for how, call in (
            ("validate_gere_values", lambda v=value: validate_gere_values({key: v})),
            ("GeReArguments", lambda v=value: GeReArguments(**{key: v})),
        ):
            with pytest.raises(GeReConfigError) as err:
                call()
            assert key in str(err.value), f"{how}({key}={value!r}) error does not name the key: {err.value}"


def test_table_has_no_stale_keys() -> None:
    assert set(BAD_VALUES) == {f.name for f in gere_fields()}


def test_unknown_key_suggests_the_closest() -> None:
    with pytest.raises(GeReConfigError, match="Did you mean 'gere_replay_size'"):
        validate_gere_values({"gere_replay_sise": 10})


def test_command_line_value_is_validated_with_the_key(tmp_path: Path) -> None:
    from trl import TrlParser

    from gere_plugin import GeReSFTConfig

    parser = TrlParser((GeReSFTConfig,))
    base = ["--output_dir", str(tmp_path), "--use_cpu", "true", "--bf16", "false"]
    with pytest.raises(GeReConfigError, match="gere_replay_size"):
        parser.parse_args_and_config(args=[*base, "--gere_replay_size", "0"])
    with pytest.raises(GeReConfigError, match="gere_layers"):
        parser.parse_args_and_config(args=[*base, "--gere_layers", "-1", "-1"])


# ---------------------------------------------------------------------------------------------
# Replay sources
# ---------------------------------------------------------------------------------------------
def _load(tok: Any, source: Path | str, **kw: Any) -> ReplaySet:
    args = GeReArguments(gere_replay=str(source), **{"gere_replay_size": 4, "gere_replay_max_length": 16, **kw})
    return ReplaySet.from_args(args, tok)


def _bytes(name: str, data: bytes) -> Callable[[Path], Path]:
    def make(d: Path) -> Path:
        (d / name).write_bytes(data)
        return d / name

    return make


def _rows(name: str, rows: list[dict]) -> Callable[[Path], Path]:
    return lambda d: write_jsonl(d / name, rows)


def _dir_named_like_a_file(d: Path) -> Path:
    (d / "replay.jsonl").mkdir()
    return d / "replay.jsonl"


def _dangling_symlink(d: Path) -> Path:
    (d / "replay.jsonl").symlink_to(d / "deleted.jsonl")
    return d / "replay.jsonl"


def _datasets_folder_without_split(d: Path) -> Path:
    from datasets import Dataset, DatasetDict

    DatasetDict({"validation": Dataset.from_list([{"text": t} for t in general_texts(8)])}).save_to_disk(
        str(d / "ds")
    )
    return d / "ds"


def _empty_folder(d: Path) -> Path:
    (d / "replay").mkdir()
    return d / "replay"


LATIN1 = "café crème brûlée, a lovely story of the river".encode("latin-1")
GOOD = [{"text": t} for t in general_texts(8, seed=5)]

# id -> (make source in tmp dir, extra gere_* values, substrings the message must contain)
REPLAY_CASES: dict[str, tuple[Callable[[Path], Path | str], dict, tuple[str, ...]]] = {
    "directory-passed-as-file": (_dir_named_like_a_file, {}, ("gere_replay=", "folder without replay files")),
    "empty-folder": (_empty_folder, {}, ("gere_replay=", "folder without replay files")),
    "dangling-symlink": (_dangling_symlink, {}, ("gere_replay=", "does not exist", "Check the path")),
    "missing-path": (lambda d: d / "nope.jsonl", {}, ("gere_replay=", "does not exist")),
    "non-utf8-jsonl": (
        _bytes("r.jsonl", b'{"text": "' + LATIN1 + b'"}\n'),
        {},
        ("gere_replay", "not UTF-8", "Re-encode"),
    ),
    "non-utf8-txt": (_bytes("r.txt", LATIN1 + b"\n"), {}, ("gere_replay", "not UTF-8", "Re-encode")),
    "non-utf8-json": (_bytes("r.json", b'[{"text": "' + LATIN1 + b'"}]'), {}, ("gere_replay", "not UTF-8")),
    "invalid-json-line": (
        _bytes("r.jsonl", b'{"text": "a b c d"}\n{"text": "e f g h"}\n{"text": "oops\n'),
        {},
        ("gere_replay", "line 3", "not valid JSON"),
    ),
    "json-line-not-an-object": (
        _bytes("r.jsonl", b'{"text": "a b c d"}\n["a", "list"]\n'),
        {},
        ("gere_replay", "line 2", "not a JSON object"),
    ),
    "json-file-without-a-list": (_bytes("r.json", b'{"a": 1, "b": 2}'), {}, ("gere_replay", "JSON list")),
    "non-string-text": (
        _rows("r.jsonl", [*GOOD[:3], {"text": 5}, *GOOD[3:]]),
        {},
        ("gere_replay_text_field='text'", "record 3", "string"),
    ),
    "list-text": (
        _rows("r.jsonl", [{"text": ["para one", "para two"]}, *GOOD]),
        {},
        ("gere_replay_text_field", "record 0", "string"),
    ),
    "text-field-missing-everywhere": (
        _rows("r.jsonl", [{"content": t["text"]} for t in GOOD]),
        {},
        ("gere_replay_text_field='text'", "content", "Set gere_replay_text_field"),
    ),
    "empty-file": (_bytes("r.jsonl", b""), {}, ("gere_replay=", "empty", "general text")),
    "blank-lines-only": (_bytes("r.jsonl", b"\n  \n\n"), {}, ("gere_replay=", "empty")),
    "empty-txt": (_bytes("r.txt", b""), {}, ("gere_replay=", "empty")),
    "only-empty-texts": (
        _rows("r.jsonl", [{"text": ""}, {"text": "   "}, {"text": None}, {"text": "\n"}]),
        {},
        ("gere_replay=", "only empty texts"),
    ),
    "all-shorter-than-min-tokens": (
        _rows("r.jsonl", [{"text": w} for w in ("a", "the", "of", "an")]),
        {"gere_replay_min_tokens": 4},
        ("gere_replay_min_tokens=4", "Use longer general texts"),
    ),
    "replay-size-larger-than-corpus": (
        _rows("r.jsonl", GOOD[:5]),
        {"gere_replay_size": 50},
        ("gere_replay_size=50", "only 5 usable", "Lower gere_replay_size to 5"),
    ),
    "preference-dataset": (
        _rows("r.jsonl", [{"prompt": "Q?", "chosen": "yes indeed", "rejected": "no"} for _ in range(8)]),
        {},
        ("gere_replay=", "preference dataset", "GENERAL text"),
    ),
    "unsupported-suffix": (_bytes("r.csv", b"text\nhello world\n"), {}, ("gere_replay=", "unsupported file type")),
    "corrupt-parquet": (_bytes("r.parquet", b"PAR1 this is not parquet"), {}, ("gere_replay", "parquet")),
    "datasets-folder-without-the-split": (
        _datasets_folder_without_split,
        {},
        ("gere_replay_split='train'", "validation"),
    ),
    "dataset-id-not-available-offline": (
        lambda d: "gere-test-nonexistent-org/no-such-dataset",
        {},
        ("gere_replay=", "no local file or folder", "local jsonl/json/parquet/txt file"),
    ),
}


@pytest.mark.parametrize("case", sorted(REPLAY_CASES))
def test_bad_replay_source_names_the_key(case: str, tmp_path: Path, tiny_tokenizer: Any) -> None:
    make, kw, expected = REPLAY_CASES[case]
    source = make(tmp_path)
    with pytest.raises(ReplayError) as err:
        _load(tiny_tokenizer, source, **kw)
    msg = str(err.value)
    for part in expected:
        assert part in msg, f"{case}: {part!r} not in error: {msg}"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files regardless of their permissions")
@pytest.mark.parametrize("in_folder", [False, True])
def test_unreadable_file_names_the_key(tmp_path: Path, tiny_tokenizer: Any, in_folder: bool) -> None:
    path = write_jsonl(tmp_path / "r.jsonl", GOOD)
    path.chmod(0)
    try:
        with pytest.raises(ReplayError, match="permission denied") as err:
            _load(tiny_tokenizer, tmp_path if in_folder else path)
        assert "gere_replay=" in str(err.value)
    finally:
        path.chmod(0o644)


def test_mixed_schema_keeps_only_usable_records(tmp_path: Path, tiny_tokenizer: Any, caplog) -> None:
    """Records with other fields, a missing or empty text field are dropped (and counted), not fatal."""
    rows = [
        {"text": "the river city music science history", "source": "wiki", "id": 1},
        {"content": "no text field here"},
        {"text": "", "meta": {"lang": "en"}},
        {"text": "planet engine winter summer mountain village", "url": "http://x"},
        {"text": None},
        {"title": "only a title", "text": "game film team water light energy market"},
        {"text": "school garden forest ocean paper story movie"},
    ]
    write_jsonl(tmp_path / "r.jsonl", rows)
    with caplog.at_level("WARNING", logger="gere_plugin.replay"):
        replay = _load(tiny_tokenizer, tmp_path / "r.jsonl", gere_replay_size=4)
    assert len(replay) == 4
    assert replay.dropped_empty == 3
    assert sorted(replay.texts) == sorted(r["text"] for r in rows if r.get("text"))
    assert "dropped 3 replay records" in caplog.text


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".txt"])
def test_utf8_byte_order_mark_is_accepted(tmp_path: Path, tiny_tokenizer: Any, suffix: str) -> None:
    """Files saved by Windows editors start with a UTF-8 BOM: it must neither fail nor reach the texts."""
    texts = general_texts(4, seed=11)
    if suffix == ".jsonl":
        body = "".join(json.dumps({"text": t}) + "\n" for t in texts)
    elif suffix == ".json":
        body = json.dumps([{"text": t} for t in texts])
    else:
        body = "\n".join(texts) + "\n"
    path = tmp_path / f"r{suffix}"
    path.write_bytes(b"\xef\xbb\xbf" + body.encode("utf-8"))
    replay = _load(tiny_tokenizer, path)
    assert sorted(replay.texts) == sorted(texts)


# ---------------------------------------------------------------------------------------------
# gere_replay_per_step against the global batch and the replay set
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("per_step", "global_batch"), [(4, 4), (5, 4), (1, 1), (None, 1)])
def test_per_step_must_leave_task_rows(per_step: int | None, global_batch: int) -> None:
    with pytest.raises(GeReConfigError) as err:
        resolve_replay_per_step(per_step, global_batch)
    msg = str(err.value)
    assert "gere_replay_per_step" in msg and "global batch" in msg and "gradient_accumulation_steps" in msg


def test_per_step_default_is_a_quarter_of_the_global_batch() -> None:
    assert [resolve_replay_per_step(None, b) for b in (2, 4, 8, 33)] == [1, 1, 2, 8]


def test_trainer_refuses_per_step_not_below_global_batch(
    tmp_path: Path, tiny_model: Any, tiny_tokenizer: Any, sft_dataset: Any, replay_file: Path
) -> None:
    from gere_plugin import GeReSFTTrainer

    cfg = sft_config(
        tmp_path,
        gradient_checkpointing=False,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=1,
        gere_replay=str(replay_file),
        gere_replay_per_step=2,
    )
    with pytest.raises(GeReConfigError) as err:
        GeReSFTTrainer(model=tiny_model, args=cfg, train_dataset=sft_dataset, processing_class=tiny_tokenizer)
    assert "gere_replay_per_step=2" in str(err.value) and "global batch (2" in str(err.value)


def test_trainer_refuses_replay_set_smaller_than_two_steps(
    tmp_path: Path, tiny_model: Any, tiny_tokenizer: Any, sft_dataset: Any, replay_file: Path
) -> None:
    from gere_plugin import GeReSFTTrainer

    cfg = sft_config(
        tmp_path, gradient_checkpointing=False, gere_replay=str(replay_file), gere_replay_size=3, gere_replay_per_step=2
    )
    with pytest.raises(GeReConfigError) as err:
        GeReSFTTrainer(model=tiny_model, args=cfg, train_dataset=sft_dataset, processing_class=tiny_tokenizer)
    assert "gere_replay_size" in str(err.value) and "gere_replay_per_step" in str(err.value)
