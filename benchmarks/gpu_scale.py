"""GPU scale benchmark: GeRe steps at the shapes users train, with random bf16 weights built on the GPU.

Two shapes (``SHAPES``), every variant in its own process (so peak memory is the variant's own):

* ``llama1b-full``  - a Llama-3.2-1B-like model (hidden 2048, 16 layers, vocabulary 128,256), full
  fine-tune, sequence 2048, 8 task + 2 replay rows;
* ``llama8b-lora``  - a Llama-3.1-8B-like model (hidden 4096, 32 layers, vocabulary 128,256), LoRA r=16 on
  every projection, sequence 2048, 4 task + 1 replay row.

Gradient checkpointing is on. Variants (``VARIANTS``): ``plain`` (``gere_replay=None``, ``B + k`` task
rows: the same rows per step), ``vanilla`` (replay rows, CE only), ``tm`` (GeRe's threshold-margin loss,
state cache loaded), ``kl`` (logit KL to the base model on the replay rows) and ``tm_full_logits`` (TM with
the replay CE on full-vocabulary logits, ``GERE_LOGITS_CHUNK=0``). Each child reports the median step time
(``GeReSFTTrainer.training_step`` + optimizer step, ``benchmarks/throughput.py``'s ``Stepper``), peak
allocated and reserved CUDA memory and tokens/s; one more child per shape builds the state cache
(``gere_plugin.states.build_state_cache``) and times it against batched inference through the decoder.
The weights are random (seeded): none of these numbers needs trained weights. The texts are Wikipedia lead
sections (``--texts``, a gzip of JSON lines); the tokenizer is SmolLM2's (``--tokenizer``; the model's
vocabulary is 128,256 whatever the tokenizer's, which is what the memory of the logits depends on).

Targets (``value`` / ``target`` / ``pass`` in the JSON, per shape): TM / vanilla step time <= 1.05,
TM / plain step time at equal rows <= 1.05, TM / plain peak allocated memory <= 1.05, state build >= 0.8x
batched inference in tokens/s. The run stops starting children once ``--budget-s`` is spent (the rest is
recorded as skipped), and a child that runs past ``--child-timeout-s`` is killed and recorded.

    python benchmarks/gpu_scale.py --texts wiki.jsonl.gz --tokenizer DIR --out gpu_scale.json   # CUDA
    python benchmarks/gpu_scale.py --smoke --texts wiki.jsonl.gz --tokenizer DIR --out /tmp/s.json  # CPU, tiny

``--smoke`` runs the same code on the CPU with a tiny LoRA model (fp32, a few steps): its numbers are not
GPU numbers. Exit status 1 when a child failed; performance targets never change the exit status.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _env import environment_info, set_offline_defaults  # noqa: E402

set_offline_defaults()  # before transformers / datasets are imported

VARIANTS = ("plain", "vanilla", "tm", "kl", "tm_full_logits")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LLAMA3 = dict(num_attention_heads=32, num_key_value_heads=8, vocab_size=128_256, rope_theta=500_000.0,
              max_position_embeddings=8192)
SHAPES: dict[str, dict[str, Any]] = {
    "llama1b-full": dict(model=dict(LLAMA3, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                    head_dim=64, tie_word_embeddings=True),
                         lora=False, seq=2048, task_rows=8, replay_rows=2, replay_size=32),
    "llama8b-lora": dict(model=dict(LLAMA3, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                    head_dim=128, tie_word_embeddings=False),
                         lora=True, seq=2048, task_rows=4, replay_rows=1, replay_size=16),
}
SMOKE_SHAPES: dict[str, dict[str, Any]] = {
    "tiny-lora": dict(model=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, head_dim=16, vocab_size=0, tie_word_embeddings=False,
                                 max_position_embeddings=256),
                      lora=True, seq=64, task_rows=2, replay_rows=1, replay_size=8),
}
TIMING = {"gpu": dict(warmup=2, steps=5, build_rounds=2, build_batch=4),
          "smoke": dict(warmup=1, steps=2, build_rounds=1, build_batch=4)}
SEED = 1234


# ---------------------------------------------------------------------------------------------
# Child: one variant (or the state build) of one shape
# ---------------------------------------------------------------------------------------------
def _texts(path: Path, n: int, min_chars: int, skip: int) -> list[str]:
    from gpu_check import sample_chunks  # type: ignore[import-not-found]

    return sample_chunks(path, n, min_chars, skip)


def _model(shape: dict[str, Any], tok: Any, device: str, dtype: Any) -> Any:
    """A seeded random Llama of ``shape`` created on ``device`` directly (no CPU copy of an 8B model)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = dict(shape["model"])
    spec["vocab_size"] = max(spec["vocab_size"], len(tok))
    cfg = LlamaConfig(pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      **spec)
    torch.manual_seed(SEED)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(cfg, dtype=dtype)
    return model


def _replay_args(spec: dict[str, Any], regularizer: str, cache: Optional[str]) -> dict[str, Any]:
    shape = spec["shape"]
    return dict(gere_replay=spec["replay_file"], gere_replay_size=shape["replay_size"], gere_replay_max_length=shape["seq"],
                gere_replay_per_step=shape["replay_rows"], gere_regularizer=regularizer, gere_state_cache=cache,
                gere_seed=42)


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def _memory(device: str) -> dict[str, Optional[int]]:
    if device != "cuda":
        from gere_plugin.continual.cost import peak_rss

        return {"peak_allocated_bytes": None, "peak_reserved_bytes": None, "peak_rss_bytes": peak_rss()}
    import torch

    return {"peak_allocated_bytes": int(torch.cuda.max_memory_allocated()),
            "peak_reserved_bytes": int(torch.cuda.max_memory_reserved())}


def run_variant(spec: dict[str, Any]) -> dict[str, Any]:
    """Build the model and one variant's trainer, run warm-up + timed steps, report time, memory, tokens/s."""
    import throughput as tp  # type: ignore[import-not-found]
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer

    from gere_plugin import GeReSFTConfig, GeReSFTTrainer

    shape, variant, device = spec["shape"], spec["variant"], spec["device"]
    timing = TIMING[spec["timing"]]
    dtype = getattr(torch, spec["dtype"])
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(spec["tokenizer"])
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = _model(shape, tok, device, dtype)
    if shape["lora"]:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS,
                                                 task_type="CAUSAL_LM"))
    build_s = time.perf_counter() - t0
    rows = shape["task_rows"] + (shape["replay_rows"] if variant == "plain" else 0)
    kw: dict[str, Any] = dict(
        output_dir=str(Path(spec["work"]) / variant), per_device_train_batch_size=rows, gradient_accumulation_steps=1,
        learning_rate=1e-5, max_steps=10_000, logging_steps=10_000, save_strategy="no", report_to=[],
        bf16=spec["dtype"] == "bfloat16", use_cpu=device == "cpu", gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False}, disable_tqdm=True, max_length=shape["seq"],
        dataloader_num_workers=0, dataset_text_field="text", packing=False, seed=0,
    )
    if variant != "plain":
        regularizer = {"vanilla": "none", "tm_full_logits": "tm"}.get(variant, variant)
        kw.update(_replay_args(spec, regularizer, spec["cache"] if regularizer == "tm" else None))
    task = Dataset.from_list([{"text": t} for t in spec["task_texts"]])
    trainer = GeReSFTTrainer(model=model, args=GeReSFTConfig(**kw), train_dataset=task, processing_class=tok)
    optimizer = trainer.create_optimizer()
    stepper = tp.Stepper(variant, trainer, tp.prepare_batches(trainer, 2), optimizer, device)
    gstep = getattr(trainer, "gere_step", None)
    setup_s = time.perf_counter() - t0
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = int(torch.cuda.memory_allocated())
    else:
        from gere_plugin.continual.cost import reset_peak_rss

        before = reset_peak_rss()
    for i in range(timing["warmup"] + timing["steps"]):
        stepper.step(record=i >= timing["warmup"])
    _sync(device)
    tps = [t / s for t, s in zip(stepper.tokens, stepper.step_s)]
    return {
        "status": "ran", "variant": variant, "rows_per_step": shape["task_rows"] + shape["replay_rows"],
        "task_rows": rows, "step_s": tp.summary(stepper.step_s), "fwd_bwd_s": tp.summary(stepper.fwd_bwd_s),
        "tokens_per_step": tp.summary([float(t) for t in stepper.tokens]), "tokens_per_s": tp.summary(tps),
        "before_steps_allocated_bytes": before, **_memory(device),
        "replay_ce_chunked": bool(gstep is not None and gstep.logit_head is not None),
        "logit_chunk_tokens": getattr(gstep, "logit_chunk", None),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "parameters": sum(p.numel() for p in model.parameters()),
        "model_build_s": build_s, "setup_s": setup_s,
    }


def run_state_build(spec: dict[str, Any]) -> dict[str, Any]:
    """``build_state_cache`` vs batched ``no_grad`` inference through the decoder (same batches), and the cache."""
    from types import SimpleNamespace

    import numpy as np
    import throughput as tp  # type: ignore[import-not-found]
    import torch
    from transformers import AutoTokenizer

    from gere_plugin.replay import ReplaySet
    from gere_plugin.states import build_state_cache

    shape, device = spec["shape"], spec["device"]
    timing = TIMING[spec["timing"]]
    tok = AutoTokenizer.from_pretrained(spec["tokenizer"])
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = _model(shape, tok, device, getattr(torch, spec["dtype"])).eval()
    ns = SimpleNamespace(**_replay_args(spec, "tm", None), gere_replay_split="train", gere_replay_text_field="text",
                         gere_replay_min_tokens=2)
    replay = ReplaySet.from_args(ns, tok)
    batch = timing["build_batch"]
    order = np.argsort(-replay.lengths, kind="stable")
    batches = [order[i: i + batch].tolist() for i in range(0, len(replay), batch)]
    backbone = model.get_decoder()

    @torch.no_grad()
    def infer() -> None:
        for idx in batches:
            b = replay.collate(idx, tok.pad_token_id, torch.device(device))
            backbone(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)

    def build() -> Any:
        return build_state_cache(model, replay, [-1], 1.0, batch_size=batch, pad_token_id=tok.pad_token_id,
                                 progress=False)

    infer()  # warm-up
    times: dict[str, list[float]] = {"build": [], "inference_backbone": []}
    built = None
    for r in range(timing["build_rounds"]):
        for kind in (("build", "inference_backbone") if r % 2 == 0 else ("inference_backbone", "build")):
            _sync(device)
            t0 = time.perf_counter()
            out = build() if kind == "build" else infer()
            _sync(device)
            times[kind].append(time.perf_counter() - t0)
            built = out if kind == "build" else built
    assert built is not None
    built.save(Path(spec["cache"]))
    tps = {k: replay.num_tokens / statistics.median(v) for k, v in times.items()}
    return {"status": "ran", "replay_samples": len(replay), "replay_tokens": int(replay.num_tokens), "batch_size": batch,
            "seconds": {k: tp.summary(v) for k, v in times.items()}, "tokens_per_s": tps,
            "build_seconds": statistics.median(times["build"]),
            "build_vs_inference_backbone": tps["build"] / tps["inference_backbone"], **_memory(device)}


def child_main(spec_file: Path) -> int:
    """One variant; with ``spec["group"]`` (the CPU smoke run) every variant of the shape in turn, in this process."""
    spec = json.loads(spec_file.read_text())
    import torch

    if spec["device"] == "cpu":
        torch.set_num_threads(1)
    results = {}
    for variant in spec.get("group") or [spec["variant"]]:
        if variant == "tm_full_logits":
            os.environ["GERE_LOGITS_CHUNK"] = "0"
        else:
            os.environ.pop("GERE_LOGITS_CHUNK", None)
        one = {**spec, "variant": variant}
        results[variant] = run_state_build(one) if variant == "state" else run_variant(one)
        gc.collect()
    print("GPU_SCALE " + json.dumps(results if spec.get("group") else results[spec["variant"]]), flush=True)
    return 0


# ---------------------------------------------------------------------------------------------
# Parent: children under a time budget, ratios, targets
# ---------------------------------------------------------------------------------------------
def run_child(spec: dict[str, Any], work: Path, timeout: float, logs: Optional[Path]) -> dict[str, Any]:
    name = f"{spec['shape_name']}-{spec['variant']}"
    spec_file = work / f"spec-{name}.json"
    spec_file.write_text(json.dumps(spec))
    env = dict(os.environ)
    if spec["variant"] == "tm_full_logits":
        env["GERE_LOGITS_CHUNK"] = "0"
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, __file__, "--child", str(spec_file)], capture_output=True, text=True,
                              timeout=max(timeout, 1.0), env=env)
        out, err, rc = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        err = exc.stderr.decode() if isinstance(exc.stderr, bytes) else exc.stderr or ""
        rc = None
    wall = time.perf_counter() - t0
    if logs is not None:
        (logs / f"gpu_scale-{name}.log").write_text(f"{out}\n--- stderr ---\n{err}")
    line = [ln for ln in out.splitlines() if ln.startswith("GPU_SCALE ")]
    if rc is None:
        res: dict[str, Any] = {"status": "timeout", "error": f"killed after {timeout:.0f}s", "stderr_tail": err[-2000:]}
    elif rc != 0 or not line:
        res = {"status": "error", "error": f"exit status {rc}", "stderr_tail": err[-4000:]}
    else:
        res = json.loads(line[-1][len("GPU_SCALE "):])
    res["wall_s"] = wall
    print(f"  [{name}] {res.get('status', 'ran')} in {wall:.0f}s"
          + (f": step {res['step_s']['median']:.3f}s" if "step_s" in res else ""), flush=True)
    return res


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


def shape_ratios(results: dict[str, dict[str, Any]]) -> dict[str, Optional[float]]:
    """Ratios of the variants of one shape (None where a side did not run)."""
    def med(v: str, key: str) -> Optional[float]:
        r = results.get(v, {})
        return r[key]["median"] if r.get("status") == "ran" else None

    def mem(v: str, key: str) -> Optional[float]:
        r = results.get(v, {})
        return r.get(key) if r.get("status") == "ran" else None

    out: dict[str, Optional[float]] = {}
    for v in ("vanilla", "tm", "kl", "tm_full_logits"):
        out[f"{v}_vs_plain_step_time"] = _ratio(med(v, "step_s"), med("plain", "step_s"))
        out[f"{v}_vs_plain_tokens_per_s"] = _ratio(med(v, "tokens_per_s"), med("plain", "tokens_per_s"))
        for key in ("peak_allocated_bytes", "peak_reserved_bytes"):
            out[f"{v}_vs_plain_{key.removesuffix('_bytes')}"] = _ratio(mem(v, key), mem("plain", key))
    for v in ("tm", "kl", "tm_full_logits"):
        out[f"{v}_vs_vanilla_step_time"] = _ratio(med(v, "step_s"), med("vanilla", "step_s"))
        out[f"{v}_vs_vanilla_peak_allocated"] = _ratio(mem(v, "peak_allocated_bytes"), mem("vanilla", "peak_allocated_bytes"))
    state = results.get("state", {})
    out["state_build_vs_inference_tokens_per_s"] = state.get("build_vs_inference_backbone") if state.get("status") == "ran" else None
    return out


#: (ratio key, comparison, bound): the issue's targets, per shape
TARGETS = (("tm_vs_vanilla_step_time", "<=", 1.05), ("tm_vs_plain_step_time", "<=", 1.05),
           ("tm_vs_plain_peak_allocated", "<=", 1.05), ("state_build_vs_inference_tokens_per_s", ">=", 0.8))


def targets(shapes: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``value`` / ``target`` / ``pass`` for every target and shape (``pass`` None where the value is missing)."""
    out = {}
    for name, shape in shapes.items():
        for key, op, bound in TARGETS:
            value = shape["ratios"].get(key)
            ok = None if value is None else (value <= bound if op == "<=" else value >= bound)
            out[f"{name}.{key}"] = {"kind": "performance", "value": value, "target": f"{op} {bound}", "pass": ok}
    return out


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny LoRA shape, a few steps (the test suite's run)")
    ap.add_argument("--shapes", default=None, help=f"comma-separated, of {', '.join(SHAPES)} (default: all)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--texts", type=Path, required=False, help="gzip of JSON lines with a 'text' field")
    ap.add_argument("--tokenizer", type=Path, required=False, help="tokenizer folder (SmolLM2's)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--logs", type=Path, default=None, help="folder for every child's output")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--budget-s", type=float, default=420.0, help="start no child after this many seconds")
    ap.add_argument("--child-timeout-s", type=float, default=150.0)
    a = ap.parse_args(argv)
    if a.child:
        return child_main(a.child)
    if a.texts is None or a.tokenizer is None:
        ap.error("--texts and --tokenizer are needed")
    import torch

    device = "cpu" if a.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_scale.py needs a CUDA GPU (or --smoke for the CPU dry run)")
    table = SMOKE_SHAPES if a.smoke else SHAPES
    names = a.shapes.split(",") if a.shapes else list(table)
    variants = [v for v in a.variants.split(",") if v]
    work = a.workdir or Path(tempfile.mkdtemp(prefix="gere-gpu-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    if a.logs:
        a.logs.mkdir(parents=True, exist_ok=True)
    out = a.out or HERE / "results" / ("gpu_scale_smoke.json" if a.smoke else "gpu_scale.json")
    t0 = time.perf_counter()
    result: dict[str, Any] = {
        "benchmark": "benchmarks/gpu_scale.py", "mode": "smoke (CPU dry run: not GPU numbers)" if a.smoke else "full",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "random_weights": True,
        "weights": f"random (torch.manual_seed({SEED})), built on the {device} directly; not trained weights",
        "environment": environment_info(), "timing": TIMING["smoke" if a.smoke else "gpu"],
        "gradient_checkpointing": True, "texts": str(a.texts), "tokenizer": str(a.tokenizer), "shapes": {},
    }

    def save() -> None:
        result["wall_seconds"] = time.perf_counter() - t0
        result["targets"] = targets(result["shapes"])
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1, default=str))

    for name in names:
        shape = table[name]
        chars = shape["seq"] * 6
        shape_work = work / name
        shape_work.mkdir(parents=True, exist_ok=True)
        replay_file = shape_work / "replay.jsonl"
        replay_file.write_text("".join(json.dumps({"text": t}) + "\n"
                                       for t in _texts(a.texts, shape["replay_size"], chars, skip=0)))
        base = {"shape_name": name, "shape": shape, "device": device, "dtype": "float32" if a.smoke else "bfloat16",
                "timing": "smoke" if a.smoke else "gpu", "tokenizer": str(a.tokenizer), "replay_file": str(replay_file),
                "cache": str(shape_work / "states"), "work": str(shape_work),
                "task_texts": _texts(a.texts, 2 * (shape["task_rows"] + shape["replay_rows"]), chars, skip=3000)}
        runs: dict[str, Any] = {}
        entry = {"settings": {k: v for k, v in shape.items()}, "variants": runs, "ratios": {}}
        result["shapes"][name] = entry
        needs_cache = any(v in ("tm", "tm_full_logits") for v in variants)
        order = (["state"] if needs_cache else []) + variants
        if a.smoke:  # one process for the whole shape: the CPU smoke run's time is mostly imports
            group = run_child({**base, "variant": "all", "group": order}, shape_work, a.child_timeout_s, a.logs)
            for variant in order:
                runs[variant] = group.get(variant) or {k: v for k, v in group.items() if k in ("status", "error", "stderr_tail")}
            entry["ratios"] = shape_ratios(runs)
            entry["one_process"] = True
            order = []
        for variant in order:
            left = a.budget_s - (time.perf_counter() - t0)
            if left <= 5:
                runs[variant] = {"status": "skipped", "reason": f"time budget of {a.budget_s:.0f}s spent"}
                continue
            runs[variant] = run_child({**base, "variant": variant}, shape_work, min(a.child_timeout_s, left), a.logs)
            entry["ratios"] = shape_ratios(runs)
            save()
        entry["state_build_seconds"] = runs.get("state", {}).get("build_seconds")
        save()
    save()
    print(f"wrote {out} in {result['wall_seconds']:.0f}s")
    for k, v in result["targets"].items():
        mark = "----" if v["pass"] is None else "PASS" if v["pass"] else "FAIL"
        print(f"  {mark} {k}: {v['value']} ({v['target']})")
    failed = [f"{n}/{v}" for n, s in result["shapes"].items() for v, r in s["variants"].items()
              if r["status"] in ("error", "timeout")]
    with contextlib.suppress(Exception):
        result["failed"] = failed
        save()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
