"""The forgetting monitor: general-ability drift measured while training, with or without replay.

Before the first update (step 0), every ``gere_monitor_steps`` optimizer steps and after the last step,
:class:`ForgettingMonitor` (a ``TrainerCallback``) runs the model in eval mode under ``torch.no_grad``
over a fixed set of held-out general texts (``gere_monitor``) and a fixed sample of the training set's
own rows, restores every module's training flag, and logs through the trainer's metrics store (so
every ``report_to`` backend gets them):

==================================  ====================================================================
``gere/monitor_ppl``                perplexity of the monitor texts (token-weighted, as
                                    :func:`gere_plugin.evaluation.scoring.perplexity`)
``gere/monitor_ppl_rise``           ``ppl / ppl_at_step_0 - 1`` (0.2 = +20% over the base model)
``gere/monitor_kl``                 token-mean ``KL(base || model)`` on the monitor texts
``gere/monitor_task_kl``            the same on ``gere_monitor_task_size`` training rows: the forward KL on
                                    the new task's own inputs, which "RL's Razor" (arXiv 2509.04259)
                                    found to predict how much a fine-tune forgets
``gere/monitor_out_of_state``       (when GeRe's state cache exists) fraction of hidden-state elements of
                                    the monitor texts outside the activation state they had at step 0
==================================  ====================================================================

**The base side needs no second model.** At step 0 the model *is* the base: the monitor keeps, per
scored position, the base's ``TOP_K`` largest log-probabilities and their token ids (8 bytes each:
64 x 8 + 4 = 516 bytes per position, about 4 MiB for 64 texts of 128 tokens), plus the base perplexity. Later
passes compare the model's distribution with that snapshot coarse-grained to ``TOP_K + 1`` outcomes
(the base's top-k tokens and one bucket for the rest of the vocabulary, whose base mass is kept too),
:func:`topk_kl`. That is the
exact KL of the coarse-grained distributions: never above the full KL (data-processing inequality),
equal to it up to the base's tail mass, and exactly 0 while the model equals the base. The same
snapshot serves full fine-tunes and LoRA (no adapter-disabled forward, so a pass costs one forward
per row for both, and "base" means the model before the first update in both).

Every rank scores its share of the rows (``i % world_size == rank``), and one all-reduce per pass
turns the partial sums into the same means on every rank. Under parameter sharding (FSDP, ZeRO-3)
every rank runs every row (the forwards gather parameters collectively) and only rank 0's sums count.
The pass uses no random numbers and does not touch parameters, gradients, the optimizer or the data
order, so training with and without the monitor gives the same weights (a test checks bit-identity).

The package: :mod:`~gere_plugin.monitor.kl` (the KL math), :mod:`~gere_plugin.monitor.texts` (the
rows it scores and their batches), :mod:`~gere_plugin.monitor.callback` (:class:`ForgettingMonitor`,
its base snapshot, :data:`TOP_K`).
"""

from .callback import (
    METRIC_KEYS,
    POSITIONS_PER_CHUNK,
    SNAPSHOT_FILE,
    TOP_K,
    ForgettingMonitor,
    RowSet,
    StateRef,
)
from .kl import full_kl, rest_logmass, topk_kl
from .texts import (
    TOKENS_PER_FORWARD,
    MonitorError,
    MonitorTexts,
    PaddedBatch,
    check_disjoint,
    load_monitor_texts,
    make_batches,
    row_token_ids,
    task_sample,
)

__all__ = [
    "METRIC_KEYS", "POSITIONS_PER_CHUNK", "SNAPSHOT_FILE", "TOKENS_PER_FORWARD", "TOP_K", "ForgettingMonitor",
    "MonitorError", "MonitorTexts", "PaddedBatch", "RowSet", "StateRef", "check_disjoint", "full_kl",
    "load_monitor_texts", "make_batches", "rest_logmass", "row_token_ids", "task_sample", "topk_kl",
]  # fmt: skip
