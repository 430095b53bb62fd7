"""GRPO (online RL) with GeRe, TRL-style: every flag of TRL's GRPOConfig plus --gere_* and --reward_funcs.

Run (a local model folder and a prompt dataset; add `accelerate launch` for several GPUs/processes):

    # prompts.jsonl rows: {"prompt": ...} (plain text or a list of chat messages)
    python recipes/trl/grpo_gere.py \
        --model_name_or_path ./my-base-model --dataset_name ./prompts.jsonl \
        --reward_funcs my_rewards.py:correctness think_format_reward \
        --output_dir out/rl1 --per_device_train_batch_size 8 --num_generations 8 --gradient_accumulation_steps 4 \
        --gere_replay ./replay.jsonl --gere_replay_per_step 4 --gere_state_cache out/base-states

`--reward_funcs` takes TRL's rule-based rewards by name (`accuracy_reward`, `reasoning_accuracy_reward`,
`think_format_reward`), a dotted import path (`my_pkg.rewards.correctness`) or a file and function
(`path/to/rewards.py:correctness`); `--reward_model_name_or_path` adds a reward model. A tiny example
reward: `recipes/axolotl/tiny_rewards.py:vowel_share_reward`. Or use a YAML file: `--config grpo_gere.yaml`.

What GeRe does here: every optimizer step also trains on `--gere_replay_per_step` general replay texts
(default: a quarter of the step's PROMPTS, i.e. completions / num_generations), and the loss is
`L_grpo + CE_replay + w * TM` with `w = CE_replay / TM`: the GRPO loss is near 0 and often negative,
so the weight is matched to the replay cross-entropy (never negative) and the policy term keeps its
full weight. For LoRA add `--use_peft --lora_r 16`. Resume with `--resume_from_checkpoint PATH` (or
`true`); the replay settings must be those of the checkpoint.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from gere_recipe import run_recipe, train_recipe
from trl import ModelConfig, ScriptArguments

from gere_plugin import GeReGRPOConfig, GeReGRPOTrainer

#: TRL's rule-based rewards that can be named directly (those the installed TRL has).
TRL_REWARDS = ("accuracy_reward", "reasoning_accuracy_reward", "think_format_reward")


@dataclass
class RewardArguments:
    """Where the rewards come from."""

    reward_funcs: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Reward functions: a TRL name (accuracy_reward, reasoning_accuracy_reward, think_format_reward), "
            "a dotted path (pkg.module.function) or FILE.py:function."
        },
    )
    reward_model_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "A sequence-classification reward model (folder or hub id)."}
    )


def load_reward(spec: str) -> Callable[..., Any]:
    """A reward function from a TRL name, a dotted import path or ``FILE.py:function``."""
    if spec in TRL_REWARDS:
        import trl.rewards

        if hasattr(trl.rewards, spec):
            return getattr(trl.rewards, spec)
        raise SystemExit(f"error: --reward_funcs {spec}: this TRL ({trl.__version__}) has no trl.rewards.{spec}.")
    if ":" in spec:
        path, _, name = spec.rpartition(":")
        if not Path(path).is_file():
            raise SystemExit(f"error: --reward_funcs {spec}: {path} is not a file.")
        module_spec = importlib.util.spec_from_file_location(Path(path).stem, path)
        assert module_spec is not None and module_spec.loader is not None
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        module_name, _, name = spec.rpartition(".")
        try:
            module = importlib.import_module(module_name) if module_name else None
        except ImportError as e:
            raise SystemExit(f"error: --reward_funcs {spec}: cannot import {module_name} ({e}).") from None
    func = getattr(module, name, None) if module is not None else None
    if not callable(func):
        raise SystemExit(
            f"error: --reward_funcs {spec}: no function {name!r} there. Use one of {', '.join(TRL_REWARDS)}, "
            "a dotted path (pkg.module.function) or FILE.py:function."
        )
    return func


def main(
    script_args: ScriptArguments, training_args: GeReGRPOConfig, model_args: ModelConfig, reward_args: RewardArguments
) -> None:
    rewards: list[Any] = [load_reward(s) for s in reward_args.reward_funcs]
    if reward_args.reward_model_name_or_path:
        rewards.append(reward_args.reward_model_name_or_path)
    if not rewards:
        raise SystemExit("error: no reward: pass --reward_funcs (and/or --reward_model_name_or_path).")
    train_recipe(GeReGRPOTrainer, script_args, training_args, model_args, reward_funcs=rewards)


if __name__ == "__main__":
    run_recipe(main, ScriptArguments, GeReGRPOConfig, ModelConfig, RewardArguments)
