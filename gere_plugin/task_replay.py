"""Moved: the rows to :mod:`gere_plugin.data.task_rows`, :class:`TaskReplay` and the term to
:mod:`gere_plugin.methods.earlier_tasks`; this path keeps old imports working."""

from .data.task_rows import KEY, ROW_FORMATS, TaskReplaySet, Tokenization, tokenize_row  # noqa: F401
from .methods.earlier_tasks import EarlierTasks, TaskReplay  # noqa: F401
