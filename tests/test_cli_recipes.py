"""The `gere` CLI, the TRL recipes run as written (with --gere_* flags), and the documented key table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gere_plugin.cli import main
from gere_plugin.config import gere_fields, keys_markdown

from .conftest import general_texts, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false")


def test_readme_documents_every_key_exactly_once():
    readme = (ROOT / "docs" / "configuration.md").read_text()
    assert keys_markdown() in readme, "docs/configuration.md key table is stale: paste the output of `gere keys`"
    for f in gere_fields():
        assert readme.count(f"| `{f.name}` |") == 1


def test_trl_parser_accepts_gere_flags():
    from trl import TrlParser

    from gere_plugin import GeReSFTConfig

    (cfg,) = TrlParser((GeReSFTConfig,)).parse_args_and_config(
        ["--output_dir", "x", "--bf16", "false", "--use_cpu", "true", "--gere_replay", "r.jsonl", "--gere_weight", "100",
         "--gere_layers", "-1", "-3", "--gere_regularizer", "l2", "--gere_freeze_embeddings", "true"]
    )
    assert cfg.gere_weight_value == 100.0 and cfg.gere_layers == [-1, -3] and cfg.gere_regularizer == "l2"
    assert cfg.gere_freeze_embeddings is True
    with pytest.raises(SystemExit):
        TrlParser((GeReSFTConfig,)).parse_args_and_config(["--output_dir", "x", "--gere_regularizer", "mse"])


def test_build_replay_samples_and_writes_atomically(tmp_path, capsys):
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"body": t} for t in general_texts(30, seed=4)] + [{"body": ""}])
    out = tmp_path / "sub" / "replay.jsonl"
    args = ["build-replay", "--from", str(corpus), "--out", str(out), "--gere_replay_text_field", "body"]
    assert main([*args, "--gere_replay_size", "12"]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 12 and len({r["text"] for r in rows}) == 12
    assert all(r["text"] for r in rows)
    assert not list(out.parent.glob(".*tmp*"))
    before = out.read_bytes()
    # an existing file is replaced only with --force; a failing --force run leaves it as it was
    assert main([*args, "--gere_replay_size", "12"]) == 2
    assert "already exists" in capsys.readouterr().err and out.read_bytes() == before
    assert main([*args, "--gere_replay_size", "100", "--force"]) == 2
    assert "--gere_replay_size 100" in capsys.readouterr().err and out.read_bytes() == before
    # unset size: every usable text, at most 1000
    assert main([*args, "--force"]) == 0
    assert len(out.read_text().splitlines()) == 30


def test_build_replay_old_spellings_still_work(tmp_path, capsys):
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"body": t} for t in general_texts(30, seed=4)])
    new, old = tmp_path / "new.jsonl", tmp_path / "old.jsonl"
    assert main(["build-replay", "--from", str(corpus), "--out", str(new), "--gere_replay_size", "7", "--gere_seed", "3",
                 "--gere_replay_text_field", "body"]) == 0
    capsys.readouterr()
    assert main(["build-replay", "--from", str(corpus), "--out", str(old), "--size", "7", "--seed", "3",
                 "--text-field", "body"]) == 0
    err = capsys.readouterr().err
    assert old.read_bytes() == new.read_bytes()
    for flag, canonical in (("--size", "--gere_replay_size"), ("--seed", "--gere_seed"),
                            ("--text-field", "--gere_replay_text_field")):
        assert f"{flag} is deprecated, use {canonical}" in err


def test_cache_states_cli_builds_a_reusable_cache(tmp_path, tiny_dir, replay_file):
    cache = tmp_path / "states"
    rc = main(["cache-states", "--model", str(tiny_dir), "--gere_replay", str(replay_file), "--gere_replay_size", "32",
               "--gere_replay_max_length", "32", "--gere_state_cache", str(cache)])
    assert rc == 0
    meta = json.loads((cache / "meta.json").read_text())
    assert meta["num_samples"] == 32 and meta["hidden_size"] == 32


def test_keys_check(tmp_path):
    good = tmp_path / "a.md"
    good.write_text("intro\n" + keys_markdown())
    assert main(["keys", "--check", str(good)]) == 0
    bad = tmp_path / "b.md"
    bad.write_text("no table")
    assert main(["keys", "--check", str(bad)]) == 1


@pytest.mark.slow
def test_sft_recipe_runs_with_gere_flags(tmp_path, tiny_dir, replay_file, sft_dataset):
    data = write_jsonl(tmp_path / "task.jsonl", sft_dataset.to_list())
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "recipes/trl/sft_gere.py"), "--model_name_or_path", str(tiny_dir),
           "--dataset_name", str(data), "--output_dir", str(out), "--max_steps", "2", "--per_device_train_batch_size", "4",
           "--bf16", "false", "--use_cpu", "true", "--gradient_checkpointing", "false", "--report_to", "none",
           "--save_strategy", "no", "--logging_steps", "1", "--max_length", "64",
           "--gere_replay", str(replay_file), "--gere_replay_size", "32", "--gere_replay_max_length", "32",
           "--gere_replay_per_step", "1", "--gere_state_cache", str(tmp_path / "states"), "--gere_freeze_layers", "1",
           "--use_peft", "--lora_r", "4", "--lora_target_modules", "q_proj", "v_proj"]
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "gere/reg_loss" in r.stdout + r.stderr
    assert (out / "adapter_model.safetensors").exists()
    assert (tmp_path / "states" / "meta.json").exists()


@pytest.mark.slow
def test_dpo_recipe_runs_with_gere_flags(tmp_path, tiny_dir, replay_file):
    rows = [{"prompt": f"Q{i}: is it good?", "chosen": " yes", "rejected": " no"} for i in range(16)]
    data = write_jsonl(tmp_path / "prefs.jsonl", rows)
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "recipes/trl/dpo_gere.py"), "--model_name_or_path", str(tiny_dir),
           "--dataset_name", str(data), "--output_dir", str(out), "--max_steps", "2", "--per_device_train_batch_size", "4",
           "--bf16", "false", "--use_cpu", "true", "--gradient_checkpointing", "false", "--report_to", "none",
           "--save_strategy", "no", "--logging_steps", "1",
           "--gere_replay", str(replay_file), "--gere_replay_size", "32", "--gere_replay_max_length", "32",
           "--gere_replay_per_step", "1", "--gere_state_cache", str(tmp_path / "states"), "--gere_regularizer", "tm"]
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "gere/reg_loss" in r.stdout + r.stderr and "rewards/margins" in r.stdout + r.stderr


@pytest.mark.slow
def test_grpo_recipe_runs_with_gere_flags(tmp_path, tiny_dir, replay_file):
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": t} for t in general_texts(16, seed=9, max_words=6)])
    out = tmp_path / "out"
    reward = f"{ROOT / 'recipes/axolotl/tiny_rewards.py'}:vowel_share_reward"
    cmd = [sys.executable, str(ROOT / "recipes/trl/grpo_gere.py"), "--model_name_or_path", str(tiny_dir),
           "--dataset_name", str(data), "--output_dir", str(out), "--max_steps", "2", "--per_device_train_batch_size", "4",
           "--num_generations", "2", "--max_completion_length", "8", "--use_vllm", "false", "--reward_funcs", reward,
           "--bf16", "false", "--use_cpu", "true", "--gradient_checkpointing", "false", "--report_to", "none",
           "--save_strategy", "no", "--logging_steps", "1",
           "--gere_replay", str(replay_file), "--gere_replay_size", "32", "--gere_replay_max_length", "32",
           "--gere_state_cache", str(tmp_path / "states")]
    r = subprocess.run(cmd, env=dict(ENV, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    log = r.stdout + r.stderr
    assert "gere/reg_loss" in log and "rewards/vowel_share_reward/mean" in log
    # the default replay rows count prompts: 4 completions / 2 generations = 2 prompts -> 1 row
    assert "gere: 1 replay rows per optimizer step" in log and "loss family grpo" in log
    assert (out / "model.safetensors").exists()
    bad = subprocess.run([*cmd[:cmd.index("--reward_funcs") + 1], "no_such_reward", *cmd[cmd.index("--reward_funcs") + 2:]],
                         env=ENV, capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "--reward_funcs no_such_reward" in bad.stderr


def _readme_trl_snippet() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### TRL"):]
    return section[section.index("```python") + len("```python"):section.index("```", section.index("```python") + 9)]


@pytest.mark.slow
def test_readme_trl_snippet_runs_as_written_on_a_small_replay_file(tmp_path, tiny_dir, sft_dataset):
    """The README's TRL example, unchanged, next to a model folder, a task file and a 20-text replay file."""
    import shutil

    snippet = _readme_trl_snippet()
    assert "GeReSFTTrainer(" in snippet and "trainer.train()" in snippet
    shutil.copytree(tiny_dir, tmp_path / "base-model")
    write_jsonl(tmp_path / "task.jsonl", sft_dataset.to_list()[:32])
    write_jsonl(tmp_path / "replay.jsonl", [{"text": t} for t in general_texts(20, seed=7)])
    r = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, env=dict(ENV, OMP_NUM_THREADS="1"),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "out" / "base-states" / "meta.json").is_file()
    # the one line GeRe prints at train start, visible at TRL's default log level
    line = next(x for x in r.stderr.splitlines() if x.startswith("gere: 4 replay rows per optimizer step"))
    assert "20 samples" in line and "regularizer tm" in line and "state cache out/base-states built" in line
    assert "nothing frozen" in line
