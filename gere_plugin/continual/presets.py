"""The method presets of a continual sequence (:data:`METHODS`, see :mod:`gere_plugin.continual` for the table),
the recommended one (:data:`RECOMMENDED`), their strengths, and one task of a sequence (:class:`SequenceTask`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from ..evaluation.tasks import ClassificationItem, GenerationItem

__all__ = ["DER_LOGIT_WEIGHT", "DER_STRONG_LOGIT_WEIGHT", "DER_STRONG_SHARE", "DER_WISE_ALPHA", "EARLIER_TASK_KEYS",
           "EWC_LAMBDA", "FD_WEIGHTING", "GENERATION_MAX_NEW_TOKENS", "METHODS", "NO_DEV_METHODS", "PAPER_WEIGHTING", "RECOMMENDED",
           "STRENGTH_SETTINGS", "TASK_KL_WEIGHT", "WISE_ALPHA", "WISE_ALPHA_GRID", "MethodSpec", "SequenceTask", "TaskItem", "item_kind"]


#: ``gere_*`` keys that act on earlier-task rows only (their share of the task term, the KL to their stored
#: logits): dropped for a task with no earlier task to replay (the first, or any task of a method without them).
EARLIER_TASK_KEYS = ("gere_task_replay_logit_weight", "gere_task_replay_weight")


@dataclass(frozen=True)
class MethodSpec:
    """How one method trains. ``replay`` is the general replay (``gere_replay``); ``task_replay`` replays
    kept samples of the earlier tasks of the sequence (``gere_task_replay``). ``freeze_from`` is the 0-based
    task index where freezing starts; ``gere`` holds extra ``gere_*`` keys of the method (e.g. its
    weighting), as ``(key, value)`` pairs."""

    name: str
    replay: bool
    regularizer: str = "tm"
    freeze_layers: int = 0
    freeze_embeddings: bool = False
    freeze_from: int = 1
    gere: tuple[tuple[str, Any], ...] = ()
    external: Optional[str] = None  # an external baseline of gere_plugin.baselines ("sdft", "osf")
    task_replay: bool = False
    #: WiSE-FT presets: ``gere_wise_alpha`` candidates, one chosen after every task on the dev items of that task
    #: and the earlier ones (:func:`~gere_plugin.continual.wise_select.select_wise_alpha`; 1.0 is always one);
    #: empty: the fixed ``gere_wise_alpha`` of :attr:`gere`. A run's ``TrainSettings.wise_alphas`` overrides it.
    wise_alphas: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.wise_alphas and "gere_wise_alpha" not in dict(self.gere):
            raise ValueError(f"method {self.name!r}: wise_alphas chooses gere_wise_alpha, which its gere keys lack")
        if not all(isinstance(a, (int, float)) and 0 < a <= 1 for a in self.wise_alphas):
            raise ValueError(f"method {self.name!r}: wise_alphas={self.wise_alphas!r} must be numbers in (0, 1]")

    def without_wise(self) -> MethodSpec:
        """This method as it trains a task: without WiSE-FT's interpolation (the first-task learning-rate
        selection trains that way, and methods that differ only in WiSE-FT share it)."""
        return dataclasses.replace(self, gere=tuple(kv for kv in self.gere if kv[0] != "gere_wise_alpha"),
                                   wise_alphas=())

    def wise_candidates(self, override: Sequence[float] = ()) -> tuple[float, ...]:
        """The ``gere_wise_alpha`` candidates chosen among after each task on dev items: ``override`` (a run's
        ``TrainSettings.wise_alphas``) when given, else the preset's :attr:`wise_alphas`; empty for a fixed alpha
        (and for a method that does not interpolate)."""
        if "wise" not in self.uses:
            return tuple(override)  # check_sequence refuses a non-empty override for such a method by name
        return tuple(float(a) for a in (override or self.wise_alphas))

    def gere_kwargs(self, task_index: int) -> dict[str, Any]:
        """The ``gere_*`` regularizer/freeze keys for task ``task_index`` (replay source added by the caller)."""
        freeze = task_index >= self.freeze_from
        out = {
            "gere_regularizer": self.regularizer if self.replay else "none",
            "gere_freeze_layers": self.freeze_layers if freeze else 0,
            "gere_freeze_embeddings": self.freeze_embeddings if freeze else False,
        }
        out.update(dict(self.gere))  # the method's own keys (weighting, FLOW, EWC, task KL)
        if task_index == 0:  # no earlier task yet: the first task trains as without the earlier-task keys
            for key in EARLIER_TASK_KEYS:
                out.pop(key, None)
        return out

    @property
    def uses(self) -> list[str]:
        """The methods without replay this preset switches on (``flow``, ``ewc``, ``task_kl``, ``wise``), and
        ``logit_replay`` when it gives the earlier-task rows a KL to their stored logits."""
        from ..config import task_methods

        return task_methods(dict(self.gere)) + (["logit_replay"] if self.logit_replay else [])

    @property
    def logit_replay(self) -> bool:
        """Earlier-task rows with a KL to the logits stored when their task ended (``der``)."""
        weight = dict(self.gere).get("gere_task_replay_logit_weight")
        return self.task_replay and isinstance(weight, (int, float)) and weight > 0

    @property
    def needs_base_reference(self) -> bool:
        """Whether the method compares with the ORIGINAL base model (replay l1/l2/kl, task KL)."""
        return (self.replay and self.regularizer in ("l1", "l2", "kl")) or "task_kl" in self.uses


#: The paper's exact TM weighting: w = CE / TM, unbounded, TM reduced over its non-zero elements.
PAPER_WEIGHTING: tuple[tuple[str, Any], ...] = (
    ("gere_tm_reduction", "violations"), ("gere_weight", "dynamic"), ("gere_weight_max", None),
)

#: The feature-distillation baselines keep the paper's dynamic weight whatever the package default is.
FD_WEIGHTING: tuple[tuple[str, Any], ...] = (("gere_weight", "dynamic"), ("gere_weight_max", None))

#: EWC strength of the ``ewc`` presets (not tuned on any benchmark yet: override with
#: ``TrainSettings.gere_ewc_lambda`` / ``gere sequence --gere_ewc_lambda``).
EWC_LAMBDA = 1000.0
#: Task-KL weight of the ``task_kl`` preset: LLaMA-Factory's default ``asft_alpha``.
TASK_KL_WEIGHT = 0.1
#: Interpolation share of the ``wise`` presets: WiSE-FT's mixing coefficient 0.5 (Wortsman et al. 2022), the
#: choice without a held-out split; not tuned on any benchmark here. Choose it on a dev split with
#: :func:`gere_plugin.continual.wise_select.select_wise_alpha`; override with ``TrainSettings.gere_wise_alpha``
#: / ``gere sequence --gere_wise_alpha``.
WISE_ALPHA = 0.5
#: Logit-replay ``beta`` of the ``der`` preset: the KL to the stored logits at half the weight of the
#: earlier-task CE (not tuned on any benchmark yet: override with ``TrainSettings.gere_task_replay_logit_weight``).
DER_LOGIT_WEIGHT = 0.5
#: The two stronger earlier-task settings the dev-only selection also weighs (benchmarks/select_recommended.py):
#: the earlier tasks' share ``rho`` of the task term raised from its row share (1 row beside 8: 0.111) to
#: :data:`DER_STRONG_SHARE` (``der_paper_rho25``), or the logit-replay ``beta`` raised to
#: :data:`DER_STRONG_LOGIT_WEIGHT` (``der_paper_beta1``). Neither adds a row, so neither adds step time.
DER_STRONG_SHARE = 0.25
DER_STRONG_LOGIT_WEIGHT = 1.0
#: WiSE-FT's ``alpha`` of ``der_paper_wise``, fixed (the recommended-preset selection scores candidates on the dev
#: items, so they cannot also choose alpha there): the median of the nine picks the dev rule
#: (:func:`gere_plugin.continual.wise_select.select_wise_alpha`) had made in the cpu-fair ``wise`` / ``gere_wise``
#: runs when the preset was written (0.25, 0.75, 0.5 / 0.75, 0.75, 0.5 / 0.75, 1.0, 0.75; dev numbers only).
DER_WISE_ALPHA = 0.75
#: WiSE-FT's ``alpha`` candidates of the presets that choose it per task (1.0 is always one too, see
#: :attr:`MethodSpec.wise_alphas`), and of the forgetting benchmark's ``wise`` / ``gere_wise`` rows.
WISE_ALPHA_GRID = (0.25, 0.5, 0.75)

METHODS: dict[str, MethodSpec] = {
    "plain": MethodSpec("plain", replay=False, regularizer="none"),
    "replay": MethodSpec("replay", replay=True, regularizer="none"),
    "kl": MethodSpec("kl", replay=True, regularizer="kl", gere=FD_WEIGHTING),
    "l1": MethodSpec("l1", replay=True, regularizer="l1", gere=FD_WEIGHTING),
    "l2": MethodSpec("l2", replay=True, regularizer="l2", gere=FD_WEIGHTING),
    "gere": MethodSpec("gere", replay=True, regularizer="tm"),
    "gere_paper": MethodSpec("gere_paper", replay=True, regularizer="tm", gere=PAPER_WEIGHTING),
    "gere_freeze": MethodSpec("gere_freeze", replay=True, regularizer="tm", freeze_layers=3, freeze_embeddings=True),
    "flow": MethodSpec("flow", replay=False, regularizer="none", gere=(("gere_flow", True),)),
    "ewc": MethodSpec("ewc", replay=False, regularizer="none", gere=(("gere_ewc_lambda", EWC_LAMBDA),)),
    "task_kl": MethodSpec("task_kl", replay=False, regularizer="none", gere=(("gere_task_kl", TASK_KL_WEIGHT),)),
    "gere_flow": MethodSpec("gere_flow", replay=True, regularizer="tm", gere=(("gere_flow", True),)),
    "gere_ewc": MethodSpec("gere_ewc", replay=True, regularizer="tm", gere=(("gere_ewc_lambda", EWC_LAMBDA),)),
    "sdft": MethodSpec("sdft", replay=False, regularizer="none", external="sdft"),
    "osf": MethodSpec("osf", replay=False, regularizer="none", external="osf"),
    "gere_er": MethodSpec("gere_er", replay=True, regularizer="tm", task_replay=True),
    "replay_er": MethodSpec("replay_er", replay=True, regularizer="none", task_replay=True),
    "plain_er": MethodSpec("plain_er", replay=False, regularizer="none", task_replay=True),
    "wise": MethodSpec("wise", replay=False, regularizer="none", gere=(("gere_wise_alpha", WISE_ALPHA),)),
    "gere_wise": MethodSpec("gere_wise", replay=True, regularizer="tm", gere=(("gere_wise_alpha", WISE_ALPHA),)),
    "der": MethodSpec("der", replay=True, regularizer="tm", task_replay=True,
                      gere=(("gere_task_replay_logit_weight", DER_LOGIT_WEIGHT),)),
    # der with the paper's TM weighting (gere_paper + earlier-task replay + logit replay)
    "der_paper": MethodSpec("der_paper", replay=True, regularizer="tm", task_replay=True,
                            gere=PAPER_WEIGHTING + (("gere_task_replay_logit_weight", DER_LOGIT_WEIGHT),)),
    # der_paper with the earlier tasks' share of the task term raised to 0.25 (same rows, same cost)
    "der_paper_rho25": MethodSpec("der_paper_rho25", replay=True, regularizer="tm", task_replay=True,
                                  gere=PAPER_WEIGHTING + (("gere_task_replay_logit_weight", DER_LOGIT_WEIGHT),
                                                          ("gere_task_replay_weight", DER_STRONG_SHARE))),
    # der_paper with the KL to the stored logits at the earlier-task CE's full weight
    "der_paper_beta1": MethodSpec("der_paper_beta1", replay=True, regularizer="tm", task_replay=True,
                                  gere=PAPER_WEIGHTING + (("gere_task_replay_logit_weight", DER_STRONG_LOGIT_WEIGHT),)),
    # der_paper + WiSE-FT after each task at a fixed alpha (no row added: the interpolation runs once per task)
    "der_paper_wise": MethodSpec("der_paper_wise", replay=True, regularizer="tm", task_replay=True,
                                 gere=PAPER_WEIGHTING + (("gere_task_replay_logit_weight", DER_LOGIT_WEIGHT),
                                                         ("gere_wise_alpha", DER_WISE_ALPHA))),
    # der_paper_wise with alpha chosen after each task on dev items among WISE_ALPHA_GRID and 1.0, giving up at most
    # 1 point of the task's dev accuracy (select_wise_alpha); gere_wise_alpha marks it as interpolating (the chosen
    # alpha replaces it)
    "der_paper_wise_tuned": MethodSpec("der_paper_wise_tuned", replay=True, regularizer="tm", task_replay=True,
                                       gere=PAPER_WEIGHTING + (("gere_task_replay_logit_weight", DER_LOGIT_WEIGHT),
                                                               ("gere_wise_alpha", DER_WISE_ALPHA)),
                                       wise_alphas=WISE_ALPHA_GRID),
}

#: The recommended preset (a key of :data:`METHODS`), picked on dev splits by benchmarks/select_recommended.py
#: among ``der``, ``der_paper``, ``der_paper_rho25``, ``der_paper_beta1`` and ``der_paper_wise``
#: (benchmarks/results/recommended_selection_cpu-fair.md: ``der_paper`` won, dev AP 83.3 + dev ARC-Easy 50.0
#: against 81.0 + 41.4, 80.0 + 50.0 and 79.0 + 50.0; ``der_paper_wise`` learned too little to be admissible);
#: see docs/evaluation.md. The one place the
#: choice is written: ``gere sequence`` and ``make demo`` run it by default. Deliberately no alias entry in
#: :data:`METHODS` (a second name for the same spec would give it two rows in every result table).
RECOMMENDED: str = "der_paper"

#: The presets a sequence of tasks without dev items can run (``gere sequence`` and the demo take no dev items):
#: every one but those that choose WiSE-FT's alpha on dev items (:meth:`MethodSpec.wise_candidates`).
NO_DEV_METHODS: tuple[str, ...] = tuple(sorted(name for name, spec in METHODS.items() if not spec.wise_candidates()))

#: TrainSettings fields that override a preset's strength (only for presets that use the key).
STRENGTH_SETTINGS = {"gere_ewc_lambda": "ewc", "gere_task_kl": "task_kl", "gere_wise_alpha": "wise",
                     "gere_task_replay_logit_weight": "logit_replay"}


#: A test or dev item of a sequence task: a label-word item or a generation item (prompt + reference answers).
TaskItem = Union[ClassificationItem, GenerationItem]

#: Greedy tokens generated per generation item when a task is scored (short answers: keeps evaluation cheap).
GENERATION_MAX_NEW_TOKENS = 12


def item_kind(items: Sequence[TaskItem], what: str = "items") -> Optional[str]:
    """``"classification"`` or ``"generation"`` when every item is of that kind, ``None`` for no items;
    :class:`ValueError` (naming ``what``) for a mix or for anything else."""
    kinds = set()
    for item in items:
        if isinstance(item, ClassificationItem):
            kinds.add("classification")
        elif isinstance(item, GenerationItem):
            kinds.add("generation")
        else:
            raise ValueError(f"{what}: {type(item).__name__} is neither a ClassificationItem nor a GenerationItem")
    if len(kinds) > 1:
        raise ValueError(f"{what} mix ClassificationItem and GenerationItem; one task holds items of one kind")
    return kinds.pop() if kinds else None


@dataclass
class SequenceTask:
    """One task of the sequence: TRL SFT rows (prompt/completion or text) and test items of ONE kind, either
    label-word items (:class:`ClassificationItem`, scored by ``label_accuracy``) or generation items
    (:class:`GenerationItem`, scored by greedy exact match with ``max_new_tokens`` tokens).

    ``dev`` holds held-out items of the same kind for choosing hyper-parameters (never the test items); may be
    empty.
    """

    name: str
    train: list[dict[str, str]]
    test: list[TaskItem]
    dev: list[TaskItem] = field(default_factory=list)
    max_new_tokens: int = GENERATION_MAX_NEW_TOKENS

    def __post_init__(self) -> None:
        test_kind = item_kind(self.test, f"task {self.name!r} test")
        dev_kind = item_kind(self.dev, f"task {self.name!r} dev")
        if test_kind and dev_kind and test_kind != dev_kind:
            raise ValueError(f"task {self.name!r}: test items are {test_kind} items but dev items are {dev_kind} "
                             "items; give both splits items of one kind")
        if self.max_new_tokens < 1:
            raise ValueError(f"task {self.name!r}: max_new_tokens={self.max_new_tokens} must be >= 1")

    @property
    def kind(self) -> Optional[str]:
        """``"classification"`` or ``"generation"`` (``None`` while the task has no test or dev items)."""
        return item_kind(self.test) or item_kind(self.dev)

    @classmethod
    def from_label_task(cls, task: Any) -> SequenceTask:
        """From an :class:`gere_plugin.assets.LabelTask` or :class:`~gere_plugin.assets.GenerationTask` (or
        anything with name/train/test[/dev][/max_new_tokens])."""
        return cls(name=task.name, train=list(task.train), test=list(task.test), dev=list(getattr(task, "dev", [])),
                   max_new_tokens=getattr(task, "max_new_tokens", GENERATION_MAX_NEW_TOKENS))
