"""``gere sequence``: fine-tune a model on your own task sequence with one method, evaluating as it goes.

Each ``--task NAME TRAIN TEST`` names a task, its training rows and its test items (``.jsonl``):

* TRAIN: TRL SFT rows, ``{"prompt": ..., "completion": ...}`` or ``{"text": ...}``;
* TEST: label-word classification items, ``{"prompt": ..., "label_words": [" yes", " no"], "gold": 0}``
  (or ``"answer": " yes"`` instead of ``gold``).

The tasks run in the order given, carrying the model forward; replay methods share one base-state
cache built from the ORIGINAL model. The result JSON (accuracy matrix, AA/AP/BWT/FWT/FM/F1, per-task
logs, general ability when ``--ppl`` / ``--cloze`` are given) is rewritten after every task and can be
turned into tables and plots with ``gere report``. Library equivalent: :func:`gere_plugin.continual.run_sequence`.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from .config import GeReConfigError
from .replay import read_jsonl_objects

__all__ = ["load_test_items", "load_train_rows", "sequence_main"]


def _jsonl(path: Path, what: str, example: str) -> list[tuple[int, dict[str, Any]]]:
    if not path.is_file():
        raise GeReConfigError(f"{what} file {str(path)!r} does not exist.")
    rows = read_jsonl_objects(path, f"--task ({what} file)", example)
    if not rows:
        raise GeReConfigError(f"{what} file {str(path)!r} is empty.")
    return rows


def load_train_rows(path: str | os.PathLike) -> list[dict[str, str]]:
    """TRL SFT rows of a ``.jsonl``: ``prompt`` + ``completion``, or ``text``."""
    out = []
    for n, row in _jsonl(Path(path), "training", '{"prompt": "...", "completion": "..."}'):
        if isinstance(row.get("prompt"), str) and isinstance(row.get("completion"), str):
            out.append({"prompt": row["prompt"], "completion": row["completion"]})
        elif isinstance(row.get("text"), str):
            out.append({"text": row["text"]})
        else:
            raise GeReConfigError(
                f"{path} line {n}: a training row needs string fields 'prompt' and 'completion', or 'text' "
                f"(found {sorted(row)})."
            )
    return out


def load_test_items(path: str | os.PathLike) -> list[Any]:
    """Label-word test items of a ``.jsonl`` (see the module docstring for the fields)."""
    from .evaluation.tasks import ClassificationItem

    items = []
    for n, row in _jsonl(Path(path), "test", '{"prompt": "...", "label_words": [" yes", " no"], "gold": 0}'):
        words = row.get("label_words")
        if not isinstance(row.get("prompt"), str) or not isinstance(words, list) or not all(isinstance(w, str) for w in words):
            raise GeReConfigError(
                f"{path} line {n}: a test item needs 'prompt' (string) and 'label_words' (list of strings), found {sorted(row)}."
            )
        if "gold" in row:
            gold = row["gold"]
        elif row.get("answer") in words:
            gold = words.index(row["answer"])
        else:
            raise GeReConfigError(
                f"{path} line {n}: give 'gold' (index into label_words) or 'answer' (one of {words}), found {row.get('answer')!r}."
            )
        try:
            items.append(ClassificationItem(row["prompt"], tuple(words), int(gold)))
        except ValueError as e:
            raise GeReConfigError(f"{path} line {n}: {e}.") from None
    return items


def _parser() -> argparse.ArgumentParser:
    from .continual import METHODS, TrainSettings

    d = TrainSettings()
    p = argparse.ArgumentParser(prog="gere sequence", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the ORIGINAL base model (folder or cached id)")
    p.add_argument("--task", nargs=3, action="append", metavar=("NAME", "TRAIN", "TEST"), required=True,
                   help="one task of the sequence (repeat, in order)")
    p.add_argument("--method", default="gere", choices=sorted(METHODS))
    p.add_argument("--replay", help="replay source for replay methods (e.g. replay.jsonl with a 'text' field)")
    p.add_argument("--out", required=True, help="output folder (trainer runs, result.json, final model)")
    p.add_argument("--state-cache", help="base-state cache folder (default OUT/gere_states); reuse it across runs")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--steps", type=int, default=d.steps_per_task, help="optimizer steps per task")
    p.add_argument("--lr", type=float, default=d.learning_rate)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--gradient-accumulation-steps", type=int, default=d.gradient_accumulation_steps)
    p.add_argument("--max-length", type=int, default=d.max_length)
    p.add_argument("--replay-size", type=int, default=d.replay_size)
    p.add_argument("--replay-max-length", type=int, default=d.replay_max_length)
    p.add_argument("--replay-per-step", type=int, default=d.replay_per_step)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--ppl", nargs="*", default=[], help="held-out text files (.jsonl/.txt) or 'wiki'")
    p.add_argument("--cloze", nargs="*", default=[], help="cloze tasks, e.g. arc_easy piqa")
    p.add_argument("--limit", type=int, default=300, help="items per cloze task and texts per ppl set")
    p.add_argument("--general-every-task", action="store_true", help="general evaluation after every task too")
    p.add_argument("--save-final", action="store_true", help="save the final model to OUT/final")
    return p


def sequence_main(argv: Optional[Sequence[str]] = None) -> int:
    """``gere sequence``: returns 0 and prints the accuracy matrix and summary."""
    args = _parser().parse_args(argv)
    names = [t[0] for t in args.task]
    if len(set(names)) != len(names):
        raise GeReConfigError(f"--task names must be unique, got {names}.")
    from .continual import METHODS, SequenceTask, TrainSettings, run_sequence

    if METHODS[args.method].replay and not args.replay:
        raise GeReConfigError(f"--method {args.method} replays general text: pass --replay FILE (see `gere build-replay`).")
    tasks = [SequenceTask(name=n, train=load_train_rows(tr), test=load_test_items(te)) for n, tr, te in args.task]
    general = None
    if args.ppl or args.cloze:
        from .evaluation.cli import general_config

        general = general_config(args.ppl, args.cloze, args.limit, 256, 16)
    settings = TrainSettings(
        steps_per_task=args.steps, learning_rate=args.lr, batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps, max_length=args.max_length,
        replay_size=args.replay_size, replay_max_length=args.replay_max_length,
        replay_per_step=args.replay_per_step, bf16=args.bf16, general_every_task=args.general_every_task,
    )
    out = Path(args.out)
    result = run_sequence(
        args.model, tasks, args.method, out, settings=settings, replay=args.replay,
        state_cache=args.state_cache, seed=args.seed, general=general, result_path=out / "result.json",
        save_final_model=args.save_final,
    )
    width = max(len(n) for n in names)
    print(f"accuracy after each task (rows) on each task (columns), method {args.method}:")
    print(" " * (width + 2) + "  ".join(f"{n:>{width}}" for n in names))
    print(f"{'base':<{width + 2}}" + "  ".join(f"{100 * v:>{width}.1f}" for v in result["base_row"]))
    for name, row in zip(names, result["matrix"]):
        print(f"{name:<{width + 2}}" + "  ".join(f"{100 * v:>{width}.1f}" for v in row))
    print(json.dumps({k: v for k, v in result["summary"].items() if v is not None}, indent=1, default=float))
    print(f"result: {out / 'result.json'}")
    return 0
