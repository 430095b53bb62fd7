"""DPO with GeRe, TRL-style: every flag of TRL's DPO script plus the --gere_* flags.

Run (a local model folder and local data; add `accelerate launch` for several GPUs/processes):

    # preferences.jsonl rows: {"prompt": ..., "chosen": ..., "rejected": ...}
    python recipes/trl/dpo_gere.py \
        --model_name_or_path ./my-base-model --dataset_name ./preferences.jsonl \
        --output_dir out/task1 --per_device_train_batch_size 8 --gradient_accumulation_steps 2 \
        --gere_replay ./replay.jsonl --gere_replay_per_step 4 --gere_state_cache out/base-states

or with a YAML file: `python recipes/trl/dpo_gere.py --config dpo_gere.yaml`. For LoRA add
`--use_peft --lora_r 16`; for QLoRA add `--load_in_4bit` (CUDA + bitsandbytes). For the second task
of a sequence, start from the first task's output and keep the SAME --gere_state_cache (the
original base model's states) and add `--gere_freeze_layers 3 --gere_freeze_embeddings true`.

Resume an interrupted run with `--resume_from_checkpoint out/task1/checkpoint-200` (or `true` for the
newest checkpoint in --output_dir); the replay settings must be those of the checkpoint. A run that
would overwrite checkpoints it does not resume (a fresh start into an --output_dir with checkpoints)
is refused.
"""

from __future__ import annotations

import os

from accelerate import PartialState
from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import ModelConfig, ScriptArguments, TrlParser, get_peft_config, get_quantization_config

from gere_plugin import GeReConfigError, GeReDPOConfig, GeReDPOTrainer
from gere_plugin.resume import script_resume_checkpoint


def load_data(name: str, config: str | None, split: str):
    if os.path.isfile(name):
        kind = "json" if name.endswith((".json", ".jsonl")) else name.rsplit(".", 1)[-1]
        return load_dataset(kind, data_files=name, split=split)
    return load_dataset(name, config, split=split)


def main(script_args: ScriptArguments, training_args: GeReDPOConfig, model_args: ModelConfig) -> None:
    # --resume_from_checkpoint (a checkpoint folder, or true = the newest in --output_dir) is passed to
    # train(); a run that would overwrite checkpoints it does not resume is refused before any work.
    checkpoint = script_resume_checkpoint(training_args.output_dir, training_args.resume_from_checkpoint)
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
    dataset = load_data(script_args.dataset_name, script_args.dataset_config, script_args.dataset_train_split)
    trainer = GeReDPOTrainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )
    trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_model(training_args.output_dir)


if __name__ == "__main__":
    parser = TrlParser((ScriptArguments, GeReDPOConfig, ModelConfig))
    try:
        main(*parser.parse_args_and_config())
    except GeReConfigError as e:  # bad gere_* values, refused caches and resumes: the message, no traceback
        raise SystemExit(f"error: {e}") from None
