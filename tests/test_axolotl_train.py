"""End-to-end: ``axolotl train`` with the GeRe plugin on CPU: SFT and DPO (full and LoRA), GRPO (full).

Each test copies a ``recipes/axolotl/tiny-cpu-*.yml`` recipe, points it at the tiny random Llama
from ``conftest.py`` and a temporary output folder, runs Axolotl in a subprocess (exactly as a user
would), and then checks from the run's own artefacts that GeRe really ran:

* ``gere/*`` metrics in ``trainer_state.json``'s log history, TM == 0 at the first step (the model
  still equals the base model) and > 0 afterwards;
* the exact replay rows of every micro-batch (``GERE_REPLAY_LOG``) against the replay schedule;
* frozen layers bit-identical to the base model (full), or LoRA ``lora_B`` still exactly zero
  inside frozen layers (LoRA);
* the replay-schedule state written next to the checkpoint.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import yaml

from .scripts import runner

pytest.importorskip("axolotl")

from gere_plugin.axolotl.args import PLUGIN_PATH  # noqa: E402
from gere_plugin.axolotl.compat import axolotl_facts  # noqa: E402

NEW_AXOLOTL = axolotl_facts().loads_entry_points  # >= 0.21: the gere_* keys alone run GeRe

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes" / "axolotl"
VENV_BIN = Path(sys.executable).parent


def prepare_recipe(name: str, tmp_path: Path, model_dir: Path, plugin_line: bool = True) -> tuple[Path, dict]:
    """Copy a tiny recipe with base_model / output_dir / data paths made absolute for this test.

    ``plugin_line=False`` drops the ``plugins:`` line (the keys alone: enough on Axolotl >= 0.21).
    """
    raw = yaml.safe_load((RECIPES / name).read_text())
    assert raw["plugins"] == [PLUGIN_PATH], "the recipes use the README's documented plugin line"
    if not plugin_line:
        del raw["plugins"]
    raw["base_model"] = str(model_dir)
    raw["output_dir"] = str(tmp_path / "out")
    raw["dataset_prepared_path"] = str(tmp_path / "prepared")
    for ds in raw["datasets"]:
        ds["path"] = str(REPO / ds["path"])
    if "gere_replay" in raw:
        raw["gere_replay"] = str(REPO / raw["gere_replay"])
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path, raw


def run(cmd: list[str], cwd: Path, replay_log: Path, expect_fail: bool = False, importable_repo: bool = False) -> str:
    env = runner.child_env(replay_log)  # offline, 1 thread, no leaked ACCELERATE_LOG_LEVEL / rank vars
    env.update(AXOLOTL_DO_NOT_TRACK="1", PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}")
    if importable_repo:  # the GRPO recipe names its reward function by a dotted path from the repository root
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=480)
    out = proc.stdout + proc.stderr
    if expect_fail:
        if proc.returncode == 0:
            pytest.fail(f"{' '.join(cmd)} succeeded although it should fail:\n{out[-3000:]}")
    elif proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} failed with exit code {proc.returncode}:\n{out[-6000:]}")
    return out


def axolotl_train(cfg_path: Path, tmp_path: Path, cli: bool = False) -> str:
    """``axolotl train`` (accelerate launcher, the user's command) or ``python -m axolotl.cli.train``."""
    if cli:
        cmd = [str(VENV_BIN / "axolotl"), "train", str(cfg_path)]
    else:
        cmd = [sys.executable, "-m", "axolotl.cli.train", str(cfg_path)]
    return run(cmd, tmp_path, tmp_path / "replay.jsonl", importable_repo=True)


def train_with_gere(cfg_path: Path, tmp_path: Path, cli: bool = False) -> str:
    """``axolotl train`` that must set GeRe up exactly once (one plugin instance acts, whatever the YAML)."""
    log = axolotl_train(cfg_path, tmp_path, cli=cli)
    assert log.count("gere: trainer runs as") == 1, "GeRe must be set up exactly once"
    return log


def load_safetensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def check_gere_ran(raw: dict, tmp_path: Path) -> list[dict]:
    """The checks shared by every run; returns the log history of the training steps."""
    from gere_plugin.mixing import ReplaySchedule

    out = Path(raw["output_dir"])
    steps = int(raw["max_steps"])
    per_step = int(raw["gere_replay_per_step"])
    accumulation = int(raw["gradient_accumulation_steps"])
    ckpt = out / f"checkpoint-{steps}"

    history = [h for h in json.loads((ckpt / "trainer_state.json").read_text())["log_history"] if "loss" in h]
    assert [h["step"] for h in history] == list(range(1, steps + 1))
    for h in history:
        for key in (
            "gere/task_loss",
            "gere/replay_ce",
            "gere/reg_loss",
            "gere/out_of_state",
            "gere/replay_rows",
        ):
            assert key in h, f"{key} missing from step {h['step']}: {sorted(h)}"
        # the weight is logged exactly on the steps whose regularizer is not 0
        assert ("gere/weight" in h) == (h["gere/reg_loss"] != 0), h
        assert h["gere/replay_rows"] == per_step
        assert h["gere/replay_ce"] > 0
    # step 1 trains the base model itself: every replay hidden state is in its base state
    assert history[0]["gere/reg_loss"] < 1e-6
    assert history[0]["gere/out_of_state"] < 1e-6
    assert max(h["gere/reg_loss"] for h in history[1:]) > 0

    # exact replay rows of every micro-batch
    entries = [
        json.loads(line) for line in (tmp_path / "replay.jsonl").read_text().splitlines() if line.strip()
    ]
    by_step: dict[int, list[dict]] = defaultdict(list)
    for e in entries:
        by_step[e["step"]].append(e)
    assert sorted(by_step) == list(range(steps))
    schedule = ReplaySchedule(int(raw["gere_replay_size"]), per_step, int(raw.get("gere_seed", 42)))
    for step, micro in by_step.items():
        assert [m["micro"] for m in micro] == list(range(accumulation))
        rows = [r for m in micro for r in m["rows"]]
        assert len(rows) == per_step
        assert sorted(rows) == sorted(schedule.rows_for_step(step))

    state = json.loads((ckpt / "gere_state.json").read_text())
    assert state["global_step"] == steps
    assert state["schedule"]["per_step"] == per_step
    return history


def check_full_freeze(raw: dict, base_dir: Path) -> None:
    base = load_safetensors(base_dir / "model.safetensors")
    tuned = load_safetensors(Path(raw["output_dir"]) / "model.safetensors")
    n = int(raw["gere_freeze_layers"])
    frozen = [k for k in base if any(f"layers.{i}." in k for i in range(n))]
    if raw.get("gere_freeze_embeddings"):
        frozen.append("model.embed_tokens.weight")
    assert frozen
    for k in frozen:
        assert (tuned[k] == base[k]).all(), f"{k} changed although it is frozen"
    trainable = [k for k in base if k not in frozen and "layers." in k]
    assert any(not (tuned[k] == base[k]).all() for k in trainable), "nothing was trained"


def check_lora_freeze(raw: dict) -> None:
    adapter = load_safetensors(Path(raw["output_dir"]) / "adapter_model.safetensors")
    n = int(raw["gere_freeze_layers"])
    lora_b = {k: v for k, v in adapter.items() if "lora_B" in k}
    frozen = {k: v for k, v in lora_b.items() if any(f"layers.{i}." in k for i in range(n))}
    assert frozen, sorted(adapter)[:5]
    for k, v in frozen.items():
        assert (v == 0).all(), f"{k} moved from its zero init although layer is frozen"
    assert any((v != 0).any() for k, v in lora_b.items() if k not in frozen), "no adapter weight was trained"


def test_sft_full_with_axolotl_train_cli(tmp_path, tiny_dir):
    cfg, raw = prepare_recipe("tiny-cpu-sft-full.yml", tmp_path, tiny_dir)
    train_with_gere(cfg, tmp_path, cli=True)
    check_gere_ran(raw, tmp_path)
    check_full_freeze(raw, tiny_dir)
    assert (Path(raw["output_dir"]) / "gere_states" / "meta.json").exists()


def test_sft_lora_reuses_cache_built_by_axolotl_gere_build_cache(tmp_path, tiny_dir):
    import torch

    from gere_plugin.config import GeReArguments
    from gere_plugin.replay import ReplaySet
    from gere_plugin.states import StateCache, build_state_cache

    cfg, raw = prepare_recipe("tiny-cpu-sft-lora.yml", tmp_path, tiny_dir)
    run([str(VENV_BIN / "axolotl"), "gere", "build-cache", str(cfg)], tmp_path, tmp_path / "unused.jsonl")
    cache_dir = Path(raw["output_dir"]) / "gere_states"
    meta = json.loads((cache_dir / "meta.json").read_text())
    assert meta["built_by"] == "axolotl gere build-cache"

    # the cache equals one built directly from the base model with the core API
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_dir))
    args = GeReArguments(**{k: v for k, v in raw.items() if k.startswith("gere_")})
    replay = ReplaySet.from_args(args, tok)
    direct = build_state_cache(
        AutoModelForCausalLM.from_pretrained(str(tiny_dir), dtype=torch.float32),
        replay,
        [-1],
        1.0,
        batch_size=8,
        pad_token_id=tok.pad_token_id,
        progress=False,
    )
    built = StateCache.load(cache_dir)
    assert built.meta["replay_fingerprint"] == direct.meta["replay_fingerprint"]
    torch.testing.assert_close(built.mu, direct.mu, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(built.std, direct.std, atol=1e-5, rtol=1e-5)

    log = train_with_gere(cfg, tmp_path)
    assert "gere: reusing base-model state cache" in log
    check_gere_ran(raw, tmp_path)
    check_lora_freeze(raw)
    # training loaded the cache instead of rebuilding it
    assert json.loads((cache_dir / "meta.json").read_text()) == meta


def test_dpo_full(tmp_path, tiny_dir):
    cfg, raw = prepare_recipe("tiny-cpu-dpo-full.yml", tmp_path, tiny_dir)
    train_with_gere(cfg, tmp_path)
    history = check_gere_ran(raw, tmp_path)
    assert all("rewards/margins" in h for h in history), "not a DPO run"
    check_full_freeze(raw, tiny_dir)


def test_dpo_lora(tmp_path, tiny_dir):
    cfg, raw = prepare_recipe("tiny-cpu-dpo-lora.yml", tmp_path, tiny_dir)
    train_with_gere(cfg, tmp_path)
    history = check_gere_ran(raw, tmp_path)
    assert all("rewards/margins" in h for h in history), "not a DPO run"
    check_lora_freeze(raw)


@pytest.mark.parametrize("recipe", ["tiny-cpu-sft-full.yml", "tiny-cpu-dpo-lora.yml"])
def test_without_the_plugin_line(recipe, tmp_path, tiny_dir):
    """The same recipe with no ``plugins:`` line: GeRe runs on Axolotl >= 0.21 (entry point); on 0.19,
    where Axolotl would silently drop the keys, ``axolotl gere check`` refuses the YAML and says why."""
    cfg, raw = prepare_recipe(recipe, tmp_path, tiny_dir, plugin_line=False)
    if not NEW_AXOLOTL:
        out = run([str(VENV_BIN / "axolotl"), "gere", "check", str(cfg)], tmp_path, tmp_path / "unused.jsonl",
                  expect_fail=True)
        assert "silently drops" in out and PLUGIN_PATH in out
        return
    train_with_gere(cfg, tmp_path)
    history = check_gere_ran(raw, tmp_path)
    if raw.get("rl"):
        assert all("rewards/margins" in h for h in history), "not a DPO run"
        check_lora_freeze(raw)
    else:
        check_full_freeze(raw, tiny_dir)


def test_sft_flow_and_ewc_without_replay(tmp_path, tiny_dir):
    """FLOW + EWC from YAML keys alone (no replay set): the weights are logged every step, the base losses
    are cached, and the run writes its EWC state (Fisher + anchor) next to the model for the next task."""
    from gere_plugin.ewc import EWCState

    cfg, raw = prepare_recipe("tiny-cpu-sft-flow-ewc.yml", tmp_path, tiny_dir)
    log = train_with_gere(cfg, tmp_path)
    assert "FLOW weights exp(-base_loss/" in log and "EWC lambda 100" in log
    out = Path(raw["output_dir"])
    history = [h for h in json.loads((out / f"checkpoint-{raw['max_steps']}" / "trainer_state.json").read_text())
               ["log_history"] if "loss" in h]
    assert [h["step"] for h in history] == [1, 2, 3]
    for h in history:
        assert 0 < h["gere/flow_weight"] < 1  # exp(-base_loss / median): every weight is below 1
        assert h["gere/flow_ce"] > h["gere/task_loss"]  # the weighted loss is below the plain CE
        assert h["loss"] == pytest.approx(h["gere/task_loss"], rel=1e-4)  # no replay, no penalty yet
        assert "gere/replay_ce" not in h and "gere/ewc_penalty" not in h
    flow = json.loads((out / "gere_flow" / "meta.json").read_text())
    assert flow["kind"] == "gere_flow" and flow["num_samples"] > 0
    state = EWCState.load(out / "gere_ewc")
    assert state.meta["tasks"] == 1 and state.meta["samples"] == raw["gere_ewc_samples"]
    assert "model.layers.0.self_attn.q_proj.weight" in state.fisher


def test_sft_full_with_wise_saves_the_interpolated_model(tmp_path, tiny_dir):
    """``gere_wise_alpha`` from the YAML (with replay and the freeze): the model Axolotl saves after training is
    ``(1 - alpha) * base + alpha * trained``, trained = the last checkpoint (written before the interpolation);
    frozen tensors stay the base's."""
    import torch

    cfg, raw = prepare_recipe("tiny-cpu-sft-full.yml", tmp_path, tiny_dir)
    raw["gere_wise_alpha"] = 0.25
    cfg.write_text(yaml.safe_dump(raw, sort_keys=False))
    log = train_with_gere(cfg, tmp_path)
    assert "WiSE-FT after training: theta <- 0.75 * theta_before + 0.25 * theta_after" in log
    base = load_safetensors(tiny_dir / "model.safetensors")
    trained = load_safetensors(Path(raw["output_dir"]) / f"checkpoint-{raw['max_steps']}" / "model.safetensors")
    final = load_safetensors(Path(raw["output_dir"]) / "model.safetensors")
    moved = [k for k in base if not torch.equal(trained[k], base[k])]
    assert moved and "model.embed_tokens.weight" not in moved
    for k in base:
        expected = 0.75 * base[k].double() + 0.25 * trained[k].double()
        torch.testing.assert_close(final[k].double(), expected, rtol=0, atol=1e-6)


def add_monitor(cfg: Path, raw: dict, tmp_path: Path, task_rows: int) -> None:
    """Turn the forgetting monitor on in a copied recipe: 16 held-out texts, a pass at step 0, every 2
    steps and at the last step."""
    from .conftest import general_texts, write_jsonl

    heldout = write_jsonl(tmp_path / "heldout.jsonl", [{"text": t} for t in general_texts(24, seed=99)])
    raw.update(gere_monitor=str(heldout), gere_monitor_steps=2, gere_monitor_size=16, gere_monitor_max_length=32,
               gere_monitor_task_size=task_rows)
    cfg.write_text(yaml.safe_dump(raw, sort_keys=False))


def monitor_records(raw: dict) -> tuple[Path, list[dict], dict[int, dict]]:
    """The last checkpoint, its whole log history and the records holding monitor metrics, by step."""
    ckpt = Path(raw["output_dir"]) / f"checkpoint-{raw['max_steps']}"
    history = json.loads((ckpt / "trainer_state.json").read_text())["log_history"]
    monitor = {int(h["step"]): h for h in history if "gere/monitor_ppl" in h}
    assert sorted(monitor) == [0, 2, 3], "step 0, every 2 steps and the last step"
    assert monitor[0]["gere/monitor_kl"] == 0.0 and monitor[0]["gere/monitor_ppl_rise"] == 0.0
    assert monitor[0]["gere/monitor_task_kl"] == 0.0
    assert monitor[3]["gere/monitor_kl"] > 0 and monitor[3]["gere/monitor_task_kl"] > 0
    return ckpt, history, monitor


def test_sft_monitor_only_without_replay(tmp_path, tiny_dir):
    """Only ``gere_monitor`` keys (no replay): the forgetting monitor runs on a plain Axolotl SFT run."""
    cfg, raw = prepare_recipe("tiny-cpu-sft-full.yml", tmp_path, tiny_dir)
    for key in [k for k in raw if k.startswith("gere_")]:
        del raw[key]
    add_monitor(cfg, raw, tmp_path, task_rows=4)
    log = train_with_gere(cfg, tmp_path)
    assert "forgetting monitor=on" in log
    ckpt, history, _ = monitor_records(raw)
    assert not any("gere/replay_ce" in h for h in history), "no replay in a monitor-only run"
    assert (ckpt / "gere_monitor_rank0.safetensors").is_file()
    # nothing was frozen and no state cache was built without replay
    assert not (Path(raw["output_dir"]) / "gere_states").exists()


def test_grpo_full_with_axolotl_train_cli(tmp_path, tiny_dir):
    """``rl: grpo`` (online RL, rule-based reward, no vLLM) through the real ``axolotl train`` CLI, with
    the forgetting monitor on (issue 15: the monitor in GRPO from Axolotl YAML): its metrics land in the
    run's log history next to GRPO's reward, KL 0 at step 0 and > 0 after the updates."""
    cfg, raw = prepare_recipe("tiny-cpu-grpo-full.yml", tmp_path, tiny_dir)
    add_monitor(cfg, raw, tmp_path, task_rows=2)
    log = train_with_gere(cfg, tmp_path, cli=True)
    assert "loss family=grpo" in log and "combine=sum" in log and "forgetting monitor=on" in log
    history = check_gere_ran(raw, tmp_path)
    assert all("reward" in h and "completions/mean_length" in h for h in history), "not a GRPO run"
    _, _, monitor = monitor_records(raw)
    assert "reward" in monitor[3], "the monitor logs in the same record as GRPO's own metrics"
    # the GRPO weight is matched to the replay CE: never negative, and w * R == CE_replay per micro-batch
    weights = [h["gere/weight"] for h in history if "gere/weight" in h]
    assert weights and min(weights) >= 0
    check_full_freeze(raw, tiny_dir)


def test_sft_full_with_earlier_tasks(tmp_path, tiny_dir):
    """``gere_task_replay`` from Axolotl YAML: exact earlier-task rows per step next to the general replay."""
    from gere_plugin.mixing import ReplaySchedule

    earlier = tmp_path / "earlier-task.jsonl"
    earlier.write_text("".join(
        json.dumps({"prompt": f"Question {i}: is the river {w}?\nAnswer:", "completion": " yes" if i % 2 else " no"}) + "\n"
        for i, w in enumerate(("long", "wide", "cold", "deep", "calm", "old"))))
    cfg, raw = prepare_recipe("tiny-cpu-sft-full.yml", tmp_path, tiny_dir)
    raw.update(gere_task_replay=[str(earlier)], gere_task_replay_size=6, gere_task_replay_per_step=2)
    cfg.write_text(yaml.safe_dump(raw, sort_keys=False))
    log = train_with_gere(cfg, tmp_path)
    assert "2 earlier-task rows per optimizer step from 6 rows of 1 earlier tasks" in log
    history = check_gere_ran(raw, tmp_path)  # the general replay keeps its own rows per step
    assert [h["gere/task_replay_rows"] for h in history] == [2.0] * int(raw["max_steps"])
    assert all(h["gere/task_replay_ce"] > 0 for h in history)
    schedule = ReplaySchedule(6, 2, int(raw.get("gere_seed", 42)), stream=1)
    entries = [json.loads(line) for line in (tmp_path / "replay.jsonl").read_text().splitlines() if line.strip()]
    by_step: dict[int, list[int]] = defaultdict(list)
    for e in entries:
        by_step[e["step"]].extend(e["task_rows"])
    assert {s: sorted(r) for s, r in by_step.items()} == {
        s: sorted(schedule.rows_for_step(s)) for s in range(int(raw["max_steps"]))}
    state = json.loads((Path(raw["output_dir"]) / f"checkpoint-{raw['max_steps']}" / "gere_state.json").read_text())
    assert state["task_replay"]["kept"] == [6]
