"""GeRe steps under DeepSpeed ZeRO-2 / ZeRO-3 (CPU accelerator, gloo), for the optional DeepSpeed tests.

Launch with ``python -m torch.distributed.run --nproc_per_node 2 deepspeed_tiny.py --stage 3 ...``.
Accelerate 1.13 does not select DeepSpeed on a CPU-only machine, so the script builds a TRL
``SFTTrainer`` on the CPU (``MULTI_CPU`` over gloo), attaches GeRe with :func:`gere_plugin.enable_gere`
while accelerate's state reports the ZeRO stage (what GeRe reads under ``accelerate launch`` with a
DeepSpeed config), then wraps the model with ``deepspeed.initialize`` and runs every micro-batch as
the Trainer does under DeepSpeed: ``compute_loss`` on the engine, ``engine.backward``,
``engine.step``. DeepSpeed's optional shared-memory all-reduce kernel (a C++ build of several minutes)
is not built; collectives go through torch.distributed (gloo).

Prints ``GERE_DS_DONE rank <r>`` at the end and writes ``<output>/rank<r>.json`` (rows and loss of every
micro-batch).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("ACCELERATE_USE_CPU", "true")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--replay", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--stage", type=int, default=3, choices=[2, 3])
    p.add_argument("--accum", type=int, default=1)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--per_step", type=int, default=2)
    p.add_argument("--skip_guard", action="store_true", help="attach GeRe without telling it about DeepSpeed")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import deepspeed
    import torch
    from accelerate.state import AcceleratorState
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from gere_plugin import GeReArguments, enable_gere

    torch.set_num_threads(1)
    torch.manual_seed(0)
    rows = [json.loads(line) for line in Path(args.data).read_text().splitlines() if line.strip()]
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    config = SFTConfig(
        output_dir=args.output, per_device_train_batch_size=2, gradient_accumulation_steps=args.accum, learning_rate=1e-3,
        max_steps=args.steps, logging_steps=1, save_strategy="no", report_to=[], bf16=False, use_cpu=True, seed=0,
        disable_tqdm=True, max_length=64, dataloader_num_workers=0, gradient_checkpointing=False, loss_type="nll",
        train_sampling_strategy="sequential",
    )
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tok)
    rank = trainer.accelerator.process_index
    gere = GeReArguments(gere_replay=args.replay, gere_replay_size=16, gere_replay_max_length=32,
                         gere_replay_per_step=args.per_step, gere_state_cache=str(Path(args.output) / "gere_states"),
                         gere_state_batch_size=8)
    prop = AcceleratorState.deepspeed_plugin
    try:
        if not args.skip_guard:  # what accelerate's state holds under `accelerate launch` with a DeepSpeed config
            AcceleratorState.deepspeed_plugin = property(lambda self: argparse.Namespace(zero_stage=args.stage))
        step = enable_gere(trainer, gere)
    finally:
        AcceleratorState.deepspeed_plugin = prop
    # (importlib: the attribute deepspeed.comm.torch is the torch package, not DeepSpeed's module)
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    ds_config = {
        "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": args.accum, "zero_optimization": {"stage": args.stage},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}, "bf16": {"enabled": False},
    }
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                                           config=ds_config)
    record: dict = {"rank": rank, "stage": engine.zero_optimization_stage(), "micro": []}
    loader = iter(trainer.get_train_dataloader())
    engine.train()
    for s in range(args.steps):
        batches, num_items = trainer.get_batch_samples(loader, args.accum, trainer.args.device)
        trainer.state.global_step = s
        trainer.current_gradient_accumulation_steps = len(batches)
        for m, batch in enumerate(batches):
            loss = trainer.compute_loss(engine, batch, num_items_in_batch=num_items)
            engine.backward(loss)
            engine.step()
            record["micro"].append({"step": s, "micro": m, "loss": float(loss.detach()), "rows": step.history[-1]["rows"]})
    Path(args.output, f"rank{rank}.json").write_text(json.dumps(record, indent=1))
    print(f"GERE_DS_DONE rank {rank}", flush=True)
    return 0


if __name__ == "__main__":
    code = main()
    from _dist import close_process_group  # this script's folder is on sys.path

    close_process_group()
    sys.exit(code)
