"""The GeRe trainers compute replay CE / KL from hidden states in chunks: same loss and gradients as the
full-logit path (``GERE_LOGITS_CHUNK=0``), and the replay rows never reach the head as full logits.

Two premises depend on the TRL version. Up to TRL 1.14 ``SFTTrainer`` computes the task loss from the
model's logits (the LM head module runs on the task rows) and accepts a LoRA adapter on ``lm_head``.
TRL 1.16 computes it with ``fused_lm_head=True`` from ``lm_head.weight`` directly (the head module never
runs on the task rows) and refuses an adapter on ``lm_head``. The tests check whichever holds for the
installed TRL, so a change of either premise fails here instead of passing unnoticed.
"""

from __future__ import annotations

import inspect

import pytest
import torch

from gere_plugin import GeReSFTTrainer
from gere_plugin.logits import CHUNK_ENV

from .conftest import sft_config


def _trl_fuses_the_task_head() -> bool:
    from trl import SFTTrainer

    return "fused_lm_head" in inspect.getsource(SFTTrainer.compute_loss)


TASK_HEAD_FUSED = _trl_fuses_the_task_head()


def _trainer(tmp_path, tiny_dir, tok, dataset, replay_file, name, lora=None, **overrides):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir))
    if lora is not None:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(0)  # the same random adapter weights in every trainer of a comparison
        model = get_peft_model(model, LoraConfig(r=4, target_modules=lora, init_lora_weights=False))
    kw = dict(gradient_checkpointing=False, gere_replay=str(replay_file), gere_state_cache=str(tmp_path / "cache"),
              gere_weight=2.0, gere_replay_per_step=3, per_device_train_batch_size=4)
    kw.update(overrides)
    cfg = sft_config(tmp_path / name, **kw)
    trainer = GeReSFTTrainer(model=model, args=cfg, train_dataset=dataset, processing_class=tok)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # move away from the base states / reference so that TM and KL are non-zero
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return trainer


def _step(trainer):
    """One optimizer step's loss (summed over micro-batches) and the gradients it leaves."""
    model = trainer.model
    model.train()
    acc = trainer.args.gradient_accumulation_steps
    it = iter(trainer.get_train_dataloader())
    batches = [trainer._prepare_inputs(next(it)) for _ in range(acc)]
    num_items = sum((b["labels"][:, 1:] != -100).sum() for b in batches)
    trainer.current_gradient_accumulation_steps = acc
    trainer.state.global_step = 0
    total = 0.0
    for b in batches:
        loss = trainer.compute_loss(model, dict(b), num_items_in_batch=num_items)
        loss.backward()
        total += float(loss.detach())
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return total, grads


@pytest.mark.parametrize(
    ("reg", "accumulation", "lora"),
    [("tm", 1, None), ("tm", 2, None), ("kl", 1, None), ("kl", 2, None), ("none", 1, None),
     ("kl", 1, ["q_proj", "lm_head"]), ("tm", 1, ["q_proj", "v_proj"])],
)
def test_chunked_replay_equals_full_logits(tmp_path, tiny_dir, tiny_tokenizer, sft_dataset, replay_file, monkeypatch,
                                           reg, accumulation, lora):
    kw = dict(gere_regularizer=reg, gradient_accumulation_steps=accumulation,
              per_device_train_batch_size=4 // accumulation, lora=lora)
    if lora and "lm_head" in lora:
        kw["loss_type"] = "nll"  # TRL's chunked_nll task loss refuses a LoRA-wrapped lm_head
    monkeypatch.setenv(CHUNK_ENV, "0")
    if TASK_HEAD_FUSED and lora and "lm_head" in lora:
        # this TRL refuses the adapter itself (its task loss reads lm_head.weight): nothing of ours to compare
        with pytest.raises(ValueError, match="lm_head"):
            _trainer(tmp_path, tiny_dir, tiny_tokenizer, sft_dataset, replay_file, "full", **kw)
        return
    full = _trainer(tmp_path, tiny_dir, tiny_tokenizer, sft_dataset, replay_file, "full", **kw)
    assert full.gere_step.logit_head is None
    monkeypatch.setenv(CHUNK_ENV, "5")  # several chunks per replay row
    chunked = _trainer(tmp_path, tiny_dir, tiny_tokenizer, sft_dataset, replay_file, "chunked", **kw)
    assert chunked.gere_step.logit_head is not None and chunked.gere_step.logit_chunk == 5
    loss_full, grads_full = _step(full)
    loss_chunked, grads_chunked = _step(chunked)
    assert loss_chunked == pytest.approx(loss_full, rel=1e-5)
    assert sorted(grads_chunked) == sorted(grads_full) and grads_full
    for name, g in grads_full.items():
        torch.testing.assert_close(grads_chunked[name], g, rtol=1e-4, atol=1e-6, msg=name)
    for key in ("gere/replay_ce", "gere/reg_loss"):
        assert chunked._metrics["train"][key][-1] == pytest.approx(full._metrics["train"][key][-1], rel=1e-5)
    if reg != "none":
        assert chunked._metrics["train"]["gere/reg_loss"][-1] > 1e-5


@pytest.mark.parametrize("bf16", [False, True])
def test_replay_rows_never_meet_the_head_as_full_logits(tmp_path, tiny_dir, tiny_tokenizer, sft_dataset, replay_file,
                                                        monkeypatch, bf16):
    monkeypatch.setenv(CHUNK_ENV, "7")
    # loss_type nll: up to TRL 1.14 the task rows go through the head as full logits (chunked_nll would bypass
    # the hook); TRL 1.16 fuses the task loss with the head's weight in either case
    trainer = _trainer(tmp_path, tiny_dir, tiny_tokenizer, sft_dataset, replay_file, "hooked", gere_regularizer="kl",
                       bf16=bf16, loss_type="nll")
    calls: list[tuple[tuple[int, ...], bool]] = []
    head = trainer.model.get_output_embeddings()
    head.register_forward_hook(lambda _m, _i, out: calls.append((tuple(out.shape), torch.is_autocast_enabled("cpu"))))
    _step(trainer)
    task = [s for s, _ in calls if len(s) == 3 and s[1] > 1]
    forward_rows = [s for s, _ in calls if len(s) == 3 and s[1] == 1]  # the replay forward: logits_to_keep=1
    chunks = [(s, ac) for s, ac in calls if len(s) == 2]
    if TASK_HEAD_FUSED:  # the task loss is computed from lm_head.weight: the head module sees no task row
        assert task == [], f"no full logits at all: {task}"
    else:
        assert len(task) == 1 and task[0][0] == 4, f"only the 4 task rows get full logits: {task}"
    assert len(forward_rows) == 1 and forward_rows[0][0] == 3
    assert chunks and max(s[0] for s, _ in chunks) <= 7
    # the chunks run under the same autocast as the model's forward (bf16 on CPU here)
    assert {ac for _, ac in chunks} == {bf16}
