"""Shared fixtures: a tiny random Llama model and a tokenizer built in code (no downloads)."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

# One thread: tiny models run several times faster than with two contended threads.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("AXOLOTL_DO_NOT_TRACK", "1")

WORDS = (
    "the a of and to in is was for on with as by at from that this it be are were or an which his her "
    "river city music science history game film team water light energy market school garden forest ocean "
    "planet engine winter summer mountain village island paper story movie great bad good terrible lovely "
    "positive negative yes no question answer because people year first many most time world state house"
).split()


def general_texts(n: int, seed: int = 0, min_words: int = 6, max_words: int = 30) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))) + "." for _ in range(n)]


def build_tokenizer(path: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    from tokenizers import decoders

    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(general_texts(400, seed=1) + ["Review: x Sentiment: positive negative"], trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.save_pretrained(str(path))
    return fast


def build_model(path: Path, tokenizer, hidden: int = 32, layers: int = 4, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return model


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A folder with a tiny random Llama (4 layers, hidden 32) and its tokenizer."""
    d = tmp_path_factory.mktemp("tiny-llama")
    tok = build_tokenizer(d)
    build_model(d, tok)
    return d


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_dir))


@pytest.fixture
def tiny_model(tiny_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_dir), dtype="float32")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    return path


@pytest.fixture(scope="session")
def replay_file(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("replay")
    return write_jsonl(d / "replay.jsonl", [{"text": t} for t in general_texts(64, seed=7)])


@pytest.fixture(scope="session")
def sft_dataset():
    from datasets import Dataset

    rng = random.Random(3)
    rows = []
    for _ in range(64):
        label = rng.choice(["positive", "negative"])
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 10)))
        rows.append({"prompt": f"Review: {words} Sentiment:", "completion": f" {label}"})
    return Dataset.from_list(rows)


def sft_config(out: Path, **overrides):
    from gere_plugin import GeReSFTConfig

    kw = dict(
        output_dir=str(out),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=1,
        learning_rate=1e-3,
        max_steps=3,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        bf16=False,
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        max_length=64,
        dataloader_num_workers=0,
        gere_replay_size=32,
        gere_replay_max_length=32,
        gere_replay_per_step=2,
        gere_state_batch_size=8,
    )
    kw.update(overrides)
    return GeReSFTConfig(**kw)
