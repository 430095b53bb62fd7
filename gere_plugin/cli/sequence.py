"""``gere sequence``: fine-tune a model on your own task sequence with one method, evaluating as it goes.

Each ``--task NAME TRAIN TEST`` names a task, its training rows and its test items (``.jsonl``):

* TRAIN: TRL SFT rows, ``{"prompt": ..., "completion": ...}`` or ``{"text": ...}``;
* TEST: label-word classification items, ``{"prompt": ..., "label_words": [" yes", " no"], "gold": 0}``
  (or ``"answer": " yes"`` instead of ``gold``).

The tasks run in the order given, carrying the model forward; replay methods share one base-state
cache built from the ORIGINAL model. Methods ending in ``_er`` (``gere_er``, ``replay_er``, ``plain_er``)
also replay earlier tasks: after each task a seeded sample of at most ``--gere_task_replay_size`` of its
training rows is kept as token ids in ``OUT/task_replay/`` and replayed in every later task
(``--gere_task_replay_per_step`` rows per step, share ``--gere_task_replay_weight`` of the task term); ``der`` is
``gere_er`` whose earlier-task rows also get a KL (weight ``--gere_task_replay_logit_weight``) to the model's top-k
log-probabilities stored beside them when their task ended (``OUT/task_replay/<k>_<name>.topk.safetensors``).

Without ``--method`` the recommended preset runs (``gere_plugin.continual.RECOMMENDED``, picked on dev splits
among the ``CANDIDATES`` of ``benchmarks/select_recommended.py``); it replays general text, so it needs
``--gere_replay``. ``--method gere`` runs plain GeRe, ``--method plain`` plain SFT.

The result JSON (accuracy matrix, AA/AP/BWT/FWT/FM/F1, per-task logs, general ability when ``--ppl`` /
``--cloze`` are given) is rewritten after every task and can be turned into tables and plots with
``gere report``. Library equivalent: :func:`gere_plugin.continual.run_sequence`.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from ..config import GeReConfigError
from ..data.sources import read_jsonl_objects

__all__ = ["load_test_items", "load_train_rows", "sequence_main", "sequence_parser"]


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
    from ..evaluation.tasks import ClassificationItem

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


#: TrainSettings fields that become flags (spelled as the TRL / gere_* settings they feed).
TRAIN_FLAGS = (
    "max_steps", "learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps", "max_length",
    "warmup_ratio", "warmup_steps", "lr_scheduler_type", "weight_decay", "bf16", "completion_eos", "logging_steps",
)  # fmt: skip
GERE_SETTING_FLAGS = (
    "gere_replay_size", "gere_replay_max_length", "gere_replay_per_step", "gere_weight", "gere_seed",
    "gere_state_batch_size", "gere_task_replay_size", "gere_task_replay_per_step", "gere_task_replay_weight",
    "gere_task_replay_logit_weight", "gere_task_replay_topk", "gere_ewc_lambda", "gere_task_kl", "gere_wise_alpha",
    "gere_monitor", "gere_monitor_size", "gere_monitor_steps", "gere_monitor_max_length", "gere_monitor_task_size",
)  # fmt: skip
#: Old spellings (still accepted, with a note) -> the flag they now are.
DEPRECATED_FLAGS = {
    "--replay": "--gere_replay", "--state-cache": "--gere_state_cache", "--steps": "--max_steps",
    "--lr": "--learning_rate", "--batch-size": "--per_device_train_batch_size",
    "--gradient-accumulation-steps": "--gradient_accumulation_steps", "--max-length": "--max_length",
    "--replay-size": "--gere_replay_size", "--replay-max-length": "--gere_replay_max_length",
    "--replay-per-step": "--gere_replay_per_step",
}  # fmt: skip


def sequence_parser() -> argparse.ArgumentParser:
    from ..config import GeReArguments
    from ..continual import RECOMMENDED, TrainSettings
    from ..continual.presets import NO_DEV_METHODS
    from .flags import add_deprecated_flag, add_field_flags

    p = argparse.ArgumentParser(prog="gere sequence", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the ORIGINAL base model (folder or cached id)")
    p.add_argument("--task", nargs=3, action="append", metavar=("NAME", "TRAIN", "TEST"), required=True,
                   help="one task of the sequence (repeat, in order)")
    p.add_argument("--method", default=RECOMMENDED, choices=NO_DEV_METHODS, metavar="METHOD",
                   help=f"the method preset (default {RECOMMENDED}: the recommended preset, GeRe general replay + "
                        "earlier-task replay + logit replay, picked on dev splits; --method gere for plain GeRe, "
                        f"--method plain for plain SFT). One of: {', '.join(NO_DEV_METHODS)} (the presets that "
                        "choose WiSE-FT's alpha on dev items need tasks with dev items: the Python API's "
                        "run_sequence)")
    add_field_flags(p, GeReArguments, ("gere_replay",))
    p.add_argument("--out", required=True, help="output folder (trainer runs, result.json, final model)")
    add_field_flags(p, GeReArguments, ("gere_state_cache",))
    p.add_argument("--seed", type=int, default=42, help="training seed (also gere_seed unless --gere_seed is given)")
    add_field_flags(p, TrainSettings, TRAIN_FLAGS + GERE_SETTING_FLAGS)
    p.add_argument("--ppl", nargs="*", default=[], help="held-out text files (.jsonl/.txt) or 'wiki'")
    p.add_argument("--cloze", nargs="*", default=[], help="cloze tasks, e.g. arc_easy piqa")
    p.add_argument("--limit", type=int, default=300, help="items per cloze task and texts per ppl set")
    p.add_argument("--general-every-task", action="store_true", help="general evaluation after every task too")
    p.add_argument("--save-final", action="store_true", help="save the final model to OUT/final")
    p.add_argument("--force", action="store_true", help="write into an --out that holds an earlier run's results")
    for old, new in DEPRECATED_FLAGS.items():
        add_deprecated_flag(p, old, new)
    return p


def _check_out(out: Path, force: bool) -> None:
    """Refuse to write over an earlier run's files (result.json, task_* folders, final/) unless ``force``."""
    if out.exists() and not out.is_dir():
        raise GeReConfigError(f"--out {str(out)!r} is a file; give a folder for the run.")
    if out.is_dir() and not force:
        earlier = sorted(p.name for p in out.iterdir() if p.name in ("result.json", "final") or p.name.startswith("task_"))
        if earlier:
            raise GeReConfigError(
                f"--out {str(out)!r} holds an earlier run ({', '.join(earlier[:4])}); gere never overwrites files "
                "unasked: choose a new --out, or pass --force to replace that run's files."
            )


def sequence_main(argv: Optional[Sequence[str]] = None) -> int:
    """``gere sequence``: returns 0 and prints the accuracy matrix and summary."""
    args = sequence_parser().parse_args(argv)
    names = [t[0] for t in args.task]
    if len(set(names)) != len(names):
        raise GeReConfigError(f"--task names must be unique, got {names}.")
    from ..continual import METHODS, SequenceTask, TrainSettings, run_sequence
    from .flags import check_model_source

    settings = TrainSettings(
        **{k: getattr(args, k) for k in TRAIN_FLAGS + GERE_SETTING_FLAGS}, general_every_task=args.general_every_task
    )  # validates every value, naming its flag
    if METHODS[args.method].replay and not args.gere_replay:
        raise GeReConfigError(
            f"--method {args.method} replays general text: pass --gere_replay FILE (see `gere build-replay`)."
        )
    out = Path(args.out)
    _check_out(out, args.force)
    model = check_model_source(args.model, "--model")
    tasks = [SequenceTask(name=n, train=load_train_rows(tr), test=load_test_items(te)) for n, tr, te in args.task]
    general = None
    if args.ppl or args.cloze:
        from ..evaluation.cli import general_config

        general = general_config(args.ppl, args.cloze, args.limit, 256, 16)
    result = run_sequence(
        model, tasks, args.method, out, settings=settings, replay=args.gere_replay,
        state_cache=args.gere_state_cache, seed=args.seed, general=general, result_path=out / "result.json",
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
