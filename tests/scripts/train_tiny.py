"""A tiny ``GeReSFTTrainer`` (or, with ``--trainer grpo``, ``GeReGRPOTrainer``) run that the slow tests
launch as a subprocess.

Run it with ``python`` (one process) or ``accelerate launch --multi_gpu --num_processes 2`` (CPU DDP
over gloo: the script always sets ``use_cpu=True``). Everything it needs comes from the command
line: the tiny model folder, a prompt/completion jsonl (GRPO uses only its prompts, with a rule-based
reward), a replay jsonl (optional), earlier tasks' jsonl files for ``gere_task_replay`` (optional). It
writes

* ``<output>/history.json``: ``trainer.state.log_history`` (main process, after training);
* ``GERE_REPLAY_LOG`` rows (set by the caller; see :mod:`gere_plugin.trainer`);
* ``--hang_marker``: created right before the run deliberately hangs (``--hang_at_step`` or
  ``--hang_in_cache_save``) so that a test can SIGKILL it at a known point.

Logging goes to stderr at INFO with the rank in every line, so a test can count which rank built the
base-model state cache and which one reused it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HANG_SECONDS = 600


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="folder with the tiny model and its tokenizer")
    p.add_argument("--data", required=True, help="prompt/completion jsonl (the task data)")
    p.add_argument("--replay", default=None, help="general-text jsonl (gere_replay); omit for no general replay")
    p.add_argument("--task_replay", nargs="+", default=None, help="earlier tasks' jsonl files (gere_task_replay)")
    p.add_argument("--task_per_step", type=int, default=None, help="gere_task_replay_per_step")
    p.add_argument("--task_size", type=int, default=100, help="gere_task_replay_size")
    p.add_argument("--output", required=True, help="output_dir")
    p.add_argument("--state_cache", default=None, help="gere_state_cache (default <output>/gere_states)")
    p.add_argument("--batch", type=int, default=2, help="per-device train batch size")
    p.add_argument("--accum", type=int, default=1, help="gradient accumulation steps")
    p.add_argument("--max_steps", type=int, default=4)
    p.add_argument("--save_steps", type=int, default=0, help="0 = no checkpoints")
    p.add_argument("--per_step", type=int, default=2, help="gere_replay_per_step")
    p.add_argument("--replay_size", type=int, default=16, help="gere_replay_size")
    p.add_argument("--weight", default="dynamic", help="gere_weight")
    p.add_argument("--ddp_broadcast_buffers", default=None, choices=["true", "false"],
                   help="TrainingArguments.ddp_broadcast_buffers (default: unset = torch's True)")
    p.add_argument("--sampling", default="random", choices=["random", "sequential"], help="train_sampling_strategy")
    p.add_argument("--resume", default=None, help="checkpoint folder to resume from")
    p.add_argument("--hang_at_step", type=int, default=0, help="hang in on_step_end once global_step reaches this")
    p.add_argument("--hang_in_cache_save", action="store_true", help="hang inside StateCache.save (after labels.bin)")
    p.add_argument("--hang_marker", default=None, help="file created right before hanging")
    p.add_argument("--build_only", action="store_true", help="build the trainer (and the state cache), do not train")
    p.add_argument("--monitor", default=None, help="gere_monitor: held-out general-text jsonl (the forgetting monitor)")
    p.add_argument("--monitor_steps", type=int, default=1, help="gere_monitor_steps")
    p.add_argument("--trainer", default="sft", choices=["sft", "grpo"], help="GeReSFTTrainer or GeReGRPOTrainer")
    p.add_argument("--num_generations", type=int, default=2, help="GRPO: completions per prompt")
    p.add_argument("--steps_per_generation", type=int, default=None, help="GRPO: optimizer micro-steps per generation")
    p.add_argument("--num_iterations", type=int, default=1, help="GRPO: passes over each generation batch")
    return p.parse_args(argv)


def vowel_reward(completions: list[str], **kwargs: Any) -> list[float]:
    """Rule-based GRPO reward: the share of vowels among the letters of each completion."""
    out = []
    for c in completions:
        letters = [ch for ch in c if ch.isalpha()]
        out.append(sum(ch in "aeiou" for ch in letters) / len(letters) if letters else 0.0)
    return out


def _hang(marker: str | None, what: str) -> None:
    if marker:
        Path(marker).write_text(what)
    print(f"GERE_TEST_HANG {what}", flush=True)
    time.sleep(HANG_SECONDS)
    raise SystemExit(f"hang at {what} was not killed within {HANG_SECONDS}s")


def _patch_cache_save_to_hang(marker: str | None) -> None:
    """Make ``StateCache.save`` stop half-way: labels.bin and thresholds are in the temporary folder,
    meta.json is not written and the folder is not renamed into place."""
    import safetensors.torch

    real_save_file = safetensors.torch.save_file

    def save_file_then_hang(tensors: Any, filename: str, *args: Any, **kwargs: Any) -> None:
        real_save_file(tensors, filename, *args, **kwargs)
        _hang(marker, f"cache-save {filename}")

    safetensors.torch.save_file = save_file_then_hang


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(
        level=logging.INFO,
        format=f"[rank{rank}] %(created).6f %(name)s %(levelname)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    from gere_plugin import GeReGRPOConfig, GeReGRPOTrainer, GeReSFTConfig, GeReSFTTrainer

    torch.set_num_threads(1)
    if args.hang_in_cache_save:
        _patch_cache_save_to_hang(args.hang_marker)

    rows = [json.loads(line) for line in Path(args.data).read_text(encoding="utf-8").splitlines() if line.strip()]
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    common: dict[str, Any] = dict(
        output_dir=args.output,
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=args.accum,
        learning_rate=1e-3,
        max_steps=args.max_steps,
        logging_steps=1,
        save_strategy="steps" if args.save_steps else "no",
        save_steps=args.save_steps or 500,
        report_to=[],
        bf16=False,
        fp16=False,
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
        gradient_checkpointing=False,
        ddp_broadcast_buffers=None if args.ddp_broadcast_buffers is None else args.ddp_broadcast_buffers == "true",
        gere_replay=args.replay,
        gere_replay_size=args.replay_size,
        gere_replay_max_length=32,
        gere_replay_per_step=args.per_step,
        gere_weight=args.weight,
        gere_state_cache=args.state_cache,
        gere_state_batch_size=8,
        gere_monitor=args.monitor,
        gere_monitor_steps=args.monitor_steps,
        gere_monitor_size=16,
        gere_monitor_max_length=32,
        gere_monitor_task_size=6,
        gere_task_replay=args.task_replay,
        gere_task_replay_size=args.task_size,
        gere_task_replay_per_step=args.task_per_step,
    )

    class HangAtStep(TrainerCallback):
        def on_step_end(self, targs, state, control, **kwargs):  # noqa: D102
            if args.hang_at_step and state.global_step >= args.hang_at_step:
                _hang(args.hang_marker, f"step {state.global_step}")
            return control

    if args.trainer == "grpo":
        config = GeReGRPOConfig(
            **common, num_generations=args.num_generations, steps_per_generation=args.steps_per_generation,
            num_iterations=args.num_iterations, max_completion_length=8, use_vllm=False, beta=0.0,
        )
        trainer: Any = GeReGRPOTrainer(
            model=model, reward_funcs=vowel_reward, args=config, processing_class=tok, callbacks=[HangAtStep()],
            train_dataset=Dataset.from_list([{"prompt": r["prompt"]} for r in rows]),
        )
    else:
        config = GeReSFTConfig(
            **common, max_length=64, average_tokens_across_devices=True, train_sampling_strategy=args.sampling
        )
        trainer = GeReSFTTrainer(
            model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tok, callbacks=[HangAtStep()]
        )
    if args.build_only:
        return 0
    trainer.train(resume_from_checkpoint=args.resume)
    if trainer.is_world_process_zero():
        out = Path(args.output) / "history.json"
        out.write_text(json.dumps(trainer.state.log_history, indent=1))
    return 0


if __name__ == "__main__":
    code = main()
    from _dist import close_process_group  # this script's folder is on sys.path

    close_process_group()
    sys.exit(code)
