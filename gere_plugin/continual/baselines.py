"""External anti-forgetting baselines, run as a user of those libraries would run them (no GeRe code in
their losses): TRL's **SDFT** trainer and PEFT's **OSF** adapter.

Both plug into :func:`gere_plugin.continual.run_sequence` as the presets ``sdft`` and ``osf`` (and so into
``gere sequence --method``), so they see the same tasks, seeds, learning rate, schedule, batch size, step
count and evaluation as every other method. Only the glue lives here: mapping
:class:`~gere_plugin.continual.TrainSettings` onto the library's own config, and building the rows it
expects.

* **SDFT** (``trl.experimental.sdft``, Shenfeld et al. 2026, "Self-Distillation Enables Continual
  Learning"): present in TRL 1.9 (the Axolotl 0.19 stack) and TRL 1.16 (the newest). On-policy: the model
  generates a completion for the task prompt, and is distilled toward itself conditioned on a
  demonstration (the teacher; ``teacher_model_kind='base'`` = the model the task starts from). The
  demonstration of a ``{"prompt", "completion"}`` row is the row itself, placed before the prompt
  (``SDFT_TEMPLATE``). One generation per prompt (``num_generations=1``), so a step sees as many task
  prompts as an SFT step; completions are at most ``SDFT_MAX_COMPLETION`` tokens (label-word tasks).
* **OSF** (``peft.OSFConfig``, orthogonal subspace fine-tuning, Nayak et al. 2025): present in PEFT 0.20
  and 0.21. Each task wraps the model in OSF with the top ``effective_rank`` singular directions of every
  target weight frozen, trains it with TRL's plain ``SFTTrainer`` and merges it back
  (``merge_and_unload``) before the next task. The preserved fraction grows over the sequence:
  ``osf_preserved_fraction(k, K) = 0.5 + 0.5 * k / K`` for task ``k`` of ``K`` (PEFT's default 50% on the
  first task).

:func:`baseline_problem` says why a baseline cannot run in the current environment (``None`` when it can).
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import torch

from ..config import GeReConfigError

__all__ = ["BASELINES", "SDFT_TEMPLATE", "baseline_problem", "build_baseline_trainer", "model_after_training",
           "osf_preserved_fraction", "sdft_rows"]

#: The external baselines and the module each needs.
BASELINES = {"sdft": "trl.experimental.sdft", "osf": "peft"}
#: Teacher prompt of SDFT: the demonstration (the task row itself) first, then the task prompt.
SDFT_TEMPLATE = "{privileged_context}\n\n{prompt}"
#: Completion tokens SDFT generates per prompt.
SDFT_MAX_COMPLETION = 8


def baseline_problem(name: str) -> Optional[str]:
    """Why baseline ``name`` cannot run here (the missing module and the versions that have it), or ``None``."""
    if name not in BASELINES:
        raise GeReConfigError(f"unknown external baseline {name!r}; known: {', '.join(BASELINES)}.")
    try:
        if name == "sdft":
            importlib.import_module("trl.experimental.sdft")
        else:
            from peft import OSFConfig  # noqa: F401
    except ImportError as e:
        need = "trl >= 1.9 (trl.experimental.sdft)" if name == "sdft" else "peft >= 0.20 (OSFConfig)"
        return f"{name} needs {need}: {e}"
    return None


def _require(name: str) -> None:
    problem = baseline_problem(name)
    if problem is not None:
        raise GeReConfigError(problem)


def sdft_rows(rows: Sequence[dict[str, str]]) -> list[dict[str, str]]:
    """SDFT rows (``prompt`` + ``privileged_context``) from SFT prompt/completion rows: the demonstration is
    the row itself, with no label before it (an ``Example:`` line before it made SmolLM2-135M's teacher pick the
    wrong SST-2 word for 74% of the rows it had just seen answered; see benchmarks/external_baselines.md)."""
    out = []
    for row in rows:
        if "prompt" not in row or "completion" not in row:
            raise GeReConfigError("the sdft baseline needs prompt/completion rows (the prompt is what it generates from).")
        out.append({"prompt": row["prompt"], "privileged_context": f"{row['prompt']}{row['completion']}"})
    return out


def osf_preserved_fraction(task_index: int, num_tasks: int, start: float = 0.5) -> float:
    """Share of each weight's singular directions OSF freezes on task ``task_index`` (0-based) of ``num_tasks``."""
    return start + (1.0 - start) * task_index / max(num_tasks, 1)


def _common_args(settings: Any, output_dir: Path, seed: int) -> dict[str, Any]:
    return {**settings.training_args(output_dir, seed), "gradient_checkpointing": False}


def build_baseline_trainer(
    name: str,
    model: torch.nn.Module,
    tokenizer: Any,
    rows: Sequence[dict[str, str]],
    settings: Any,
    output_dir: Path,
    seed: int,
    task_index: int = 0,
    num_tasks: int = 1,
    sft_rows: Optional[Sequence[dict[str, Any]]] = None,
) -> Any:
    """The library's own trainer for one task of a sequence (``name``: ``sdft`` or ``osf``).

    ``rows`` are the task's prompt/completion rows; ``sft_rows`` the rows the SFT methods of the sequence
    train on (e.g. pre-tokenized without EOS, see ``TrainSettings.completion_eos``), which OSF's SFT uses
    too (default: ``rows``).
    """
    from datasets import Dataset

    _require(name)
    common = _common_args(settings, output_dir, seed)
    if name == "sdft":
        from trl.experimental.sdft import SDFTConfig, SDFTTrainer

        cfg = SDFTConfig(**common, num_generations=1, max_prompt_length=settings.max_length,
                         max_completion_length=SDFT_MAX_COMPLETION, teacher_prompt_template=SDFT_TEMPLATE,
                         **settings.extra_config)
        tokenizer.padding_side = "left"  # generation pads on the left
        return SDFTTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(sdft_rows(rows)),
                           processing_class=tokenizer)
    from peft import OSFConfig, get_peft_model
    from trl import SFTConfig, SFTTrainer

    fraction = osf_preserved_fraction(task_index, num_tasks)
    peft_model = get_peft_model(model, OSFConfig(effective_rank=fraction))
    data = list(sft_rows if sft_rows is not None else rows)
    cfg = SFTConfig(**common, max_length=settings.max_length, **settings.extra_config)
    if any("completion_mask" in r for r in data):
        cfg.completion_only_loss = True  # as for the SFT methods: TRL infers it only from prompt/completion columns
    trainer = SFTTrainer(model=peft_model, args=cfg, train_dataset=Dataset.from_list(data), processing_class=tokenizer)
    trainer.osf_preserved_fraction = fraction
    return trainer


def model_after_training(name: str, trainer: Any) -> torch.nn.Module:
    """The plain model to carry to the next task (OSF: merged back into the weights)."""
    model = trainer.model
    if name == "osf":
        model = model.merge_and_unload()
    if name == "sdft":
        tok = getattr(trainer, "processing_class", None)
        if tok is not None:
            tok.padding_side = "right"  # back to the side the SFT trainers and evaluation use
    return model
