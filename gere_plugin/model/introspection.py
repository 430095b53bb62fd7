"""Model and trainer introspection shared by every part of GeRe (no GeRe logic here).

One definition each of: the unwrapped model, PEFT / DeepSpeed / FSDP detection, the accelerate
autocast, the tokenizer behind a processing class, the pad-id rule, world size and rank, and the
model's text config (hidden size, number of hidden states, decoder layers).
"""

from __future__ import annotations

import contextlib
from typing import Any, Optional

import torch


def unwrap(trainer: Any, model: torch.nn.Module) -> torch.nn.Module:
    """``model`` without accelerate's wrappers (DDP, DeepSpeed, compiled), as the trainer sees it."""
    acc = getattr(trainer, "accelerator", None)
    if acc is not None:
        with contextlib.suppress(Exception):
            return acc.unwrap_model(model)
    return model


def is_peft(model: Any) -> bool:
    """A PEFT model (adapters that ``disable_adapter()`` can bypass)."""
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def zero_stage(trainer: Any) -> Optional[int]:
    """DeepSpeed's ZeRO stage through accelerate, or None without DeepSpeed."""
    plugin = getattr(getattr(getattr(trainer, "accelerator", None), "state", None), "deepspeed_plugin", None)
    return None if plugin is None else getattr(plugin, "zero_stage", None)


def is_zero3(trainer: Any) -> bool:
    return zero_stage(trainer) == 3


def is_sharded(trainer: Any) -> bool:
    """Parameters are sharded across ranks (FSDP or DeepSpeed ZeRO-3)."""
    return bool(getattr(trainer, "is_fsdp_enabled", False)) or is_zero3(trainer)


def autocast_of(trainer: Any) -> contextlib.AbstractContextManager:
    """The mixed-precision autocast accelerate wraps the model's forward in (a no-op without one)."""
    acc = getattr(trainer, "accelerator", None)
    return acc.autocast() if acc is not None and hasattr(acc, "autocast") else contextlib.nullcontext()


def world_of(trainer: Any) -> tuple[int, int]:
    """``(world_size, rank)`` of the trainer's accelerator, ``(1, 0)`` without one."""
    acc = getattr(trainer, "accelerator", None)
    if acc is None:
        return 1, 0
    return int(acc.num_processes), int(acc.process_index)


def tokenizer_of(processing_class: Any) -> Any:
    """The tokenizer inside a processor (multimodal), or the tokenizer itself."""
    return getattr(processing_class, "tokenizer", None) or processing_class


def pad_token_id(tokenizer: Any) -> int:
    """The id GeRe pads its own batches with: the pad token, else EOS, else 0 (masked either way)."""
    tok = tokenizer_of(tokenizer)
    if tok.pad_token_id is not None:
        return int(tok.pad_token_id)
    return int(tok.eos_token_id or 0)


def text_config(model_or_config: Any) -> Any:
    """The text part of a model's (or a config's) config: ``get_text_config()`` where it exists."""
    cfg = getattr(model_or_config, "config", model_or_config)
    if cfg is not None and hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    return cfg


def num_layers_of(model_or_config: Any) -> Optional[int]:
    """Decoder layers the text config declares; ``None`` when it does not say."""
    cfg = text_config(model_or_config)
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return None


def hidden_size_of(model: Any) -> Optional[int]:
    """Hidden size from a model's (or a config's) text config; ``None`` when it does not say."""
    cfg = text_config(model)
    return getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None) or getattr(cfg, "d_model", None)


def num_hidden_states_of(model: Any) -> Optional[int]:
    """How many ``hidden_states`` a forward returns (decoder layers + the embeddings); ``None`` if unknown."""
    n = num_layers_of(model)
    return None if n is None else n + 1


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")
