"""EWC: the penalty and its gradient, the Fisher estimate on a toy model, the state, the scaling in the
trainer, and a task sequence through ``gere sequence --method ewc``."""

from __future__ import annotations

import json
import math
import types

import pytest
import torch

from gere_plugin import GeReSFTTrainer
from gere_plugin.config import GeReArguments, GeReConfigError
from gere_plugin.ewc import EWCState, accumulate_fisher, estimate_fisher, ewc_penalty, trainable_parameters
from gere_plugin.states import StateCacheError

from .conftest import sft_config

FAST = dict(gradient_checkpointing=False)


# -- pure math ----------------------------------------------------------------------------------
def test_penalty_and_its_gradient_by_hand():
    theta = [torch.tensor([1.0, 2.0], requires_grad=True), torch.tensor([[0.5]], requires_grad=True)]
    anchor = [torch.tensor([0.0, 2.5]), torch.tensor([[1.5]])]
    fisher = [torch.tensor([2.0, 4.0]), torch.tensor([[0.25]])]
    lam = 3.0
    value = ewc_penalty(theta, anchor, fisher, lam)
    # lam/2 * (2*1^2 + 4*0.5^2 + 0.25*1^2) = 1.5 * 3.25
    assert value.item() == pytest.approx(4.875, rel=1e-7)
    value.backward()
    # d/dtheta = lam * F * (theta - theta*)
    assert theta[0].grad.tolist() == pytest.approx([3.0 * 2.0 * 1.0, 3.0 * 4.0 * -0.5])
    assert theta[1].grad.item() == pytest.approx(3.0 * 0.25 * -1.0)


def test_online_accumulation():
    prev = {"a": torch.tensor([1.0, 2.0])}
    cur = {"a": torch.tensor([0.5, 0.5])}
    assert accumulate_fisher(prev, cur, 0.5)["a"].tolist() == [1.0, 1.5]
    assert accumulate_fisher(None, cur, 0.5)["a"].tolist() == [0.5, 0.5]


class Bigram(torch.nn.Module):
    """A toy causal LM: the logits at position t are row ``input_ids[t]`` of W."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.W = torch.nn.Parameter(torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(0)))

    def forward(self, input_ids, attention_mask=None, use_cache=None, position_ids=None):
        return types.SimpleNamespace(logits=self.W[input_ids])


def test_fisher_of_a_toy_model_by_hand():
    vocab = 4
    model = Bigram(vocab)
    samples = [([0, 1, 2], [-100, 1, 2]), ([3, 3, 1, 0], [-100, -100, 1, 0]), ([2, 0], [-100, -100])]
    W = model.W.detach().tolist()

    def softmax(row):
        m = max(row)
        e = [math.exp(v - m) for v in row]
        return [v / sum(e) for v in e]

    expected = [[0.0] * vocab for _ in range(vocab)]
    counted = 0
    for ids, labels in samples:
        trained = [(ids[t], labels[t + 1]) for t in range(len(ids) - 1) if labels[t + 1] != -100]
        if not trained:
            continue  # no trained token: not part of the estimate
        grad = [[0.0] * vocab for _ in range(vocab)]
        for x, y in trained:  # gradient of the sample's token-mean CE
            p = softmax(W[x])
            for v in range(vocab):
                grad[x][v] += (p[v] - (1.0 if v == y else 0.0)) / len(trained)
        for i in range(vocab):
            for j in range(vocab):
                expected[i][j] += grad[i][j] ** 2
        counted += 1
    expected = torch.tensor(expected) / counted

    def batch(rows):
        width = max(len(i) for i, _ in rows)
        ids = torch.tensor([i + [0] * (width - len(i)) for i, _ in rows])
        labels = torch.tensor([la + [-100] * (width - len(la)) for _, la in rows])
        mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in rows])
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    one_by_one, n1 = estimate_fisher(model, {"W": model.W}, [batch([s]) for s in samples])
    together, n2 = estimate_fisher(model, {"W": model.W}, [batch(samples)])  # per-row gradients inside one batch
    assert n1 == n2 == 2
    torch.testing.assert_close(one_by_one["W"], expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(together["W"], expected, rtol=1e-5, atol=1e-7)
    assert model.W.grad is None  # the estimate never touches .grad (optimizer, DDP hooks)


def test_state_round_trip_and_folder_rules(tmp_path):
    state = EWCState({"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([0.5, 0.5])}, {"tasks": 1})
    state.save(tmp_path / "ewc")
    back = EWCState.load(tmp_path / "ewc")
    assert back.fisher["w"].tolist() == [1.0, 2.0] and back.anchor["w"].tolist() == [0.5, 0.5]
    assert json.loads((tmp_path / "ewc" / "meta.json").read_text())["kind"] == "gere_ewc"
    state.save(tmp_path / "ewc")  # an EWC state folder is replaced (atomically) ...
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("x")
    with pytest.raises(StateCacheError, match="gere_ewc_state=.*not empty"):
        state.save(mine)  # ... a folder with other files never
    assert (mine / "notes.txt").read_text() == "x"
    with pytest.raises(GeReConfigError, match="does not exist"):
        EWCState.load(tmp_path / "missing")
    (tmp_path / "ewc" / "ewc.safetensors").write_bytes(b"broken")
    with pytest.raises(StateCacheError, match="truncated or corrupted"):
        EWCState.load(tmp_path / "ewc")


def test_ewc_keys_are_validated():
    with pytest.raises(GeReConfigError, match="gere_ewc_lambda is 0"):
        GeReArguments(gere_ewc_state="somewhere")
    with pytest.raises(GeReConfigError, match="gere_ewc_gamma"):
        GeReArguments(gere_ewc_lambda=1.0, gere_ewc_gamma=1.5)
    with pytest.raises(GeReConfigError, match="gere_ewc_lambda"):
        GeReArguments(gere_ewc_lambda=-1.0)


# -- inside the trainer ----------------------------------------------------------------------------
def _batches(trainer, n):
    it = iter(trainer.get_train_dataloader())
    return [trainer._prepare_inputs(next(it)) for _ in range(n)]


@pytest.mark.parametrize("accumulation", [1, 2])
def test_penalty_is_added_once_per_optimizer_step(tmp_path, tiny_dir, tiny_tokenizer, sft_dataset, accumulation):
    from transformers import AutoModelForCausalLM
    from trl import SFTTrainer

    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir))
    g = torch.Generator().manual_seed(2)
    params = trainable_parameters(model)
    fisher = {n: torch.rand(p.shape, generator=g) for n, p in params.items()}
    anchor = {n: p.detach().clone() for n, p in params.items()}
    EWCState(fisher, anchor, {"tasks": 1}).save(tmp_path / "prev")
    lam = 7.0
    cfg = sft_config(tmp_path / "out", **FAST, gere_ewc_lambda=lam, gere_ewc_state=str(tmp_path / "prev"),
                     gradient_accumulation_steps=accumulation, per_device_train_batch_size=4 // accumulation)
    trainer = GeReSFTTrainer(model=model, args=cfg, train_dataset=sft_dataset, processing_class=tiny_tokenizer)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    model.train()
    batches = _batches(trainer, accumulation)
    num_items = sum((b["labels"][:, 1:] != -100).sum() for b in batches)
    trainer.current_gradient_accumulation_steps = accumulation
    trainer.state.global_step = 0
    ours = sum(trainer.compute_loss(model, dict(b), num_items_in_batch=num_items) for b in batches)
    task = sum(SFTTrainer.compute_loss(trainer, model, dict(b), num_items_in_batch=num_items) for b in batches)
    with torch.no_grad():
        by_hand = lam / 2 * sum(float((fisher[n] * (p - anchor[n]) ** 2).sum()) for n, p in params.items())
    assert by_hand > 1e-3
    assert float(ours - task) == pytest.approx(by_hand, rel=1e-4)
    assert trainer._metrics["train"]["gere/ewc_penalty"][-1] == pytest.approx(by_hand, rel=1e-4)


def test_ewc_with_lora_anchors_the_adapters_only(tmp_path, tiny_dir, tiny_tokenizer, sft_dataset):
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir))
    cfg = sft_config(tmp_path / "out", **FAST, gere_ewc_lambda=5.0, gere_ewc_samples=6, max_steps=2)
    trainer = GeReSFTTrainer(model=model, args=cfg, train_dataset=sft_dataset, processing_class=tiny_tokenizer,
                             peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    trainer.train()
    state = EWCState.load(tmp_path / "out" / "gere_ewc")
    assert state.fisher and all("lora_" in n for n in state.fisher)
    assert state.meta["samples"] == 6 and state.meta["tasks"] == 1
    assert any(float(f.sum()) > 0 for f in state.fisher.values())
    # the next task's trainer binds the same adapter weights; a model without them is refused by name
    with pytest.raises(GeReConfigError, match="gere_ewc_state=.*does not train"):
        GeReSFTTrainer(model=AutoModelForCausalLM.from_pretrained(str(tiny_dir)), processing_class=tiny_tokenizer,
                       train_dataset=sft_dataset, args=sft_config(tmp_path / "o2", **FAST, gere_ewc_lambda=5.0,
                                                                  gere_ewc_state=str(tmp_path / "out" / "gere_ewc")))


@pytest.mark.slow
def test_gere_sequence_method_ewc_chains_the_state(tiny_dir, tmp_path, capsys):
    """``gere sequence --method ewc``: task 1 writes its state, task 2 is anchored to it (penalty > 0 once the
    weights move) and writes the accumulated state, whose anchor is the final model."""
    from safetensors.torch import load_file

    from gere_plugin.cli import main

    from .test_continual import TASKS, _write_task_files

    out = tmp_path / "ewc"
    args = ["sequence", "--model", str(tiny_dir), "--method", "ewc", "--gere_ewc_lambda", "50", "--out", str(out),
            "--seed", "3", "--max_steps", "3", "--per_device_train_batch_size", "4", "--max_length", "48",
            "--learning_rate", "1e-2", "--warmup_ratio", "0", "--logging_steps", "1", "--save-final"]
    for task in TASKS:
        args += ["--task", task.name, *_write_task_files(tmp_path, task)]
    assert main(args) == 0
    result = json.loads((out / "result.json").read_text())
    s0, s1 = result["stages"]
    assert s0["ewc_state_used"] is None and s1["ewc_state_used"] == s0["ewc_state_written"]
    assert [r["gere/ewc_penalty"] for r in s1["history"] if "gere/ewc_penalty" in r][0] == 0.0  # starts at the anchor
    assert max(r.get("gere/ewc_penalty", 0.0) for r in s1["history"]) > 0
    first, second = EWCState.load(s0["ewc_state_written"]), EWCState.load(s1["ewc_state_written"])
    assert (first.meta["tasks"], second.meta["tasks"]) == (1, 2)
    for n, f in first.fisher.items():  # gamma = 1: plain accumulation
        assert bool((second.fisher[n] >= f - 1e-12).all())
    assert any(bool((second.fisher[n] > f).any()) for n, f in first.fisher.items())
    final = load_file(str(out / "final" / "model.safetensors"))
    for n, a in second.anchor.items():
        torch.testing.assert_close(a, final[n].float(), rtol=0, atol=0)
    assert "accuracy after each task" in capsys.readouterr().out
