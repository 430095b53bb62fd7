"""Continual fine-tuning over a sequence of tasks, evaluated after every task.

:func:`run_sequence` fine-tunes task after task on ONE model object that is carried forward (task
``k`` starts from task ``k-1``'s weights), evaluates every task and (optionally) general ability
after each stage, and returns / writes a result dict with the accuracy matrix ``R[i][j]``.

GeRe's base-model state cache is built once from the ORIGINAL base model (during the first task) and
reused by every later task through the same ``gere_state_cache`` folder; the l1/l2/kl baselines are
given a frozen copy of the original base model as their reference for every task.

Method presets (:data:`METHODS`):

=============== ===================================================================================
``plain``       plain SFT (no replay)
``replay``      vanilla GeRe replay: replay CE only (``gere_regularizer="none"``)
``kl``          replay + logit KL to the base model
``l1`` / ``l2`` replay + L1 / L2 distance of hidden states to the base model
``gere``        replay + threshold-margin loss on the base model's 3-way state labels (package defaults)
``gere_paper``  ``gere`` with the paper's exact weighting (:data:`PAPER_WEIGHTING`)
``gere_freeze`` ``gere`` + frozen embeddings and bottom layers from the second task on
``flow``        FLOW: task samples weighted by ``exp(-base_loss / tau)`` (no replay), each task's weights
                from the model that task starts from
``ewc``         online EWC: Fisher of each finished task, penalty ``lambda/2 sum F (theta - theta*)^2`` on
                the next ones (no replay; :data:`EWC_LAMBDA`)
``task_kl``     KL(base || model) on the task rows' trained tokens (ASFT's anchor; no replay;
                :data:`TASK_KL_WEIGHT`), against the ORIGINAL base model
``gere_flow``   ``gere`` + FLOW weights on the task rows
``gere_ewc``    ``gere`` + EWC
``sdft``        TRL's own SDFT trainer (external baseline, :mod:`gere_plugin.baselines`)
``osf``         PEFT's OSF adapter trained with TRL's SFTTrainer, merged after each task (external baseline)
``gere_er``     ``gere`` + experience replay of earlier tasks (``gere_task_replay*`` keys)
``replay_er``   ``replay`` + experience replay of earlier tasks (ablation: no TM)
``plain_er``    experience replay of earlier tasks only (ablation: no general replay)
``wise``        plain SFT + WiSE-FT after each task: ``theta <- (1 - a) theta_before + a theta_after``
                (:data:`WISE_ALPHA`; no replay)
``gere_wise``   ``gere`` + WiSE-FT after each task
``der``         ``gere_er`` + logit replay: the earlier-task rows also get ``beta * KL`` to the top-k
                log-probabilities stored when their task ended (dark experience replay; :data:`DER_LOGIT_WEIGHT`)
``der_paper``   ``der`` with the paper's exact weighting (:data:`PAPER_WEIGHTING`)
``der_paper_rho25``
                ``der_paper`` with the earlier tasks' share of the task term at :data:`DER_STRONG_SHARE`
``der_paper_beta1``
                ``der_paper`` with the logit replay's ``beta`` at :data:`DER_STRONG_LOGIT_WEIGHT`
``der_paper_wise``
                ``der_paper`` + WiSE-FT after each task at a fixed ``alpha`` (``DER_WISE_ALPHA``)
``der_paper_wise_tuned``
                ``der_paper`` + WiSE-FT with ``alpha`` chosen after each task on the dev items among
                :data:`WISE_ALPHA_GRID` and 1.0, giving up at most 1 point of that task's dev accuracy
                (:attr:`MethodSpec.wise_alphas`; every task needs dev items)
=============== ===================================================================================

:data:`RECOMMENDED` names the recommended preset (picked on dev splits among the ``CANDIDATES`` of
``benchmarks/select_recommended.py``; see docs/evaluation.md); ``gere sequence`` and ``make demo`` run it by default.

The EWC state written at the end of task ``k`` (``<task k output>/gere_ewc``) is handed to task ``k + 1``
as ``gere_ewc_state``; ``TrainSettings.gere_ewc_lambda`` / ``gere_task_kl`` / ``gere_wise_alpha`` override the
presets' strengths.

Methods with earlier-task replay (``task_replay=True``) keep, after every finished task, a seeded
sample of at most ``gere_task_replay_size`` of its training rows as token ids (tokenized exactly as
the task trained on them) in ``output_dir/task_replay/<k>_<name>.jsonl``; every later task replays
all kept files through ``gere_task_replay``. The result records the budget and what was kept. With logit
replay (``der``) the model's top-``gere_task_replay_topk`` log-probabilities on the kept rows are written
beside each file when its task ends (``<k>_<name>.topk.safetensors``, :mod:`gere_plugin.methods.logit_replay`).

Modules: :mod:`~gere_plugin.continual.presets` (the methods, :class:`SequenceTask`),
:mod:`~gere_plugin.continual.settings` (:class:`TrainSettings`), :mod:`~gere_plugin.continual.runner`
(:func:`run_sequence`, one stage's trainer), :mod:`~gere_plugin.continual.stage` (evaluation, fingerprints),
:mod:`~gere_plugin.continual.task_rows` (kept samples of finished tasks), :mod:`~gere_plugin.continual.cost`
(:class:`PeakMemory`, :func:`step_clock`) and :mod:`~gere_plugin.continual.baselines` (SDFT, OSF).
"""

from __future__ import annotations

from .cost import (
    PeakMemory,
    max_rss_bytes,
    peak_rss,
    release_free_heap,
    reset_peak_rss,
    rss_bytes,
    step_clock,
)
from .presets import (
    EWC_LAMBDA,
    FD_WEIGHTING,
    METHODS,
    PAPER_WEIGHTING,
    RECOMMENDED,
    STRENGTH_SETTINGS,
    TASK_KL_WEIGHT,
    WISE_ALPHA,
    WISE_ALPHA_GRID,
    MethodSpec,
    SequenceTask,
)
from .runner import build_trainer, run_sequence, stage_gere_keys
from .settings import TrainSettings
from .stage import evaluate_stage, model_fingerprint
from .task_rows import keep_task_sample, tokenized_for_training, tokenized_without_eos

__all__ = [
    "EWC_LAMBDA", "FD_WEIGHTING", "METHODS", "PAPER_WEIGHTING", "RECOMMENDED", "STRENGTH_SETTINGS", "TASK_KL_WEIGHT",
    "WISE_ALPHA", "WISE_ALPHA_GRID",
    "MethodSpec", "PeakMemory", "SequenceTask", "TrainSettings", "build_trainer", "evaluate_stage", "keep_task_sample",
    "max_rss_bytes", "model_fingerprint", "peak_rss", "release_free_heap", "reset_peak_rss", "rss_bytes", "run_sequence",
    "stage_gere_keys", "step_clock", "tokenized_for_training", "tokenized_without_eos",
]
