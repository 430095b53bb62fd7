"""Loss families: how a trainer's own loss is combined with GeRe's replay terms.

GeRe adds ``CE_replay`` (cross-entropy on the replay rows) and ``w * R`` (the weighted regularizer) to
the loss the parent trainer computes. How they combine depends on what that loss *is*, so every
trainer GeRe wraps belongs to exactly one family:

========  ==========================  =====================================  ============================
family    parent loss                 combined loss                          dynamic weight ``w``
========  ==========================  =====================================  ============================
``sft``   token-mean CE (>= 0):       ``mean(CE_task, CE_replay) + w * R``   ``mean(CE_task, CE_replay)
          SFT, a plain LM Trainer                                            / R`` (the paper's rule)
``dpo``   preference loss (>= 0):     ``L_dpo + CE_replay + w * R``          ``L_dpo / R``
          DPO, IPO
``grpo``  policy-gradient loss, any   ``L_grpo + CE_replay + w * R``         ``CE_replay / R``
          sign, often ~0: GRPO
========  ==========================  =====================================  ============================

``w`` is computed per micro-batch from detached values (``R + 1e-8`` in the denominator), bounded by
``gere_weight_max`` when set; a fixed ``gere_weight`` replaces it in every family. The ``grpo``
rule exists because the GRPO loss is near 0 and often negative (advantages are zero-mean per prompt
group): ``L_grpo / R`` would be a tiny or NEGATIVE weight that pushes activations away from the base
model. Replay CE is a cross-entropy, never negative, and measures the same replay rows the
regularizer acts on, so ``w * R`` matches the replay CE term whatever the sign of the policy loss.

The family also says how GeRe's default ``gere_replay_per_step`` reads the parent's batch:
``sft``/``dpo`` count rows (a DPO row is a preference pair), ``grpo`` counts prompts
(``completions / num_generations``; ``per_device_train_batch_size`` counts completions in TRL's GRPO).

:func:`family_for` picks the family from the trainer class: the first TRL class in its MRO decides, so
TRL's ``SFTTrainer`` / ``DPOTrainer`` / ``GRPOTrainer`` and subclasses written outside TRL (yours,
Axolotl's) get their family, and any ``transformers.Trainer`` without a TRL class is ``sft``. Every
other TRL trainer is REFUSED with an error naming it: KTO, ORPO, online DPO, RLOO, PPO, reward
trainers, and TRL's own variants of the three (GKD subclasses ``SFTTrainer`` but trains on a
distillation loss): their losses have other signs and scales, and a guessed rule would be silently
wrong. ``family=`` overrides the choice for a trainer whose loss the caller knows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from ..config import GeReConfigError


@dataclass(frozen=True)
class LossFamily:
    """How GeRe combines its replay terms with one kind of parent loss."""

    name: str
    combine: str  # "mean": mean(task, replay CE); "sum": task + replay CE
    weight_basis: str  # the dynamic weight matches w * R to "task" (the combined CE/task term) or "replay_ce"
    batch_unit: str  # what gere_replay_per_step's default counts: "rows" or "prompts"
    describes: str  # the parent losses this family is for


FAMILIES: dict[str, LossFamily] = {
    "sft": LossFamily("sft", "mean", "task", "rows", "a token-mean cross-entropy (SFT, a plain language-model Trainer)"),
    "dpo": LossFamily("dpo", "sum", "task", "rows", "a non-negative preference loss (DPO, IPO)"),
    "grpo": LossFamily("grpo", "sum", "replay_ce", "prompts", "a policy-gradient loss of any sign (GRPO)"),
}

#: The family of each TRL trainer GeRe is defined and tested for (matched by class name in ``trl``).
TRL_FAMILIES = {"SFTTrainer": "sft", "DPOTrainer": "dpo", "GRPOTrainer": "grpo"}

#: ``combine`` spellings of the older API: ``mean`` = the ``sft`` family, ``sum`` = the ``dpo`` family.
COMBINE_FAMILIES = {"mean": "sft", "sum": "dpo"}


#: TRL's shared base classes: not trainers of their own, skipped when the MRO is searched.
_TRL_BASES = frozenset({"_BaseTrainer", "BaseTrainer"})


def _is_trl_trainer(cls: type) -> bool:
    module = getattr(cls, "__module__", "") or ""
    name = cls.__name__
    return (module == "trl" or module.startswith("trl.")) and name.endswith("Trainer") and name not in _TRL_BASES


def detect_family(trainer_cls: type) -> tuple[Optional[str], Optional[type]]:
    """``(family name, deciding class)`` from the method resolution order of ``trainer_cls``.

    The first TRL trainer class in the MRO decides: a known one gives its family, any other gives
    ``(None, that class)`` (unknown semantics). With no TRL trainer in the MRO the class is a plain
    ``transformers.Trainer`` (or Axolotl's SFT ``AxolotlTrainer``), whose loss is the LM cross-entropy:
    ``sft``.
    """
    for klass in trainer_cls.__mro__:
        if _is_trl_trainer(klass):
            return TRL_FAMILIES.get(klass.__name__), klass
    return "sft", None


def family_for(trainer_cls: type, family: Optional[str] = None, combine: Optional[str] = None) -> LossFamily:
    """The :class:`LossFamily` GeRe uses for ``trainer_cls``; raises :class:`GeReConfigError` when unknown.

    Args:
        trainer_cls: the trainer class GeRe is layered on.
        family: ``"sft"`` / ``"dpo"`` / ``"grpo"`` chosen by the caller (wins over detection).
        combine: the older spelling (``"mean"`` / ``"sum"``). On a TRL trainer whose family is known it must
            agree with that family; on a plain Trainer it picks ``sft`` (mean) or ``dpo`` (sum).
    """
    name = trainer_cls.__name__
    if family is not None:
        if family not in FAMILIES:
            raise GeReConfigError(f"family={family!r} is not one of {', '.join(FAMILIES)} (trainer {name}).")
        chosen = FAMILIES[family]
        if combine is not None and combine != chosen.combine:
            raise GeReConfigError(
                f"combine={combine!r} contradicts family={family!r} (which combines with {chosen.combine!r}) for {name}: "
                "pass only family."
            )
        return chosen
    if combine is not None and combine not in COMBINE_FAMILIES:
        raise GeReConfigError(f"combine={combine!r} must be 'mean' or 'sum' (trainer {name}).")
    detected, decider = detect_family(trainer_cls)
    if detected is None:
        assert decider is not None
        raise GeReConfigError(
            f"GeRe cannot tell how {name} (built on TRL's {decider.__name__}) should combine its loss with replay: "
            f"GeRe is defined for {', '.join(f'{k} ({v.describes})' for k, v in FAMILIES.items())}. "
            f"{decider.__name__}'s loss has another sign or scale, so a guessed combine rule or dynamic weight could be "
            "silently wrong (e.g. a negative weight). Use GeReSFTTrainer / GeReDPOTrainer / GeReGRPOTrainer, or, if you "
            "know which family its loss belongs to, pass family='sft' | 'dpo' | 'grpo' to with_gere / enable_gere."
        )
    if combine is None:
        return FAMILIES[detected]
    if decider is None:  # a plain Trainer: the caller's combine chooses between the two CE-scaled families
        return FAMILIES[COMBINE_FAMILIES[combine]]
    if combine != FAMILIES[detected].combine:
        raise GeReConfigError(
            f"combine={combine!r} is wrong for {name} (a {decider.__name__}): its loss is "
            f"{FAMILIES[detected].describes} and combines with {FAMILIES[detected].combine!r}. Leave combine unset."
        )
    return FAMILIES[detected]


def prompts_per_step(trainer: Any, global_batch: int) -> int:
    """Prompts in one optimizer step of a GRPO-like trainer: completions of the step / ``num_generations``."""
    generations = getattr(getattr(trainer, "args", None), "num_generations", None) or getattr(trainer, "num_generations", None)
    if not generations:
        raise GeReConfigError(
            f"{type(trainer).__name__} has no num_generations, so GeRe cannot count its batch in prompts "
            "(family 'grpo'); pass gere_replay_per_step explicitly or use another family."
        )
    return global_batch // int(generations)
