"""run_sequence: a 2-task sequence on the tiny random model (2-3 steps per task)."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import pytest

from gere_plugin.continual import METHODS, SequenceTask, TrainSettings, model_fingerprint, run_sequence
from gere_plugin.evaluation.general import GeneralEvalConfig
from gere_plugin.evaluation.tasks import ClassificationItem, MCItem

WORDS = "the river city music film team water light energy market school garden forest ocean planet".split()


def _task(name: str, labels: tuple[str, str], seed: int, n_train: int = 16, n_test: int = 6) -> SequenceTask:
    rng = random.Random(seed)

    def item() -> ClassificationItem:
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8)))
        return ClassificationItem(f"{name}: {text}\nAnswer:", labels, rng.randint(0, 1))

    train = [item().as_prompt_completion() for _ in range(n_train)]
    return SequenceTask(name=name, train=train, test=[item() for _ in range(n_test)])


TASKS = [_task("sentiment", (" positive", " negative"), 1), _task("question", (" yes", " no"), 2)]
SETTINGS = TrainSettings(
    max_steps=2, per_device_train_batch_size=4, max_length=48, learning_rate=1e-3, gere_replay_size=24,
    gere_replay_max_length=24, gere_replay_per_step=2, gere_state_batch_size=8, logging_steps=1, eval_batch_size=8,
)
GENERAL = GeneralEvalConfig(
    ppl_sets={"held": ["the river was lovely and the city was great.", "a film about the ocean and planet."]},
    mc_items={"toy": [MCItem("the river was", (" great", " ocean planet"), 0)]},
    ppl_max_length=32,
)


def _check_structure(result: dict, method: str) -> None:
    assert result["method"] == method
    assert result["tasks"] == ["sentiment", "question"]
    assert len(result["matrix"]) == 2 and all(len(row) == 2 for row in result["matrix"])
    assert all(0.0 <= v <= 1.0 for row in result["matrix"] for v in row)
    assert len(result["base_row"]) == 2
    assert [s["task"] for s in result["stages"]] == ["sentiment", "question"]
    assert all(s["steps"] == 2 for s in result["stages"])
    for key in ("AA", "AP", "BWT", "FWT", "FM", "F1"):
        assert result["summary"][key] is not None
    general = result["final"]["general"]
    assert set(general["ppl"]) == {"held"} and general["ppl"]["held"] > 1.0
    assert general["n"]["cloze/toy"] == 1


def test_run_sequence_gere_carries_weights_and_reuses_state_cache(tiny_dir, replay_file, tmp_path):
    cache = tmp_path / "states"
    out_json = tmp_path / "result.json"
    result = run_sequence(
        str(tiny_dir), TASKS, "gere", tmp_path / "run", settings=SETTINGS, replay=replay_file,
        state_cache=cache, seed=3, general=GENERAL, result_path=out_json,
    )
    _check_structure(result, "gere")
    on_disk = json.loads(out_json.read_text())
    assert on_disk["matrix"] == result["matrix"] and on_disk["summary"] == result["summary"]

    s0, s1 = result["stages"]
    # task 2 starts exactly where task 1 ended, and training changed the weights
    assert s1["start_fingerprint"] == s0["end_fingerprint"]
    assert s0["start_fingerprint"] != s0["end_fingerprint"]
    assert s1["start_fingerprint"] != s1["end_fingerprint"]
    # the state cache was built by task 1 (from the base model) and reused untouched by task 2
    assert s0["state_cache_before"] == {"exists": False}
    assert s0["state_cache_after"]["exists"] and not s0["state_cache_reused"]
    assert s1["state_cache_reused"] and s1["state_cache_before"] == s0["state_cache_after"]
    assert (cache / "meta.json").is_file()
    # GeRe metrics were logged during training
    assert any("gere/reg_loss" in rec for rec in s1["history"])
    for stage in (s0, s1):  # one wall time per optimizer step; together they fit inside train()
        assert len(stage["step_seconds"]) == stage["steps"] == SETTINGS.max_steps
        assert all(t > 0 for t in stage["step_seconds"])
        assert sum(stage["step_seconds"]) <= stage["train_seconds"] + 1e-3
        assert stage["train_outside_steps_seconds"] == pytest.approx(
            stage["train_seconds"] - sum(stage["step_seconds"]), abs=1e-3)


@pytest.mark.slow
def test_run_sequence_plain_and_freeze_preset(tiny_dir, tiny_tokenizer, replay_file, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir), dtype="float32")
    base_fp = model_fingerprint(model)
    plain = run_sequence(model, TASKS, "plain", tmp_path / "plain", tokenizer=tiny_tokenizer, settings=SETTINGS,
                         seed=3, general=GENERAL)
    _check_structure(plain, "plain")
    assert plain["stages"][0]["start_fingerprint"] == base_fp
    assert plain["state_cache"] is None
    assert not any("gere/reg_loss" in rec for s in plain["stages"] for rec in s["history"])

    spec = METHODS["gere_freeze"]
    assert spec.gere_kwargs(0)["gere_freeze_layers"] == 0 and spec.gere_kwargs(1)["gere_freeze_layers"] == 3
    frozen = run_sequence(str(tiny_dir), TASKS, "gere_freeze", tmp_path / "frz", settings=SETTINGS,
                          replay=replay_file, state_cache=tmp_path / "states", seed=3, general=None)
    first, second = frozen["stages"]
    assert second["trainable_params"] < first["trainable_params"]
    assert "general" not in frozen["final"] and frozen["summary"]["F1"] is None


def test_run_sequence_rejects_bad_input(tiny_dir, tmp_path):
    with pytest.raises(ValueError):
        run_sequence(str(tiny_dir), [], "plain", tmp_path)
    with pytest.raises(ValueError):
        run_sequence(str(tiny_dir), [TASKS[0], TASKS[0]], "plain", tmp_path)
    with pytest.raises(KeyError):
        run_sequence(str(tiny_dir), TASKS, "no-such-method", tmp_path)


@pytest.mark.slow
def test_feature_regularizer_compares_with_the_original_base(tiny_dir, replay_file, tmp_path):
    # l2 against the ORIGINAL base: at the first step of task 2 the model already differs from it,
    # so the regularizer is > 0 (a copy of task 2's starting weights would give exactly 0 there).
    settings = TrainSettings(**{**SETTINGS.__dict__, "print_logs": False})
    result = run_sequence(str(tiny_dir), TASKS, "l2", tmp_path / "l2", settings=settings, replay=replay_file,
                          seed=3, general=None)
    first_logged = [rec for rec in result["stages"][1]["history"] if "gere/reg_loss" in rec][0]
    assert first_logged["step"] == 1
    assert first_logged["gere/reg_loss"] > 0
    assert result["state_cache"] is not None and not (tmp_path / "l2" / "gere_states" / "meta.json").exists()


def _write_task_files(tmp_path, task: SequenceTask) -> tuple[str, str]:
    train = tmp_path / f"{task.name}_train.jsonl"
    test = tmp_path / f"{task.name}_test.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in task.train))
    # one item uses "answer" instead of "gold": both spellings are accepted
    rows = [{"prompt": it.prompt, "label_words": list(it.label_words), "gold": it.gold} for it in task.test]
    rows[0] = {"prompt": rows[0]["prompt"], "label_words": rows[0]["label_words"],
               "answer": rows[0]["label_words"][rows[0]["gold"]]}
    test.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(train), str(test)


@pytest.mark.slow
def test_gere_sequence_cli_matches_the_library_run(tiny_dir, replay_file, tmp_path, capsys):
    from gere_plugin.cli import main

    args = ["sequence", "--model", str(tiny_dir), "--method", "gere", "--gere_replay", str(replay_file),
            "--out", str(tmp_path / "cli"), "--seed", "3", "--max_steps", "2", "--per_device_train_batch_size", "4",
            "--max_length", "48", "--learning_rate", "1e-3", "--gere_replay_size", "24", "--gere_replay_max_length",
            "24", "--gere_replay_per_step", "2"]
    for task in TASKS:
        args += ["--task", task.name, *_write_task_files(tmp_path, task)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    cli = json.loads((tmp_path / "cli" / "result.json").read_text())
    settings = TrainSettings(**{**SETTINGS.__dict__, "logging_steps": 5, "gere_state_batch_size": 16,
                                "eval_batch_size": 16})
    lib = run_sequence(str(tiny_dir), TASKS, "gere", tmp_path / "lib", settings=settings, replay=replay_file,
                       seed=3, general=None)
    assert cli["tasks"] == ["sentiment", "question"]
    assert cli["matrix"] == lib["matrix"] and cli["base_row"] == lib["base_row"]
    assert [s["end_fingerprint"] for s in cli["stages"]] == [s["end_fingerprint"] for s in lib["stages"]]
    assert "sentiment" in printed and "result:" in printed


def test_gere_sequence_cli_bad_input_names_file_and_line(tiny_dir, replay_file, tmp_path, capsys):
    from gere_plugin.cli import main

    train, test = _write_task_files(tmp_path, TASKS[0])
    bad = tmp_path / "bad_test.jsonl"
    bad.write_text('{"prompt": "x", "label_words": [" a", " b"], "gold": 0}\n{"prompt": "y", "label_words": [" a", " b"], "answer": " c"}\n')
    base = ["sequence", "--model", str(tiny_dir), "--out", str(tmp_path / "o"), "--replay", str(replay_file)]
    assert main([*base, "--task", "t", train, str(bad)]) == 2
    assert f"{bad} line 2" in capsys.readouterr().err
    assert main([*base, "--task", "t", train, str(tmp_path / "missing.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["sequence", "--model", str(tiny_dir), "--out", str(tmp_path / "o"), "--task", "t", train, test]) == 2
    assert "--gere_replay" in capsys.readouterr().err
    assert main([*base, "--task", "t", train, test, "--task", "t", train, test]) == 2
    assert "unique" in capsys.readouterr().err


def test_sequence_flags_come_from_the_one_definition(capsys):
    """gere sequence spells every setting as TRL / config.py do; the old spellings still parse, with a note."""
    from gere_plugin.sequence_cli import GERE_SETTING_FLAGS, TRAIN_FLAGS, sequence_parser

    new = sequence_parser().parse_args([
        "--model", "m", "--out", "o", "--task", "t", "a", "b", "--gere_replay", "r.jsonl", "--max_steps", "7",
        "--learning_rate", "0.01", "--per_device_train_batch_size", "3", "--gradient_accumulation_steps", "2",
        "--max_length", "40", "--gere_replay_size", "11", "--gere_replay_max_length", "12",
        "--gere_replay_per_step", "1", "--gere_state_cache", "s", "--bf16",
    ])  # fmt: skip
    assert capsys.readouterr().err == ""
    old = sequence_parser().parse_args([
        "--model", "m", "--out", "o", "--task", "t", "a", "b", "--replay", "r.jsonl", "--steps", "7", "--lr", "0.01",
        "--batch-size", "3", "--gradient-accumulation-steps", "2", "--max-length", "40", "--replay-size", "11",
        "--replay-max-length", "12", "--replay-per-step", "1", "--state-cache", "s", "--bf16",
    ])  # fmt: skip
    notes = capsys.readouterr().err
    assert vars(old) == vars(new)
    assert "--replay-size is deprecated, use --gere_replay_size" in notes and "--lr is deprecated" in notes
    # every settings flag is a TrainSettings field whose gere_* help is GeReArguments' own
    from gere_plugin.config import gere_fields

    helps = {f.name: f.metadata["help"] for f in gere_fields()}
    for f in dataclasses.fields(TrainSettings):
        if f.name.startswith("gere_"):
            assert f.metadata["help"] == helps[f.name]
    assert set(TRAIN_FLAGS + GERE_SETTING_FLAGS) <= {f.name for f in dataclasses.fields(TrainSettings)}
    settings = TrainSettings(**{k: getattr(new, k) for k in TRAIN_FLAGS + GERE_SETTING_FLAGS})
    assert (settings.max_steps, settings.gere_replay_size, settings.bf16) == (7, 11, True)


def test_sequence_runs_the_recommended_preset_by_default():
    """The one constant names a preset, and `gere sequence` without --method runs it (the help says so)."""
    from gere_plugin.continual import RECOMMENDED
    from gere_plugin.sequence_cli import sequence_parser

    assert RECOMMENDED in METHODS  # that it is the committed dev selection's pick: tests/test_select_recommended.py
    parser = sequence_parser()
    assert parser.parse_args(["--model", "m", "--out", "o", "--task", "t", "a", "b"]).method == RECOMMENDED
    method = next(a for a in parser._actions if a.dest == "method")
    assert f"default {RECOMMENDED}: the recommended preset" in method.help and "--method gere" in method.help
    assert parser.parse_args(["--model", "m", "--out", "o", "--task", "t", "a", "b", "--method", "gere"]).method == "gere"
    # the README's recommendation names the same preset (it must follow when select_recommended.py picks another)
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    assert f"`gere sequence` runs the recommended preset (`{RECOMMENDED}`" in readme


def test_train_settings_old_names_still_work():
    with pytest.warns(DeprecationWarning, match="replay_size=.*is deprecated.*gere_replay_size="):
        s = TrainSettings(steps_per_task=3, replay_size=20, batch_size=2)
    assert (s.max_steps, s.gere_replay_size, s.per_device_train_batch_size) == (3, 20, 2)
    assert s.steps_per_task == 3 and s.replay_size == 20  # old attribute names read the new fields
    with pytest.raises(ValueError, match="gere_replay_per_step"):
        TrainSettings(gere_replay_per_step=0)


def test_completion_only_rows_train_the_label_and_not_an_eos(tiny_dir, tiny_tokenizer):
    """completion_eos=False: the runner hands TRL pre-tokenized rows whose loss mask covers exactly the label
    tokens (no EOS appended); completion_eos=True leaves TRL's own path (label + EOS)."""
    from transformers import AutoModelForCausalLM

    from gere_plugin.continual import METHODS, build_trainer

    task = TASKS[0]
    trainers = {}
    for eos in (False, True):
        settings = dataclasses.replace(SETTINGS, completion_eos=eos)
        model = AutoModelForCausalLM.from_pretrained(str(tiny_dir))
        trainers[eos] = build_trainer(model, tiny_tokenizer, task, METHODS["plain"], 0, settings, None, None,
                                      tiny_dir.parent / f"eos-{eos}", 0, None)
    row = task.train[0]
    prompt = tiny_tokenizer(row["prompt"])["input_ids"]
    label = tiny_tokenizer(row["prompt"] + row["completion"])["input_ids"][len(prompt):]
    for eos, trainer in trainers.items():
        batch = trainer.data_collator([trainer.train_dataset[0]])
        trained = batch["labels"][0][batch["labels"][0] != -100].tolist()
        expected = label + ([tiny_tokenizer.eos_token_id] if eos else [])
        assert trained == expected, (eos, trained, expected)


def test_warmup_ratio_resolves_against_max_steps():
    assert TrainSettings(max_steps=40).resolved_warmup_steps == 4  # 10% by default
    assert TrainSettings(max_steps=45, warmup_ratio=0.1).resolved_warmup_steps == 5  # rounded up
    assert TrainSettings(max_steps=40, warmup_steps=7).resolved_warmup_steps == 7  # explicit steps win
    from gere_plugin.config import GeReConfigError

    with pytest.raises(GeReConfigError, match="warmup_ratio"):
        TrainSettings(warmup_ratio=1.5)


@pytest.mark.slow
def test_gere_sequence_method_flow_weights_each_task_from_its_own_start(tiny_dir, tmp_path):
    """``gere sequence --method flow``: every task computes its FLOW weights from the model it starts from
    (its own cache under its output folder), and the weights are logged."""
    from gere_plugin.cli import main

    out = tmp_path / "flow"
    args = ["sequence", "--model", str(tiny_dir), "--method", "flow", "--out", str(out), "--seed", "3",
            "--max_steps", "2", "--per_device_train_batch_size", "4", "--max_length", "48", "--logging_steps", "1"]
    for task in TASKS:
        args += ["--task", task.name, *_write_task_files(tmp_path, task)]
    assert main(args) == 0
    result = json.loads((out / "result.json").read_text())
    for k, stage in enumerate(result["stages"]):
        assert stage["task_methods"] == ["flow"] and stage["flow"]["base_losses"] == "built"
        assert stage["setup_seconds"] > 0  # the base-loss pass happens before the first step
        assert stage["seconds_per_step"] == pytest.approx(stage["train_seconds"] / stage["steps"])
        assert stage["memory"] is None or stage["memory"]["peak_mb"] >= stage["memory"]["before_mb"] > 0
        assert 0 < stage["flow"]["weight_min"] <= stage["flow"]["weight_max"] <= 1
        assert all(0 < r["gere/flow_weight"] <= 1 for r in stage["history"] if "loss" in r)
        meta = json.loads((out / f"task_{k}_{stage['task']}" / "gere_flow" / "meta.json").read_text())
        assert meta["num_samples"] > 0
    models = [json.loads((out / f"task_{k}_{s['task']}" / "gere_flow" / "meta.json").read_text())["model_fingerprint"]
              for k, s in enumerate(result["stages"])]
    assert models[0] != models[1]  # task 2's weights come from task 1's result, not the base


def test_strength_settings_apply_only_to_methods_that_use_them(tiny_dir, tmp_path):
    from gere_plugin.config import GeReConfigError
    from gere_plugin.continual import EWC_LAMBDA, TASK_KL_WEIGHT

    assert METHODS["ewc"].gere_kwargs(1)["gere_ewc_lambda"] == EWC_LAMBDA
    assert METHODS["task_kl"].gere_kwargs(0)["gere_task_kl"] == TASK_KL_WEIGHT and METHODS["task_kl"].needs_base_reference
    assert METHODS["gere_flow"].replay and METHODS["gere_flow"].uses == ["flow"]
    settings = TrainSettings(**{**SETTINGS.__dict__, "gere_task_kl": 0.5})
    with pytest.raises(GeReConfigError, match="gere_task_kl sets the strength of methods with task_kl"):
        run_sequence(str(tiny_dir), TASKS, "ewc", tmp_path / "x", settings=settings)
