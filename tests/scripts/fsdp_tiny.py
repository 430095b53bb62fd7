"""GeRe steps on a tiny Llama sharded with torch FSDP2 (``fully_shard``) over gloo, for the slow tests.

Launch with ``python -m torch.distributed.run --nproc_per_node 2 fsdp_tiny.py ...`` (or plain
``python`` for the 1-process reference). Accelerate 1.13 only selects FSDP on accelerator devices, so
the script builds a TRL ``SFTTrainer`` on the CPU (accelerate: ``MULTI_CPU`` over gloo), attaches GeRe
with :func:`gere_plugin.enable_gere` the way the Trainer would see FSDP (``is_fsdp_enabled``), then
shards the model like accelerate's FSDP2 path (every decoder layer, then the root, with
``reshard_after_forward=True``, optionally the ``lm_head`` as a unit of its own) and runs the
Trainer's own ``training_step`` for every micro-batch plus an optimizer step, as ``Trainer.train``
would. It writes ``<output>/rank<r>.json``: the loss of every micro-batch, the replay rows per
micro-batch and, on rank 0, a checksum of every full (unsharded) parameter after the last step.
"""

from __future__ import annotations

import argparse
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
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--accum", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--per_step", type=int, default=2)
    p.add_argument("--regularizer", default="tm")
    p.add_argument("--chunk", default="5", help="GERE_LOGITS_CHUNK (tokens per head call; 0 = full logits)")
    p.add_argument("--shard_lm_head", action="store_true", help="make lm_head an FSDP unit of its own")
    p.add_argument("--loss_type", default="nll", help="TRL SFT loss_type of the task rows")
    p.add_argument("--no_gere", action="store_true", help="plain TRL SFT (no replay)")
    p.add_argument("--no_shard", action="store_true", help="do not shard (the 1-process reference)")
    p.add_argument("--skip_guard", action="store_true",
                   help="attach GeRe as if the run were not sharded (to show what the guard prevents)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ["GERE_LOGITS_CHUNK"] = args.chunk
    import torch
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
        output_dir=args.output, per_device_train_batch_size=args.batch, gradient_accumulation_steps=args.accum,
        learning_rate=1e-2, max_steps=args.steps, logging_steps=1, save_strategy="no", report_to=[], bf16=False,
        use_cpu=True, seed=0, disable_tqdm=True, max_length=64, dataloader_num_workers=0, gradient_checkpointing=False,
        train_sampling_strategy="sequential", average_tokens_across_devices=True, loss_type=args.loss_type,
    )
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tok)
    world, rank = trainer.accelerator.num_processes, trainer.accelerator.process_index
    sharded = world > 1 and not args.no_shard
    trainer.is_fsdp_enabled = sharded and not args.skip_guard
    gere = GeReArguments(gere_replay=args.replay, gere_replay_size=16, gere_replay_max_length=32,
                         gere_replay_per_step=args.per_step, gere_regularizer=args.regularizer, gere_weight="dynamic",
                         gere_state_cache=str(Path(args.output) / "gere_states"), gere_state_batch_size=8)
    step = None if args.no_gere else enable_gere(trainer, gere)
    trainer.is_fsdp_enabled = sharded
    if sharded:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh, reshard_after_forward=True)
        if args.shard_lm_head:
            fully_shard(model.lm_head, mesh=mesh, reshard_after_forward=True)
        fully_shard(model, mesh=mesh, reshard_after_forward=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # linear in the gradients: no Adam sign amplification
    record: dict = {"rank": rank, "world": world, "micro": [], "chunked": step is not None and step.logit_head is not None}
    loader = iter(trainer.get_train_dataloader())
    model.train()
    for s in range(args.steps):
        batches, num_items = trainer.get_batch_samples(loader, args.accum, trainer.args.device)
        trainer.state.global_step = s
        trainer.current_gradient_accumulation_steps = len(batches)
        for m, batch in enumerate(batches):
            loss = trainer.training_step(model, batch, num_items)
            rows = step.history[-1]["rows"] if step is not None else []
            record["micro"].append({"step": s, "micro": m, "loss": float(loss), "rows": rows})
        if s == 0:  # the first step's gradients, before any update: the sharpest comparison
            record["grad_sums"] = {
                n: float((p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).double().abs().sum())
                for n, p in model.named_parameters() if p.grad is not None
            }
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    sums = {}
    for name, p in model.named_parameters():
        full = (p.full_tensor() if hasattr(p, "full_tensor") else p).detach()
        sums[name] = [float(full.double().sum()), float(full.double().abs().sum())]
    if rank == 0:
        record["param_sums"] = sums
    Path(args.output, f"rank{rank}.json").write_text(json.dumps(record, indent=1))
    print(f"GERE_FSDP_DONE rank {rank}", flush=True)
    return 0


if __name__ == "__main__":
    code = main()
    from _dist import close_process_group  # this script's folder is on sys.path

    close_process_group()
    sys.exit(code)
