"""One stage of a sequence, before and after training: evaluation (:func:`evaluate_stage`), the model's
fingerprint, the state cache's identity, loading the model and tokenizer, and what a stage records of its
trainer (training cost and logs, the monitor, the earlier-task rows it replayed)."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional, Union, cast

import torch

from ..evaluation.general import GeneralEvalConfig, evaluate_general
from ..evaluation.tasks import (
    ClassificationItem,
    GenerationItem,
    exact_match_accuracy,
    label_accuracy,
    normalize_answer,
)
from .cost import PeakMemory
from .presets import GENERATION_MAX_NEW_TOKENS, SequenceTask, TaskItem, item_kind

__all__ = ["cache_state", "evaluate_stage", "load_model", "load_tokenizer", "model_fingerprint", "monitor_record",
           "record_training", "score_items", "task_replay_record", "train_history"]


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 (first 16 hex digits) over every parameter and buffer, in name order."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def cache_state(folder: Optional[Path]) -> dict[str, Any]:
    """Existence, mtime and content hash of a state cache's ``meta.json`` (to prove reuse)."""
    if folder is None:
        return {"exists": False}
    meta = Path(folder) / "meta.json"
    if not meta.is_file():
        return {"exists": False}
    return {
        "exists": True,
        "mtime_ns": meta.stat().st_mtime_ns,
        "sha256": hashlib.sha256(meta.read_bytes()).hexdigest()[:16],
    }


def score_items(
    model: Any,
    tokenizer: Any,
    items: Sequence[TaskItem],
    batch_size: int = 16,
    max_new_tokens: int = GENERATION_MAX_NEW_TOKENS,
) -> dict[str, Any]:
    """Accuracy and majority share of one task's items (all of one kind).

    * :class:`~gere_plugin.evaluation.tasks.ClassificationItem`: ``label_accuracy`` (the most likely label
      word); the majority share is that of the most frequent predicted label;
    * :class:`~gere_plugin.evaluation.tasks.GenerationItem`: ``exact_match_accuracy`` (greedy decoding of at
      most ``max_new_tokens`` tokens, normalised exact match); the majority share is that of the most frequent
      normalised output (:func:`~gere_plugin.evaluation.tasks.normalize_answer`).

    A majority share near 1.0 means the model gives every item the same answer: it learned a prior, not the task.
    """
    kind = item_kind(items)
    if kind is None:
        raise ValueError("score_items needs at least one item")
    if kind == "generation":
        generation = cast(Sequence[GenerationItem], items)
        res = exact_match_accuracy(model, tokenizer, generation, max_new_tokens=max_new_tokens, batch_size=batch_size)
        answers = [normalize_answer(out) for out in res["outputs"]]
    else:
        res = label_accuracy(model, tokenizer, cast(Sequence[ClassificationItem], items), batch_size=batch_size)
        answers = [str(p) for p in res["predictions"]]
    most = max(answers.count(a) for a in set(answers))
    return {"accuracy": res["accuracy"], "n": len(items), "majority_share": most / len(answers)}


def evaluate_stage(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[SequenceTask],
    general: Optional[GeneralEvalConfig],
    batch_size: int = 16,
) -> dict[str, Any]:
    """Accuracy on every task's test items (:func:`score_items`: label-word or exact-match accuracy by the
    items' kind) and (when ``general`` is given) general ability.

    ``majority_share[task]`` is the share of the most frequent answer (the predicted label word, or the
    normalised generated text): 1.0 = the model answers every item the same way, i.e. it learned the answer
    prior, not the task.
    """
    t0 = time.perf_counter()
    out: dict[str, Any] = {"tasks": {}, "majority_share": {}}
    for task in tasks:
        res = score_items(model, tokenizer, task.test, batch_size=batch_size, max_new_tokens=task.max_new_tokens)
        out["tasks"][task.name] = res["accuracy"]
        out["majority_share"][task.name] = res["majority_share"]
    if general is not None:
        out["general"] = evaluate_general(model, tokenizer, general)
    out["seconds"] = time.perf_counter() - t0
    return out


def load_model(model: Union[str, Path, torch.nn.Module]) -> torch.nn.Module:
    if isinstance(model, torch.nn.Module):
        return model
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32)


def load_tokenizer(tokenizer: Any, model: Union[str, Path, torch.nn.Module]) -> Any:
    if tokenizer is not None and not isinstance(tokenizer, (str, Path)):
        return tokenizer
    from transformers import AutoTokenizer

    src = tokenizer if tokenizer is not None else model
    if isinstance(src, torch.nn.Module):
        raise ValueError("pass tokenizer= when model is an in-memory model")
    tok = AutoTokenizer.from_pretrained(str(src))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def train_history(log_history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    from ..monitor import METRIC_KEYS as MONITOR_METRICS

    keep = ("step", "loss", "learning_rate", "grad_norm", "gere/task_loss", "gere/replay_ce", "gere/reg_loss", "gere/weight",
            "gere/out_of_state", "gere/replay_rows", "gere/grad_norm_ce", "gere/grad_norm_reg",
            "gere/grad_norm_total", "gere/clip_coef", "gere/grad_cosine", "gere/task_replay_ce", "gere/task_replay_kl",
            "gere/task_replay_rows", "gere/task_ce", "gere/flow_weight", "gere/flow_ce", "gere/task_kl", "gere/ewc_penalty",
            "train_runtime", "train_loss", *MONITOR_METRICS)
    return [{k: v for k, v in rec.items() if k in keep} for rec in log_history]


def monitor_record(trainer: Any) -> Optional[dict[str, Any]]:
    """What the stage's forgetting monitor scored and what its passes cost (``None`` without a monitor)."""
    monitor = getattr(trainer, "gere_monitor", None)
    if monitor is None:
        return None
    return {
        "source": monitor.texts.source,
        "texts": len(monitor.texts.texts),
        "tokens": monitor.texts.num_tokens,
        "task_rows": monitor.num_task_rows,
        "every": monitor.every,
        "pass_seconds": [[step, seconds] for step, seconds in monitor.seconds],
        "tripped": monitor.tripped,
    }


def task_replay_record(trainer: Any) -> Optional[dict[str, Any]]:
    """The earlier-task samples a stage's trainer replays (``None`` when it replays none)."""
    term = getattr(getattr(trainer, "gere_step", None), "earlier", None)
    if term is None:
        return None
    replay_step = term.replay
    logits = getattr(term, "logits", None)
    out = {
        "sources": list(replay_step.rows.sources), "rows": list(replay_step.rows.kept),
        "per_step": replay_step.per_step, "weight": replay_step.weight,
    }
    if logits is not None:  # weight, top-k and the fingerprint of each snapshot used
        out["logit_replay"] = logits.state_dict()
    return out


def record_training(stage: dict[str, Any], trainer: Any, train_out: Any, train_seconds: float,
                    step_seconds: list[float], memory: PeakMemory) -> None:
    """Add what training returned and cost to ``stage`` (loss, steps, time per step, memory, logs, monitor)."""
    stage["train_seconds"] = train_seconds
    stage["train_loss"] = float(train_out.training_loss)
    stage["steps"] = int(trainer.state.global_step)
    # cost: wall time per optimizer step (EWC's end-of-task Fisher pass included) and added memory
    stage["seconds_per_step"] = stage["train_seconds"] / max(stage["steps"], 1)
    # ... and apart: each optimizer step's wall seconds, and what train() spent outside the steps
    stage["step_seconds"] = [round(t, 4) for t in step_seconds]
    stage["train_outside_steps_seconds"] = stage["train_seconds"] - sum(step_seconds)
    stage["memory"] = memory.record()
    stage["history"] = train_history(trainer.state.log_history)
    monitor = monitor_record(trainer)
    if monitor is not None:
        stage["monitor"] = monitor
