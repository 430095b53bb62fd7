"""Is SDFT's teacher a good teacher? Label-word accuracy of the base model given each row in context.

TRL's SDFT trains the model towards a *teacher*: the same starting model, prompted with privileged
context (here: the training row itself, answer included) before the task prompt
(``gere_plugin.baselines.SDFT_TEMPLATE``). The baseline only works if that teacher picks the right
label word far more often than the model without the context. This script measures exactly that, on
the training rows of the forgetting benchmark's tasks (``cpu-fair`` preset, SmolLM2-135M, fp32), for
the privileged-context layouts below; the prediction is the label word with the highest log-likelihood
after the prompt (each word scored whole, as the benchmark scores its tasks).

* ``none``: the prompt alone (the student before training);
* ``example_label``: ``"Example:\\n" + prompt + completion`` first (the layout the baseline used at first);
* ``row``: the layout the baseline builds (``gere_plugin.baselines``), now ``prompt + completion`` first.

    OMP_NUM_THREADS=1 python benchmarks/sdft_teacher.py            # a few minutes on one core
    python benchmarks/sdft_teacher.py --rows 10                    # quick smoke run

Writes ``benchmarks/results/sdft_teacher.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import environment_info, set_offline_defaults  # noqa: E402

set_offline_defaults()

RESULTS = Path(__file__).resolve().parent / "results"

def baseline_layout(row: dict[str, str]) -> str:
    """The teacher prompt the baseline builds (``gere_plugin.baselines``): what SDFT trains towards."""
    from gere_plugin.baselines import SDFT_TEMPLATE, sdft_rows

    return SDFT_TEMPLATE.format(**sdft_rows([row])[0])


LAYOUTS: dict[str, Callable[[dict[str, str]], str]] = {
    "none": lambda r: r["prompt"],
    "example_label": lambda r: f"Example:\n{r['prompt']}{r['completion']}\n\n{r['prompt']}",
    "row": baseline_layout,
}


def teacher_accuracy(model: Any, tok: Any, rows: list[dict[str, str]], make: Callable[[dict[str, str]], str]) -> dict:
    """Label-word accuracy of ``model`` on ``rows`` prompted by ``make``, scored like the benchmark's tasks
    (:func:`gere_plugin.evaluation.label_accuracy`: log-likelihood of each whole label word)."""
    from gere_plugin.evaluation import ClassificationItem, label_accuracy

    labels = tuple(sorted({r["completion"] for r in rows}))
    items = [ClassificationItem(make(r), labels, labels.index(r["completion"])) for r in rows]
    res = label_accuracy(model, tok, items)
    picks = {w: sum(int(p == i) for p in res["predictions"]) for i, w in enumerate(labels)}
    return {"accuracy": res["accuracy"], "picks": picks, "rows": len(rows)}


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=80, help="training rows per task")
    p.add_argument("--data-seed", type=int, default=1234)
    p.add_argument("--out", default=str(RESULTS / "sdft_teacher.json"))
    args = p.parse_args(argv)

    import forgetting
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gere_plugin import assets

    t0 = time.perf_counter()
    cfg = dict(forgetting.PRESETS["cpu-fair"])
    model_dir = assets.prepare_smollm2()
    tasks = forgetting.build_tasks(cfg, assets.wikipedia_splits(replay_size=cfg["replay_size"], seed=args.data_seed),
                                   args.data_seed)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    results: dict[str, Any] = {}
    for task in tasks:
        rows = task.train[: args.rows]
        results[task.name] = {name: teacher_accuracy(model, tok, rows, make) for name, make in LAYOUTS.items()}
        print(task.name, {k: round(v["accuracy"], 3) for k, v in results[task.name].items()}, flush=True)
    doc = {"what": "label-word accuracy of SmolLM2-135M on training rows, per privileged-context layout",
           "baseline_layout": "row", "results": results, "environment": environment_info(),
           "seconds": time.perf_counter() - t0}
    out = Path(args.out)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
