"""Every command, every key it reads, bad input: an error that names the key or flag, never a traceback,
and no file that existed before is modified or removed (nor anything new written).

One workspace holds user files, a copy of a model folder, another model's GeRe cache, good and
malformed inputs; each case runs one ``gere`` command on it in-process and compares a snapshot of
the whole workspace before and after. ``axolotl gere check`` / ``build-cache`` and the trainers get
their own (smaller) tables at the end.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gere_plugin.cli import CACHE_KEYS, main
from gere_plugin.config import GeReConfigError, gere_fields

from .conftest import build_model, general_texts, sft_config, write_jsonl
from .test_state_cache_owner import snapshot


@dataclass
class W:
    """The workspace: paths every case may use."""

    root: Path

    def __getattr__(self, name: str) -> str:  # w.model -> str(root / "model"), w.replay_jsonl -> root/replay.jsonl
        return str(self.root / name.replace("_jsonl", ".jsonl").replace("_json", ".json").replace("_txt", ".txt"))


@pytest.fixture(scope="module")
def workspace_template(tmp_path_factory: Any, tiny_dir: Path, tiny_tokenizer: Any) -> Path:
    root = tmp_path_factory.mktemp("template")
    shutil.copytree(tiny_dir, root / "model")
    (root / "notes" / "sub").mkdir(parents=True)
    (root / "notes" / "todo.md").write_text("- read the paper\n")
    (root / "notes" / "sub" / "data.csv").write_text("a,b\n1,2\n")
    write_jsonl(root / "replay.jsonl", [{"text": t} for t in general_texts(40, seed=7)])
    write_jsonl(root / "corpus.jsonl", [{"text": t} for t in general_texts(30, seed=4)])
    (root / "bad.jsonl").write_text('{"text": "a b c d e f"}\n{"text": "broken\n')
    (root / "empty.jsonl").write_text("")
    (root / "notext.jsonl").write_text('{"body": "a b c"}\n')
    (root / "held.txt").write_text("the river was lovely and the city was great.\n")
    (root / "existing.jsonl").write_text('{"text": "the user\'s own file"}\n')
    (root / "out-dir").mkdir()
    (root / "out-dir" / "keep.txt").write_text("keep")
    (root / "bad.json").write_text('{\n  "method": "gere",\n  "matrix": [[0.5]\n}\n')
    (root / "notresult.json").write_text(json.dumps({"hello": "world"}))
    (root / "train.jsonl").write_text('{"prompt": "Q: a", "completion": " yes"}\n{"prompt": "Q: b", "completion": " no"}\n')
    (root / "test.jsonl").write_text('{"prompt": "Q: a", "label_words": [" yes", " no"], "gold": 0}\n')
    (root / "badtest.jsonl").write_text('{"prompt": "Q", "label_words": [" yes", " no"], "gold": 0}\n{"prompt": 1}\n')
    (root / "earlier").mkdir()
    (root / "earlier" / "result.json").write_text("{}")
    # another model's cache (hidden 64) on this replay set
    from gere_plugin.config import GeReArguments
    from gere_plugin.replay import ReplaySet
    from gere_plugin.states import build_state_cache

    wide = build_model(root / "wide-model-tmp", tiny_tokenizer, hidden=64)
    replay = ReplaySet.from_args(GeReArguments(gere_replay=str(root / "replay.jsonl"), gere_replay_max_length=32),
                                 tiny_tokenizer)
    build_state_cache(wide, replay, progress=False).save(root / "other_cache")
    shutil.rmtree(root / "wide-model-tmp")
    return root


@pytest.fixture
def w(workspace_template: Path, tmp_path: Path) -> W:
    root = Path(shutil.copytree(workspace_template, tmp_path / "ws"))
    return W(root)


def _cache(w: W, *extra: str) -> list[str]:
    return ["cache-states", "--model", w.model, "--gere_replay", w.replay_jsonl, "--gere_replay_max_length", "32",
            "--gere_state_cache", str(w.root / "new-cache"), *extra]


def _cache_without(w: W, flag: str) -> list[str]:
    argv = _cache(w)
    i = argv.index(flag)
    return argv[:i] + argv[i + 2:]


def _evaluate(w: W, *extra: str) -> list[str]:
    return ["evaluate", "--model", w.model, *extra]


def _sequence(w: W, *extra: str) -> list[str]:
    return ["sequence", "--model", w.model, "--out", str(w.root / "seq"), "--task", "t", w.train_jsonl, w.test_jsonl,
            "--method", "gere", "--gere_replay", w.replay_jsonl, *extra]


# Bad values for the gere_* keys `gere cache-states` reads, as they come from a command line:
# (wrong type, out of range). The key table of every key's Python values is tests/test_bad_input.py.
CLI_BAD_VALUES: dict[str, tuple[str, ...]] = {
    "gere_replay": ("", "   "),
    "gere_state_cache": ("", "  "),
    "gere_replay_size": ("ten", "0", "-3"),
    "gere_replay_max_length": ("1.5", "1"),
    "gere_replay_min_tokens": ("two", "1"),
    "gere_replay_text_field": ("",),
    "gere_replay_split": ("",),
    "gere_seed": ("x", "-1"),
    "gere_layers": ("last", "99", "-1 -1"),
    "gere_sigma": ("wide", "0", "nan", "-1"),
    "gere_state_batch_size": ("8.5", "0"),
}


def test_cli_bad_values_cover_every_key_cache_states_reads() -> None:
    assert set(CLI_BAD_VALUES) == set(CACHE_KEYS)


# id -> (argv, substrings the message must contain; the first names the key or flag)
CASES: dict[str, tuple[Callable[[W], list[str]], tuple[str, ...]]] = {
    # -- gere ------------------------------------------------------------------------------------
    "unknown-command": (lambda w: ["foo"], ("unknown command 'foo'", "build-replay", "cache-states", "sequence")),
    "misspelled-command": (lambda w: ["cache-state"], ("unknown command", "Did you mean `gere cache-states`")),
    # -- build-replay ------------------------------------------------------------------------------
    "build-replay/no-from": (lambda w: ["build-replay", "--out", str(w.root / "r.jsonl")], ("--from",)),
    "build-replay/missing-from": (
        lambda w: ["build-replay", "--from", str(w.root / "nope.jsonl"), "--out", str(w.root / "r.jsonl")],
        ("--from", "does not exist"),
    ),
    "build-replay/malformed-from": (
        lambda w: ["build-replay", "--from", w.bad_jsonl, "--out", str(w.root / "r.jsonl")],
        ("--from", "line 2", "not valid JSON"),
    ),
    "build-replay/empty-from": (
        lambda w: ["build-replay", "--from", w.empty_jsonl, "--out", str(w.root / "r.jsonl")], ("--from", "empty")
    ),
    "build-replay/out-is-a-folder": (
        lambda w: ["build-replay", "--from", w.corpus_jsonl, "--out", str(w.root / "out-dir")], ("--out", "is a folder")
    ),
    "build-replay/out-exists": (
        lambda w: ["build-replay", "--from", w.corpus_jsonl, "--out", w.existing_jsonl],
        ("--out", "already exists", "--force"),
    ),
    "build-replay/size-zero": (
        lambda w: ["build-replay", "--from", w.corpus_jsonl, "--out", str(w.root / "r.jsonl"), "--gere_replay_size", "0"],
        ("gere_replay_size",),
    ),
    "build-replay/size-not-a-number": (
        lambda w: ["build-replay", "--from", w.corpus_jsonl, "--out", str(w.root / "r.jsonl"), "--gere_replay_size", "x"],
        ("--gere_replay_size", "invalid int"),
    ),
    "build-replay/size-larger-than-corpus": (
        lambda w: ["build-replay", "--from", w.corpus_jsonl, "--out", str(w.root / "r.jsonl"), "--gere_replay_size",
                   "500"],
        ("--gere_replay_size 500", "30 usable"),
    ),
    "build-replay/old-size-spelling-zero": (
        lambda w: ["build-replay", "--from", w.corpus_jsonl, "--out", str(w.root / "r.jsonl"), "--size", "0"],
        ("gere_replay_size",),
    ),
    "build-replay/negative-seed": (
        lambda w: ["build-replay", "--from", w.corpus_jsonl, "--out", str(w.root / "r.jsonl"), "--gere_seed", "-1"],
        ("gere_seed",),
    ),
    "build-replay/text-field-not-there": (
        lambda w: ["build-replay", "--from", w.corpus_jsonl, "--out", str(w.root / "r.jsonl"),
                   "--gere_replay_text_field", "body"],
        ("gere_replay_text_field='body'", "fields found"),
    ),
    # -- cache-states ------------------------------------------------------------------------------
    "cache-states/no-model": (lambda w: _cache_without(w, "--model"), ("--model",)),
    "cache-states/missing-model-folder": (
        lambda w: [*_cache_without(w, "--model"), "--model", "./no/such/model"], ("--model", "does not exist")
    ),
    "cache-states/missing-model-id": (
        lambda w: [*_cache_without(w, "--model"), "--model", "nobody/no-model"], ("--model", "no such folder")
    ),
    "cache-states/model-is-not-a-model": (
        lambda w: [*_cache_without(w, "--model"), "--model", w.notes], ("--model", "config.json")
    ),
    "cache-states/no-replay": (lambda w: _cache_without(w, "--gere_replay"), ("--gere_replay",)),
    "cache-states/missing-replay": (
        lambda w: [*_cache_without(w, "--gere_replay"), "--gere_replay", str(w.root / "nope.jsonl")],
        ("gere_replay=", "does not exist"),
    ),
    "cache-states/malformed-replay": (
        lambda w: [*_cache_without(w, "--gere_replay"), "--gere_replay", w.bad_jsonl], ("gere_replay", "line 2")
    ),
    "cache-states/empty-replay": (
        lambda w: [*_cache_without(w, "--gere_replay"), "--gere_replay", w.empty_jsonl], ("gere_replay", "empty")
    ),
    "cache-states/no-cache-folder": (lambda w: _cache_without(w, "--gere_state_cache"), ("--gere_state_cache",)),
    "cache-states/user-files": (
        lambda w: [*_cache_without(w, "--gere_state_cache"), "--gere_state_cache", w.notes],
        ("gere_state_cache", "not empty", "never deletes"),
    ),
    "cache-states/user-files-force": (
        lambda w: [*_cache_without(w, "--gere_state_cache"), "--gere_state_cache", w.notes, "--force"],
        ("gere_state_cache", "not empty"),
    ),
    "cache-states/model-folder": (
        lambda w: [*_cache_without(w, "--gere_state_cache"), "--gere_state_cache", w.model, "--force"],
        ("gere_state_cache", "model.safetensors"),
    ),
    "cache-states/other-model-cache": (
        lambda w: [*_cache_without(w, "--gere_state_cache"), "--gere_state_cache", w.other_cache],
        ("gere_state_cache", "hidden size 64", "--force"),
    ),
    "cache-states/cache-is-a-file": (
        lambda w: [*_cache_without(w, "--gere_state_cache"), "--gere_state_cache", w.existing_jsonl],
        ("gere_state_cache", "is a file"),
    ),
    "cache-states/bad-dtype": (lambda w: _cache(w, "--dtype", "int8"), ("--dtype", "invalid choice")),
    # -- keys ----------------------------------------------------------------------------------------
    "keys/check-missing-file": (lambda w: ["keys", "--check", str(w.root / "nope.md")], ("--check", "cannot be read")),
    # -- evaluate ------------------------------------------------------------------------------------
    "evaluate/nothing-to-measure": (lambda w: _evaluate(w), ("nothing to measure", "--ppl", "--cloze")),
    "evaluate/missing-model": (
        lambda w: ["evaluate", "--model", str(w.root / "gone"), "--ppl", w.held_txt], ("--model", "does not exist")
    ),
    "evaluate/model-is-not-a-model": (
        lambda w: ["evaluate", "--model", w.notes, "--ppl", w.held_txt], ("--model", "config.json")
    ),
    "evaluate/missing-ppl-file": (
        lambda w: _evaluate(w, "--ppl", str(w.root / "nope.txt")), ("--ppl", "no such file")
    ),
    "evaluate/malformed-ppl-file": (lambda w: _evaluate(w, "--ppl", w.bad_jsonl), ("--ppl", "line 2", "not valid JSON")),
    "evaluate/ppl-without-text": (lambda w: _evaluate(w, "--ppl", w.notext_jsonl), ("--ppl", "line 1", "'text'")),
    "evaluate/unknown-cloze-task": (lambda w: _evaluate(w, "--cloze", "nope"), ("--cloze 'nope'", "known:")),
    "evaluate/out-is-a-folder": (
        lambda w: _evaluate(w, "--ppl", w.held_txt, "--out", str(w.root / "out-dir")), ("--out", "is a folder")
    ),
    "evaluate/limit-zero": (lambda w: _evaluate(w, "--ppl", w.held_txt, "--limit", "0"), ("--limit",)),
    # -- report --------------------------------------------------------------------------------------
    "report/no-files": (lambda w: ["report"], ("results",)),
    "report/missing-file": (lambda w: ["report", str(w.root / "nope.json")], ("nope.json", "no such result file")),
    "report/malformed-json": (lambda w: ["report", w.bad_json], ("bad.json", "line 4", "not valid JSON")),
    "report/not-a-result": (lambda w: ["report", w.notresult_json], ("notresult.json", "'method' and 'matrix'")),
    "report/folder": (lambda w: ["report", str(w.root / "out-dir")], ("out-dir", "is a folder")),
    # -- sequence ------------------------------------------------------------------------------------
    "sequence/no-replay": (
        lambda w: [a for a in _sequence(w) if a not in ("--gere_replay", w.replay_jsonl)], ("--gere_replay",)
    ),
    "sequence/missing-model": (
        lambda w: [*_sequence(w), "--model", str(w.root / "gone")], ("--model", "does not exist")
    ),
    "sequence/per-step-zero": (lambda w: _sequence(w, "--gere_replay_per_step", "0"), ("gere_replay_per_step",)),
    "sequence/old-spelling-per-step-zero": (lambda w: _sequence(w, "--replay-per-step", "0"), ("gere_replay_per_step",)),
    "sequence/replay-size-not-a-number": (
        lambda w: _sequence(w, "--gere_replay_size", "many"), ("--gere_replay_size", "invalid int")
    ),
    "sequence/max-steps-zero": (lambda w: _sequence(w, "--max_steps", "0"), ("max_steps",)),
    "sequence/negative-learning-rate": (lambda w: _sequence(w, "--learning_rate", "-1"), ("learning_rate",)),
    "sequence/bad-weight": (lambda w: _sequence(w, "--gere_weight", "heavy"), ("gere_weight",)),
    "sequence/malformed-test-file": (
        lambda w: ["sequence", "--model", w.model, "--out", str(w.root / "seq"), "--task", "t", w.train_jsonl,
                   w.badtest_jsonl, "--gere_replay", w.replay_jsonl],
        ("badtest.jsonl line 2",),
    ),
    "sequence/missing-train-file": (
        lambda w: ["sequence", "--model", w.model, "--out", str(w.root / "seq"), "--task", "t",
                   str(w.root / "nope.jsonl"), w.test_jsonl, "--gere_replay", w.replay_jsonl],
        ("nope.jsonl", "does not exist"),
    ),
    "sequence/out-holds-an-earlier-run": (
        lambda w: [*_sequence(w), "--out", str(w.root / "earlier")], ("--out", "earlier run", "--force")
    ),
    "sequence/duplicate-task-names": (
        lambda w: _sequence(w, "--task", "t", w.train_jsonl, w.test_jsonl), ("--task", "unique")
    ),
    "sequence/unknown-method": (lambda w: _sequence(w, "--method", "magic"), ("--method", "invalid choice")),
}
for _key, _values in CLI_BAD_VALUES.items():
    for _i, _value in enumerate(_values):
        CASES[f"cache-states/{_key}-{_i}"] = (
            lambda w, k=_key, v=_value: [*_cache(w), f"--{k}", *(v.split() if v.strip() else [v])],
            (_key,),  # argparse ("argument --gere_seed: invalid int value") and the validator both name it
        )


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_an_error_naming_the_flag_and_touches_nothing(case: str, w: W, capsys: Any) -> None:
    make_argv, says = CASES[case]
    argv = make_argv(w)
    before = snapshot(w.root)
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 2, f"{case}: exit status {rc}\n{out}\n{err}"
    for part in says:
        assert part in err, f"{case}: {part!r} not in the message:\n{err}"
    assert "Traceback" not in out + err
    assert snapshot(w.root) == before, f"{case}: the workspace changed"


# ---------------------------------------------------------------------------------------------
# The trainers: config checks before the state build
# ---------------------------------------------------------------------------------------------
TRAINER_CASES: dict[str, tuple[dict[str, Any], tuple[str, ...]]] = {
    "freeze-beyond-depth": ({"gere_freeze_layers": 5}, ("gere_freeze_layers=5", "only 4 decoder layers")),
    "layer-out-of-range": ({"gere_layers": [9]}, ("gere_layers contains 9", "valid: -5..4")),
    "per-step-not-below-batch": ({"gere_replay_per_step": 4}, ("gere_replay_per_step=4", "global batch")),
    "replay-set-too-small": ({"gere_replay_size": 3}, ("gere_replay_size", "gere_replay_per_step")),
    "missing-replay": ({"gere_replay": "/no/such/replay.jsonl"}, ("gere_replay=", "does not exist")),
}


@pytest.mark.parametrize("case", sorted(TRAINER_CASES))
def test_trainer_checks_run_before_the_state_build(
    case: str, tmp_path: Path, tiny_model: Any, tiny_tokenizer: Any, sft_dataset: Any, replay_file: Path,
    monkeypatch: Any,
) -> None:  # fmt: skip
    import gere_plugin.trainer.resources
    from gere_plugin import GeReSFTTrainer

    def forbidden(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the state build ran before the config checks")

    monkeypatch.setattr(gere_plugin.trainer.resources, "build_state_cache", forbidden)
    overrides, says = TRAINER_CASES[case]
    kw = {"gere_replay": str(replay_file), "gere_state_cache": str(tmp_path / "cache"), **overrides}
    cfg = sft_config(tmp_path / "out", gradient_checkpointing=False, **kw)
    with pytest.raises(GeReConfigError) as err:
        GeReSFTTrainer(model=tiny_model, args=cfg, train_dataset=sft_dataset, processing_class=tiny_tokenizer)
    for part in says:
        assert part in str(err.value), str(err.value)
    assert not (tmp_path / "cache").exists()


# ---------------------------------------------------------------------------------------------
# axolotl gere check / build-cache
# ---------------------------------------------------------------------------------------------
def test_axolotl_check_lists_every_problem_in_one_run(tmp_path: Path, tiny_dir: Path) -> None:
    from click.testing import CliRunner

    pytest.importorskip("axolotl")
    from gere_plugin.axolotl.cli import gere_command

    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.md").write_text("x")
    ds = tmp_path / "zero3.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    cfg = {
        "base_model": str(tiny_dir), "plugins": ["gere_plugin.GeRePlugin"], "gere_replay": "r.jsonl",
        "gere_sigma": 0, "gere_weight": "heavy", "gere_replay_sise": 10, "gere_freeze_layers": 9,
        "gere_replay_per_step": 3, "micro_batch_size": 2, "gradient_accumulation_steps": 2, "deepspeed": str(ds),
        "gere_state_cache": str(notes), "output_dir": str(tmp_path / "out"),
    }  # fmt: skip
    path = tmp_path / "bad.yml"
    import yaml

    path.write_text(yaml.safe_dump(cfg))
    result = CliRunner().invoke(gere_command, ["check", str(path), "--num-processes", "2"])
    assert result.exit_code == 1
    out = result.output
    for part in ("gere_sigma=0", "gere_weight='heavy'", "Did you mean 'gere_replay_size'",
                 "gere_freeze_layers=9 but base_model has only 4", "at least processes x gradient_accumulation_steps (4)",
                 "(2 processes x 2 accumulation steps) under DeepSpeed ZeRO-3", "gere_state_cache", "never deletes"):
        assert part in out, f"{part!r} missing from:\n{out}"
    assert "6 problem(s)" in out
    assert (notes / "todo.md").read_text() == "x"


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"base_model": "./no/such/model"}, ("base_model:", "does not exist")),
        ({"gere_regularizer": "l2"}, ("gere_regularizer='l2'", "needs no state cache")),
        ({"gere_sigma": -1}, ("gere_sigma",)),
    ],
    ids=["missing-base-model", "no-cache-needed", "bad-sigma"],
)
def test_axolotl_build_cache_bad_input(change: dict, says: tuple[str, ...], tmp_path: Path, tiny_dir: Path) -> None:
    pytest.importorskip("axolotl")
    import yaml
    from axolotl.integrations.base import PluginManager
    from click.testing import CliRunner

    from gere_plugin.axolotl.cli import gere_command

    from .test_axolotl_train import prepare_recipe

    cfg, raw = prepare_recipe("tiny-cpu-sft-full.yml", tmp_path, tiny_dir)
    raw.update(change)
    cfg.write_text(yaml.safe_dump(raw, sort_keys=False))
    before = snapshot(tmp_path)
    PluginManager._instance = None
    try:
        result = CliRunner().invoke(gere_command, ["build-cache", str(cfg)])
    finally:
        PluginManager._instance = None
    assert result.exit_code == 1, result.output
    for part in says:
        assert part in result.output, result.output
    assert "Traceback" not in result.output
    after = snapshot(tmp_path)  # Axolotl's config loader itself may add output_dir/debug.log; nothing else changes
    assert {k: after.get(k) for k in before} == before
    assert set(after) - set(before) <= {"out", "out/debug.log"}


def test_every_gere_key_is_in_a_bad_input_table() -> None:
    """The command table covers the keys cache-states reads; tests/test_bad_input.py covers every key."""
    from .test_bad_input import BAD_VALUES

    assert set(BAD_VALUES) == {f.name for f in gere_fields()}
    assert set(CLI_BAD_VALUES) <= set(BAD_VALUES)


@pytest.mark.parametrize(
    ("cfg", "procs", "says"),
    [
        ({"fsdp_config": {"fsdp_version": 2}, "gradient_accumulation_steps": 2, "gere_replay_per_step": 3}, 2,
         "(2 processes x 2 accumulation steps) under FSDP"),
        ({"deepspeed": "deepspeed_configs/zero3_bf16.json", "gradient_accumulation_steps": 4,
          "gere_replay_per_step": 5}, None, "2 processes assumed"),
        ({"deepspeed": {"zero_optimization": {"stage": 3}}, "batch_size": 8, "micro_batch_size": 2,
          "gere_replay_per_step": 3}, 2, "(2 processes x 4 accumulation steps) under DeepSpeed ZeRO-3"),
        ({"micro_batch_size": 2, "gradient_accumulation_steps": 1, "gere_replay_per_step": 4}, 2,
         "must be smaller than the global batch (4"),
    ],
    ids=["fsdp", "zero3-by-name-no-process-count", "zero3-dict-batch-size", "not-below-global-batch"],
)
def test_axolotl_check_batch_layout(cfg: dict, procs: Any, says: str, monkeypatch: Any) -> None:
    from gere_plugin.axolotl.check import batch_problems

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    problems = batch_problems(cfg, procs)
    assert len(problems) == 1 and says in problems[0], problems
    assert "gere_replay_per_step" in problems[0]


def test_axolotl_check_batch_layout_accepts_good_layouts(monkeypatch: Any) -> None:
    from gere_plugin.axolotl.check import batch_problems

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert batch_problems({"deepspeed": {"zero_optimization": {"stage": 3}}, "gradient_accumulation_steps": 2,
                           "micro_batch_size": 4, "gere_replay_per_step": 4}, 2) == []
    # a multiple of the processes: micro-batch 1 has no rows on any rank, which does not hang
    assert batch_problems({"fsdp_config": {"fsdp_version": 2}, "gradient_accumulation_steps": 2,
                           "micro_batch_size": 4, "gere_replay_per_step": 2}, 2) == []
    # at least processes x accumulation: every micro-batch of every rank has rows (3 and 2 per rank)
    assert batch_problems({"fsdp_config": {"fsdp_version": 2}, "gradient_accumulation_steps": 2,
                           "micro_batch_size": 4, "gere_replay_per_step": 5}, 2) == []
    assert batch_problems({"deepspeed": {"zero_optimization": {"stage": 2}}, "gradient_accumulation_steps": 2,
                           "gere_replay_per_step": 3}, 2) == []  # ZeRO-2: any value
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert "(4 processes x 1 accumulation steps)" in batch_problems(
        {"fsdp": ["full_shard"], "micro_batch_size": 4, "gere_replay_per_step": 2})[0]
    problems = batch_problems({"fsdp": ["full_shard"], "micro_batch_size": 4, "gere_replay_per_step": 4,
                               "gere_task_replay_per_step": 1})
    assert len(problems) == 1 and "gere_task_replay_per_step=1" in problems[0]
