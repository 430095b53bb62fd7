"""GeReSFTTrainer: the combined loss against an independent computation, replay counts, resume, freeze."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from gere_plugin import GeReSFTTrainer
from gere_plugin.losses import INACTIVE, NEG, POS
from gere_plugin.states import StateCacheError

from .conftest import general_texts, sft_config, write_jsonl

FAST = dict(gradient_checkpointing=False)


def make_trainer(tmp_path, model, tok, dataset, replay_file, **overrides):
    kw = dict(FAST, gere_replay=str(replay_file), gere_state_cache=str(tmp_path / "cache"))
    kw.update(overrides)
    cfg = sft_config(tmp_path / "out", **kw)
    return GeReSFTTrainer(model=model, args=cfg, train_dataset=dataset, processing_class=tok)


def _batches(trainer, n):
    it = iter(trainer.get_train_dataloader())
    out = [trainer._prepare_inputs(next(it)) for _ in range(n)]
    return out


def _ce(logits, labels):
    """Sum of shifted CE over labels != -100, and the count."""
    lg = logits[:, :-1].float()
    lb = labels[:, 1:]
    keep = lb != -100
    ce = F.cross_entropy(lg[keep], lb[keep], reduction="sum")
    return ce, keep.sum()


def _independent_reg(kind, model, base, replay, rows, pos=None, neg=None, thresholds_from=None, reduction="mean"):
    """Regularizer on replay ``rows`` computed from scratch (no gere_plugin code). TM is reduced over all
    elements (``mean``) or over its non-zero elements (``violations``)."""
    ids_list = [replay.input_ids[i] for i in rows]
    vals = []
    for ids in ids_list:  # one row at a time: no padding involved at all
        x = torch.tensor([ids])
        out = model(x, output_hidden_states=True)
        with torch.no_grad():
            bout = base(x, output_hidden_states=True)
        h, hb = out.hidden_states[-1][0], bout.hidden_states[-1][0]
        if kind == "l1":
            vals.append(((h - hb).abs().sum(), h.numel()))
        elif kind == "l2":
            vals.append(((h - hb).pow(2).sum(), h.numel()))
        elif kind == "kl":
            p = F.log_softmax(out.logits[0].float(), -1)
            q = F.log_softmax(bout.logits[0].float(), -1)
            vals.append(((q.exp() * (q - p)).sum(), len(ids)))
        elif kind == "tm":
            lab = torch.full(hb.shape, INACTIVE)
            lab[hb >= pos] = POS
            lab[hb <= neg] = NEG
            v = torch.where(
                lab == INACTIVE,
                torch.relu(h - pos) + torch.relu(neg - h),
                torch.where(lab == POS, torch.relu(pos - h), torch.relu(h - neg)),
            )
            vals.append((v.sum(), (v > 0).sum() if reduction == "violations" else v.numel()))
    total = sum(v for v, _ in vals)
    count = sum(c for _, c in vals)
    return total / (count + 1e-8)


def _independent_thresholds(base, replay, sigma=1.0):
    hs = []
    with torch.no_grad():
        for ids in replay.input_ids:
            hs.append(base(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0])
    h = torch.cat(hs)
    mu, std = h.mean(0), h.std(0, unbiased=False)
    return mu + sigma * std, mu - sigma * std


def _perturb(model, scale=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("reg", ["tm", "tm-violations", "l1", "l2", "kl", "none"])
@pytest.mark.parametrize("accumulation", [1, 2])
def test_combined_loss_equals_hand_computed(tmp_path, tiny_dir, tiny_tokenizer, sft_dataset, replay_file, reg, accumulation):
    reg, _, reduction = reg.partition("-")
    reduction = reduction or "mean"  # the default
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir))
    base = AutoModelForCausalLM.from_pretrained(str(tiny_dir)).eval()
    w = 3.0
    trainer = make_trainer(
        tmp_path, model, tiny_tokenizer, sft_dataset, replay_file,
        gere_regularizer=reg, gere_weight=w, gere_replay_per_step=2, gere_tm_reduction=reduction,
        gradient_accumulation_steps=accumulation, per_device_train_batch_size=4 // accumulation,
    )
    replay = trainer.gere_step.replay
    _perturb(model)  # the model now differs from the base the states/reference came from
    model.train()
    batches = _batches(trainer, accumulation)
    num_items = sum((b["labels"][:, 1:] != -100).sum() for b in batches)
    trainer.current_gradient_accumulation_steps = accumulation
    trainer.state.global_step = 0
    got = sum(trainer.compute_loss(model, dict(b), num_items_in_batch=num_items) for b in batches)

    with torch.no_grad():
        task_sum = sum(_ce(model(input_ids=b["input_ids"], attention_mask=b.get("attention_mask")).logits, b["labels"])[0] for b in batches)
        ce_task = task_sum / num_items
        rows = trainer.gere_step.schedule.rows_for_step(0)
        rsum, rcount = 0.0, 0
        for i in rows:
            x = torch.tensor([replay.input_ids[i]])
            s, c = _ce(model(x).logits, x)
            rsum, rcount = rsum + s, rcount + c
        ce_replay = rsum / rcount
        if reg == "none":
            r = torch.tensor(0.0)
        elif reg == "tm":
            pos, neg = _independent_thresholds(base, replay)
            # with accumulation each micro-batch holds one row: the step value is the mean of per-row values
            per = [_independent_reg("tm", model, base, replay, [i], pos, neg, reduction=reduction) for i in rows] if (
                accumulation > 1) else [_independent_reg("tm", model, base, replay, rows, pos, neg, reduction=reduction)]
            r = sum(per) / len(per)
        else:
            per = [_independent_reg(reg, model, base, replay, [i]) for i in rows] if accumulation > 1 else [
                _independent_reg(reg, model, base, replay, rows)]
            r = sum(per) / len(per)
    expected = 0.5 * (ce_task + ce_replay) + (w * r if reg != "none" else 0.0)
    assert float(got) == pytest.approx(float(expected), rel=2e-4, abs=1e-5)
    if reg != "none":
        assert float(r) > 1e-4, "perturbation should make the regularizer non-zero"


def test_dynamic_weight_balances_ce(tmp_path, tiny_dir, tiny_tokenizer, sft_dataset, replay_file):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir))
    trainer = make_trainer(tmp_path, model, tiny_tokenizer, sft_dataset, replay_file, gere_regularizer="l2")
    _perturb(model)
    model.train()
    (b,) = _batches(trainer, 1)
    n = (b["labels"][:, 1:] != -100).sum()
    trainer.current_gradient_accumulation_steps = 1
    loss = trainer.compute_loss(model, dict(b), num_items_in_batch=n)
    ce = trainer._metrics["train"]["gere/replay_ce"][-1]
    w = trainer._metrics["train"]["gere/weight"][-1]
    reg = trainer._metrics["train"]["gere/reg_loss"][-1]
    assert w * reg == pytest.approx(float(loss) / 2, rel=1e-4)  # w*R == mean(ce_task, ce_replay)
    assert ce > 0


def test_task_term_is_logged_on_its_own(tmp_path, tiny_dir, tiny_tokenizer, sft_dataset, replay_file):
    """gere/task_loss is the parent's task CE alone; the returned loss is mean(task, replay CE) + w*R."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir))
    trainer = make_trainer(tmp_path, model, tiny_tokenizer, sft_dataset, replay_file, gere_regularizer="l2")
    _perturb(model)
    model.train()
    (b,) = _batches(trainer, 1)
    n = (b["labels"][:, 1:] != -100).sum()
    trainer.current_gradient_accumulation_steps = 1
    loss = trainer.compute_loss(model, dict(b), num_items_in_batch=n)
    with torch.no_grad():
        s, c = _ce(model(**{k: v for k, v in b.items() if k != "labels"}).logits, b["labels"])
    m = trainer._metrics["train"]
    assert m["gere/task_loss"][-1] == pytest.approx(float(s / c), rel=1e-4)
    total = 0.5 * (m["gere/task_loss"][-1] + m["gere/replay_ce"][-1]) + m["gere/weight"][-1] * m["gere/reg_loss"][-1]
    assert float(loss) == pytest.approx(total, rel=1e-4)
    # the dynamic weight makes w*R equal the CE term, so the logged total is twice mean(task, replay CE)
    assert float(loss) == pytest.approx(m["gere/task_loss"][-1] + m["gere/replay_ce"][-1], rel=1e-4)


def test_tm_is_zero_at_first_step_and_positive_later(tmp_path, tiny_model, tiny_tokenizer, sft_dataset, replay_file):
    trainer = make_trainer(tmp_path, tiny_model, tiny_tokenizer, sft_dataset, replay_file, max_steps=4, learning_rate=5e-3)
    trainer.train()
    tm = [h["gere/reg_loss"] for h in trainer.state.log_history if "gere/reg_loss" in h]
    assert len(tm) == 4
    assert tm[0] < 1e-6
    assert max(tm[1:]) > 1e-3
    oos = [h["gere/out_of_state"] for h in trainer.state.log_history if "gere/out_of_state" in h]
    assert oos[0] < 1e-6 and oos[-1] > 0
    steps = trainer.state.log_history[:4]
    for key in ("gere/replay_ce", "gere/replay_rows", "gere/task_loss"):
        assert all(key in h for h in steps), key
    # the weight of a step whose regularizer is exactly 0 (step 1: the model is the base) is not logged:
    # with the dynamic weight it would read CE x 1e8 and wreck every plot's scale
    assert "gere/weight" not in steps[0]
    assert all("gere/weight" in h and h["gere/weight"] < 1e6 for h in steps[1:] if h["gere/reg_loss"] > 0)


def test_exact_replay_rows_per_step_over_epochs(tmp_path, tiny_model, tiny_tokenizer, sft_dataset, replay_file):
    # 64 task rows, batch 2 x accumulation 2 => 16 steps per epoch; 3 replay rows per step split 2+1.
    trainer = make_trainer(
        tmp_path, tiny_model, tiny_tokenizer, sft_dataset.select(range(16)), replay_file,
        per_device_train_batch_size=2, gradient_accumulation_steps=2, gere_replay_per_step=3,
        gere_replay_size=10, max_steps=-1, num_train_epochs=3, learning_rate=1e-4,
    )
    trainer.train()
    assert trainer.state.global_step == 12
    by_step: dict[int, list[int]] = {}
    for e in trainer.gere_step.history:
        by_step.setdefault(e["step"], []).extend(e["rows"])
    assert sorted(by_step) == list(range(12))
    assert all(len(r) == 3 for r in by_step.values())
    assert all(len(set(r)) == 3 for r in by_step.values())
    # steps 0-2 hold 9 distinct samples (no repeats before all 10 were used) and the 30 rows of
    # steps 0-9 are exactly three passes over the 10 replay samples
    first = [x for s in range(3) for x in by_step[s]]
    assert len(set(first)) == 9
    from collections import Counter

    assert Counter(x for s in range(10) for x in by_step[s]) == {i: 3 for i in range(10)}
    micro_sizes = [len(e["rows"]) for e in trainer.gere_step.history]
    assert micro_sizes == [2, 1] * 12
    rows_metric = [h["gere/replay_rows"] for h in trainer.state.log_history if "gere/replay_rows" in h]
    assert rows_metric == [3.0] * 12


def test_resume_replays_the_same_rows(tmp_path, tiny_dir, tiny_tokenizer, sft_dataset, replay_file):
    from transformers import AutoModelForCausalLM

    def run(out, max_steps, resume=None):
        model = AutoModelForCausalLM.from_pretrained(str(tiny_dir))
        t = make_trainer(
            out, model, tiny_tokenizer, sft_dataset, replay_file, max_steps=max_steps, save_strategy="steps",
            save_steps=2, gere_replay_per_step=3, per_device_train_batch_size=4,
            gere_state_cache=str(tmp_path / "shared-cache"),
        )
        t.args.max_steps = 6
        if max_steps < 6:  # interrupted run: stop after max_steps via the control flag
            from transformers import TrainerCallback

            class Stop(TrainerCallback):
                def on_step_end(self, args, state, control, **kw):
                    if state.global_step >= max_steps:
                        control.should_training_stop = True
                    return control

            t.add_callback(Stop())
        t.train(resume_from_checkpoint=resume)
        return t

    full = run(tmp_path / "a", 6)
    part = run(tmp_path / "b", 3)
    ckpt = tmp_path / "b" / "out" / "checkpoint-2"
    assert (ckpt / "gere_state.json").exists()
    resumed = run(tmp_path / "b", 6, resume=str(ckpt))
    rows = lambda t: {e["step"]: e["rows"] for e in t.gere_step.history}  # noqa: E731
    assert min(rows(resumed)) == 2
    assert {s: r for s, r in rows(full).items() if s >= 2} == rows(resumed)
    assert {s: r for s, r in rows(full).items() if s < 3} == rows(part)
    def losses(t):
        return {h["step"]: h["loss"] for h in t.state.log_history if "loss" in h}

    after_resume = {s: v for s, v in losses(resumed).items() if s >= 3}
    assert sorted(after_resume) == [3, 4, 5, 6]
    assert after_resume == pytest.approx({s: v for s, v in losses(full).items() if s >= 3}, rel=1e-5)


def test_resume_with_another_replay_set_is_refused(tmp_path, tiny_dir, tiny_tokenizer, sft_dataset, replay_file):
    from transformers import AutoModelForCausalLM

    t = make_trainer(tmp_path, AutoModelForCausalLM.from_pretrained(str(tiny_dir)), tiny_tokenizer, sft_dataset,
                     replay_file, max_steps=2, save_strategy="steps", save_steps=2)
    t.train()
    other = write_jsonl(tmp_path / "other.jsonl", [{"text": s} for s in general_texts(64, seed=99)])
    t2 = make_trainer(tmp_path / "2", AutoModelForCausalLM.from_pretrained(str(tiny_dir)), tiny_tokenizer, sft_dataset,
                      other, max_steps=4, gere_state_cache=str(tmp_path / "cache2"))
    with pytest.raises(Exception, match="another replay set"):
        t2.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))


@pytest.mark.parametrize("use_lora", [False, True])
def test_frozen_layers_are_bit_identical(tmp_path, tiny_model, tiny_tokenizer, sft_dataset, replay_file, use_lora):
    model = tiny_model
    if use_lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "gate_proj"], init_lora_weights=False))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = make_trainer(
        tmp_path, model, tiny_tokenizer, sft_dataset, replay_file, max_steps=3, learning_rate=1e-2,
        gere_freeze_layers=2, gere_freeze_embeddings=True,
    )
    trainer.train()
    after = dict(model.named_parameters())
    frozen = set(trainer.gere_frozen)
    assert frozen, "nothing was frozen"
    changed = {n for n in before if not torch.equal(before[n], after[n].detach())}
    for n in frozen:
        assert torch.equal(before[n], after[n].detach()), f"{n} changed although frozen"
    assert any(".layers.0." in n for n in frozen) and any(".layers.1." in n for n in frozen)
    assert not any(".layers.2." in n or ".layers.3." in n for n in frozen)
    # trainable parameters above the frozen block did change
    upper = [n for n in changed if ".layers.3." in n]
    assert upper, "layers above the frozen block did not train"
    if use_lora:
        assert all("lora_" in n for n in changed)


def test_gradient_checkpointing_with_frozen_embeddings(tmp_path, tiny_model, tiny_tokenizer, sft_dataset, replay_file):
    trainer = make_trainer(tmp_path, tiny_model, tiny_tokenizer, sft_dataset, replay_file, max_steps=2,
                           gradient_checkpointing=True, gere_freeze_embeddings=True, gere_freeze_layers=1,
                           learning_rate=1e-2)
    before = tiny_model.model.layers[3].mlp.up_proj.weight.detach().clone()
    trainer.train()
    assert not torch.equal(before, tiny_model.model.layers[3].mlp.up_proj.weight)


def test_state_cache_is_reused_not_rebuilt(tmp_path, tiny_dir, tiny_tokenizer, sft_dataset, replay_file):
    from transformers import AutoModelForCausalLM

    make_trainer(tmp_path, AutoModelForCausalLM.from_pretrained(str(tiny_dir)), tiny_tokenizer, sft_dataset, replay_file)
    meta = tmp_path / "cache" / "meta.json"
    stamp = meta.stat().st_mtime_ns
    created = json.loads(meta.read_text())["created"]
    # a later task starts from a changed model but must keep the ORIGINAL base states
    model2 = AutoModelForCausalLM.from_pretrained(str(tiny_dir))
    _perturb(model2, 0.5)
    t2 = make_trainer(tmp_path, model2, tiny_tokenizer, sft_dataset, replay_file)
    assert meta.stat().st_mtime_ns == stamp
    assert t2.gere_step.states.meta["created"] == created


def test_plain_mode_without_replay(tmp_path, tiny_model, tiny_tokenizer, sft_dataset):
    cfg = sft_config(tmp_path / "o", gradient_checkpointing=False, max_steps=1)
    t = GeReSFTTrainer(model=tiny_model, args=cfg, train_dataset=sft_dataset, processing_class=tiny_tokenizer)
    assert t.gere_step is None
    t.train()
    assert not any(k.startswith("gere/") for h in t.state.log_history for k in h)


# ---- clear errors -----------------------------------------------------------------------------
def test_errors_name_the_key(tmp_path, tiny_model, tiny_tokenizer, sft_dataset, replay_file):
    with pytest.raises(ValueError, match="gere_replay=.*does not exist"):
        make_trainer(tmp_path, tiny_model, tiny_tokenizer, sft_dataset, tmp_path / "missing.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="gere_replay=.*empty"):
        make_trainer(tmp_path, tiny_model, tiny_tokenizer, sft_dataset, empty)
    short = write_jsonl(tmp_path / "short.jsonl", [{"text": "a"}] * 50)
    with pytest.raises(ValueError, match="gere_replay_min_tokens"):
        make_trainer(tmp_path, tiny_model, tiny_tokenizer, sft_dataset, short)
    with pytest.raises(ValueError, match="gere_sigma"):
        make_trainer(tmp_path, tiny_model, tiny_tokenizer, sft_dataset, replay_file, gere_sigma=0)
    with pytest.raises(ValueError, match="gere_replay_per_step=4 must be smaller than the global batch"):
        make_trainer(tmp_path, tiny_model, tiny_tokenizer, sft_dataset, replay_file, gere_replay_per_step=4)


def test_short_texts_are_dropped_with_a_count(tmp_path, tiny_model, tiny_tokenizer, sft_dataset, caplog):
    rows = [{"text": t} for t in general_texts(40, seed=2)] + [{"text": "a"}] * 5 + [{"text": "  "}] * 3
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    t = make_trainer(tmp_path, tiny_model, tiny_tokenizer, sft_dataset, path, gere_replay_size=40)
    assert t.gere_step.replay.dropped_empty == 3
    assert t.gere_step.replay.dropped_short == 5
    assert len(t.gere_step.replay) == 40


def test_cache_of_another_model_is_rejected(tmp_path, tiny_model, tiny_tokenizer, sft_dataset, replay_file):
    from transformers import LlamaConfig, LlamaForCausalLM

    make_trainer(tmp_path, tiny_model, tiny_tokenizer, sft_dataset, replay_file)
    cfg = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    with pytest.raises(StateCacheError, match="hidden size 32.*48"):
        make_trainer(tmp_path, LlamaForCausalLM(cfg), tiny_tokenizer, sft_dataset, replay_file)
    (tmp_path / "cache" / "labels.bin").write_bytes(b"\0" * 10)
    with pytest.raises(StateCacheError, match="truncated"):
        make_trainer(tmp_path, tiny_model, tiny_tokenizer, sft_dataset, replay_file)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="QLoRA needs bitsandbytes 4-bit kernels on a CUDA GPU; this machine has none")
def test_qlora_trains_with_gere(tmp_path, tiny_dir, tiny_tokenizer, sft_dataset, replay_file):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir), quantization_config=q, device_map={"": 0})
    model = get_peft_model(prepare_model_for_kbit_training(model), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    t = make_trainer(tmp_path, model, tiny_tokenizer, sft_dataset, replay_file, use_cpu=False, bf16=True, max_steps=3,
                     gere_freeze_layers=1)
    t.train()
    tm = [h["gere/reg_loss"] for h in t.state.log_history if "gere/reg_loss" in h]
    assert tm[0] < 1e-3 and len(tm) == 3


@pytest.mark.parametrize("reg", ["l2", "kl"])
def test_reference_model_argument_anchors_feature_regularizers(tmp_path, tiny_dir, tiny_tokenizer, sft_dataset,
                                                               replay_file, reg):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny_dir)).eval()
    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir))
    _perturb(model)  # the model handed to the trainer already differs from the original base (a task-2 start)
    kw = dict(FAST, gere_replay=str(replay_file), gere_state_cache=str(tmp_path / "cache"),
              gere_regularizer=reg, gere_weight=1.0, gere_replay_per_step=2)

    def first_reg(**extra):
        cfg = sft_config(tmp_path / f"out-{len(extra)}", **kw)
        trainer = GeReSFTTrainer(model=model, args=cfg, train_dataset=sft_dataset, processing_class=tiny_tokenizer,
                                 **extra)
        model.train()
        (b,) = _batches(trainer, 1)
        trainer.current_gradient_accumulation_steps = 1
        trainer.state.global_step = 0
        trainer.compute_loss(model, dict(b), num_items_in_batch=(b["labels"][:, 1:] != -100).sum())
        return trainer, trainer._metrics["train"]["gere/reg_loss"][-1]

    trainer, anchored = first_reg(gere_ref_model=base)
    assert trainer.gere_step.ref_model is base and not any(p.requires_grad for p in base.parameters())
    with torch.no_grad():
        rows = trainer.gere_step.schedule.rows_for_step(0)
        expected = float(_independent_reg(reg, model, base, trainer.gere_step.replay, rows))
    assert expected > 1e-4
    assert anchored == pytest.approx(expected, rel=2e-4, abs=1e-6)
    # without the argument the reference is a copy of the model as given: step 0 reads exactly 0
    _, unanchored = first_reg()
    assert unanchored == pytest.approx(0.0, abs=1e-6)


def test_reference_model_of_another_width_is_refused(tmp_path, tiny_model, tiny_tokenizer, sft_dataset, replay_file):
    from gere_plugin.config import GeReConfigError

    from .conftest import build_model

    other = build_model(tmp_path / "wide", tiny_tokenizer, hidden=48)
    cfg = sft_config(tmp_path / "out", **FAST, gere_replay=str(replay_file), gere_regularizer="l2",
                     gere_state_cache=str(tmp_path / "cache"))
    with pytest.raises(GeReConfigError, match="gere_ref_model has hidden size 48"):
        GeReSFTTrainer(model=tiny_model, args=cfg, train_dataset=sft_dataset, processing_class=tiny_tokenizer,
                       gere_ref_model=other)


def test_gradient_balance_diagnostic_matches_separate_backward_passes(
    tmp_path, tiny_dir, tiny_tokenizer, sft_dataset, replay_file
):
    """The diagnostic's CE / regularizer gradient norms equal two independent backward passes."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir))
    trainer = make_trainer(tmp_path, model, tiny_tokenizer, sft_dataset, replay_file, gere_regularizer="l2",
                           gere_weight="3.0", max_grad_norm=1.0)
    _perturb(model)
    model.train()
    (b,) = _batches(trainer, 1)
    n = (b["labels"][:, 1:] != -100).sum()
    trainer.current_gradient_accumulation_steps = 1
    params = [p for p in model.parameters() if p.requires_grad]

    def norm_of(fn):
        model.zero_grad()
        trainer._metrics["train"].clear()
        fn().backward()
        return torch.sqrt(sum((p.grad.float() ** 2).sum() for p in params if p.grad is not None))

    step = trainer.gere_step
    total = norm_of(lambda: trainer.compute_loss(model, dict(b), num_items_in_batch=n))
    step.regularizer = "none"  # CE part only (the weight is fixed, so nothing else changes)
    step._cur_step = -1
    ce_only = norm_of(lambda: trainer.compute_loss(model, dict(b), num_items_in_batch=n))
    step.regularizer = "l2"
    step._cur_step = -1
    step.grad_diagnostics = True
    trainer._metrics["train"].clear()
    model.zero_grad()
    trainer.compute_loss(model, dict(b), num_items_in_batch=n).backward()
    got = {k: v[-1] for k, v in trainer._metrics["train"].items() if k.startswith("gere/grad") or k == "gere/clip_coef"}
    assert got["gere/grad_norm_total"] == pytest.approx(float(total), rel=1e-4)
    assert got["gere/grad_norm_ce"] == pytest.approx(float(ce_only), rel=1e-4)
    assert got["gere/grad_norm_reg"] > 0
    assert got["gere/clip_coef"] == pytest.approx(min(1.0, 1.0 / float(total)), rel=1e-4)
    assert -1.0 <= got["gere/grad_cosine"] <= 1.0
