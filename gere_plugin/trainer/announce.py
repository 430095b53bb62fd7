"""The one line GeRe prints when training starts: what it replays, how it regularizes, what it froze."""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:  # pragma: no cover
    from .step import ReplayStep

logger = logging.getLogger("gere_plugin.trainer")


def announce(line: str) -> None:
    """Show ``line`` once: as an INFO record where ``gere_plugin`` INFO records are shown (the ``gere``
    command, the Axolotl plugin, a user's logging set-up), else on stderr, so that it is visible at
    TRL's default log level too."""
    if logger.isEnabledFor(logging.INFO) and logger.hasHandlers():
        logger.info(line)
    else:
        print(line, file=sys.stderr, flush=True)


def _describe_frozen(trainer: Any, gere_args: Any) -> str:
    names = getattr(trainer, "gere_frozen", None) or []
    if not names:
        return "nothing frozen"
    what = []
    if gere_args.gere_freeze_embeddings:
        what.append("embeddings")
    if gere_args.gere_freeze_layers:
        what.append(f"bottom {gere_args.gere_freeze_layers} decoder layers")
    return f"frozen: {' + '.join(what)} ({len(names)} tensors)"


def describe_gere(trainer: Any, checkpoint: Optional[str] = None) -> str:
    """The one line GeRe prints at train start: what it replays, how it regularizes, what it froze."""
    gere_args = getattr(trainer, "gere_args", None) or trainer.args
    step: Optional[ReplayStep] = getattr(trainer, "gere_step", None)
    frozen = _describe_frozen(trainer, gere_args)
    task = getattr(trainer, "gere_task", None)
    if task is not None:
        frozen = f"{task.describe()}; {frozen}"
    monitor = getattr(trainer, "gere_monitor", None)
    watching = f"; {monitor.describe()}" if monitor is not None else ""
    if step is None:
        return f"gere: no replay (gere_replay is not set); {frozen}{watching}"
    weight = f" with weight {gere_args.gere_weight}"
    if step.family.weight_basis == "replay_ce" and step.fixed_weight is None:
        weight += " (w*R matched to the replay CE: the task loss may be negative)"
    parts = []
    if step.replay is not None:
        parts += [
            f"{step.per_step} replay rows per optimizer step from {len(step.replay)} samples "
            f"({step.replay.num_tokens} tokens) of {step.replay.source}",
            f"regularizer {step.regularizer}" + ("" if step.regularizer == "none" else weight),
        ]
    else:
        parts.append("no general replay (gere_replay is not set)")
    if step.earlier is not None:
        parts.append(step.earlier.describe())
    parts.append(f"loss family {step.family.name}")
    if step.states is not None:
        parts.append(f"state cache {step.cache_dir(trainer)} {step.cache_action}")
    parts.append(frozen)
    if checkpoint is not None:
        parts.append(f"resuming {checkpoint} (replay settings checked)")
    logits = getattr(step.earlier, "logits", None)
    earlier = "CE_earlier" if logits is None else f"(CE_earlier + {logits.weight:g}*KL_earlier)"
    task = "task" if step.task_replay is None else f"((1-rho)*task + rho*{earlier})"
    if step.replay is None:
        total = task
    else:
        total = f"mean({task}, replay CE)" if step.combine == "mean" else f"{task} + replay CE"
    parts.append(f"logged loss = {total}{'' if step.regularizer == 'none' else ' + w*R'}; task term alone: gere/task_loss")
    return "gere: " + "; ".join(parts) + watching
