"""``GeRePlugin``: GeRe replay for Axolotl SFT, DPO and GRPO, LoRA/QLoRA and full fine-tunes.

Use it with ``plugins: [gere_plugin.GeRePlugin]`` and ``gere_*`` keys in the Axolotl YAML. On
Axolotl >= 0.21 the ``plugins:`` line is optional: Axolotl loads the plugin through this package's
``axolotl.plugins`` entry point for every config, and the ``gere_*`` keys alone turn GeRe on.

Exactly once, whatever the YAML says: Axolotl keys its plugin registry by the spelling of the
plugin line, so ``gere_plugin.GeRePlugin`` in the YAML next to the entry point (or two spellings in
one YAML) gives several ``GeRePlugin`` instances. Only the first one registered acts (schema, checks,
trainer set-up); the others stay inert, so the schema is merged once and the replay step is attached
once (see :meth:`GeRePlugin._is_primary`).

A config is served when it asks for GeRe (lists the plugin or sets any ``gere_*`` key); every other
config passes untouched, which matters on 0.21 where the plugin is loaded for all of them.

How it hooks in (Axolotl 0.19 and 0.21):

* ``get_input_args`` adds :class:`~gere_plugin.axolotl.args.GeReArgs` to Axolotl's config schema,
  so the ``gere_*`` keys survive validation and bad values are validation errors naming the key.
* ``post_trainer_create`` turns the trainer Axolotl built (``AxolotlTrainer`` for SFT,
  ``AxolotlDPOTrainer`` for ``rl: dpo``/``ipo``, ``AxolotlGRPOTrainer`` for ``rl: grpo``, or whatever
  ``trainer_cls`` / another plugin chose)
  into its GeRe subclass in place with :func:`gere_plugin.enable_gere`: a class swap plus
  :func:`gere_plugin.trainer.setup_gere`, which freezes ``gere_freeze_layers`` /
  ``gere_freeze_embeddings``, loads or builds the base-model state cache (main process first) and
  attaches the replay step. This runs after the trainer is built and before ``trainer.train()``
  creates the optimizer and wraps the model for DDP/DeepSpeed, so frozen parameters never reach the
  optimizer. Swapping the class instead of returning one from ``get_trainer_cls`` keeps Axolotl's
  own trainer selection (and works for RL, where a plugin's trainer class is built without the
  model: Axolotl issue #2883).
* The loss family follows ``rl:`` (:mod:`gere_plugin.families`): SFT ``mean(CE_task, CE_replay) + w*R``;
  DPO/IPO ``L_dpo + CE_replay + w*R``; GRPO ``L_grpo + CE_replay + w*R`` with ``w = CE_replay / R``
  (the GRPO loss can be negative). The reference model Axolotl built (full fine-tune) or the
  adapter-disabled model (LoRA/QLoRA) serves ``l1``/``l2``/``kl``.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Optional

from axolotl.integrations.base import BasePlugin

from ..trainer import ReplayStep, enable_gere
from .args import check_gere_request, gere_arguments_from_cfg, gere_requested, loss_family_for_rl

logger = logging.getLogger(__name__)

_LOG_FORMAT = "[%(asctime)s] [%(levelname)s] [%(name)s] %(message)s"


def route_gere_logging() -> None:
    """Show ``gere_plugin`` INFO lines next to Axolotl's own.

    Axolotl filters INFO records of loggers not named ``axolotl.*`` twice: its logger class attaches
    a filter to every such logger, and its console handlers carry the same filter. So the GeRe
    messages (replay set size, state cache built or reused, frozen layers) would vanish. This strips
    that filter from the ``gere_plugin.*`` loggers and gives ``gere_plugin`` its own stdout handler
    at ``AXOLOTL_LOG_LEVEL`` (default INFO) plus Axolotl's unfiltered file handler (``debug.log``);
    ranks other than the main one only show warnings. Safe to call repeatedly.
    """
    root = logging.getLogger("gere_plugin")
    for name, lg in list(logging.Logger.manager.loggerDict.items()):
        if (name == "gere_plugin" or name.startswith("gere_plugin.")) and isinstance(lg, logging.Logger):
            for f in list(lg.filters):
                if type(f).__name__ == "AxolotlOrWarnErrorFilter":
                    lg.removeFilter(f)
    if getattr(root, "_gere_routed", False):
        return
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(_LOG_FORMAT))
    root.addHandler(handler)
    for h in logging.getLogger("axolotl").handlers:
        if not h.filters:
            root.addHandler(h)
    level = os.getenv("AXOLOTL_LOG_LEVEL", "INFO").upper()
    if int(os.getenv("RANK", os.getenv("LOCAL_RANK", "0")) or 0) != 0:
        level = "WARNING"  # INFO once, from the main process
    root.setLevel(level)
    root.propagate = False
    root._gere_routed = True  # type: ignore[attr-defined]


class GeRePlugin(BasePlugin):
    """Axolotl plugin that adds GeRe (general samples replay + threshold-margin loss) to training.

    Every optimizer step gets ``gere_replay_per_step`` rows of the fixed general replay set; their
    final hidden states are kept in the base model's activation states (the TM loss). See
    :class:`~gere_plugin.GeReArguments` for every key.
    """

    def _is_primary(self) -> bool:
        """Whether this instance is the one that acts (the first ``GeRePlugin`` Axolotl registered).

        An instance Axolotl never registered (e.g. built directly in a script) acts as well.
        """
        from axolotl.integrations.base import PluginManager

        # The registry as it is (not get_instance(): on 0.21 that may register built-in plugins, and this
        # runs while Axolotl iterates over the registry).
        manager = getattr(PluginManager, "_instance", None)
        registered = manager.plugins.values() if manager is not None else ()
        mine = [p for p in registered if isinstance(p, GeRePlugin)]
        return not any(p is self for p in mine) or mine[0] is self

    def _serves(self, cfg: Any) -> bool:
        """Whether this instance acts on ``cfg``: it is the primary instance and ``cfg`` asks for GeRe."""
        return self._is_primary() and gere_requested(cfg)

    def get_input_args(self) -> Optional[str]:
        # Once per schema: a second GeRePlugin instance must not add GeReArgs again (duplicate base class).
        return "gere_plugin.axolotl.args.GeReArgs" if self._is_primary() else None

    def register(self, cfg: dict) -> None:
        """Early, readable errors on the raw config (the schema repeats these checks)."""
        # Axolotl's PluginManager is a singleton (and 0.21 loads this plugin for every config): only
        # configs that ask for GeRe are checked.
        if not self._serves(cfg):
            return
        route_gere_logging()
        check_gere_request(cfg)

    def post_trainer_create(self, cfg: Any, trainer: Any) -> None:
        """Turn the built trainer into a GeRe trainer (before the optimizer exists)."""
        if not self._serves(cfg):
            return
        if getattr(trainer, "gere_args", None) is not None:
            return  # already set up (defensive: the primary-instance rule should make this unreachable)
        check_gere_request(cfg)
        route_gere_logging()
        gere_args = gere_arguments_from_cfg(cfg)
        freezing = bool(gere_args.gere_freeze_layers or gere_args.gere_freeze_embeddings)
        if freezing and getattr(trainer, "optimizer", None) is not None:
            raise RuntimeError(
                "gere: the optimizer already exists when the GeRe plugin sets up the trainer, so the layers that "
                "gere_freeze_layers / gere_freeze_embeddings freeze would already be in it. Something (another "
                "plugin?) created it early; list the GeRe plugin first in plugins:, or freeze with Axolotl's "
                "unfrozen_parameters instead."
            )
        family = loss_family_for_rl(cfg.get("rl"))
        enable_gere(trainer, gere_args, family=family)
        step: Optional[ReplayStep] = getattr(trainer, "gere_step", None)
        logger.info(
            "gere: trainer runs as %s (loss family=%s, combine=%s, replay rows per step=%s, regularizer=%s, "
            "frozen tensors=%d, forgetting monitor=%s)",
            type(trainer).__name__,
            family,
            trainer.gere_combine,
            step.per_step if step is not None else 0,
            gere_args.gere_regularizer if step is not None else "none",
            len(getattr(trainer, "gere_frozen", []) or []),
            "on" if getattr(trainer, "gere_monitor", None) is not None else "off",
        )
