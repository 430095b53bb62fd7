"""The one interface of an anti-forgetting term, and the registry that finds terms by name.

A term is built once per trainer, in the set-up pass (:meth:`gere_plugin.trainer.resources.Resources.resolve`),
from the resources that pass resolved; it never fetches a resource of its own. The trainer's step then
calls its hooks; each hook has a neutral default, so a term overrides only what it does:

======================  ======================================================================================
hook                    when, and what it returns
======================  ======================================================================================
``check`` (classmethod) set-up, before any forward pass: refuse what the term cannot serve, naming the key
``build`` (classmethod) set-up: the term, from :class:`~gere_plugin.trainer.resources.Resources`
``task_loss``           every training micro-batch, when ``needs_task_logits``: per-row weights of the task CE
                        and/or an extra summed per-token term (:class:`TaskTerms`)
``replay_loss``         every training micro-batch: the term's scaled part of the loss from replay rows
``step_penalty``        every training micro-batch: a penalty counted once per optimizer step in total
``after_task``          when ``train()`` returns: state written for the next task (EWC's Fisher), or the
                        weights changed (WiSE-FT's interpolation; such terms, ``moves_weights``, run first)
``describe``            the term's part of the one line printed at train start
``state_dict``          what a resumed run must match (checked against the checkpoint)
======================  ======================================================================================

Adding a method = one module with one :class:`Term` subclass decorated with :func:`register`, its keys in
``gere_plugin/config.py``, its module name in :data:`METHOD_MODULES`, a preset of the sequence runner and a
test against a naive reference (docs/architecture.md, "Adding a method").
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Optional

import torch

from ..config import GeReConfigError

if TYPE_CHECKING:  # pragma: no cover
    from ..trainer.resources import Resources

#: Modules that define the registered terms, imported on first use of the registry.
METHOD_MODULES = ("earlier_tasks", "flow", "task_kl", "ewc", "wise")


@dataclass
class TaskBatch:
    """One training micro-batch's task forward, as :class:`Term.task_loss` sees it."""

    trainer: Any
    model: torch.nn.Module
    inputs: dict[str, Any]
    fwd: dict[str, torch.Tensor]  # the forward's inputs
    logits: torch.Tensor
    labels: torch.Tensor
    row_sums: torch.Tensor  # per-row summed CE of the trained tokens
    row_counts: torch.Tensor  # per-row trained tokens


@dataclass
class TaskLossPart:
    """What a term adds to the task loss: ``weights`` multiply each row's CE (``None`` = 1); ``extra`` is
    summed over trained tokens and divided by the same denominator as the CE (``None`` = nothing)."""

    weights: Optional[torch.Tensor] = None
    extra: Optional[torch.Tensor] = None
    logs: dict[str, torch.Tensor] = field(default_factory=dict)  # gere/* values of this micro-batch


class Term:
    """One anti-forgetting method inside one trainer (see the module docstring for the hooks)."""

    #: registry name (also the word of ``gere sequence --method`` presets)
    name: ClassVar[str] = ""
    #: the ``gere_*`` key that switches the term on
    key: ClassVar[str] = ""
    #: ``gere/*`` metrics the term logs
    metrics: ClassVar[tuple[str, ...]] = ()
    #: the task loss is computed by the step from its own forward (FLOW, task KL)
    needs_task_logits: ClassVar[bool] = False
    #: the term reads the reference model (:mod:`gere_plugin.model.reference`)
    needs_reference: ClassVar[bool] = False
    #: ``after_task`` changes the model's weights (WiSE-FT): it runs before the other terms' ``after_task``,
    #: so that what they record (EWC's anchor and Fisher) describes the weights handed to the next task
    moves_weights: ClassVar[bool] = False

    @classmethod
    def wanted(cls, gere_args: Any) -> bool:
        """The term is switched on by ``gere_args``."""
        value = getattr(gere_args, cls.key, None)
        return bool(value) and not (isinstance(value, (int, float)) and value <= 0)

    @classmethod
    def check(cls, trainer: Any, gere_args: Any) -> None:
        """Refuse a set-up the term cannot serve (no forward pass; the message names the key and the fix)."""

    @classmethod
    def build(cls, res: Resources, trainer: Any) -> Term:
        raise NotImplementedError

    def task_loss(self, batch: TaskBatch) -> TaskLossPart:
        return TaskLossPart()

    def step_penalty(self) -> Optional[torch.Tensor]:
        return None

    def after_task(self, trainer: Any, model: torch.nn.Module) -> None:
        """Called once when training returns."""

    def describe(self) -> str:
        return self.name

    def state_dict(self) -> dict[str, Any]:
        return {}


_REGISTRY: dict[str, type[Term]] = {}


def register(cls: type[Term]) -> type[Term]:
    """Class decorator: make ``cls`` findable by its ``name``."""
    if not cls.name or not cls.key:
        raise TypeError(f"{cls.__name__} needs a name and a key to be registered")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise TypeError(f"two terms are named {cls.name!r}: {_REGISTRY[cls.name].__name__} and {cls.__name__}")
    _REGISTRY[cls.name] = cls
    return cls


def registry() -> dict[str, type[Term]]:
    """Every registered term by name (imports :data:`METHOD_MODULES` on first use)."""
    for module in METHOD_MODULES:
        importlib.import_module(f"{__package__}.{module}")
    return dict(_REGISTRY)


def term_class(name: str) -> type[Term]:
    """The term registered as ``name``; an unknown name is refused, naming the known ones."""
    known = registry()
    if name not in known:
        raise GeReConfigError(f"no anti-forgetting term named {name!r}; known terms: {', '.join(sorted(known))}.")
    return known[name]


def task_terms(gere_args: Any) -> list[type[Term]]:
    """The task-side terms ``gere_args`` switches on, in the order of ``config.task_methods`` (FLOW, EWC,
    task KL, WiSE): their names are that function's words."""
    from ..config import task_methods

    return [term_class(name) for name in task_methods(gere_args)]
