"""The forgetting monitor (gere_monitor): values against independent computations, KL 0 at step 0,
bit-identical training with and without it, the guard, SFT / DPO / GRPO, full / LoRA, earlier-task
replay, resume, config checks."""

from __future__ import annotations

import logging

import pytest
import torch

from gere_plugin import GeReSFTTrainer
from gere_plugin.config import GeReArguments, GeReConfigError
from gere_plugin.evaluation.scoring import perplexity
from gere_plugin.monitor import (
    METRIC_KEYS,
    MonitorError,
    full_kl,
    load_monitor_texts,
    rest_logmass,
    task_sample,
    topk_kl,
)

from .conftest import general_texts, sft_config, write_jsonl

FAST = dict(gradient_checkpointing=False)


@pytest.fixture(scope="module")
def monitor_file(tmp_path_factory):
    """Held-out general texts (another seed than the replay file's)."""
    d = tmp_path_factory.mktemp("monitor")
    return write_jsonl(d / "heldout.jsonl", [{"text": t} for t in general_texts(40, seed=99)])


@pytest.fixture(scope="module")
def collapse_dataset():
    """A task that pulls the model onto one word: held-out perplexity must rise."""
    from datasets import Dataset

    return Dataset.from_list([{"prompt": "Review: film Sentiment:", "completion": " positive positive positive"}] * 32)


def _load(tiny_dir, lora: bool = False):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir), dtype=torch.float32)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "gate_proj"]))
    return model


def _trainer(tmp_path, model, tok, dataset, monitor_file=None, name="out", **overrides):
    kw = dict(FAST, gere_replay=None, gere_monitor=str(monitor_file) if monitor_file else None, gere_monitor_steps=1,
              gere_monitor_size=24, gere_monitor_max_length=48, gere_monitor_task_size=8, max_steps=4)
    kw.update(overrides)
    return GeReSFTTrainer(model=model, args=sft_config(tmp_path / name, **kw), train_dataset=dataset, processing_class=tok)


def _monitor_logs(trainer) -> dict[int, dict]:
    return {int(h["step"]): h for h in trainer.state.log_history if "gere/monitor_ppl" in h}


# ---------------------------------------------------------------------------------------------
# The top-k KL against the full KL
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("vocab,k", [(7, 7), (50, 5), (300, 64)])
def test_topk_kl_is_exact_on_the_coarse_grained_distribution_and_bounded_by_full_kl(vocab, k):
    g = torch.Generator().manual_seed(vocab)
    base = torch.randn(31, vocab, generator=g) * 3
    model = base + torch.randn(31, vocab, generator=g)
    lb, lm = torch.log_softmax(base, -1), torch.log_softmax(model, -1)
    vals, idx = lb.topk(k, -1)
    approx = topk_kl(vals, lm.gather(-1, idx), rest_logmass(lb, idx), rest_logmass(lm, idx))
    full = full_kl(base, model)
    # independent: the KL of the (k + 1)-outcome distributions, built by hand in float64
    pb, pm = lb.double().exp(), lm.double().exp()
    in_top = torch.zeros_like(pb, dtype=torch.bool).scatter_(-1, idx, True)
    coarse_b = torch.cat([pb.gather(-1, idx), (pb * ~in_top).sum(-1, keepdim=True)], -1)
    coarse_m = torch.cat([pm.gather(-1, idx), (pm * ~in_top).sum(-1, keepdim=True)], -1)
    safe = coarse_b > 0
    hand = torch.where(safe, coarse_b * (coarse_b.clamp_min(1e-300).log() - coarse_m.clamp_min(1e-300).log()), 0).sum(-1)
    torch.testing.assert_close(approx, hand, atol=1e-6, rtol=1e-5)
    assert (approx >= -1e-9).all() and (approx <= full + 1e-6).all()
    if k == vocab:
        torch.testing.assert_close(approx, full, atol=1e-6, rtol=1e-5)
    rest = rest_logmass(lb, idx)
    assert torch.equal(topk_kl(vals, vals, rest, rest), torch.zeros(31, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------
# Plain SFT with the monitor only (no replay)
# ---------------------------------------------------------------------------------------------
def test_step0_is_the_base_and_kl_rises_under_plain_sft(tmp_path, tiny_dir, tiny_tokenizer, collapse_dataset,
                                                        monitor_file):
    base = _load(tiny_dir)
    model = _load(tiny_dir)
    trainer = _trainer(tmp_path, model, tiny_tokenizer, collapse_dataset, monitor_file, learning_rate=2e-2,
                       lr_scheduler_type="constant")
    assert trainer.gere_step is None and trainer.gere_monitor is not None
    texts = trainer.gere_monitor.texts.texts
    base_ppl = perplexity(base, tiny_tokenizer, texts, max_length=48)["ppl"]
    trainer.train()
    logs = _monitor_logs(trainer)
    assert sorted(logs) == [0, 1, 2, 3, 4]
    first = logs[0]
    assert first["gere/monitor_kl"] == 0.0 and first["gere/monitor_task_kl"] == 0.0
    assert first["gere/monitor_ppl_rise"] == 0.0
    assert first["gere/monitor_ppl"] == pytest.approx(base_ppl, rel=1e-6)
    assert "gere/monitor_out_of_state" not in first  # no state cache without replay
    kls = [logs[s]["gere/monitor_kl"] for s in range(1, 5)]
    assert all(v > 0 for v in kls) and kls[-1] > kls[0]
    assert logs[4]["gere/monitor_task_kl"] > 0
    # the last pass equals a separate evaluation of the trained model
    final_ppl = perplexity(model, tiny_tokenizer, texts, max_length=48)["ppl"]
    assert logs[4]["gere/monitor_ppl"] == pytest.approx(final_ppl, rel=1e-5)
    assert logs[4]["gere/monitor_ppl_rise"] == pytest.approx(final_ppl / base_ppl - 1, rel=1e-4)
    assert logs[4]["gere/monitor_ppl_rise"] > 0
    # steps 1..4 are logged once, in the Trainer's own record of the step (with the loss)
    assert all("loss" in logs[s] for s in range(1, 5))
    assert model.training  # the training mode is restored after every pass


def test_kl_is_exactly_zero_again_on_an_unchanged_model(tmp_path, tiny_dir, tiny_tokenizer, sft_dataset, monitor_file):
    trainer = _trainer(tmp_path, _load(tiny_dir), tiny_tokenizer, sft_dataset, monitor_file)
    monitor = trainer.gere_monitor
    monitor.measure(0, snapshot=True)
    again = monitor.measure(0)  # a second, separate forward pass over the same rows
    assert again["gere/monitor_kl"] == 0.0 and again["gere/monitor_task_kl"] == 0.0
    assert again["gere/monitor_ppl_rise"] == 0.0


def test_kl_equals_an_independent_full_kl_when_k_covers_the_vocabulary(tmp_path, tiny_dir, tiny_tokenizer,
                                                                       sft_dataset, monitor_file, monkeypatch):
    """With TOP_K >= vocabulary the coarse-grained KL IS the full KL: the monitor's value after training
    against the full-vocabulary KL computed row by row, without padding, from a copy of the base.
    (The random tiny model's near-uniform distributions make top-64 of 300 tokens a loose bound; on
    SmolLM2-135M the benchmark measures the real gap.)"""
    import gere_plugin.monitor.callback as monitor_module

    monkeypatch.setattr(monitor_module, "TOP_K", 1024)
    base = _load(tiny_dir)
    model = _load(tiny_dir)
    trainer = _trainer(tmp_path, model, tiny_tokenizer, sft_dataset, monitor_file, max_steps=3, learning_rate=5e-3)
    trainer.train()
    got = _monitor_logs(trainer)[3]["gere/monitor_kl"]
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in trainer.gere_monitor.texts.input_ids:
            x = torch.tensor([ids])
            kl = full_kl(base(x).logits[0, :-1], model.eval()(x).logits[0, :-1])
            total, count = total + float(kl.sum()), count + len(ids) - 1
    assert got > 0
    assert got == pytest.approx(total / count, rel=1e-4)
    # gere/monitor_task_kl: the same naive computation on the training rows the monitor drew (seeded, by index)
    rows = task_sample(trainer.train_dataset, tiny_tokenizer, 8, trainer.args.gere_seed, 48)
    assert len(rows) == trainer.gere_monitor.num_task_rows == 8
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in rows:
            x = torch.tensor([ids])
            kl = full_kl(base(x).logits[0, :-1], model.eval()(x).logits[0, :-1])
            total, count = total + float(kl.sum()), count + len(ids) - 1
    task_kl = _monitor_logs(trainer)[3]["gere/monitor_task_kl"]
    assert task_kl > 0
    assert task_kl == pytest.approx(total / count, rel=1e-4)


# ---------------------------------------------------------------------------------------------
# Training is unchanged by the monitor
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["plain", "gere", "lora", "task_replay"])
def test_weights_are_bit_identical_with_and_without_the_monitor(tmp_path, tiny_dir, tiny_tokenizer, sft_dataset,
                                                                replay_file, monitor_file, kind):
    lora = kind == "lora"
    extra = {}
    if kind == "gere":
        extra = dict(gere_replay=str(replay_file), gere_state_cache=str(tmp_path / "cache"), gere_replay_per_step=2)
    if kind == "task_replay":  # earlier-task replay only (no general replay): the monitor runs next to it
        earlier = write_jsonl(tmp_path / "earlier.jsonl", [
            {"prompt": f"Question {i}: is it {w}?\nAnswer:", "completion": " yes" if i % 2 else " no"}
            for i, w in enumerate(("long", "wide", "cold", "deep", "calm", "old"))])
        extra = dict(gere_task_replay=[str(earlier)], gere_task_replay_size=6, gere_task_replay_per_step=2)
    runs = {}
    for name, watched in (("without", None), ("with", monitor_file)):
        model = _load(tiny_dir, lora=lora)
        trainer = _trainer(tmp_path, model, tiny_tokenizer, sft_dataset, watched, name=name, **extra)
        trainer.train()
        runs[name] = (trainer, {k: v.detach().clone() for k, v in model.state_dict().items()})
    (plain_trainer, without), (watched_trainer, with_monitor) = runs["without"], runs["with"]
    assert without.keys() == with_monitor.keys()
    changed = [k for k in without if not torch.equal(without[k], with_monitor[k])]
    assert changed == [], f"weights differ with the monitor: {changed[:3]}"
    logs = _monitor_logs(watched_trainer)
    assert sorted(logs) == [0, 1, 2, 3, 4] and not _monitor_logs(plain_trainer)
    assert logs[4]["gere/monitor_kl"] > 0
    losses = {int(h["step"]): h["loss"] for h in plain_trainer.state.log_history if "loss" in h}
    assert losses == {int(h["step"]): h["loss"] for h in watched_trainer.state.log_history if "loss" in h}
    if kind == "gere":
        # with a state cache: out-of-state fraction of the monitor texts, exactly 0 at step 0
        assert logs[0]["gere/monitor_out_of_state"] == 0.0 and logs[4]["gere/monitor_out_of_state"] > 0
        assert "gere/reg_loss" in logs[4]  # the replay metrics share the record
    elif kind == "task_replay":
        assert watched_trainer.gere_step is not None and watched_trainer.gere_step.replay is None
        assert logs[4]["gere/task_replay_rows"] == 2.0 and "gere/monitor_out_of_state" not in logs[4]
    else:
        assert "gere/monitor_out_of_state" not in logs[4]


def test_default_interval_measures_step_0_and_the_last_step(tmp_path, tiny_dir, tiny_tokenizer, sft_dataset,
                                                            monitor_file):
    trainer = _trainer(tmp_path, _load(tiny_dir), tiny_tokenizer, sft_dataset, monitor_file, gere_monitor_steps=200,
                       max_steps=3)
    trainer.train()
    assert sorted(_monitor_logs(trainer)) == [0, 3]
    assert [s for s, _ in trainer.gere_monitor.seconds] == [0, 3]


# ---------------------------------------------------------------------------------------------
# The guard
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("action", ["warn", "stop"])
def test_guard_warns_or_stops_naming_the_key(tmp_path, tiny_dir, tiny_tokenizer, collapse_dataset, monitor_file,
                                             action, caplog):
    trainer = _trainer(tmp_path, _load(tiny_dir), tiny_tokenizer, collapse_dataset, monitor_file, learning_rate=2e-2,
                       lr_scheduler_type="constant", max_steps=6, gere_monitor_max_ppl_rise=0.05,
                       gere_monitor_action=action)
    with caplog.at_level(logging.WARNING, logger="gere_plugin"):
        trainer.train()
    rises = {s: h["gere/monitor_ppl_rise"] for s, h in _monitor_logs(trainer).items()}
    crossed = min(s for s, r in rises.items() if r > 0.05)
    messages = [r.getMessage() for r in caplog.records if "gere_monitor_max_ppl_rise=0.05 crossed" in r.getMessage()]
    assert messages and f"at step {crossed}" in messages[0]
    assert trainer.gere_monitor.tripped["step"] == crossed
    if action == "stop":
        assert trainer.state.global_step == crossed < 6
        assert "gere_monitor_action=stop" in messages[0]
    else:
        assert trainer.state.global_step == 6
        assert "gere_monitor_action=warn" in messages[0]


# ---------------------------------------------------------------------------------------------
# DPO, resume
# ---------------------------------------------------------------------------------------------
def test_dpo_monitor_only(tmp_path, tiny_dir, tiny_tokenizer, monitor_file):
    from datasets import Dataset

    from gere_plugin import GeReDPOConfig, GeReDPOTrainer

    rows = [{"prompt": f"Review: the film was {'great' if i % 2 else 'bad'} Sentiment:",
             "chosen": " positive" if i % 2 else " negative", "rejected": " negative" if i % 2 else " positive"}
            for i in range(16)]
    cfg = GeReDPOConfig(
        output_dir=str(tmp_path / "dpo"), per_device_train_batch_size=4, max_steps=3, logging_steps=1, report_to=[],
        bf16=False, use_cpu=True, gradient_checkpointing=False, save_strategy="no", disable_tqdm=True,
        learning_rate=5e-3, seed=0, beta=0.1, gere_monitor=str(monitor_file), gere_monitor_steps=1,
        gere_monitor_size=16, gere_monitor_task_size=4,
    )
    trainer = GeReDPOTrainer(model=_load(tiny_dir), args=cfg, train_dataset=Dataset.from_list(rows),
                             processing_class=tiny_tokenizer)
    assert trainer.gere_monitor.num_task_rows == 4  # prompt_ids + chosen_ids of TRL's prepared rows
    trainer.train()
    logs = _monitor_logs(trainer)
    assert sorted(logs) == [0, 1, 2, 3]
    assert logs[0]["gere/monitor_kl"] == 0.0 and logs[0]["gere/monitor_task_kl"] == 0.0
    assert logs[3]["gere/monitor_kl"] > 0 and logs[3]["gere/monitor_task_kl"] > 0
    assert all("rewards/margins" in logs[s] for s in (1, 2, 3))


def test_grpo_with_gere_monitor_values_and_bit_identical_weights(tmp_path, tiny_dir, tiny_tokenizer, replay_file,
                                                                 monitor_file):
    """GeReGRPOTrainer (real TRL GRPO, rule-based reward, replay + TM) with and without the monitor: the
    same weights and losses (generation samples from the same RNG stream: the monitor draws no random
    numbers), step 0 equals a separate perplexity evaluation of the base, KL 0 at step 0 and > 0 after,
    task KL on the GRPO prompts, and the monitor values in the same record as GRPO's reward."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from gere_plugin import GeReGRPOConfig, GeReGRPOTrainer

    from .test_grpo_trainer import vowel_reward

    prompts = Dataset.from_list([{"prompt": t} for t in general_texts(24, seed=5, min_words=3, max_words=8)])
    base = AutoModelForCausalLM.from_pretrained(str(tiny_dir))
    runs = {}
    for name, watched in (("without", None), ("with", monitor_file)):
        cfg = GeReGRPOConfig(
            output_dir=str(tmp_path / name), per_device_train_batch_size=4, num_generations=2, max_completion_length=6,
            max_steps=2, logging_steps=1, report_to=[], bf16=False, use_cpu=True, gradient_checkpointing=False,
            save_strategy="no", disable_tqdm=True, learning_rate=1e-2, seed=0, use_vllm=False,
            gere_replay=str(replay_file), gere_replay_size=32, gere_replay_max_length=32, gere_replay_per_step=2,
            gere_state_cache=str(tmp_path / "cache"), gere_monitor=str(watched) if watched else None,
            gere_monitor_steps=1, gere_monitor_size=16, gere_monitor_max_length=32, gere_monitor_task_size=4,
        )
        model = AutoModelForCausalLM.from_pretrained(str(tiny_dir))
        trainer = GeReGRPOTrainer(model=model, reward_funcs=vowel_reward, args=cfg, train_dataset=prompts,
                                  processing_class=tiny_tokenizer)
        trainer.train()
        runs[name] = (trainer, {k: v.detach().clone() for k, v in model.state_dict().items()})
    (plain, without), (watched_trainer, with_monitor) = runs["without"], runs["with"]
    assert [k for k in without if not torch.equal(without[k], with_monitor[k])] == []
    losses = {int(h["step"]): h["loss"] for h in plain.state.log_history if "loss" in h}
    assert losses == {int(h["step"]): h["loss"] for h in watched_trainer.state.log_history if "loss" in h}
    monitor = watched_trainer.gere_monitor
    assert monitor.num_task_rows == 4  # the GRPO prompts (raw strings) tokenized
    logs = _monitor_logs(watched_trainer)
    assert sorted(logs) == [0, 1, 2]
    base_ppl = perplexity(base, tiny_tokenizer, monitor.texts.texts, max_length=32)["ppl"]
    assert logs[0]["gere/monitor_ppl"] == pytest.approx(base_ppl, rel=1e-6)
    assert logs[0]["gere/monitor_kl"] == 0.0 and logs[0]["gere/monitor_task_kl"] == 0.0
    assert logs[0]["gere/monitor_out_of_state"] == 0.0
    assert logs[2]["gere/monitor_kl"] > 0 and logs[2]["gere/monitor_task_kl"] > 0
    assert all("reward" in logs[s] and "gere/replay_ce" in logs[s] for s in (1, 2))
    assert watched_trainer.model.training


def test_resume_keeps_the_base_snapshot(tmp_path, tiny_dir, tiny_tokenizer, sft_dataset, monitor_file, caplog):
    constant = dict(lr_scheduler_type="constant")  # the same schedule for the 2-step and the 4-step runs
    full = _trainer(tmp_path, _load(tiny_dir), tiny_tokenizer, sft_dataset, monitor_file, name="full", **constant)
    full.train()
    first = _trainer(tmp_path, _load(tiny_dir), tiny_tokenizer, sft_dataset, monitor_file, name="resumed",
                     save_strategy="steps", save_steps=2, max_steps=2, **constant)
    first.train()
    assert (tmp_path / "resumed" / "checkpoint-2" / "gere_monitor_rank0.safetensors").is_file()
    resumed = _trainer(tmp_path, _load(tiny_dir), tiny_tokenizer, sft_dataset, monitor_file, name="resumed",
                       save_strategy="steps", save_steps=2, **constant)
    with caplog.at_level(logging.WARNING, logger="gere_plugin"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-2"))
    assert not [r for r in caplog.records if "without the monitor's base snapshot" in r.getMessage()]
    assert [s for s, _ in resumed.gere_monitor.seconds] == [3, 4]  # no new snapshot at the resumed step
    assert resumed.gere_monitor.base_nll == full.gere_monitor.base_nll
    want, got = _monitor_logs(full)[4], _monitor_logs(resumed)[4]
    for key in ("gere/monitor_ppl", "gere/monitor_ppl_rise", "gere/monitor_kl", "gere/monitor_task_kl"):
        assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-9), key


# ---------------------------------------------------------------------------------------------
# Inputs and configuration
# ---------------------------------------------------------------------------------------------
def test_monitor_texts_must_not_be_replayed(tmp_path, tiny_dir, tiny_tokenizer, sft_dataset, replay_file):
    with pytest.raises(MonitorError, match=r"gere_monitor=.*also in the replay set"):
        _trainer(tmp_path, _load(tiny_dir), tiny_tokenizer, sft_dataset, replay_file, gere_replay=str(replay_file),
                 gere_state_cache=str(tmp_path / "cache"))


def test_monitor_reader_errors_name_gere_monitor(tmp_path, tiny_tokenizer):
    args = GeReArguments(gere_monitor=str(tmp_path / "missing.jsonl"))
    with pytest.raises(MonitorError, match=r"^gere_monitor=.*does not exist"):
        load_monitor_texts(args, tiny_tokenizer)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"body": "x y z"}])
    with pytest.raises(MonitorError, match="gere_replay_text_field='text' is not a field"):
        load_monitor_texts(GeReArguments(gere_monitor=str(bad)), tiny_tokenizer)


def test_monitor_draws_size_texts_seeded_in_source_order(tiny_tokenizer, monitor_file):
    a = load_monitor_texts(GeReArguments(gere_monitor=str(monitor_file), gere_monitor_size=10), tiny_tokenizer)
    b = load_monitor_texts(GeReArguments(gere_monitor=str(monitor_file), gere_monitor_size=10), tiny_tokenizer)
    c = load_monitor_texts(GeReArguments(gere_monitor=str(monitor_file), gere_monitor_size=10, gere_seed=1),
                           tiny_tokenizer)
    source = general_texts(40, seed=99)
    assert a.texts == b.texts and len(a.texts) == 10 and a.texts != c.texts
    assert [source.index(t) for t in a.texts] == sorted(source.index(t) for t in a.texts)
    all_of_them = load_monitor_texts(GeReArguments(gere_monitor=str(monitor_file), gere_monitor_size=500),
                                     tiny_tokenizer)
    assert all_of_them.texts == source


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(gere_monitor_size=0), "gere_monitor_size=0 is out of range"),
        (dict(gere_monitor_steps=0), "gere_monitor_steps=0 is out of range"),
        (dict(gere_monitor_max_length=1), "gere_monitor_max_length=1 is out of range"),
        (dict(gere_monitor_task_size=-1), "gere_monitor_task_size=-1 is out of range"),
        (dict(gere_monitor="x.jsonl", gere_monitor_max_ppl_rise=0), "gere_monitor_max_ppl_rise=0 must be a number > 0"),
        (dict(gere_monitor="x.jsonl", gere_monitor_action="halt"), "gere_monitor_action='halt' is not one of warn, stop"),
        (dict(gere_monitor_max_ppl_rise=0.2), "gere_monitor_max_ppl_rise is set but gere_monitor is not"),
        (dict(gere_monitor=""), "gere_monitor='' must be a path"),
    ],
)
def test_bad_monitor_values_name_the_key(kw, match):
    with pytest.raises(GeReConfigError, match=match):
        GeReArguments(**kw)


def test_axolotl_request_rules_for_monitor_only_configs():
    from gere_plugin.axolotl.args import check_gere_request

    check_gere_request({"gere_monitor": "heldout.jsonl", "gere_monitor_steps": 50, "gere_seed": 3})  # valid
    with pytest.raises(GeReConfigError, match="gere_replay is not set, but the config sets gere_regularizer"):
        check_gere_request({"gere_monitor": "heldout.jsonl", "gere_regularizer": "kl"})
    with pytest.raises(GeReConfigError, match="gere_replay is not set"):
        check_gere_request({"gere_monitor_steps": 50})
    with pytest.raises(GeReConfigError, match="gere_monitor_max_ppl_rise is set but gere_monitor is not"):
        check_gere_request({"gere_replay": "r.jsonl", "gere_monitor_max_ppl_rise": 0.2})
    check_gere_request({"gere_replay": "r.jsonl", "gere_monitor": "h.jsonl", "gere_monitor_max_ppl_rise": 0.2})


def test_metric_keys_are_documented():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "docs" / "monitor.md").read_text()
    missing = [k for k in METRIC_KEYS if f"`{k}`" not in readme]
    assert missing == [], f"docs/monitor.md does not describe {missing}"


# ---------------------------------------------------------------------------------------------
# Continual runner and report
# ---------------------------------------------------------------------------------------------
def test_run_sequence_records_the_monitor_and_gere_report_draws_it(tmp_path, tiny_dir, replay_file, monitor_file):
    import dataclasses
    import json
    import struct

    from gere_plugin.continual import run_sequence
    from gere_plugin.evaluation.report import monitor_series, report_main

    from .test_continual import SETTINGS, TASKS

    settings = dataclasses.replace(SETTINGS, gere_monitor=str(monitor_file), gere_monitor_steps=1,
                                   gere_monitor_size=12, gere_monitor_max_length=32, gere_monitor_task_size=4)
    results = []
    for method in ("plain", "gere"):
        path = tmp_path / f"{method}.json"
        run_sequence(str(tiny_dir), TASKS, method, tmp_path / method, settings=settings, replay=replay_file,
                     state_cache=tmp_path / "states", seed=3, result_path=path)
        results.append(path)
    plain, gere = (json.loads(p.read_text()) for p in results)
    for run in (plain, gere):
        for stage in run["stages"]:
            steps = [h["step"] for h in stage["history"] if "gere/monitor_kl" in h]
            assert steps == [0, 1, 2], steps
            assert stage["history"][0]["gere/monitor_kl"] == 0.0
            assert stage["monitor"]["texts"] == 12 and stage["monitor"]["task_rows"] == 4
            assert [s for s, _ in stage["monitor"]["pass_seconds"]] == [0, 1, 2]
    # both methods score the same texts: identical step-0 perplexity (the same base model)
    assert plain["stages"][0]["history"][0]["gere/monitor_ppl"] == gere["stages"][0]["history"][0]["gere/monitor_ppl"]
    last = {name: [h for h in run["stages"][1]["history"] if "gere/monitor_kl" in h][-1]
            for name, run in (("plain", plain), ("gere", gere))}
    assert last["gere"]["gere/monitor_out_of_state"] > 0  # GeRe's state cache exists
    assert "gere/monitor_out_of_state" not in last["plain"]

    series = monitor_series(plain)
    assert series["steps"] == [0, 1, 2, 2, 3, 4] and series["boundaries"] == [2, 4]
    # the rise stays relative to the ORIGINAL base across tasks: task 2's start = task 1's end
    assert series["ppl_rise"][0] == 0.0
    assert series["ppl_rise"][3] == pytest.approx(series["ppl_rise"][2], rel=1e-6, abs=1e-12)
    assert series["kl"][3] == 0.0  # task 2's KL compares with the model at its start

    out_png = tmp_path / "report.png"
    assert report_main([str(p) for p in results] + ["--png", str(out_png), "--md", str(tmp_path / "r.md")]) == 0
    monitor_png = tmp_path / "report_monitor.png"
    data = monitor_png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", data[16:24])[0] > 800
    table = (tmp_path / "r.md").read_text()
    assert "Forgetting monitor" in table and "| plain | 6 | 4 |" in table and "| gere | 6 | 4 |" in table
