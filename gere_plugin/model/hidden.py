"""The hidden states GeRe reads off a model: one forward with ``output_hidden_states`` and the selection
of ``gere_layers`` (indices into ``hidden_states``), checked against the model's text config."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import torch

from ..config import GeReConfigError
from .introspection import num_hidden_states_of


def _select_hidden(hidden_states: Sequence[torch.Tensor], layers: Sequence[int]) -> list[torch.Tensor]:
    """``[hidden_states[i] for i in layers]``; an index the forward did not return is a config error."""
    n = len(hidden_states)
    out = []
    for i in layers:
        if not -n <= i < n:
            raise GeReConfigError(
                f"gere_layers contains {i}, but the model returns {n} hidden states (valid: {-n}..{n - 1})."
            )
        out.append(hidden_states[i])
    return out


def forward_hidden(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    layers: Sequence[int],
    need_logits: bool = True,
) -> tuple[Optional[torch.Tensor], list[torch.Tensor]]:
    """One forward returning ``(logits or None, [hidden_states[i] for i in layers])``."""
    kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask, "output_hidden_states": True}
    if not need_logits:
        kwargs["logits_to_keep"] = 1
    try:
        out = model(**kwargs, use_cache=False)
    except TypeError:
        kwargs.pop("logits_to_keep", None)
        out = model(**kwargs, use_cache=False)
    return (out.logits if need_logits else None), _select_hidden(out.hidden_states, layers)


def forward_final(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, hidden_only: bool
                  ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """One forward for a loss on the model's outputs: ``(final hidden states, None)`` when ``hidden_only`` (the
    caller applies the logit head a chunk at a time, :mod:`gere_plugin.ops.logits`), else ``(None, logits)``."""
    if hidden_only:
        _, (last,) = forward_hidden(model, input_ids, attention_mask, [-1], need_logits=False)
        return last, None
    return None, model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def check_layer_indices(model: Any, layers: Sequence[int]) -> None:
    """Raise :class:`GeReConfigError` when ``gere_layers`` names a hidden state the model does not return.

    Runs before the state build (the build would otherwise fail only at its first forward).
    """
    n = num_hidden_states_of(model)
    if n is None:
        return
    for i in layers:
        if not -n <= i < n:
            raise GeReConfigError(
                f"gere_layers contains {i}, but the model returns {n} hidden states (valid: {-n}..{n - 1}). "
                "Use -1 for the final hidden state (after the last norm)."
            )
