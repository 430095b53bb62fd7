"""The forgetting benchmark's ``--diagnose-gradients``: the gradient balance of each weighting on the first task
(:data:`GRADIENT_VARIANTS`, :func:`diagnose_gradients`) and its plot (:func:`plot_gradient_balance`). Used by
``forgetting.py``, which re-exports these names."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import environment_info, set_offline_defaults  # noqa: E402

set_offline_defaults()  # before transformers / datasets are imported

from gere_plugin.continual import METHODS, MethodSpec, SequenceTask, TrainSettings, run_sequence  # noqa: E402

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
