"""KL to the base model on the task rows (ASFT's anchor): hand values and the trainer's loss against an
independent computation, full fine-tune and LoRA."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gere_plugin import GeReSFTTrainer
from gere_plugin.losses import per_row_kl

from .conftest import sft_config

FAST = dict(gradient_checkpointing=False)


def test_per_row_kl_by_hand():
    logits = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]]])
    base = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [0.0, 0.0]]])
    labels = torch.tensor([[-100, 1, -100]])  # only position 0 predicts a trained token

    def kl(q_logits, p_logits):
        q = [math.exp(v) / sum(math.exp(u) for u in q_logits) for v in q_logits]
        p = [math.exp(v) / sum(math.exp(u) for u in p_logits) for v in p_logits]
        return sum(qi * (math.log(qi) - math.log(pi)) for qi, pi in zip(q, p))

    assert per_row_kl(logits, base, labels).tolist() == pytest.approx([kl([0.0, 0.0], [1.0, 0.0])], rel=1e-6)
    labels = torch.tensor([[-100, 1, 0]])
    both = kl([0.0, 0.0], [1.0, 0.0]) + kl([1.0, 0.0], [0.0, 2.0])
    assert per_row_kl(logits, base, labels).tolist() == pytest.approx([both], rel=1e-6)
    assert per_row_kl(logits, logits, labels).tolist() == pytest.approx([0.0], abs=1e-7)


def _batches(trainer, n):
    it = iter(trainer.get_train_dataloader())
    return [trainer._prepare_inputs(next(it)) for _ in range(n)]


def _expected(model, base, batches, beta, num_items):
    total = 0.0
    with torch.no_grad():
        for b in batches:
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            ref = base(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            keep = b["labels"][:, 1:] != -100
            ce = F.cross_entropy(logits[:, :-1][keep], b["labels"][:, 1:][keep], reduction="sum")
            logq, logp = F.log_softmax(ref[:, :-1][keep], -1), F.log_softmax(logits[:, :-1][keep], -1)
            total += float(ce) + beta * float((logq.exp() * (logq - logp)).sum())
    return total / float(num_items)


@pytest.mark.parametrize("accumulation", [1, 2])
def test_task_kl_loss_equals_independent_computation(tmp_path, tiny_dir, tiny_tokenizer, sft_dataset, accumulation):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir))
    base = AutoModelForCausalLM.from_pretrained(str(tiny_dir)).eval()
    beta = 0.7
    cfg = sft_config(tmp_path / "out", **FAST, gere_task_kl=beta, gradient_accumulation_steps=accumulation,
                     per_device_train_batch_size=4 // accumulation)
    trainer = GeReSFTTrainer(model=model, args=cfg, train_dataset=sft_dataset, processing_class=tiny_tokenizer)
    model.train()
    batches = _batches(trainer, accumulation)
    num_items = sum((b["labels"][:, 1:] != -100).sum() for b in batches)
    trainer.current_gradient_accumulation_steps = accumulation
    trainer.state.global_step = 0
    # the model is still the base: the KL is exactly 0 (a built-in check of the reference)
    sum(trainer.compute_loss(model, dict(b), num_items_in_batch=num_items) for b in batches)
    assert trainer._metrics["train"]["gere/task_kl"][-1] == 0.0
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    trainer.state.global_step = 1
    got = sum(trainer.compute_loss(model, dict(b), num_items_in_batch=num_items) for b in batches)
    expected = _expected(model, base, batches, beta, num_items)
    assert float(got.detach()) == pytest.approx(expected, rel=1e-5)
    metrics = trainer._metrics["train"]
    assert metrics["gere/task_kl"][-1] > 1e-4
    # gere/task_ce: the plain token-mean CE of the task rows (beta = 0), averaged over the step's micro-batches;
    # no FLOW metric without FLOW
    per_micro = [_expected(model, base, [b], 0.0, (b["labels"][:, 1:] != -100).sum()) for b in batches]
    assert metrics["gere/task_ce"][-1] == pytest.approx(sum(per_micro) / len(per_micro), rel=1e-5)
    assert "gere/flow_ce" not in metrics and "gere/flow_weight" not in metrics


def test_task_kl_with_lora_compares_with_the_adapter_disabled_model(tmp_path, tiny_dir, tiny_tokenizer, sft_dataset):
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir))
    base = AutoModelForCausalLM.from_pretrained(str(tiny_dir)).eval()
    cfg = sft_config(tmp_path / "out", **FAST, gere_task_kl=0.5, gere_freeze_layers=1)
    trainer = GeReSFTTrainer(model=model, args=cfg, train_dataset=sft_dataset, processing_class=tiny_tokenizer,
                             peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    assert trainer.gere_task.ref_model is None  # no copy: the base is the adapter-disabled model
    peft_model = trainer.model
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n and "layers.0." not in n:
                p.add_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
    peft_model.train()
    (b,) = _batches(trainer, 1)
    n = (b["labels"][:, 1:] != -100).sum()
    trainer.current_gradient_accumulation_steps = 1
    trainer.state.global_step = 0
    loss = trainer.compute_loss(peft_model, dict(b), num_items_in_batch=n)
    assert float(loss.detach()) == pytest.approx(_expected(peft_model, base, [b], 0.5, n), rel=1e-5)
    assert trainer._metrics["train"]["gere/task_kl"][-1] > 1e-5
    # disable_adapter() re-enables requires_grad on frozen adapters when it exits: they must stay frozen
    frozen = [p for name, p in peft_model.named_parameters() if "lora_" in name and "layers.0." in name]
    assert frozen and not any(p.requires_grad for p in frozen)
