"""Which checkpoint a run resumes, and refusing runs that would overwrite checkpoints they did not resume.

* :func:`resolve_resume_checkpoint`: the folder ``Trainer.train(resume_from_checkpoint=...)`` will load
  (``True`` = the newest ``checkpoint-N`` of ``output_dir``, transformers' own rule), so that the GeRe
  trainers check the replay settings of exactly that checkpoint in every form of resume.
* :func:`script_resume_checkpoint`: for training scripts (``recipes/trl/*.py``): turns the
  ``--resume_from_checkpoint`` flag (a path, ``true``, ``false``) into the value for ``trainer.train``
  and refuses a run that would write into checkpoints it did not resume (a fresh start into an
  ``output_dir`` that holds checkpoints, or a resume from an older checkpoint than ``output_dir`` holds).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Union

from ..config import GeReConfigError

__all__ = ["checkpoint_steps", "resolve_resume_checkpoint", "script_resume_checkpoint"]


def checkpoint_steps(output_dir: Union[str, os.PathLike, None]) -> dict[int, Path]:
    """``{step: folder}`` of the ``checkpoint-<step>`` folders in ``output_dir``."""
    if not output_dir or not Path(output_dir).is_dir():
        return {}
    out = {}
    for p in Path(output_dir).iterdir():
        step = p.name[len("checkpoint-"):]
        if p.is_dir() and p.name.startswith("checkpoint-") and step.isdigit():
            out[int(step)] = p
    return out


def resolve_resume_checkpoint(output_dir: Optional[str], resume_from_checkpoint: Any) -> Optional[str]:
    """The checkpoint folder that ``Trainer.train(resume_from_checkpoint=...)`` resumes, or ``None``.

    ``True`` means the newest ``checkpoint-N`` in ``output_dir`` (transformers' own rule, so the check
    reads the folder the Trainer will load); a path is returned as given; ``None`` / ``False``: none.
    """
    if resume_from_checkpoint is None or resume_from_checkpoint is False:
        return None
    if resume_from_checkpoint is True:
        from transformers.trainer_utils import get_last_checkpoint

        if not output_dir or not os.path.isdir(output_dir):
            return None  # the Trainer raises its own "no valid checkpoint" error
        return get_last_checkpoint(output_dir)
    return os.fspath(resume_from_checkpoint)


def _step_of(checkpoint: Path) -> Optional[int]:
    step = checkpoint.name[len("checkpoint-"):] if checkpoint.name.startswith("checkpoint-") else ""
    if step.isdigit():
        return int(step)
    try:
        import json

        return int(json.loads((checkpoint / "trainer_state.json").read_text())["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def script_resume_checkpoint(output_dir: Optional[str], resume_from_checkpoint: Any) -> Optional[str]:
    """The checkpoint a training script resumes (a path for ``trainer.train``), or ``None``.

    ``resume_from_checkpoint`` is the script's flag: ``None``/``""``/``false`` (start fresh), ``true``
    (the newest checkpoint of ``output_dir``) or a checkpoint folder. Raises
    :class:`~gere_plugin.GeReConfigError` naming ``--resume_from_checkpoint`` / ``--output_dir`` when
    the run would write into checkpoints it did not resume.
    """
    value = resume_from_checkpoint
    if isinstance(value, str) and value.strip().lower() in ("", "false", "no", "none"):
        value = None
    elif isinstance(value, str) and value.strip().lower() in ("true", "yes", "last", "latest"):
        value = True
    existing = checkpoint_steps(output_dir)
    if value is None or value is False:
        if existing:
            newest = existing[max(existing)]
            raise GeReConfigError(
                f"--output_dir {output_dir!r} already holds checkpoints (newest {newest.name}); starting over would "
                "overwrite them. Resume with --resume_from_checkpoint true (the newest) or "
                f"--resume_from_checkpoint {newest}, or choose a new --output_dir."
            )
        return None
    if value is True:
        if not existing:
            raise GeReConfigError(
                f"--resume_from_checkpoint true: --output_dir {output_dir!r} holds no checkpoint-N folder to resume. "
                "Drop the flag to start a new run, or pass a checkpoint folder."
            )
        return str(existing[max(existing)])
    checkpoint = Path(os.path.expanduser(os.fspath(value)))
    if not checkpoint.is_dir():
        raise GeReConfigError(f"--resume_from_checkpoint {str(value)!r}: the folder does not exist.")
    if not (checkpoint / "trainer_state.json").is_file():
        raise GeReConfigError(
            f"--resume_from_checkpoint {str(value)!r} is not a Trainer checkpoint (no trainer_state.json); point it "
            "at a checkpoint-N folder."
        )
    step = _step_of(checkpoint)
    newer = sorted(n for n in existing if step is not None and n > step)
    if newer:
        raise GeReConfigError(
            f"--resume_from_checkpoint {checkpoint.name} is older than checkpoint-{newer[-1]} in --output_dir "
            f"{output_dir!r}; resuming it would overwrite the newer checkpoints. Resume the newest, or write the "
            "resumed run to a new --output_dir."
        )
    return str(checkpoint)
