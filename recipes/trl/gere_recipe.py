"""What the TRL recipes (``sft_gere.py``, ``dpo_gere.py``, ``grpo_gere.py``) share: the data set from a local file
or the hub, the model and tokenizer from TRL's ``ModelConfig``, resume handling, training and saving, and the
entry point that turns a :class:`~gere_plugin.GeReConfigError` into a one-line message.

The recipes run as scripts (``python recipes/trl/sft_gere.py ...``), so this folder is on ``sys.path`` and they
import this module by its name.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, Optional

from accelerate import PartialState
from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import ModelConfig, ScriptArguments, TrlParser, get_peft_config, get_quantization_config

from gere_plugin import GeReConfigError
from gere_plugin.resume import script_resume_checkpoint


def load_data(name: str, config: str | None, split: str):
    """A local ``.json``/``.jsonl``/``.csv``/``.parquet`` file, or a data set folder or hub id."""
    if os.path.isfile(name):
        kind = "json" if name.endswith((".json", ".jsonl")) else name.rsplit(".", 1)[-1]
        return load_dataset(kind, data_files=name, split=split)
    return load_dataset(name, config, split=split)


def resume_checkpoint(training_args: Any) -> Optional[str]:
    """What ``train()`` resumes from: ``--resume_from_checkpoint`` (a checkpoint folder, or true = the newest in
    ``--output_dir``); a run that would overwrite checkpoints it does not resume is refused before any work."""
    return script_resume_checkpoint(training_args.output_dir, training_args.resume_from_checkpoint)


def load_model_and_tokenizer(model_args: ModelConfig) -> tuple[Any, Any]:
    """The causal LM (dtype, revision, attention and quantization from ``model_args``) and its tokenizer."""
    quantization_config = get_quantization_config(model_args)
    model = AutoModelForCausalLM.from_pretrained(
        model_args.model_name_or_path,
        dtype=model_args.dtype if model_args.dtype in ("auto", None) else getattr(__import__("torch"), model_args.dtype),
        revision=model_args.model_revision,
        attn_implementation=model_args.attn_implementation,
        quantization_config=quantization_config,
        # 4-bit/8-bit weights must sit on this process's GPU (one copy per rank under accelerate)
        device_map={"": PartialState().local_process_index} if quantization_config is not None else None,
    )
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path, revision=model_args.model_revision)
    return model, tokenizer


def train_recipe(trainer_cls: type, script_args: ScriptArguments, training_args: Any, model_args: ModelConfig,
                 **trainer_kwargs: Any) -> None:
    """One recipe run: the resume check first, then the model, tokenizer and data set, then ``trainer_cls``
    (with PEFT from ``model_args`` and ``trainer_kwargs``) trains and saves the model to ``--output_dir``."""
    checkpoint = resume_checkpoint(training_args)
    model, tokenizer = load_model_and_tokenizer(model_args)
    dataset = load_data(script_args.dataset_name, script_args.dataset_config, script_args.dataset_train_split)
    trainer = trainer_cls(
        model=model,
        args=training_args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
        **trainer_kwargs,
    )
    trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_model(training_args.output_dir)


def run_recipe(main: Callable[..., None], *dataclass_types: type) -> None:
    """Parse the command line (and ``--config`` YAML) into ``dataclass_types`` and call ``main`` with them."""
    parser = TrlParser(dataclass_types)
    try:
        main(*parser.parse_args_and_config())
    except GeReConfigError as e:  # bad gere_* values, refused caches and resumes: the message, no traceback
        raise SystemExit(f"error: {e}") from None
