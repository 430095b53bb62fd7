"""GeReDPOTrainer: total = hand-computed DPO loss + replay CE + w * regularizer; TM 0 then > 0; counts; LoRA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gere_plugin import GeReDPOConfig, GeReDPOTrainer
from gere_plugin.replay import ReplayError

from .conftest import write_jsonl


@pytest.fixture(scope="module")
def pref_dataset():
    from datasets import Dataset

    rows = []
    for i in range(32):
        good, bad = ("positive", "negative") if i % 2 else ("negative", "positive")
        rows.append({"prompt": f"Review: the film was {'great' if i % 2 else 'bad'} Sentiment:", "chosen": f" {good}", "rejected": f" {bad}"})
    return Dataset.from_list(rows)


def dpo_config(tmp_path, replay_file, **kw):
    base = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=3, logging_steps=1, report_to=[],
        bf16=False, use_cpu=True, gradient_checkpointing=False, save_strategy="no", disable_tqdm=True,
        learning_rate=5e-3, seed=0, beta=0.1,
        gere_replay=str(replay_file), gere_replay_size=32, gere_replay_max_length=32, gere_replay_per_step=2,
        gere_state_cache=str(tmp_path / "cache"),
    )
    base.update(kw)
    return GeReDPOConfig(**base)


def _logps(model, input_ids, attention_mask, completion_mask):
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    lp = torch.gather(F.log_softmax(logits, -1), 2, input_ids[:, 1:, None])[..., 0]
    return (lp * completion_mask[:, 1:]).sum(1)


@pytest.mark.parametrize("reg", ["tm", "l2"])
def test_total_equals_dpo_plus_replay_ce_plus_weighted_reg(tmp_path, tiny_dir, tiny_tokenizer, pref_dataset, replay_file, reg):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir))
    w = 2.0
    trainer = GeReDPOTrainer(model=model, args=dpo_config(tmp_path, replay_file, gere_regularizer=reg, gere_weight=w),
                             train_dataset=pref_dataset, processing_class=tiny_tokenizer)
    ref = trainer.ref_model
    assert ref is not None
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    model.train()
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    trainer.current_gradient_accumulation_steps = 1
    trainer.state.global_step = 0
    got = trainer.compute_loss(model, dict(batch))
    with torch.no_grad():
        pol = _logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
        rf = _logps(ref, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
        pc, pr = pol.chunk(2)
        rc, rr = rf.chunk(2)
        dpo = -F.logsigmoid(0.1 * ((pc - rc) - (pr - rr))).mean()
        replay = trainer.gere_step.replay
        rows = trainer.gere_step.schedule.rows_for_step(0)
        ce_sum, n = 0.0, 0
        for i in rows:
            x = torch.tensor([replay.input_ids[i]])
            lg = model(x).logits[0, :-1]
            ce_sum += F.cross_entropy(lg, x[0, 1:], reduction="sum")
            n += x.shape[1] - 1
        reg_val = trainer._metrics["train"]["gere/reg_loss"][-1]
    assert reg_val > 1e-4
    expected = dpo + ce_sum / n + w * reg_val
    assert float(got) == pytest.approx(float(expected), rel=1e-4)
    assert trainer._metrics["train"]["gere/replay_ce"][-1] == pytest.approx(float(ce_sum / n), rel=1e-4)


@pytest.mark.parametrize("use_lora", [False, True])
def test_dpo_trains_tm_zero_first_then_positive_and_counts(tmp_path, tiny_dir, tiny_tokenizer, pref_dataset, replay_file, use_lora):
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir))
    peft_config = LoraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"]) if use_lora else None
    trainer = GeReDPOTrainer(
        model=model, args=dpo_config(tmp_path, replay_file, max_steps=4, gradient_accumulation_steps=2,
                                     per_device_train_batch_size=2, gere_replay_per_step=3,
                                     gere_freeze_layers=1, learning_rate=2e-2),
        train_dataset=pref_dataset, processing_class=tiny_tokenizer, peft_config=peft_config,
    )
    assert (trainer.ref_model is None) == use_lora
    frozen_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if n in trainer.gere_frozen}
    trainer.train()
    logs = [h for h in trainer.state.log_history if "gere/reg_loss" in h]
    assert len(logs) == 4
    assert logs[0]["gere/reg_loss"] < 1e-6
    assert max(h["gere/reg_loss"] for h in logs[1:]) > 0
    assert all("rewards/margins" in h and "rewards/chosen" in h for h in logs), "TRL's DPO metrics must survive"
    assert [h["gere/replay_rows"] for h in logs] == [3.0] * 4
    steps = {}
    for e in trainer.gere_step.history:
        steps.setdefault(e["step"], []).extend(e["rows"])
    assert {s: len(set(r)) for s, r in steps.items()} == {0: 3, 1: 3, 2: 3, 3: 3}
    params = dict(trainer.model.named_parameters())
    assert frozen_before
    for n, before in frozen_before.items():
        assert torch.equal(before, params[n].detach()), f"{n} changed although frozen"


def test_precompute_ref_log_probs_with_l2_uses_a_frozen_copy(tmp_path, tiny_dir, tiny_tokenizer, pref_dataset, replay_file):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir))
    trainer = GeReDPOTrainer(
        model=model, args=dpo_config(tmp_path, replay_file, gere_regularizer="l2", precompute_ref_log_probs=True, max_steps=2),
        train_dataset=pref_dataset, processing_class=tiny_tokenizer,
    )
    assert trainer.ref_model is None and trainer.gere_step._own_ref is not None
    trainer.train()
    regs = [h["gere/reg_loss"] for h in trainer.state.log_history if "gere/reg_loss" in h]
    assert regs[0] == pytest.approx(0.0, abs=1e-7) and regs[1] > 0


def test_gere_ref_model_overrides_the_feature_reference_but_not_dpos(tmp_path, tiny_dir, tiny_tokenizer, pref_dataset,
                                                                     replay_file):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny_dir))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir))
    with torch.no_grad():  # a later task's starting point: already moved away from the base
        g = torch.Generator().manual_seed(2)
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    trainer = GeReDPOTrainer(
        model=model, args=dpo_config(tmp_path, replay_file, gere_regularizer="l2", max_steps=1),
        train_dataset=pref_dataset, processing_class=tiny_tokenizer, gere_ref_model=base,
    )
    assert trainer.gere_step.ref_model is base and trainer.ref_model is not base and trainer.ref_model is not None
    trainer.train()
    first = [h["gere/reg_loss"] for h in trainer.state.log_history if "gere/reg_loss" in h][0]
    assert first > 1e-4  # measured against the base, not against the moved start (which would read 0)


def test_dpos_own_reference_with_tm_raises_no_gere_ref_model_warning(tmp_path, tiny_dir, tiny_tokenizer, pref_dataset,
                                                                     replay_file, caplog):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir))
    with caplog.at_level("WARNING", logger="gere_plugin.trainer"):
        trainer = GeReDPOTrainer(model=model, args=dpo_config(tmp_path, replay_file, gere_regularizer="tm"),
                                 train_dataset=pref_dataset, processing_class=tiny_tokenizer)
    assert trainer.gere_step.ref_model is trainer.ref_model is not None
    assert "gere_ref_model" not in caplog.text


def test_preference_data_as_replay_is_refused(tmp_path, tiny_dir, tiny_tokenizer, pref_dataset):
    from transformers import AutoModelForCausalLM

    bad = write_jsonl(tmp_path / "prefs.jsonl", pref_dataset.to_list())
    with pytest.raises(ReplayError, match="preference dataset"):
        GeReDPOTrainer(model=AutoModelForCausalLM.from_pretrained(str(tiny_dir)), args=dpo_config(tmp_path, bad),
                       train_dataset=pref_dataset, processing_class=tiny_tokenizer)


def test_dpo_rejects_replay_rows_not_below_global_batch(tmp_path, tiny_dir, tiny_tokenizer, pref_dataset, replay_file):
    from transformers import AutoModelForCausalLM

    with pytest.raises(ValueError, match="gere_replay_per_step"):
        GeReDPOTrainer(model=AutoModelForCausalLM.from_pretrained(str(tiny_dir)),
                       args=dpo_config(tmp_path, replay_file, gere_replay_per_step=4),
                       train_dataset=pref_dataset, processing_class=tiny_tokenizer)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="QLoRA needs bitsandbytes 4-bit kernels on a CUDA GPU; this machine has none")
def test_qlora_dpo(tmp_path, tiny_dir, tiny_tokenizer, pref_dataset, replay_file):
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir), quantization_config=q, device_map={"": 0})
    trainer = GeReDPOTrainer(model=model, args=dpo_config(tmp_path, replay_file, use_cpu=False, bf16=True),
                             train_dataset=pref_dataset, processing_class=tiny_tokenizer,
                             peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    trainer.train()
    assert [h for h in trainer.state.log_history if "gere/reg_loss" in h][0]["gere/reg_loss"] < 1e-3
