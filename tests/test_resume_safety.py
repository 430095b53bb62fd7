"""Resume is safe in every form: ``True``, a path, Axolotl's ``resume_from_checkpoint`` and
``auto_resume_from_checkpoints``, and the TRL recipes' ``--resume_from_checkpoint``.

A checkpoint records the replay schedule it was trained with (``gere_state.json``); resuming it with
another ``gere_replay_per_step``, ``gere_seed`` or ``gere_replay_size`` is refused before any step.
The recipes pass their flag through to ``train()`` and never write into a checkpoint they did not
resume. The recipe and Axolotl runs are ``slow`` (subprocesses).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gere_plugin.config import GeReConfigError
from gere_plugin.resume import resolve_resume_checkpoint, script_resume_checkpoint

from .conftest import sft_config, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {"gere_replay_size": 32, "gere_replay_max_length": 32, "gere_replay_per_step": 2, "gere_seed": 42}
CHANGED = [("gere_replay_per_step", 1), ("gere_seed", 7), ("gere_replay_size", 16)]


def _trainer(out: Path, model: Any, tok: Any, data: Any, replay: Path, cache: Path, **overrides: Any) -> Any:
    from gere_plugin import GeReSFTTrainer

    kw = {**SETTINGS, **overrides}
    cfg = sft_config(
        out, gradient_checkpointing=False, gere_replay=str(replay), gere_state_cache=str(cache),
        save_strategy="steps", save_steps=1, **kw,
    )  # fmt: skip
    return GeReSFTTrainer(model=model, args=cfg, train_dataset=data, processing_class=tok)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: Any, tiny_dir: Path, tiny_tokenizer: Any, sft_dataset: Any, replay_file: Path) -> Path:
    """A 2-step run with a checkpoint after every step: out/checkpoint-1, out/checkpoint-2."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("resume")
    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir), dtype="float32")
    trainer = _trainer(root / "out", model, tiny_tokenizer, sft_dataset, replay_file, root / "cache", max_steps=2)
    trainer.train()
    assert (root / "out" / "checkpoint-2" / "gere_state.json").is_file()
    return root


def _checkpoint_files(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file() and "checkpoint-" in str(p)}


@pytest.mark.parametrize("how", ["true", "path"])
@pytest.mark.parametrize(("key", "value"), CHANGED)
def test_resume_with_changed_replay_settings_is_refused(
    how: str, key: str, value: int, trained: Path, tiny_model: Any, tiny_tokenizer: Any, sft_dataset: Any,
    replay_file: Path, tmp_path: Path,
) -> None:  # fmt: skip
    out = trained / "out"
    before = _checkpoint_files(out)
    # its own state cache: another seed or size draws another replay set (the shared cache would refuse it)
    trainer = _trainer(out, tiny_model, tiny_tokenizer, sft_dataset, replay_file, tmp_path / "cache", max_steps=3,
                       **{key: value})
    resume = True if how == "true" else str(out / "checkpoint-2")
    with pytest.raises(GeReConfigError) as err:
        trainer.train(resume_from_checkpoint=resume)
    msg = str(err.value)
    assert "checkpoint-2" in msg and key in msg and "start a new run" in msg, msg
    assert trainer.state.global_step == 0, "no step may run before the check"
    assert _checkpoint_files(out) == before


@pytest.fixture
def default_logging(monkeypatch: Any) -> None:
    """gere_plugin's loggers as in a plain TRL script (an earlier Axolotl test may have routed them)."""
    import logging

    root = logging.getLogger("gere_plugin")
    monkeypatch.setattr(root, "handlers", [])
    monkeypatch.setattr(root, "propagate", True)
    monkeypatch.setattr(root, "level", logging.NOTSET)
    logging.Logger.manager._clear_cache()
    yield
    logging.Logger.manager._clear_cache()


def test_resume_true_with_the_same_settings_continues_from_the_newest(
    trained: Path, tiny_model: Any, tiny_tokenizer: Any, sft_dataset: Any, replay_file: Path, capfd: Any,
    default_logging: None,
) -> None:
    import shutil

    out = trained / "copy"
    shutil.copytree(trained / "out", out)
    before = _checkpoint_files(out)
    trainer = _trainer(out, tiny_model, tiny_tokenizer, sft_dataset, replay_file, trained / "cache", max_steps=3)
    trainer.train(resume_from_checkpoint=True)
    assert trainer.state.global_step == 3
    assert json.loads((out / "checkpoint-3" / "gere_state.json").read_text())["global_step"] == 3
    after = _checkpoint_files(out)
    assert {k: v for k, v in after.items() if not k.startswith("checkpoint-3")} == before
    line = [x for x in capfd.readouterr().err.splitlines() if x.startswith("gere: ") and "rows per optimizer step" in x]
    assert line and "checkpoint-2" in line[0] and "state cache" in line[0] and "reused" in line[0], line


def test_resolve_resume_checkpoint(tmp_path: Path) -> None:
    assert resolve_resume_checkpoint(str(tmp_path), None) is None
    assert resolve_resume_checkpoint(str(tmp_path), False) is None
    assert resolve_resume_checkpoint(str(tmp_path), "x/checkpoint-3") == "x/checkpoint-3"
    for n in (2, 10, 9):
        (tmp_path / f"checkpoint-{n}").mkdir()
        (tmp_path / f"checkpoint-{n}" / "trainer_state.json").write_text("{}")
    assert resolve_resume_checkpoint(str(tmp_path), True) == str(tmp_path / "checkpoint-10")


def test_script_resume_never_writes_into_checkpoints_it_did_not_resume(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert script_resume_checkpoint(str(out), None) is None  # a new run
    with pytest.raises(GeReConfigError, match="--resume_from_checkpoint true.*holds no checkpoint"):
        script_resume_checkpoint(str(out), "true")
    for n in (2, 4):
        (out / f"checkpoint-{n}").mkdir(parents=True)
        (out / f"checkpoint-{n}" / "trainer_state.json").write_text(json.dumps({"global_step": n}))
    with pytest.raises(GeReConfigError, match="--output_dir .* already holds checkpoints .*checkpoint-4"):
        script_resume_checkpoint(str(out), None)
    with pytest.raises(GeReConfigError, match="checkpoint-2 is older than checkpoint-4"):
        script_resume_checkpoint(str(out), str(out / "checkpoint-2"))
    with pytest.raises(GeReConfigError, match="does not exist"):
        script_resume_checkpoint(str(out), str(out / "checkpoint-9"))
    (tmp_path / "not-a-checkpoint").mkdir()
    with pytest.raises(GeReConfigError, match="trainer_state.json"):
        script_resume_checkpoint(str(out), str(tmp_path / "not-a-checkpoint"))
    assert script_resume_checkpoint(str(out), "true") == str(out / "checkpoint-4")
    assert script_resume_checkpoint(str(out), str(out / "checkpoint-4")) == str(out / "checkpoint-4")
    assert script_resume_checkpoint(str(tmp_path / "new"), str(out / "checkpoint-2")) == str(out / "checkpoint-2")


# ---------------------------------------------------------------------------------------------
# The TRL recipes (subprocesses)
# ---------------------------------------------------------------------------------------------
ENV = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="disabled",
           TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")


def _recipe(name: str, tiny_dir: Path, data: Path, out: Path, replay: Path, cache: Path, steps: int,
            *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "recipes" / "trl" / f"{name}_gere.py"), "--model_name_or_path", str(tiny_dir),
           "--dataset_name", str(data), "--output_dir", str(out), "--max_steps", str(steps),
           "--per_device_train_batch_size", "4", "--bf16", "false", "--use_cpu", "true", "--gradient_checkpointing",
           "false", "--report_to", "none", "--save_strategy", "steps", "--save_steps", "1", "--logging_steps", "1",
           "--gere_replay", str(replay), "--gere_replay_size", "32", "--gere_replay_max_length", "32",
           "--gere_replay_per_step", "1", "--gere_state_cache", str(cache), *extra]
    if name == "sft":
        cmd += ["--max_length", "64"]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_sft_recipe_resumes_and_refuses_to_overwrite_checkpoints(
    tmp_path: Path, tiny_dir: Path, replay_file: Path, sft_dataset: Any
) -> None:
    data = write_jsonl(tmp_path / "task.jsonl", sft_dataset.to_list())
    out, cache = tmp_path / "out", tmp_path / "states"
    first = _recipe("sft", tiny_dir, data, out, replay_file, cache, 2)
    assert first.returncode == 0, first.stderr[-3000:]
    before = _checkpoint_files(out)
    assert {"checkpoint-1/gere_state.json", "checkpoint-2/gere_state.json"} <= set(before)

    # the same command again (no resume flag) would restart from the base model and overwrite checkpoint-2
    again = _recipe("sft", tiny_dir, data, out, replay_file, cache, 2)
    assert again.returncode != 0 and "already holds checkpoints" in again.stderr and "Traceback" not in again.stderr
    # resuming with another replay schedule is refused
    changed = _recipe("sft", tiny_dir, data, out, replay_file, cache, 3, "--resume_from_checkpoint", "true",
                      "--gere_replay_per_step", "2")
    assert changed.returncode != 0 and "another replay set or schedule" in changed.stderr, changed.stderr[-2000:]
    assert _checkpoint_files(out) == before

    resumed = _recipe("sft", tiny_dir, data, out, replay_file, cache, 3, "--resume_from_checkpoint",
                      str(out / "checkpoint-2"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    assert [h["step"] for h in state["log_history"] if "loss" in h] == [1, 2, 3]  # steps 1-2 came from the checkpoint
    after = _checkpoint_files(out)
    assert {k: v for k, v in after.items() if not k.startswith("checkpoint-3")} == before


@pytest.mark.slow
def test_dpo_recipe_resumes(tmp_path: Path, tiny_dir: Path, replay_file: Path) -> None:
    rows = [{"prompt": f"Q{i}: is it good?", "chosen": " yes", "rejected": " no"} for i in range(16)]
    data = write_jsonl(tmp_path / "prefs.jsonl", rows)
    out, cache = tmp_path / "out", tmp_path / "states"
    first = _recipe("dpo", tiny_dir, data, out, replay_file, cache, 1)
    assert first.returncode == 0, first.stderr[-3000:]
    before = _checkpoint_files(out)
    resumed = _recipe("dpo", tiny_dir, data, out, replay_file, cache, 2, "--resume_from_checkpoint", "true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["global_step"] == 2
    assert {k: v for k, v in _checkpoint_files(out).items() if k.startswith("checkpoint-1")} == before


# ---------------------------------------------------------------------------------------------
# Axolotl: resume_from_checkpoint and auto_resume_from_checkpoints
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("how", ["resume_from_checkpoint", "auto_resume_from_checkpoints"])
def test_axolotl_resume_with_changed_replay_settings_is_refused(how: str, tmp_path: Path, tiny_dir: Path) -> None:
    """Axolotl hands the checkpoint path to trainer.train(); the GeRe trainer checks it before step 1.

    The checkpoint is the one a run with ``gere_replay_per_step: 2`` would leave (its gere_state.json
    carries that schedule and the real replay fingerprint); the YAML now asks for 3 rows per step.
    """
    pytest.importorskip("axolotl")
    import yaml
    from transformers import AutoTokenizer

    from gere_plugin.config import GeReArguments
    from gere_plugin.mixing import ReplaySchedule
    from gere_plugin.replay import ReplaySet

    from .test_axolotl_train import prepare_recipe, run

    cfg_path, raw = prepare_recipe("tiny-cpu-sft-full.yml", tmp_path, tiny_dir)
    args = GeReArguments(**{k: v for k, v in raw.items() if k.startswith("gere_")})
    replay = ReplaySet.from_args(args, AutoTokenizer.from_pretrained(str(tiny_dir)))
    ckpt = Path(raw["output_dir"]) / "checkpoint-2"
    ckpt.mkdir(parents=True)
    saved = {"schedule": ReplaySchedule(len(replay), 2, args.gere_seed).state_dict(),
             "replay_fingerprint": replay.fingerprint, "regularizer": "tm", "global_step": 2}
    (ckpt / "gere_state.json").write_text(json.dumps(saved))
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    before = _checkpoint_files(Path(raw["output_dir"]))
    assert raw["gere_replay_per_step"] == 3
    if how == "resume_from_checkpoint":
        raw["resume_from_checkpoint"] = str(ckpt)
    else:
        raw["auto_resume_from_checkpoints"] = True
    cfg_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    with pytest.raises(pytest.fail.Exception) as failed:  # run() fails the test on a non-zero exit: expected here
        run([sys.executable, "-m", "axolotl.cli.train", str(cfg_path)], tmp_path, tmp_path / "replay.jsonl")
    log = str(failed.value)
    assert "another replay set or schedule" in log and "gere_replay_per_step" in log, log[-3000:]
    assert "'per_step': 2" in log and "'per_step': 3" in log
    assert _checkpoint_files(Path(raw["output_dir"])) == before
    assert not (Path(raw["output_dir"]) / "checkpoint-3").exists()
