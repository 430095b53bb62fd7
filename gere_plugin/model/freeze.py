"""Spurious-forgetting remedy: freeze the embeddings and the bottom N decoder layers.

Layers are found by model introspection (the ``nn.ModuleList`` whose length is the config's number
of hidden layers), not by guessing attribute names, so Llama, Mistral, Qwen2, Gemma, GPT-NeoX, GPT-2
and PEFT-wrapped versions of them all work. Freezing must happen before the optimizer is created:
:class:`LayerFreezeCallback` does it in ``on_init_end``; the GeRe trainers do it in ``__init__``.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Optional

import torch
from torch import nn
from transformers import TrainerCallback

from .introspection import num_layers_of

logger = logging.getLogger(__name__)


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return ``(qualified_name, module_list)`` of the model's decoder layer stack.

    Picks the ``nn.ModuleList`` of identical blocks whose length equals the config's layer count
    (the largest such list when the config is silent).
    """
    n_cfg = num_layers_of(model)
    candidates = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            kinds = {type(m) for m in module}
            if len(kinds) == 1:
                candidates.append((name, module))
    if n_cfg is not None:
        matching = [c for c in candidates if len(c[1]) == n_cfg]
        if matching:
            return min(matching, key=lambda c: c[0].count("."))
    if not candidates:
        raise ValueError("gere_freeze_layers: could not find the decoder layer list of this model.")
    return max(candidates, key=lambda c: len(c[1]))


def check_freeze_depth(model: nn.Module, num_layers: int) -> None:
    """Raise :class:`~gere_plugin.GeReConfigError` when ``gere_freeze_layers`` exceeds the model's depth.

    Runs before anything expensive (the state build), so a wrong value fails in seconds.
    """
    from ..config import GeReConfigError

    if not num_layers:
        return
    try:
        name, layers = find_decoder_layers(model)
    except ValueError as e:
        raise GeReConfigError(f"{e} Set gere_freeze_layers: 0 for this model.") from None
    if num_layers > len(layers):
        raise GeReConfigError(
            f"gere_freeze_layers={num_layers} but the model has only {len(layers)} decoder layers ({name}). Use a "
            f"value from 0 to {len(layers)} (the spurious-forgetting paper freezes 3)."
        )


def layer_index_of(param_name: str, layers_name: str) -> Optional[int]:
    """Layer index of a parameter under ``layers_name`` (``layers.1`` never matches ``layers.10``)."""
    m = re.search(re.escape(layers_name) + r"\.(\d+)\.", param_name)
    return int(m.group(1)) if m else None


def freeze_bottom(model: nn.Module, num_layers: int = 0, embeddings: bool = False) -> list[str]:
    """Set ``requires_grad=False`` on the embeddings and the bottom ``num_layers`` decoder layers.

    Works on plain and PEFT models (adapter weights inside frozen layers are frozen too). Returns the
    names of the parameters frozen. Raises if ``num_layers`` exceeds the model's depth.
    """
    frozen: list[str] = []
    if num_layers:
        layers_name, layers = find_decoder_layers(model)
        if num_layers > len(layers):
            raise ValueError(
                f"gere_freeze_layers={num_layers} but the model has only {len(layers)} decoder layers."
            )
        for name, p in model.named_parameters():
            idx = layer_index_of(name, layers_name)
            if idx is not None and idx < num_layers and p.requires_grad:
                p.requires_grad_(False)
                frozen.append(name)
    if embeddings:
        emb = model.get_input_embeddings()
        ids = {id(p) for p in emb.parameters()}
        for name, p in model.named_parameters():
            if id(p) in ids and p.requires_grad:
                p.requires_grad_(False)
                frozen.append(name)
        # PEFT may hold trainable adapter params inside the embedding module (e.g. lora_embedding_A)
        for name, p in emb.named_parameters():
            if p.requires_grad:
                p.requires_grad_(False)
                frozen.append(name)
        out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if out is not None and getattr(out, "weight", None) is not None and id(out.weight) in ids:
            logger.warning("gere_freeze_embeddings: the output head shares its weights with the embeddings (tied), so it is frozen too.")
    logger.info("gere: froze %d parameter tensors (%d bottom layers, embeddings=%s)", len(frozen), num_layers, embeddings)
    return frozen


def prepare_for_gradient_checkpointing(model: nn.Module, args: Any) -> None:
    """With frozen embeddings and reentrant checkpointing, inputs must require grad (else no gradients flow)."""
    if not getattr(args, "gradient_checkpointing", False):
        return
    kwargs = getattr(args, "gradient_checkpointing_kwargs", None) or {}
    if kwargs.get("use_reentrant", True) and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()


class LayerFreezeCallback(TrainerCallback):
    """Freeze the embeddings and the bottom ``num_layers`` decoder layers when the trainer is built.

    Args:
        num_layers: how many bottom decoder layers to freeze.
        embeddings: also freeze the input embeddings.

    Use with any ``transformers.Trainer`` (``callbacks=[LayerFreezeCallback(3, True)]``). It acts in
    ``on_init_end``, i.e. before the optimizer exists and before DDP/DeepSpeed wrap the model.
    """

    def __init__(self, num_layers: int = 0, embeddings: bool = False) -> None:
        self.num_layers = num_layers
        self.embeddings = embeddings
        self.frozen: list[str] = []

    def on_init_end(self, args, state, control, model=None, **kwargs):  # noqa: D401
        if model is None:
            raise ValueError("LayerFreezeCallback needs the model in on_init_end (pass it to the Trainer).")
        if self.num_layers or self.embeddings:
            self.frozen = freeze_bottom(model, self.num_layers, self.embeddings)
            prepare_for_gradient_checkpointing(model, args)
        return control

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        # Sanity check: no frozen parameter may be in the optimizer with requires_grad (it would still decay).
        if optimizer is not None and self.frozen and model is not None:
            names = dict((id(p), n) for n, p in model.named_parameters())
            trainable_frozen = [
                names.get(id(p)) for g in optimizer.param_groups for p in g["params"] if names.get(id(p)) in self.frozen
            ]
            if trainable_frozen:
                raise RuntimeError(f"LayerFreezeCallback: frozen parameters reached the optimizer: {trainable_frozen[:3]}")
        return control


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def snapshot(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    return {n: params[n].detach().clone() for n in names}
