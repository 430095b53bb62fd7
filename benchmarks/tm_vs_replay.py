"""Does GeRe's TM term add anything over vanilla replay at the SAME learning rate? (issue 27, item 3)

cpu-fair compares vanilla replay at its own dev-selected rate (1e-4) with GeRe at its (2e-4), so a
difference between them could be the learning rate's. This report pairs, seed by seed, GeRe (and the
paper's weighting, ``gere_paper``) from ``forgetting_cpu-fair.json`` with vanilla replay trained at 2e-4
(the same sequence, data, steps and seeds; ``forgetting.py --lr 2e-4 --methods replay``), and gives each
paired difference's mean with a 95% t-interval over the seeds.

    python benchmarks/forgetting.py --bf16 --resume --threads 1 --lr 2e-4 --methods replay --seeds 1 2 3 \\
        --out-dir /tmp/replay-2e-4          # on a copy of forgetting_cpu-fair.json with runs emptied and
                                            # settings.learning_rate / lr_grid set to 2e-4 / null
    python benchmarks/tm_vs_replay.py --replay /tmp/replay-2e-4/forgetting_cpu-fair.json

Writes ``benchmarks/results/tm_vs_replay_same_lr.{json,md}`` (``--stem`` names another pair).

At a LOWER replay ratio (1 general row beside the 8 task rows of a step instead of 2), both sides come
from new runs at the same rate, and ``--fair`` points at the GeRe runs instead of cpu-fair's::

    python benchmarks/forgetting.py ... --lr 2e-4 --replay-per-step 1 --methods gere --seeds 1 2 --out-dir /tmp/low-gere
    python benchmarks/forgetting.py ... --lr 2e-4 --replay-per-step 1 --methods replay --seeds 1 2 --out-dir /tmp/low-replay
    python benchmarks/tm_vs_replay.py --fair /tmp/low-gere/forgetting_cpu-fair.json --methods gere \
        --replay /tmp/low-replay/forgetting_cpu-fair.json --stem tm_vs_replay_low_ratio

Both files must agree on the learning rate and on the replay rows per step (``gere_replay_per_step``).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
import forgetting  # noqa: E402

from gere_plugin.cache.io import write_file_atomically  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
#: settings both files must share (key -> what it is, for the error): the ratio of replay to task rows, the
#: length of a task, the precision
SAME_SETTINGS = {"gere_replay_per_step": "general replay rows per step", "per_device_train_batch_size": "task rows per step",
                 "max_steps": "steps per task", "bf16": "precision"}
#: two-sided 95% Student t quantiles by degrees of freedom
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def interval(diffs: list[float]) -> dict[str, Any]:
    """Mean and 95% t-interval of paired differences (``None`` bounds with fewer than 2 seeds)."""
    mean = sum(diffs) / len(diffs)
    if len(diffs) < 2:
        return {"mean": mean, "low": None, "high": None, "n": len(diffs), "per_seed": diffs}
    half = T975[len(diffs) - 1] * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": len(diffs), "per_seed": diffs,
            "excludes_zero": mean - half > 0 or mean + half < 0}


def compare(gere_runs: list[dict[str, Any]], replay_runs: list[dict[str, Any]], method: str) -> dict[str, Any]:
    """Paired ``method - replay@same lr`` per metric (points / percent), seeds present in both."""
    relabelled = [r for r in gere_runs if r["method"] == method] + [
        {**r, "method": "replay_same_lr"} for r in replay_runs if r["method"] == "replay"]
    paired = forgetting.paired_differences(relabelled, method, "replay_same_lr")
    out: dict[str, Any] = {"seeds": paired.pop("seeds")}
    for key, rec in paired.items():
        out[key] = interval(rec["per_seed"])
    return out


def markdown(doc: dict[str, Any]) -> str:
    lines = []
    for method, rec in doc["comparisons"].items():
        rows = f", {doc['task_rows_per_step']} task rows" if doc.get("task_rows_per_step") else ""
        precision = {True: ", bf16 autocast", False: ", fp32"}.get(doc.get("bf16"), "")
        lines += [f"### {method} - vanilla replay, both at {doc['learning_rate']:g}, {doc['replay_per_step']} "
                  f"replay rows per step{rows}{precision} (seeds {rec['seeds']})", "",
                  "| metric | mean | 95% interval | per seed |", "|---|---|---|---|"]
        for key, st in rec.items():
            if key == "seeds":
                continue
            ci = "-" if st["low"] is None else f"[{st['low']:+.1f}, {st['high']:+.1f}]"
            lines.append(f"| {key} | {st['mean']:+.1f} | {ci} | " + ", ".join(f"{v:+.1f}" for v in st["per_seed"]) + " |")
        lines.append("")
    lines.append("Points for AP / plasticity / general (ARC-Easy), percent of the base for ppl_rise; positive = the "
                 "TM method is higher (better for AP, plasticity, general; worse for ppl_rise).")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fair", default=str(RESULTS / "forgetting_cpu-fair.json"))
    p.add_argument("--replay", required=True, help="forgetting.py output with vanilla replay at the same rate")
    p.add_argument("--methods", nargs="+", default=["gere", "gere_paper"])
    p.add_argument("--out-dir", default=str(RESULTS))
    p.add_argument("--stem", default="tm_vs_replay_same_lr", help="file name (without suffix) of the results")
    args = p.parse_args(argv)
    fair = json.loads(Path(args.fair).read_text(encoding="utf-8"))
    rep = json.loads(Path(args.replay).read_text(encoding="utf-8"))
    lr = rep["settings"]["learning_rate"]
    for key, what in SAME_SETTINGS.items():
        values = {f: d["settings"].get(key) for f, d in ((args.fair, fair), (args.replay, rep))}
        if len(set(values.values())) != 1:
            raise SystemExit(f"the two files differ in {what} ({key}: "
                             + ", ".join(f"{v} in {f}" for f, v in values.items()) + "): not a paired comparison")
    for m in args.methods:
        own = {r["settings"]["learning_rate"] for r in fair["runs"] if r["method"] == m}
        if own != {lr}:
            raise SystemExit(f"{m} ran at {sorted(own)} in {args.fair}, vanilla replay at {lr:g}: not the same rate")
    doc = {"learning_rate": lr, "replay_per_step": rep["settings"].get("gere_replay_per_step"),
           "task_rows_per_step": rep["settings"].get("per_device_train_batch_size"),
           "bf16": rep["settings"].get("bf16"), "fair": args.fair,
           "replay": args.replay, "environment": rep.get("environment"),
           "comparisons": {m: compare(fair["runs"], rep["runs"], m) for m in args.methods}}
    out = Path(args.out_dir)
    write_file_atomically(out / f"{args.stem}.json", json.dumps(doc, indent=1), "the TM-vs-replay comparison")
    write_file_atomically(out / f"{args.stem}.md", markdown(doc), "the TM-vs-replay comparison")
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
