"""Moved to :mod:`gere_plugin.trainer.task_terms` (``TaskStep`` is now :class:`TaskTerms`, one runner over
the registered task-side terms of :mod:`gere_plugin.methods`); this path keeps old imports working."""

from .data.trainer_rows import FORWARD_KEYS  # noqa: F401
from .trainer.metrics import MetricBuffer  # noqa: F401
from .trainer.task_terms import TaskTerms, check_task_methods  # noqa: F401

TaskStep = TaskTerms
SWITCH = {"flow": "gere_flow", "ewc": "gere_ewc_lambda", "task_kl": "gere_task_kl"}
