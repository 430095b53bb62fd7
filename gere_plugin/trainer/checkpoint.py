"""What a checkpoint carries for GeRe, and the check that a resume matches it.

The replay schedule is a pure function of ``global_step``, so a resumed run replays exactly what an
uninterrupted run would, provided the replay set and schedule are the same: :class:`GeReCheckpointCallback`
writes their fingerprints next to every checkpoint and :func:`check_resume` refuses a mismatch.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from transformers import TrainerCallback

from ..config import GeReConfigError

if TYPE_CHECKING:  # pragma: no cover
    from .step import ReplayStep

logger = logging.getLogger(__name__)

GERE_STATE_FILE = "gere_state.json"


class GeReCheckpointCallback(TrainerCallback):
    """Writes the replay schedule state next to every checkpoint; the schedule itself is a function of
    ``global_step``, so a resumed run replays exactly what an uninterrupted run would."""

    def __init__(self, step: ReplayStep) -> None:
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if ckpt.exists():
                data = dict(self.step.state_dict(), global_step=state.global_step)
                tmp = ckpt / f".{GERE_STATE_FILE}.tmp"
                tmp.write_text(json.dumps(data, indent=1))
                os.replace(tmp, ckpt / GERE_STATE_FILE)
        return control


def check_resume(step: ReplayStep, checkpoint: str) -> None:
    """Refuse to resume a checkpoint written with another replay set or schedule."""
    if not Path(checkpoint).is_dir():
        return  # the Trainer reports a missing checkpoint itself
    path = Path(checkpoint) / GERE_STATE_FILE
    if not path.exists():
        logger.warning("gere: %s has no %s; resuming without checking the replay schedule.", checkpoint, GERE_STATE_FILE)
        return
    saved = json.loads(path.read_text())
    now = step.state_dict()
    if saved.get("replay_fingerprint") != now["replay_fingerprint"] or saved.get("schedule") != now["schedule"]:
        raise GeReConfigError(
            f"Checkpoint {checkpoint} was trained with another replay set or schedule "
            f"(saved {saved.get('schedule')}, now {now['schedule']}). Resume with the same gere_replay, "
            "gere_replay_size, gere_replay_max_length, gere_replay_per_step and gere_seed, or start a new run."
        )
    if saved.get("task_replay") != now.get("task_replay"):
        raise GeReConfigError(
            f"Checkpoint {checkpoint} was trained with other earlier-task replay (saved {saved.get('task_replay')}, "
            f"now {now.get('task_replay')}). Resume with the same gere_task_replay, gere_task_replay_size, "
            "gere_task_replay_per_step, gere_task_replay_weight, gere_task_replay_logit_weight, gere_task_replay_topk "
            "(and the same logit snapshots), max_length and gere_seed, or start a new run."
        )
