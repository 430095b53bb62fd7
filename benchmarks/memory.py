"""Memory benchmark: is the peak memory of a GeRe step governed by the task rows, not the vocabulary?

Tiny-hidden Llama models (hidden 64, 2 layers, untied head) with vocabularies of 32,000, 128,256
(Llama-3) and 256,000 (Gemma) tokens make the vocabulary-sized tensors (logits, the head, its
gradient) dominate every step, as they do for QLoRA on a 24 GB GPU. For every vocabulary it runs, each
in a fresh process, one optimizer step after another through the real ``GeReSFTTrainer``
(``training_step`` + optimizer step, as in ``benchmarks/throughput.py``):

* ``plain``     - ``gere_replay=None``, ``B + k`` task rows (TRL's default ``chunked_nll`` task loss);
* ``tm``        - ``B`` task + ``k`` replay rows, GeRe's TM loss, replay CE from hidden states in chunks;
* ``kl``        - the same rows with the KL regularizer (model and base logits chunked alike);
* ``tm_full``   - ``tm`` with ``GERE_LOGITS_CHUNK=0``: the full-vocabulary replay logits of gere-plugin
                  before issue 16 (for comparison; no target).

Peak memory is the process's peak RSS (``VmHWM``) during the measured steps, after one warm-up step
(optimizer states exist) and a reset of the mark (``/proc/self/clear_refs``). glibc is told to serve
every allocation above 64 KiB with ``mmap`` (``MALLOC_MMAP_THRESHOLD_``), so freed tensors leave the
RSS at once and the peak RSS is the peak of live memory. ``step`` = peak minus the RSS before the
steps (activations, logits, gradients); ``total`` = the peak itself (plus weights, optimizer states,
the frozen reference copy that ``kl`` keeps in a full fine-tune). Target: GeRe / plain <= 1.05 for the
step peak of ``tm`` and ``kl`` and the total of ``tm`` at every vocabulary.

Usage::

    python benchmarks/memory.py                     # 12 probes, one process each; writes results/memory_cpu.{json,png}
    python benchmarks/memory.py --jobs 3            # probes side by side (each measures its own process; ~2 GB each at 256k)
    python benchmarks/memory.py --vocabs 32000 --variants plain,tm --seq 64 --out /tmp/m.json   # smoke run

The full run (12 probes, one at a time) took 13 minutes on the 2-core development machine.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _probe import print_probe_result, run_probe_process  # noqa: E402

from gere_plugin.continual.cost import peak_rss, reset_peak_rss  # noqa: E402

RESULTS = HERE / "results"
VOCABS = (32_000, 128_256, 256_000)
VARIANTS = ("plain", "tm", "kl", "tm_full")
TARGET = 1.05
TARGETS = (("tm", "step"), ("kl", "step"), ("tm", "total"))
WORDS = (
    "the a of and to in is was for on with as by at from that this it be are river city music science history "
    "game film team water light energy market school garden forest ocean planet engine winter summer mountain"
).split()


def _texts(n: int, words: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(words)) + "." for _ in range(n)]


# ---------------------------------------------------------------------------------------------
# One variant in a fresh process
# ---------------------------------------------------------------------------------------------
def probe(spec: dict[str, Any]) -> dict[str, Any]:
    """Build the trainer of ``spec['variant']``, run warm-up + measured steps, report peak RSS."""
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from gere_plugin import GeReSFTConfig, GeReSFTTrainer

    torch.set_num_threads(spec["threads"])
    variant, vocab, seq, task, replay_rows = spec["variant"], spec["vocab"], spec["seq"], spec["task_rows"], spec["replay_rows"]
    if variant == "tm_full":
        os.environ["GERE_LOGITS_CHUNK"] = "0"
    tok = AutoTokenizer.from_pretrained(spec["tokenizer"])
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=max(512, seq), tie_word_embeddings=False,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    out = Path(spec["work"]) / f"{variant}-{vocab}"
    kw: dict[str, Any] = dict(
        output_dir=str(out), per_device_train_batch_size=task + (replay_rows if variant == "plain" else 0),
        gradient_accumulation_steps=1, learning_rate=1e-5, max_steps=1000, logging_steps=1000, save_strategy="no",
        report_to=[], bf16=False, use_cpu=True, gradient_checkpointing=False, disable_tqdm=True, max_length=seq,
        dataloader_num_workers=0, dataset_text_field="text", packing=False, seed=0,
    )
    if variant != "plain":
        kw.update(gere_replay=spec["replay_file"], gere_replay_size=32, gere_replay_max_length=seq,
                  gere_replay_per_step=replay_rows, gere_regularizer="kl" if variant == "kl" else "tm",
                  gere_state_cache=str(out / "states"), gere_seed=42)
    task_ds = Dataset.from_list([{"text": t} for t in spec["task_texts"]])
    trainer = GeReSFTTrainer(model=model, args=GeReSFTConfig(**kw), train_dataset=task_ds, processing_class=tok)
    step = trainer.gere_step
    optimizer = trainer.create_optimizer()
    it = iter(trainer.get_train_dataloader())
    batches = []
    for _ in range(spec["steps"] + 1):
        samples, num_items = trainer.get_batch_samples(it, 1, trainer.args.device)
        batches.append((samples[0], num_items))
    rows = {tuple(b["input_ids"].shape) for b, _ in batches}

    def one_step(i: int) -> None:
        inputs, num_items = batches[i]
        trainer.state.global_step = i
        trainer.current_gradient_accumulation_steps = 1
        trainer.training_step(trainer.model, inputs, num_items)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    one_step(0)  # warm-up: optimizer states exist from here on
    import gc

    gc.collect()
    before = reset_peak_rss()
    t0 = time.perf_counter()
    for i in range(1, spec["steps"] + 1):
        one_step(i)
    seconds = (time.perf_counter() - t0) / spec["steps"]
    peak = peak_rss()
    return {
        "variant": variant, "vocab": vocab, "peak_total_bytes": peak, "before_steps_bytes": before,
        "peak_step_bytes": peak - before, "seconds_per_step": seconds, "task_batch_shapes": sorted(rows),
        "replay_chunk_tokens": getattr(step, "logit_chunk", None) if step is not None else None,
        "replay_head": "chunked" if step is not None and step.logit_head is not None else (None if step is None else "full logits"),
        "loss_type": trainer.args.loss_type,
    }


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------
def run_probe(spec: dict[str, Any], work: Path) -> dict[str, Any]:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=str(spec["threads"]), HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled",
               HF_DATASETS_DISABLE_PROGRESS_BARS="1")
    env.pop("GERE_LOGITS_CHUNK", None)
    return run_probe_process(__file__, spec, work / f"spec-{spec['variant']}-{spec['vocab']}.json",
                             f"{spec['variant']}/{spec['vocab']}", env=env)


def build_tokenizer(folder: Path, texts: list[str]) -> None:
    """A byte-level BPE tokenizer (2,048 tokens) trained on ``texts``; the models' vocabularies are larger."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2048, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(str(folder))


def check_targets(results: dict[str, dict[str, dict]]) -> dict[str, dict]:
    checks = {}
    for vocab, by_variant in results.items():
        plain = by_variant.get("plain")
        for variant, kind in TARGETS:
            if plain is None or variant not in by_variant:
                continue
            value = by_variant[variant][f"peak_{kind}_bytes"] / plain[f"peak_{kind}_bytes"]
            checks[f"{variant}_vs_plain_{kind}_peak[vocab={vocab}]"] = {
                "value": value, "target": f"<= {TARGET}", "pass": bool(value <= TARGET)}
    return checks


def ratios(results: dict[str, dict[str, dict]]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for vocab, by_variant in results.items():
        plain = by_variant.get("plain")
        if plain is None:
            continue
        out[vocab] = {f"{v}_vs_plain_{k}_peak": r[f"peak_{k}_bytes"] / plain[f"peak_{k}_bytes"]
                      for v, r in by_variant.items() if v != "plain" for k in ("step", "total")}
    return out


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vocabs = list(result["results"])
    variants = [v for v in VARIANTS if v != "plain" and all(v in result["results"][x] for x in vocabs)]
    labels = {"tm": "GeRe TM (chunked)", "kl": "replay + KL (chunked)", "tm_full": "GeRe TM, full replay logits (before)"}
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.4))
    width = 0.8 / max(len(variants), 1)
    for j, v in enumerate(variants):
        vals = [result["ratios"][x][f"{v}_vs_plain_step_peak"] for x in vocabs]
        axes[0].bar([i + j * width for i in range(len(vocabs))], vals, width, label=labels.get(v, v))
    axes[0].axhline(TARGET, color="k", ls="--", lw=1, label=f"target {TARGET}")
    axes[0].set_xticks([i + width * (len(variants) - 1) / 2 for i in range(len(vocabs))], [f"vocab {x}" for x in vocabs])
    axes[0].set_title("peak memory of a step / plain SFT (same rows)")
    axes[0].legend(fontsize=7)
    allv = [v for v in VARIANTS if all(v in result["results"][x] for x in vocabs)]
    width = 0.8 / max(len(allv), 1)
    for j, v in enumerate(allv):
        vals = [result["results"][x][v]["peak_step_bytes"] / 2**20 for x in vocabs]
        axes[1].bar([i + j * width for i in range(len(vocabs))], vals, width, label=labels.get(v, "plain SFT"))
    axes[1].set_xticks([i + width * (len(allv) - 1) / 2 for i in range(len(vocabs))], [f"vocab {x}" for x in vocabs])
    axes[1].set_ylabel("MiB above the memory held between steps")
    axes[1].set_title("step peak (RSS), absolute")
    axes[1].legend(fontsize=7)
    s = result["settings"]
    fig.suptitle(f"gere-plugin memory: hidden 64, {s['task_rows']}+{s['replay_rows']} rows x {s['seq']} tokens vs "
                 f"{s['task_rows'] + s['replay_rows']} task rows (CPU peak RSS)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocabs", default=",".join(str(v) for v in VOCABS))
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--seq", type=int, default=256, help="tokens per row (task and replay)")
    ap.add_argument("--task-rows", type=int, default=6)
    ap.add_argument("--replay-rows", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2, help="measured steps (after one warm-up step)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--jobs", type=int, default=1, help="probes run side by side (each measures its own process)")
    ap.add_argument("--out", type=Path, default=RESULTS / "memory_cpu.json")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--probe", type=Path, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.probe is not None:
        print_probe_result(probe(json.loads(a.probe.read_text())))
        return 0
    from _env import environment_info  # type: ignore[import-not-found]

    t_start = time.time()
    work = Path(tempfile.mkdtemp(prefix="gere-memory-"))
    texts = _texts(200, a.seq * 2, seed=1)
    build_tokenizer(work / "tok", texts)
    replay_file = work / "replay.jsonl"
    replay_file.write_text("".join(json.dumps({"text": t}) + "\n" for t in _texts(64, a.seq * 2, seed=2)))
    base = dict(tokenizer=str(work / "tok"), replay_file=str(replay_file), task_texts=_texts(64, a.seq * 2, seed=3),
                seq=a.seq, task_rows=a.task_rows, replay_rows=a.replay_rows, steps=a.steps, threads=a.threads, work=str(work))
    specs = [dict(base, variant=variant, vocab=int(vocab)) for vocab in a.vocabs.split(",") for variant in a.variants.split(",")]
    # Every probe is its own process and measures its own peak RSS, so probes may run side by side.
    with ThreadPoolExecutor(max_workers=max(1, a.jobs)) as pool:
        done = list(pool.map(lambda spec: run_probe(spec, work), specs))
    results: dict[str, dict[str, dict]] = {}
    for r in sorted(done, key=lambda r: (r["vocab"], VARIANTS.index(r["variant"]))):
        results.setdefault(str(r["vocab"]), {})[r["variant"]] = r
        print(f"vocab {r['vocab']:>7} {r['variant']:>8}: step peak {r['peak_step_bytes'] / 2**20:8.1f} MiB, total "
              f"{r['peak_total_bytes'] / 2**20:8.1f} MiB, {r['seconds_per_step']:.1f} s/step", flush=True)
    result = {
        "benchmark": "benchmarks/memory.py",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "environment": environment_info(),
        "settings": {"seq": a.seq, "task_rows": a.task_rows, "replay_rows": a.replay_rows, "steps": a.steps,
                     "threads": a.threads, "jobs": a.jobs, "model": "LlamaForCausalLM, hidden 64, 2 layers, 4 heads, untied head, fp32",
                     "optimizer": "AdamW (trainer default)", "full_fine_tune": True},
        "variants": {
            "plain": "GeReSFTTrainer with gere_replay=None, task_rows + replay_rows task rows",
            "tm": "task_rows task + replay_rows replay rows, gere_regularizer=tm, replay CE chunked from hidden states",
            "kl": "the same rows, gere_regularizer=kl (frozen reference copy; model and base logits chunked)",
            "tm_full": "tm with GERE_LOGITS_CHUNK=0: full-vocabulary replay logits (the implementation before issue 16)",
        },
        "memory_method": "fresh process per variant and vocabulary; glibc MALLOC_MMAP_THRESHOLD_=65536 (freed tensors "
        "leave the RSS at once); one warm-up optimizer step, then /proc/self/clear_refs 5 resets VmHWM; "
        "peak_total = VmHWM over the measured steps, peak_step = VmHWM - VmRSS before them",
        "results": results,
        "ratios": ratios(results),
        "targets": check_targets(results),
        "wall_seconds": time.time() - t_start,
    }
    shutil.rmtree(work, ignore_errors=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1))
    if not a.no_plot:
        plot(result, a.out.with_suffix(".png"))
    print(f"wrote {a.out} in {result['wall_seconds']:.0f}s")
    for k, v in result["targets"].items():
        print(f"  {'PASS' if v['pass'] else 'FAIL'} {k}: {v['value']:.3f} ({v['target']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
