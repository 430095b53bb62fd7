"""The frozen model GeRe compares against (l1 / l2 / kl on replay rows, the task KL): ONE builder.

Where the reference comes from, first match wins:

1. ``gere_ref_model`` (the user's loaded model, checked: same hidden size, frozen, on the model's device);
2. the parent trainer's own reference (TRL DPO / GRPO ``ref_model``);
3. for a PEFT model, the model itself with its adapters disabled (no copy: ``module`` is ``None``);
4. when a method needs one, a frozen copy of the model as it is when the trainer is built.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any, Optional

import torch

from ..config import GeReConfigError
from .introspection import hidden_size_of, is_peft, model_device

logger = logging.getLogger(__name__)


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen, independent copy of a ``PreTrainedModel`` (re-instantiated from its config).

    ``copy.deepcopy`` is not used: on transformers 5 the copy keeps output-recording hooks bound to
    the original modules, so its ``hidden_states`` silently come from the model being trained.
    """
    param = next(model.parameters())
    if hasattr(model, "config") and hasattr(type(model), "_from_config"):
        ref = type(model)._from_config(copy.deepcopy(model.config), dtype=param.dtype)
        missing, unexpected = ref.load_state_dict(model.state_dict(), strict=False)
        if unexpected or [m for m in missing if "rotary" not in m]:
            raise RuntimeError(f"gere: could not copy the base model (missing {missing[:3]}, unexpected {unexpected[:3]})")
        ref.to(param.device)
    else:
        ref = copy.deepcopy(model)
    return ref.eval().requires_grad_(False)


def check_ref_model(ref: Any, model: torch.nn.Module, used_by: str) -> torch.nn.Module:
    """Validate a user-given reference (``gere_ref_model``) and put it, frozen, on the model's device.

    ``used_by``: what reads it in this run (``l1`` / ``l2`` / ``kl``, or another regularizer name, which
    only logs that the reference is not read)."""
    if not isinstance(ref, torch.nn.Module):
        raise GeReConfigError(f"gere_ref_model must be a torch.nn.Module (a loaded model), got {type(ref).__name__}.")
    want, got = hidden_size_of(model), hidden_size_of(ref)
    if want is not None and got is not None and want != got:
        raise GeReConfigError(
            f"gere_ref_model has hidden size {got} but the trained model has {want}: the reference must be the "
            "same architecture (normally the original base model the sequence started from)."
        )
    if used_by not in ("l1", "l2", "kl"):
        logger.warning("gere: gere_ref_model is only read by gere_regularizer l1/l2/kl (this run uses %s); "
                       "TM reads the base states of the state cache instead.", used_by)
    device = model_device(model)
    if model_device(ref) != device:
        ref = ref.to(device)
    return ref.eval().requires_grad_(False)


@dataclass
class Reference:
    """The run's reference model: ``module`` (``None`` = the PEFT model with adapters disabled, or none
    needed), where it came from, and whether GeRe made (and so owns) the copy."""

    module: Optional[torch.nn.Module]
    source: str
    owned: bool = False

    @property
    def given(self) -> Optional[torch.nn.Module]:
        """The reference handed in (``gere_ref_model`` or the trainer's own), not a copy GeRe made."""
        return None if self.owned else self.module

    @property
    def copy(self) -> Optional[torch.nn.Module]:
        """The frozen copy GeRe made, if it made one."""
        return self.module if self.owned else None


def resolve_reference(model: torch.nn.Module, given: Optional[torch.nn.Module], trainer_ref: Optional[torch.nn.Module],
                      needed: bool) -> Reference:
    """The reference of a run (see the module docstring). ``given`` must already be checked
    (:func:`check_ref_model`); ``needed``: a method of this run reads the reference."""
    if given is not None:
        return Reference(given, "gere_ref_model")
    if trainer_ref is not None:
        return Reference(trainer_ref, "the trainer's reference model")
    if is_peft(model):
        return Reference(None, "the adapter-disabled model")
    if needed:
        return Reference(frozen_copy(model), "a frozen copy of the model at trainer init", owned=True)
    return Reference(None, "none")


def base_forward(reference: Reference, model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 layers: list[int], need_logits: bool) -> Any:
    """``forward_hidden`` of the reference without gradients: its own module, or ``model`` (unwrapped,
    PEFT) with adapters disabled."""
    from .hidden import forward_hidden

    with torch.no_grad():
        if reference.module is not None:
            return forward_hidden(reference.module, input_ids, attention_mask, layers, need_logits)
        with model.disable_adapter():
            return forward_hidden(model, input_ids, attention_mask, layers, need_logits)
