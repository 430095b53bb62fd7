"""``GeReSFTConfig`` / ``GeReSFTTrainer``: TRL's SFT with GeRe replay (thin wiring over :mod:`gere_plugin.trainer`)."""

from __future__ import annotations

from dataclasses import dataclass

from trl import SFTConfig, SFTTrainer

from ..config import GeReArguments
from .mixin import GeReTrainerMixin


@dataclass
class GeReSFTConfig(GeReArguments, SFTConfig):
    """TRL's :class:`~trl.SFTConfig` plus every ``gere_*`` key of :class:`~gere_plugin.GeReArguments`.

    ``TrlParser((ScriptArguments, GeReSFTConfig, ModelConfig))`` accepts ``--gere_*`` flags and YAML.
    See :class:`~gere_plugin.GeReArguments` for each key.
    """


class GeReSFTTrainer(GeReTrainerMixin, SFTTrainer):
    """TRL's :class:`~trl.SFTTrainer` with GeRe.

    Every optimizer step gets ``gere_replay_per_step`` replay rows (spread over micro-batches,
    gradient accumulation and ranks); they go through one extra forward with hidden states and the
    loss becomes ``mean(CE_task, CE_replay) + w * regularizer``. Same constructor as ``SFTTrainer``
    (``args`` must be a :class:`GeReSFTConfig`, or pass ``gere_args=GeReArguments(...)``). With
    ``gere_replay=None`` it is exactly an ``SFTTrainer``. ``gere_ref_model=`` sets the frozen model
    that ``l1``/``l2``/``kl`` compare against (default: a copy of ``model`` as given).
    """

    gere_family = "sft"
