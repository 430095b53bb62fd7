"""``GeReDPOConfig`` / ``GeReDPOTrainer``: TRL's DPO with GeRe replay (thin wiring over :mod:`gere_plugin.trainer`)."""

from __future__ import annotations

from dataclasses import dataclass

from trl import DPOConfig, DPOTrainer

from ..config import GeReArguments
from .mixin import GeReTrainerMixin


@dataclass
class GeReDPOConfig(GeReArguments, DPOConfig):
    """TRL's :class:`~trl.DPOConfig` plus every ``gere_*`` key of :class:`~gere_plugin.GeReArguments`."""


class GeReDPOTrainer(GeReTrainerMixin, DPOTrainer):
    """TRL's :class:`~trl.DPOTrainer` with GeRe: ``loss = L_dpo + CE_replay + w * regularizer``.

    The dynamic weight matches the regularizer to the DPO loss. For ``l1``/``l2``/``kl`` the base
    activations come from TRL's reference: the ``ref_model`` of a full fine-tune, or the
    adapter-disabled model for LoRA/QLoRA; with ``precompute_ref_log_probs`` and no reference model a
    frozen copy is kept; ``gere_ref_model=`` overrides it (e.g. the original base on a later task of a
    sequence, while DPO keeps its own ``ref_model``). The replay step is the same code as
    :class:`~gere_plugin.GeReSFTTrainer`'s.
    """

    gere_family = "dpo"
