"""Moved to :mod:`gere_plugin.data.schedule`; this path keeps old imports working."""

from .data.schedule import ReplaySchedule, uneven_micro_batches  # noqa: F401
