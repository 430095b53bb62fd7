"""SFT with GeRe, TRL-style: every flag of TRL's SFT script plus the --gere_* flags.

Run (a local model folder and local data; add `accelerate launch` for several GPUs/processes):

    python recipes/trl/sft_gere.py \
        --model_name_or_path ./my-base-model --dataset_name ./task.jsonl \
        --output_dir out/task1 --per_device_train_batch_size 8 --gradient_accumulation_steps 2 \
        --gere_replay ./replay.jsonl --gere_replay_per_step 4 --gere_state_cache out/base-states

or with a YAML file: `python recipes/trl/sft_gere.py --config sft_gere.yaml`. For LoRA add
`--use_peft --lora_r 16`; for QLoRA add `--load_in_4bit` (CUDA + bitsandbytes). For the second task
of a sequence, start from the first task's output and keep the SAME --gere_state_cache (the
original base model's states) and add `--gere_freeze_layers 3 --gere_freeze_embeddings true`.

Resume an interrupted run with `--resume_from_checkpoint out/task1/checkpoint-200` (or `true` for the
newest checkpoint in --output_dir); the replay settings must be those of the checkpoint. A run that
would overwrite checkpoints it does not resume (a fresh start into an --output_dir with checkpoints)
is refused.
"""

from __future__ import annotations

from gere_recipe import run_recipe, train_recipe
from trl import ModelConfig, ScriptArguments

from gere_plugin import GeReSFTConfig, GeReSFTTrainer


def main(script_args: ScriptArguments, training_args: GeReSFTConfig, model_args: ModelConfig) -> None:
    train_recipe(GeReSFTTrainer, script_args, training_args, model_args)


if __name__ == "__main__":
    run_recipe(main, ScriptArguments, GeReSFTConfig, ModelConfig)
