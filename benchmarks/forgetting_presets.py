"""The forgetting benchmark's presets and learning rates: :data:`PRESETS` (tasks, methods, seeds, sizes and
schedule of each preset), the task sequence (:func:`build_tasks`), the settings every method of a preset shares
(:func:`preset_settings`, :func:`method_settings`) and the per-method learning rate (a fixed table or the
selection on the first task's dev split). Used by ``forgetting.py``, which re-exports these names."""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import set_offline_defaults  # noqa: E402

set_offline_defaults()  # before transformers / datasets are imported

from gere_plugin import assets  # noqa: E402
from gere_plugin.continual import (  # noqa: E402
    METHODS,
    RECOMMENDED,
    WISE_ALPHA_GRID,
    SequenceTask,
    TrainSettings,
    evaluate_stage,
    run_sequence,
)

# Methods of the fair preset: 3 seeds each. "gere" is the package's default weighting; "gere_paper"
# the paper's exact rule (uncapped dynamic weight, violations reduction); "l2" the best
# feature-distillation baseline of the earlier cpu-medium run (best AP and cloze of KL/L1/L2).
FAIR_METHODS = ["plain", "replay", "gere", "gere_paper", "gere_freeze", "l2"]

PRESETS: dict[str, dict[str, Any]] = {
    "smoke": {  # checks the script end to end; numbers are meaningless
        "tasks": ["sst2", "wiki_topic"], "methods": ["plain", "gere"], "seeds": [1], "steps": 2, "batch_size": 4,
        "lr_grid": [3e-4, 1e-3], "lr_seed": 1, "warmup_ratio": 0.1, "scheduler": "cosine",
        "n_train": {"sst2": 32, "wiki_topic": 32}, "n_test": 16, "n_dev": 8, "clip_chars": 200,
        "wiki_texts": 8, "sciq_texts": 8, "ppl_max_length": 96, "cloze": {"arc_easy": 8}, "replay_size": 32,
        "replay_max_length": 64, "general_every_task": False,
    },
    # The issue-12 protocol on 2 CPU cores: learnable tasks, warm-up + cosine, per-method lr chosen on
    # the first task's dev split, 3 seeds; fp32, short rows (<= ~70 tokens), 500 ARC-Easy items.
    "cpu-fair": {
        "tasks": ["sst2", "wiki_topic", "mmlu_domain"], "methods": FAIR_METHODS, "seeds": [1, 2, 3], "steps": 40,
        "batch_size": 8, "lr_grid": [1e-4, 2e-4, 4e-4], "lr_seed": 1, "warmup_ratio": 0.1, "scheduler": "cosine",
        "n_train": {"sst2": 400, "wiki_topic": 400, "mmlu_domain": 400}, "n_test": 200, "n_dev": 100,
        "clip_chars": 200, "wiki_texts": 80, "sciq_texts": 64, "ppl_max_length": 96, "cloze": {"arc_easy": 500},
        "replay_size": 1000, "replay_max_length": 48, "general_every_task": False,
    },
    # Legacy (sessions 1-2): constant lr after 3 warm-up steps, no lr selection, BoolQ in the sequence.
    "cpu-small": {
        "tasks": ["sst2", "boolq", "wiki_topic"], "methods": ["plain", "gere", "replay"], "seeds": [1], "steps": 12,
        "batch_size": 6, "lr": 3e-4, "n_train": {"sst2": 400, "boolq": 400, "wiki_topic": 400}, "n_test": 100,
        "clip_chars": 200, "wiki_texts": 80, "sciq_texts": 48, "ppl_max_length": 96, "cloze": {"arc_easy": 150},
        "replay_size": 1000, "replay_max_length": 48, "general_every_task": False,
    },
    "cpu-medium": {
        "tasks": ["sst2", "boolq", "wiki_topic"], "methods": ["plain", "replay", "gere"], "seeds": [1, 2], "steps": 30,
        "batch_size": 6, "lr": 2e-4, "n_train": {"sst2": 400, "boolq": 400, "wiki_topic": 400}, "n_test": 100,
        "clip_chars": 200, "wiki_texts": 80, "sciq_texts": 48, "ppl_max_length": 96, "cloze": {"arc_easy": 300},
        "replay_size": 1000, "replay_max_length": 48, "general_every_task": False,
    },
    "full": {  # GPU advised
        "tasks": ["sst2", "wiki_topic", "mmlu_domain"], "methods": list(METHODS), "seeds": [1, 2, 3], "steps": 100,
        "batch_size": 8, "lr_grid": [5e-5, 1e-4, 2e-4, 4e-4], "lr_seed": 1, "warmup_ratio": 0.1,
        "scheduler": "cosine", "n_train": {"sst2": 500, "wiki_topic": 1200, "mmlu_domain": 1200}, "n_test": 300,
        "n_dev": 150, "clip_chars": 320, "wiki_texts": 300, "sciq_texts": 300, "ppl_max_length": 128,
        "cloze": {"arc_easy": 570, "piqa": 1000, "sciq": 500},
        "replay_size": 1000, "replay_max_length": 128, "general_every_task": True,
    },
}
# The second sequence (cpu-seq2): another kind of task than cpu-fair's label-word classification.
SEQ2_METHODS = ["plain", "replay", RECOMMENDED]  # plain SFT, vanilla replay and the recommended preset
#: cpu-seq2's fixed learning rates: no grid search on this sequence (a 3-value grid triples the runs on 2 CPU
#: cores). Carried over from cpu-fair's dev-split selection (forgetting_cpu-fair.json, lr_selection).
SEQ2_LEARNING_RATES = {"plain": 1e-4, "replay": 1e-4, "gere": 2e-4, "gere_paper": 2e-4, "gere_er": 2e-4,
                       "der": 2e-4, "der_paper": 2e-4}
SEQ2_LR_NOTE = ("fixed, not selected on this sequence: cpu-fair's choices on the SST-2 dev split (grid 1e-4 / 2e-4 / "
                "4e-4, benchmarks/results/forgetting_cpu-fair.json lr_selection): plain and replay 1e-4, gere, "
                "gere_paper and gere_er 2e-4; der and der_paper (not in that selection) take gere_er's 2e-4 "
                "(the same TM term and earlier-task replay)")
PRESETS["cpu-seq2"] = {
    # SciQ short-answer QA (generative, exact match) -> Social IQa (3-way multiple-choice reasoning, letters);
    # cpu-fair's schedule, sizes and general evaluation; rows <= 117 SmolLM2 tokens
    "tasks": ["sciq_qa", "social_iqa"], "methods": SEQ2_METHODS, "seeds": [1, 2], "steps": 40, "batch_size": 8,
    "lr_by_method": SEQ2_LEARNING_RATES, "lr_note": SEQ2_LR_NOTE, "warmup_ratio": 0.1, "scheduler": "cosine",
    "n_train": {"sciq_qa": 300, "social_iqa": 400}, "n_test": {"sciq_qa": 150, "social_iqa": 200},
    "n_dev": {"sciq_qa": 50, "social_iqa": 100}, "wiki_texts": 80, "sciq_texts": 64, "ppl_max_length": 96,
    "cloze": {"arc_easy": 500}, "replay_size": 1000, "replay_max_length": 48, "general_every_task": False,
}
# For a CUDA GPU and the Hub (not run in CI): cpu-fair's tasks, methods and seeds on a larger instruct model.
PRESETS["gpu-hub"] = {
    **PRESETS["cpu-fair"], "model": "Qwen/Qwen2.5-0.5B-Instruct", "bf16": True, "steps": 100,
    "lr_grid": [1e-5, 2e-5, 5e-5], "clip_chars": 320, "replay_max_length": 128, "ppl_max_length": 128,
    "wiki_texts": 300, "sciq_texts": 300, "cloze": {"arc_easy": 570, "piqa": 1000},
}
DEFAULT_PRESET = "cpu-fair"


def build_label_tasks(cfg: dict[str, Any], splits: assets.WikiSplits, data_seed: int, n_tune: int = 0) -> list[Any]:
    """The preset's tasks as :mod:`gere_plugin.assets` builds them (fixed data seed: identical for every method and
    seed), with dev splits and, with ``n_tune``, a tune split of that many items per task that leaves the other
    splits as they are. ``n_test`` / ``n_dev`` are one size for every task or ``{task: size}``."""
    n_train, chars = cfg["n_train"], cfg.get("clip_chars", 200)

    def size(key: str, name: str) -> int:
        value = cfg.get(key, 0)
        return int(value[name]) if isinstance(value, dict) else int(value)

    def sizes(name: str) -> dict[str, int]:
        return {"n_train": n_train[name], "n_test": size("n_test", name), "seed": data_seed, "n_dev": size("n_dev", name),
                "n_tune": n_tune}

    builders = {
        "sst2": lambda: assets.sst2_task(**sizes("sst2")),
        "boolq": lambda: assets.boolq_task(**sizes("boolq"), passage_chars=chars),
        "wiki_topic": lambda: assets.wiki_topic_task(splits, **sizes("wiki_topic"), text_chars=chars),
        "mmlu_domain": lambda: assets.mmlu_domain_task(**sizes("mmlu_domain"), text_chars=chars),
        "sciq_qa": lambda: assets.sciq_qa_task(**sizes("sciq_qa")),
        "social_iqa": lambda: assets.social_iqa_task(**sizes("social_iqa")),
    }
    return [builders[name]() for name in cfg["tasks"]]


def build_tasks(cfg: dict[str, Any], splits: assets.WikiSplits, data_seed: int) -> list[SequenceTask]:
    """The preset's task sequence (:func:`build_label_tasks`) as the runner takes it: train, test and dev items."""
    return [SequenceTask.from_label_task(task) for task in build_label_tasks(cfg, splits, data_seed)]


def preset_settings(cfg: dict[str, Any], steps: int, lr: Optional[float] = None, batch_size: Optional[int] = None,
                    max_length: int = 128, replay_per_step: int = 2, data_seed: int = 1234,
                    bf16: bool = False) -> TrainSettings:
    """The runner settings every method of a preset shares (``lr``: one rate for all, else the middle value of
    the grid (or of the fixed table) until each method's own rate replaces it; legacy presets: their constant
    rate)."""
    if "lr_grid" in cfg or "lr_by_method" in cfg:  # the fair protocol: warm-up ratio + decay, lr per method
        schedule: dict[str, Any] = {"lr_scheduler_type": cfg["scheduler"], "warmup_ratio": cfg["warmup_ratio"]}
        rates = cfg["lr_grid"] if "lr_grid" in cfg else sorted(set(cfg["lr_by_method"].values()))
        default_lr = lr or rates[len(rates) // 2]
    else:  # legacy presets
        schedule = {"lr_scheduler_type": "constant_with_warmup", "warmup_steps": 3}
        default_lr = lr or cfg["lr"]
    return TrainSettings(
        max_steps=steps, learning_rate=default_lr, per_device_train_batch_size=batch_size or cfg["batch_size"],
        max_length=max_length, gere_replay_size=cfg["replay_size"], gere_replay_max_length=cfg["replay_max_length"],
        gere_replay_per_step=replay_per_step, gere_seed=data_seed, bf16=bf16,
        general_every_task=cfg["general_every_task"], logging_steps=5, **schedule,
    )


#: The WiSE-FT presets whose ``alpha`` the benchmark chooses on dev items among
#: :data:`~gere_plugin.continual.presets.WISE_ALPHA_GRID` (1.0 is always one too: the runner picks one after every
#: task on the dev items of that task and the earlier ones, :func:`gere_plugin.continual.wise_select.select_wise_alpha`);
#: ``der_paper_wise`` keeps its preset's fixed alpha, and ``der_paper_wise_tuned`` chooses by its own preset.
DEV_ALPHA_METHODS = ("wise", "gere_wise")


def method_settings(settings: TrainSettings, method: str, lr: float) -> TrainSettings:
    """A method's settings for one benchmark run: its learning rate, and for :data:`DEV_ALPHA_METHODS` the
    dev-split choice of ``alpha`` among :data:`WISE_ALPHA_GRID` instead of the preset's fixed one."""
    choose = method in DEV_ALPHA_METHODS and "wise" in METHODS[method].uses
    return dataclasses.replace(settings, learning_rate=float(lr), wise_alphas=WISE_ALPHA_GRID if choose else ())


def first_task_signature(method: str) -> str:
    """Methods that train the first task identically (e.g. gere and gere_freeze, whose freeze starts at
    task 2) share one learning-rate selection. WiSE-FT trains each task as its base method and interpolates
    only afterwards, with ``alpha`` chosen on dev items (:func:`method_settings`), so ``wise`` shares plain
    SFT's rate and ``gere_wise`` GeRe's."""
    spec = METHODS[method]
    sig = {"replay": spec.replay, **spec.gere_kwargs(0)}
    sig.pop("gere_wise_alpha", None)
    if spec.external is not None:  # an external trainer never shares a selection with ours
        sig["external"] = spec.external
    return json.dumps(sig, sort_keys=True, default=str)


def shared_selection(selection: dict[str, Any], method: str) -> Optional[str]:
    """Whose finished dev-split learning-rate selection ``method`` uses: its own when it has a chosen rate,
    else that of a method with the same :func:`first_task_signature`; ``None`` when there is none."""
    if (selection.get(method) or {}).get("chosen"):
        return method
    sig = first_task_signature(method)
    return next((m for m, rec in selection.items() if rec.get("signature") == sig and rec.get("chosen")), None)


def fixed_learning_rates(cfg: dict[str, Any], methods: list[str], preset: str) -> dict[str, float]:
    """Each method's rate from the preset's fixed table ``lr_by_method`` (no selection run); SystemExit naming
    the method and the key when the table has no rate for one of ``methods``."""
    table = cfg["lr_by_method"]
    missing = [m for m in methods if m not in table]
    if missing:
        raise SystemExit(
            f"--preset {preset}: no learning rate for method(s) {', '.join(missing)} in the preset's 'lr_by_method' "
            f"(it has {', '.join(sorted(table))}). Add the method there with a rate chosen on a dev split, or pass "
            "--lr for one rate for every method."
        )
    return {m: float(table[m]) for m in methods}


def choose_learning_rate(grid_results: dict[str, dict[str, float]]) -> float:
    """The grid value with the best dev accuracy; ties go to the smaller learning rate."""
    return float(min(grid_results, key=lambda lr: (-grid_results[lr]["dev_accuracy"], float(lr))))


def select_learning_rates(
    doc: dict[str, Any], cfg: dict[str, Any], methods: list[str], model_dir: Path, tasks: list[SequenceTask],
    replay: Path, work: Path, settings: TrainSettings, save: Any, extra_grid: Sequence[float] = (),
) -> dict[str, float]:
    """Per-method learning rate: train the FIRST task with each grid value (seed ``lr_seed``) and keep
    the one with the best accuracy on that task's dev split. Results go to ``doc["lr_selection"]``.

    ``extra_grid`` adds rates to the preset's grid for ``methods`` (e.g. below its lowest value when a
    method chose that edge); each method's record lists them under ``extended_with``."""
    grid = cfg.get("lr_grid")
    if not grid:
        return {m: settings.learning_rate for m in methods}
    grid = list(grid) + [float(lr) for lr in extra_grid if float(lr) not in grid]
    first = tasks[0]
    if not first.dev:
        raise SystemExit(f"learning-rate selection needs dev items for {first.name}: set n_dev in the preset")
    dev_task = dataclasses.replace(first, test=first.dev, dev=[])
    selection = doc.setdefault("lr_selection", {})
    if "base_dev" not in doc:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(model_dir))
        base_model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
        doc["base_dev"] = evaluate_stage(base_model, tok, [dev_task], None, settings.eval_batch_size)
        del base_model
    chosen: dict[str, float] = {}
    for method in methods:
        sig = first_task_signature(method)
        shared = shared_selection(selection, method)
        if method not in selection and shared is not None:
            selection[method] = {**selection[shared], "shared_with": shared}
        rec = selection.setdefault(method, {"signature": sig, "grid": {}, "task": first.name,
                                            "seed": cfg["lr_seed"], "dev_items": len(first.dev)})
        if extra_grid:
            rec["extended_with"] = sorted({*rec.get("extended_with", []), *map(float, extra_grid)})
        for lr in grid:
            key = f"{lr:g}"
            if key in rec["grid"]:
                continue
            t0 = time.perf_counter()
            run = run_sequence(  # trained as first_task_signature describes it: without WiSE-FT
                str(model_dir), [dev_task], METHODS[method].without_wise(), work / "lr_selection" / f"{method}_lr{key}",
                settings=dataclasses.replace(settings, learning_rate=float(lr)), replay=replay,
                state_cache=work / "states", seed=cfg["lr_seed"], general=None, base_eval=doc["base_dev"],
            )
            stage = run["stages"][0]
            rec["grid"][key] = {"dev_accuracy": run["matrix"][0][0],
                                "majority_share": stage["eval"]["majority_share"][first.name],
                                "seconds": time.perf_counter() - t0}
            logging.info("lr selection %s lr=%s: dev accuracy %.3f", method, key, run["matrix"][0][0])
            save()
        rec["chosen"] = choose_learning_rate(rec["grid"])
        chosen[method] = rec["chosen"]
        save()
    return chosen
