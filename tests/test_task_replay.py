"""Earlier-task replay (``gere_task_replay*``): tokenization as TRL's, the loss against a hand computation,
exact rows per step (with and without general replay, accumulation, 2 ranks), resume, DPO, the runner.

The hand computations use only the tokenizer and the model: an earlier-task row's completion-only CE is
``-log p(token_t | tokens_<t)`` summed over the completion tokens (EOS appended as TRL does) of
``prompt + completion``, divided by their count, with the prompt's length taken from tokenizing the prompt
alone; nothing of ``gere_plugin`` is involved.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from gere_plugin import GeReSFTTrainer
from gere_plugin.config import GeReConfigError
from gere_plugin.task_replay import TaskReplaySet, Tokenization

from .conftest import WORDS, sft_config, write_jsonl
from .test_sft_trainer import (
    FAST,
    _batches,
    _ce,
    _independent_reg,
    _independent_thresholds,
    _perturb,
    make_trainer,
)

PER_TASK = 5  # rows per earlier-task file (all of them are kept: gere_task_replay_size >= PER_TASK)


def _earlier_rows(seed: int, topic: str, n: int = PER_TASK) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 7)))
        rows.append({"prompt": f"{topic}: {words}\nAnswer:", "completion": rng.choice([" yes", " no", " maybe so"])})
    return rows


@pytest.fixture(scope="module")
def earlier(tmp_path_factory: Any) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("earlier")
    rows = [_earlier_rows(11, "Topic"), _earlier_rows(12, "Question")]
    files = [write_jsonl(d / f"task{i}.jsonl", r) for i, r in enumerate(rows)]
    return {"rows": rows, "files": [str(f) for f in files], "pool": [r for rs in rows for r in rs]}


def _task_kw(earlier: dict[str, Any], **kw: Any) -> dict[str, Any]:
    out = dict(gere_task_replay=earlier["files"], gere_task_replay_size=PER_TASK, gere_task_replay_per_step=3)
    out.update(kw)
    return out


def _hand_completion_ce(model: torch.nn.Module, tok: Any, prompt: str, completion: str) -> tuple[torch.Tensor, int]:
    """Sum and count of -log p over the completion tokens (+ EOS) of one row, one row per forward."""
    ids = tok(prompt + completion + tok.eos_token)["input_ids"]
    n_prompt = len(tok(prompt)["input_ids"])
    x = torch.tensor([ids])
    logp = F.log_softmax(model(x).logits[0].float(), -1)
    terms = [-logp[t - 1, ids[t]] for t in range(n_prompt, len(ids))]
    assert terms, "a row without completion tokens"
    return torch.stack(terms).sum(), len(terms)


# ---------------------------------------------------------------------------------------------
# The loss, against a hand computation
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("general", ["tm", "l2", None], ids=["gere-tm", "replay-l2", "no-general-replay"])
@pytest.mark.parametrize("accumulation", [1, 2])
def test_loss_with_earlier_tasks_equals_hand_computation(tmp_path, tiny_dir, tiny_tokenizer, sft_dataset, replay_file,
                                                         earlier, general, accumulation):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir))
    base = AutoModelForCausalLM.from_pretrained(str(tiny_dir)).eval()
    w = 3.0
    rho = 0.3 if accumulation == 1 else None  # a set share, and the default row share
    trainer = make_trainer(
        tmp_path, model, tiny_tokenizer, sft_dataset, replay_file,
        gere_replay=str(replay_file) if general else None, gere_regularizer=general or "tm", gere_weight=w,
        gere_replay_per_step=2, gradient_accumulation_steps=accumulation,
        per_device_train_batch_size=4 // accumulation, **_task_kw(earlier, gere_task_replay_weight=rho),
    )
    step = trainer.gere_step
    assert step is not None and step.task_replay is not None
    assert step.task_replay.rows.kept == [PER_TASK, PER_TASK]
    expected_rho = 0.3 if rho is not None else 3 / (4 + 3)  # T / (global batch + T)
    assert step.task_replay.weight == pytest.approx(expected_rho)
    _perturb(model)
    model.train()
    batches = _batches(trainer, accumulation)
    num_items = sum((b["labels"][:, 1:] != -100).sum() for b in batches)
    trainer.current_gradient_accumulation_steps = accumulation
    trainer.state.global_step = 0
    got = sum(trainer.compute_loss(model, dict(b), num_items_in_batch=num_items) for b in batches)

    with torch.no_grad():
        task_sum = sum(_ce(model(input_ids=b["input_ids"], attention_mask=b.get("attention_mask")).logits, b["labels"])[0]
                       for b in batches)
        ce_task = task_sum / num_items
        # earlier-task rows of step 0: pool index i is row i % 5 of file i // 5 (all rows kept, source order)
        task_rows = step.task_replay.schedule.rows_for_step(0)
        assert len(task_rows) == 3 and len(set(task_rows)) == 3
        sums, counts = zip(*(_hand_completion_ce(model, tiny_tokenizer, **earlier["pool"][i]) for i in task_rows))
        ce_earlier = sum(sums) / sum(counts)
        c = 0.5 if general else 1.0
        expected = c * ((1 - expected_rho) * ce_task + expected_rho * ce_earlier)
        if general:
            replay = step.replay
            rows = step.schedule.rows_for_step(0)
            rsum, rcount = 0.0, 0
            for i in rows:
                x = torch.tensor([replay.input_ids[i]])
                s, n = _ce(model(x).logits, x)
                rsum, rcount = rsum + s, rcount + n
            if general == "tm":
                pos, neg = _independent_thresholds(base, replay)
                per = [_independent_reg("tm", model, base, replay, [i], pos, neg) for i in rows] if accumulation > 1 else [
                    _independent_reg("tm", model, base, replay, rows, pos, neg)]
            else:
                per = [_independent_reg("l2", model, base, replay, [i]) for i in rows] if accumulation > 1 else [
                    _independent_reg("l2", model, base, replay, rows)]
            r = sum(per) / len(per)
            assert float(r) > 1e-4
            # the regularizer is computed on the general replay rows only: its logged value is theirs
            logged = trainer._metrics["train"]["gere/reg_loss"]
            assert sum(logged) / len(logged) == pytest.approx(float(r), rel=2e-4)
            expected = expected + c * rsum / rcount + w * r
    assert float(got) == pytest.approx(float(expected), rel=2e-4, abs=1e-5)
    logged_ce = trainer._metrics["train"]["gere/task_replay_ce"]
    assert len(logged_ce) == 1  # one value per optimizer step: the mean over its micro-batches with such rows
    if accumulation == 1:
        assert logged_ce[0] == pytest.approx(float(ce_earlier), rel=2e-4)


def _long_rows(seed: int, topic: str, words: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    return [{"prompt": topic[0] + " ".join(rng.choice(WORDS) for _ in range(words)) + ":",
             "completion": rng.choice([" yes", " no"])} for _ in range(PER_TASK)]


@pytest.mark.parametrize("chunk", ["0", ""], ids=["full-logits", "chunked-head"])
@pytest.mark.parametrize("words", [0, 12], ids=["earlier-rows-narrower", "earlier-rows-wider"])
@pytest.mark.parametrize("beta", [0.0, 0.5], ids=["ce", "logit-replay"])
def test_one_packed_forward_equals_two_forwards(tmp_path, tiny_dir, tiny_tokenizer, sft_dataset, replay_file, chunk,
                                                words, beta, monkeypatch):
    """General and earlier-task rows of a micro-batch share one forward (``ReplayStep.pack_replay_rows``):
    one model call less, and the loss and every gradient as with a forward per kind (TM on the general rows,
    logit replay's KL on the earlier ones, both logit-head paths, and either kind the wider one)."""
    from transformers import AutoModelForCausalLM

    from gere_plugin.methods.logit_replay import write_logit_snapshot

    if chunk:
        monkeypatch.setenv("GERE_LOGITS_CHUNK", chunk)
    files = [str(write_jsonl(tmp_path / f"task{i}.jsonl", _long_rows(20 + i, t, words)))
             for i, t in enumerate(["Topic", "Question"])]
    got: dict[bool, Any] = {}
    for pack in (True, False):
        model = AutoModelForCausalLM.from_pretrained(str(tiny_dir), dtype="float32")
        kw = dict(gere_regularizer="tm", gere_weight=2.0, gere_replay_per_step=2, per_device_train_batch_size=4,
                  gere_task_replay_logit_weight=beta, gere_task_replay_topk=4, **_task_kw({"files": files}))
        trainer = make_trainer(tmp_path / f"pack{pack}", model, tiny_tokenizer, sft_dataset, replay_file, **kw)
        if beta and not trainer.gere_step.earlier.logits.covered:  # the first pass writes the snapshot
            write_logit_snapshot(model, files[0], tiny_tokenizer, Tokenization.of_trainer_args(trainer.args), 4,
                                 tiny_tokenizer.pad_token_id, batch_size=3)
            trainer = make_trainer(tmp_path / f"pack{pack}", model, tiny_tokenizer, sft_dataset, replay_file, **kw)
        assert not beta or trainer.gere_step.earlier.logits.covered == PER_TASK
        step = trainer.gere_step
        step.pack_replay_rows = pack
        _perturb(model)
        model.train()
        widths = (max(len(step.replay.input_ids[i]) for i in step.schedule.rows_for_step(0)),
                  max(len(step.task_replay.rows.input_ids[i]) for i in step.task_replay.schedule.rows_for_step(0)))
        calls: list[tuple[int, ...]] = []
        hook = model.register_forward_hook(
            lambda m, args, kwargs, out, calls=calls: calls.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True)
        (batch,) = _batches(trainer, 1)
        num_items = (batch["labels"][:, 1:] != -100).sum()
        trainer.current_gradient_accumulation_steps = 1
        trainer.state.global_step = 0
        loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=num_items)
        hook.remove()
        loss.backward()
        got[pack] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
                     calls, widths)
    (l1, g1, c1, widths), (l2, g2, c2, _) = got[True], got[False]
    assert (widths[1] > widths[0]) == (words > 0)  # the case the parameter names
    # separate: earlier-task rows (3), general rows (2), task rows (4); packed: general + earlier (5), task rows
    assert [c[0] for c in c2] == [3, 2, 4] and [c[0] for c in c1] == [5, 4]
    assert c1[0][1] == max(widths)
    assert float(l1) == pytest.approx(float(l2), rel=1e-5)
    assert g1.keys() == g2.keys() and len(g1) > 0
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], rtol=1e-4, atol=1e-6, msg=name)


def test_dpo_replays_earlier_pairs_as_ce_on_chosen(tmp_path, tiny_dir, tiny_tokenizer, replay_file):
    """DPO: loss = (1 - rho) * L_dpo + rho * CE(chosen of earlier pairs) + CE_replay + w * R."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from gere_plugin import GeReDPOTrainer

    from .test_dpo_trainer import _logps, dpo_config

    pref = Dataset.from_list([
        {"prompt": f"Review: the film was {'great' if i % 2 else 'bad'} Sentiment:",
         "chosen": " positive" if i % 2 else " negative", "rejected": " negative" if i % 2 else " positive"}
        for i in range(16)])
    rng = random.Random(5)
    pairs = [{"prompt": f"Q: {' '.join(rng.choice(WORDS) for _ in range(4))}?", "chosen": " yes it is",
              "rejected": " no"} for _ in range(6)]
    earlier_file = write_jsonl(tmp_path / "earlier_pairs.jsonl", pairs)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir))
    w, rho = 2.0, 0.25
    cfg = dpo_config(tmp_path, replay_file, gere_regularizer="l2", gere_weight=w, gere_task_replay=[str(earlier_file)],
                     gere_task_replay_per_step=2, gere_task_replay_weight=rho, gere_task_replay_size=10)
    trainer = GeReDPOTrainer(model=model, args=cfg, train_dataset=pref, processing_class=tiny_tokenizer)
    ref = trainer.ref_model
    _perturb(model, seed=1)
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
        step = trainer.gere_step
        rsum, rn = 0.0, 0
        for i in step.schedule.rows_for_step(0):
            x = torch.tensor([step.replay.input_ids[i]])
            s, n = _ce(model(x).logits, x)
            rsum, rn = rsum + s, rn + n
        sums, counts = zip(*(_hand_completion_ce(model, tiny_tokenizer, pairs[i]["prompt"], pairs[i]["chosen"])
                             for i in step.task_replay.schedule.rows_for_step(0)))
        reg = trainer._metrics["train"]["gere/reg_loss"][-1]
    assert reg > 1e-4
    expected = (1 - rho) * dpo + rho * sum(sums) / sum(counts) + rsum / rn + w * reg
    assert float(got) == pytest.approx(float(expected), rel=1e-4)


# ---------------------------------------------------------------------------------------------
# Exact rows per optimizer step, resume
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("general", [True, False], ids=["with-general-replay", "earlier-tasks-only"])
def test_exact_earlier_task_rows_per_step(tmp_path, tiny_model, tiny_tokenizer, sft_dataset, replay_file, earlier,
                                          general):
    # batch 2 x accumulation 2 = 4 task rows per step; 3 earlier-task rows per step dealt 2 + 1; 10 kept rows
    trainer = make_trainer(
        tmp_path, tiny_model, tiny_tokenizer, sft_dataset, replay_file,
        gere_replay=str(replay_file) if general else None, per_device_train_batch_size=2,
        gradient_accumulation_steps=2, gere_replay_per_step=2, max_steps=10, learning_rate=1e-4, **_task_kw(earlier),
    )
    trainer.train()
    assert trainer.state.global_step == 10
    task_by_step: dict[int, list[int]] = {}
    general_by_step: dict[int, list[int]] = {}
    for e in trainer.gere_step.history:
        task_by_step.setdefault(e["step"], []).extend(e["task_rows"])
        general_by_step.setdefault(e["step"], []).extend(e["rows"])
    assert sorted(task_by_step) == list(range(10))
    assert all(len(r) == 3 and len(set(r)) == 3 for r in task_by_step.values())
    # 30 rows over steps 0-9 are exactly three passes over the 10 kept rows, none repeated before all were used
    assert Counter(x for r in task_by_step.values() for x in r) == {i: 3 for i in range(2 * PER_TASK)}
    assert len({x for s in range(3) for x in task_by_step[s]}) == 9
    assert [len(e["task_rows"]) for e in trainer.gere_step.history] == [2, 1] * 10
    # the general replay keeps its own count: earlier-task rows never take its slots
    assert all(len(r) == (2 if general else 0) for r in general_by_step.values())
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["gere/task_replay_rows"] for h in logs] == [3.0] * 10
    assert all(h["gere/task_replay_ce"] > 0 for h in logs)
    if general:
        assert [h["gere/replay_rows"] for h in logs] == [2.0] * 10
    else:
        assert not any("gere/replay_rows" in h or "gere/reg_loss" in h for h in logs)


def test_resume_replays_the_same_earlier_task_rows(tmp_path, tiny_dir, tiny_tokenizer, sft_dataset, replay_file,
                                                    earlier):
    from transformers import AutoModelForCausalLM, TrainerCallback

    def run(out, stop_at, resume=None, **kw):
        model = AutoModelForCausalLM.from_pretrained(str(tiny_dir))
        t = make_trainer(out, model, tiny_tokenizer, sft_dataset, replay_file, max_steps=6, save_strategy="steps",
                         save_steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                         gere_state_cache=str(tmp_path / "shared-cache"), **_task_kw(earlier, **kw))

        class Stop(TrainerCallback):
            def on_step_end(self, args, state, control, **_):
                if state.global_step >= stop_at:
                    control.should_training_stop = True
                return control

        t.add_callback(Stop())
        t.train(resume_from_checkpoint=resume)
        return t

    full = run(tmp_path / "a", 6)
    run(tmp_path / "b", 3)
    ckpt = tmp_path / "b" / "out" / "checkpoint-2"
    saved = json.loads((ckpt / "gere_state.json").read_text())
    assert saved["task_replay"]["schedule"]["per_step"] == 3 and saved["task_replay"]["kept"] == [5, 5]
    resumed = run(tmp_path / "b", 6, resume=str(ckpt))

    def rows(t, field):
        out: dict[int, list[int]] = {}
        for e in t.gere_step.history:
            out.setdefault(e["step"], []).extend(e[field])
        return out

    for field in ("task_rows", "rows"):
        assert rows(resumed, field) == {s: r for s, r in rows(full, field).items() if s >= 2}, field

    def logs(t):
        return {h["step"]: h for h in t.state.log_history if "loss" in h}

    for s in (3, 4, 5, 6):
        for key in ("loss", "gere/task_replay_ce", "gere/replay_ce", "gere/reg_loss"):
            assert logs(resumed)[s][key] == pytest.approx(logs(full)[s][key], rel=1e-5), (s, key)

    # another earlier-task budget is refused before the first step
    with pytest.raises(GeReConfigError, match="other earlier-task replay.*gere_task_replay_per_step"):
        run(tmp_path / "b", 6, resume=str(ckpt), gere_task_replay_per_step=2)


# ---------------------------------------------------------------------------------------------
# Tokenization: the same ids and loss positions as TRL's own preparation of the trainer's rows
# ---------------------------------------------------------------------------------------------
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant:{% endif %}"
)


def _trl_prepared(tmp_path: Path, model: Any, tok: Any, rows: list[dict], **cfg: Any) -> list[tuple[list[int], list[int]]]:
    """``(input_ids, loss mask)`` of every row as TRL's SFTTrainer prepares its own training data."""
    from datasets import Dataset

    config = sft_config(tmp_path / f"trl-{len(list(tmp_path.iterdir()))}", **FAST, gere_replay=None, max_steps=1, **cfg)
    trainer = GeReSFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tok)
    out = []
    for row in trainer.train_dataset:
        ids = list(row["input_ids"])
        if row.get("labels") is not None:
            mask = [int(x != -100) for x in row["labels"]]
        elif row.get("completion_mask") is not None:
            mask = list(row["completion_mask"])
        else:
            mask = [1] * len(ids)
        out.append((ids, mask))
    return out


def _ours(tmp_path: Path, tok: Any, rows: list[dict], **how: Any) -> list[tuple[list[int], list[int]]]:
    path = write_jsonl(tmp_path / f"ours-{len(list(tmp_path.iterdir()))}.jsonl", rows)
    got = TaskReplaySet.from_sources([str(path)], tok, Tokenization(**how), size=len(rows), seed=0)
    return list(zip(got.input_ids, got.loss_masks))


def test_rows_are_tokenized_as_trl_tokenizes_the_trainers_rows(tmp_path, tiny_dir, tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_dir))
    tok.chat_template = CHAT_TEMPLATE
    rng = random.Random(2)

    def words(n: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(n))

    cases = {
        # the last prompt fills max_length: no completion token is left, so TRL drops the row, and so do we
        "prompt-completion": [{"prompt": f"Q: {words(4)}\nA:", "completion": f" {words(2)}"} for _ in range(4)]
        + [{"prompt": f"Q: {words(80)}\nA:", "completion": " yes"}],
        "text": [{"text": words(6)} for _ in range(3)] + [{"text": words(80)}],  # the last one is truncated
        "messages": [{"messages": [{"role": "user", "content": words(3)}, {"role": "assistant", "content": words(2)}]}
                     for _ in range(3)],
        "chat-prompt-completion": [{"prompt": [{"role": "user", "content": words(3)}],
                                    "completion": [{"role": "assistant", "content": words(2)}]} for _ in range(3)],
    }
    for name, rows in cases.items():
        trl = _trl_prepared(tmp_path, tiny_model, tok, rows, max_length=64)
        ours = _ours(tmp_path, tok, rows, max_length=64)
        assert ours == trl, name  # the same rows kept (a prompt filling max_length leaves no target: both drop it)
        assert len(ours) >= 3, name
        if name == "text":
            assert max(len(ids) for ids, _ in ours) == 64
        if name == "prompt-completion":  # loss on the completion (+ EOS) only; the long-prompt row is gone
            assert len(ours) == 4
            assert all(m[0] == 0 and m[-1] == 1 and ids[-1] == tok.eos_token_id for ids, m in ours)
    # completion_only_loss=False: TRL trains on the prompt too, and so do earlier-task rows of that trainer
    rows = cases["prompt-completion"][:4]
    trl = _trl_prepared(tmp_path, tiny_model, tok, rows, max_length=64, completion_only_loss=False)
    assert _ours(tmp_path, tok, rows, max_length=64, completion_only=False) == trl
    # DPO pairs: the chosen answer as the completion; pre-tokenized rows keep their ids and masks
    pairs = [{"prompt": r["prompt"], "chosen": r["completion"], "rejected": " no"} for r in rows]
    assert _ours(tmp_path, tok, pairs, max_length=64) == _ours(tmp_path, tok, rows, max_length=64)
    pre = [{"input_ids": ids, "completion_mask": m} for ids, m in _ours(tmp_path, tok, rows, max_length=64)]
    assert _ours(tmp_path, tok, pre, max_length=64) == _ours(tmp_path, tok, rows, max_length=64)
    labelled = [{"input_ids": ids, "labels": [t if k else -100 for t, k in zip(ids, m)]} for ids, m in
                _ours(tmp_path, tok, rows, max_length=64)]
    assert _ours(tmp_path, tok, labelled) == _ours(tmp_path, tok, rows, max_length=64)


# ---------------------------------------------------------------------------------------------
# Errors name the key
# ---------------------------------------------------------------------------------------------
def test_errors_name_the_key(tmp_path, tiny_model, tiny_tokenizer, sft_dataset, replay_file, earlier):
    def build(**kw):
        return make_trainer(tmp_path, tiny_model, tiny_tokenizer, sft_dataset, replay_file, **_task_kw(earlier, **kw))

    with pytest.raises(GeReConfigError, match="gere_task_replay=.*does not exist"):
        build(gere_task_replay=[str(tmp_path / "missing.jsonl")])
    odd = write_jsonl(tmp_path / "odd.jsonl", [{"question": "a", "answer": "b"}] * 4)
    with pytest.raises(GeReConfigError, match="gere_task_replay: row .* none of the accepted formats.*question"):
        build(gere_task_replay=[str(odd)])
    with pytest.raises(GeReConfigError, match="gere_task_replay holds 10 usable rows but gere_task_replay_per_step=6"):
        build(gere_task_replay_per_step=6, per_device_train_batch_size=8)
    with pytest.raises(GeReConfigError, match="gere_task_replay_per_step=5 is larger than the global batch"):
        build(gere_task_replay_per_step=5)
    with pytest.raises(GeReConfigError, match="gere_task_replay_weight"):
        build(gere_task_replay_weight=1.0)


def test_no_general_replay_and_no_earlier_tasks_is_the_plain_trainer(tmp_path, tiny_model, tiny_tokenizer, sft_dataset):
    cfg = sft_config(tmp_path / "o", **FAST, gere_replay=None, gere_task_replay=None)
    trainer = GeReSFTTrainer(model=tiny_model, args=cfg, train_dataset=sft_dataset, processing_class=tiny_tokenizer)
    assert trainer.gere_step is None


# ---------------------------------------------------------------------------------------------
# The continual runner keeps a sample of every finished task and replays it later
# ---------------------------------------------------------------------------------------------
def test_run_sequence_keeps_and_replays_earlier_tasks(tiny_dir, tiny_tokenizer, replay_file, tmp_path):
    from gere_plugin.continual import METHODS, TrainSettings, run_sequence, tokenized_without_eos

    from .test_continual import TASKS

    assert METHODS["gere_er"].task_replay and METHODS["gere_er"].replay and METHODS["gere_er"].regularizer == "tm"
    assert METHODS["plain_er"].task_replay and not METHODS["plain_er"].replay
    assert METHODS["replay_er"].regularizer == "none"
    settings = TrainSettings(
        max_steps=2, per_device_train_batch_size=4, max_length=48, learning_rate=1e-3, gere_replay_size=24,
        gere_replay_max_length=64, gere_replay_per_step=2, gere_state_batch_size=8, logging_steps=1, eval_batch_size=8,
        gere_task_replay_size=6, gere_task_replay_per_step=2, print_logs=False,
    )
    result = run_sequence(str(tiny_dir), TASKS, "gere_er", tmp_path / "run", settings=settings, replay=replay_file,
                          state_cache=tmp_path / "states", seed=3)
    kept = result["task_replay"]["kept"]
    assert list(kept) == ["sentiment"] and kept["sentiment"]["rows"] == 6 and kept["sentiment"]["of"] == 16
    assert result["task_replay"]["per_task"] == 6
    first, second = result["stages"]
    assert first["task_replay"] is None
    assert second["task_replay"]["rows"] == [6] and second["task_replay"]["per_step"] == 2
    assert second["task_replay"]["weight"] == pytest.approx(2 / (4 + 2))
    # the kept sample is token ids on disk next to the run: exactly the rows task 1 trained on (no EOS here)
    path = Path(kept["sentiment"]["path"])
    assert path.parent == tmp_path / "run" / "task_replay"
    on_disk = [json.loads(line) for line in path.read_text().splitlines()]
    trained = tokenized_without_eos(TASKS[0].train, tiny_tokenizer)
    assert len(on_disk) == 6 and all(row in trained for row in on_disk)
    assert len({json.dumps(r) for r in on_disk}) == 6
    logged = [h for h in second["history"] if "gere/task_replay_rows" in h]
    assert [h["gere/task_replay_rows"] for h in logged] == [2.0, 2.0]
    assert not any("gere/task_replay_rows" in h for h in first["history"])
    assert any("gere/reg_loss" in h for h in second["history"])


def test_sequence_command_plain_er_needs_no_general_replay(tiny_dir, tmp_path, capsys):
    from gere_plugin.sequence_cli import sequence_main

    from .test_continual import TASKS

    paths = []
    for task in TASKS:
        train = write_jsonl(tmp_path / f"{task.name}-train.jsonl", task.train)
        test = write_jsonl(tmp_path / f"{task.name}-test.jsonl", [
            {"prompt": it.prompt, "label_words": list(it.label_words), "gold": it.gold} for it in task.test])
        paths += ["--task", task.name, str(train), str(test)]
    out = tmp_path / "seq"
    code = sequence_main(["--model", str(tiny_dir), "--method", "plain_er", "--out", str(out), *paths,
                          "--max_steps", "2", "--per_device_train_batch_size", "4", "--max_length", "48",
                          "--logging_steps", "1", "--gere_task_replay_size", "4", "--gere_task_replay_per_step", "1",
                          "--gere_task_replay_weight", "0.2"])
    assert code == 0
    result = json.loads((out / "result.json").read_text())
    assert result["method"] == "plain_er" and result["replay"] is None
    assert result["task_replay"]["kept"]["sentiment"]["rows"] == 4
    second = result["stages"][1]
    assert second["task_replay"] == {"sources": [str(out / "task_replay" / "0_sentiment.jsonl")], "rows": [4],
                                     "per_step": 1, "weight": 0.2}
    assert [h["gere/task_replay_rows"] for h in second["history"] if "gere/task_replay_rows" in h] == [1.0, 1.0]
    assert not any("gere/replay_rows" in h for h in second["history"])


# ---------------------------------------------------------------------------------------------
# 2 processes (CPU DDP over gloo) against 1 process with the same micro-batch layout
# ---------------------------------------------------------------------------------------------
DDP_STEPS = 4


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory: Any, tiny_dir: Path, replay_file: Path, sft_dataset: Any, earlier: dict) -> dict:
    from .scripts import runner

    root = tmp_path_factory.mktemp("task-replay-ddp")
    data = write_jsonl(root / "task.jsonl", sft_dataset.to_list())
    common = [
        "--model", str(tiny_dir), "--data", str(data), "--batch", "2", "--max_steps", str(DDP_STEPS),
        "--replay_size", "16", "--sampling", "sequential",
        "--task_replay", *earlier["files"], "--task_size", str(PER_TASK),
    ]  # fmt: skip
    # 1 general + 1 earlier-task row per step on 2 ranks: rank 0 runs both extra forwards, rank 1 none (a
    # DDP-wrapped extra forward on one rank only used to hang: it broadcasts buffers to all ranks)
    general = ["--replay", str(replay_file), "--per_step", "1", "--task_per_step", "1"]
    runs = {
        # rank r of the 2-process run sees what micro-batch r of the 1-process run sees
        "ddp": runner.run([*common, *general, "--accum", "1"], root / "ddp", root / "ddp_{rank}.jsonl", num_processes=2),
        "one": runner.run([*common, *general, "--accum", "2"], root / "one", root / "one_{rank}.jsonl"),
        # earlier tasks only (no general replay), accumulation 2 on each of 2 ranks: 3 rows over 4 micro-batches
        "ddp_task_only": runner.run([*common, "--task_per_step", "3", "--accum", "2"], root / "ddp_t",
                                    root / "ddp_t_{rank}.jsonl", num_processes=2),
    }
    rows = {name: runner.replay_rows(str(root / f"{tag}_{{rank}}.jsonl"), ranks=ranks, field="task_rows")
            for name, tag, ranks in (("ddp", "ddp", 2), ("one", "one", 1), ("ddp_task_only", "ddp_t", 2))}
    general_rows = {tag: runner.replay_rows(str(root / f"{tag}_{{rank}}.jsonl"), ranks=ranks)
                    for tag, ranks in (("ddp", 2), ("one", 1))}
    return {"runs": runs, "task_rows": rows, "general_rows": general_rows}


@pytest.mark.slow
def test_exact_earlier_task_rows_over_two_ranks(ddp_runs: dict) -> None:
    from gere_plugin.mixing import ReplaySchedule

    for name, per_step, accumulation in (("ddp", 1, 1), ("ddp_task_only", 3, 2)):
        rows = ddp_runs["task_rows"][name]
        schedule = ReplaySchedule(2 * PER_TASK, per_step, seed=42, stream=1)  # gere_seed default 42
        assert sorted(rows) == list(range(DDP_STEPS)), name
        for step, parts in rows.items():
            assert sorted(parts) == [(m, r) for m in range(accumulation) for r in (0, 1)], (name, step)
            merged = [x for part in parts.values() for x in part]
            assert sorted(merged) == sorted(schedule.rows_for_step(step)), (name, step)
            assert len(merged) == per_step and len(set(merged)) == per_step, (name, step)
            for (micro, rank), part in parts.items():
                assert part == schedule.rows_for_micro(step, micro, accumulation, rank=rank, world_size=2)
        logs = ddp_runs["runs"][name].step_logs()
        assert [logs[s]["gere/task_replay_rows"] for s in sorted(logs)] == [float(per_step)] * DDP_STEPS, name
    assert not any("gere/replay_rows" in h for h in ddp_runs["runs"]["ddp_task_only"].step_logs().values())


@pytest.mark.slow
def test_two_ranks_match_one_process_with_earlier_tasks(ddp_runs: dict) -> None:
    for rows in (ddp_runs["task_rows"], ddp_runs["general_rows"]):
        ddp_rows, one_rows = rows["ddp"], rows["one"]
        assert sorted(ddp_rows) == list(range(DDP_STEPS))
        for step in ddp_rows:
            assert sum(len(r) for r in ddp_rows[step].values()) == 1  # one row per step, on rank 0 only
            for rank in (0, 1):
                assert ddp_rows[step][(0, rank)] == one_rows[step][(rank, 0)], (step, rank)
    ddp, one = ddp_runs["runs"]["ddp"].step_logs(), ddp_runs["runs"]["one"].step_logs()
    assert sorted(ddp) == sorted(one) == list(range(1, DDP_STEPS + 1))
    for step in ddp:
        for key in ("loss", "grad_norm", "gere/task_replay_ce", "gere/replay_ce"):
            a, b = ddp[step][key], one[step][key]
            assert abs(a - b) <= 1e-5 * max(abs(a), abs(b)), (step, key, a, b)
    assert ddp[DDP_STEPS]["loss"] != ddp[1]["loss"]


def test_axolotl_schema_takes_the_keys() -> None:
    """Axolotl YAML: a single source becomes a list; earlier tasks alone are a valid GeRe config; any other
    gere_* key without gere_replay or gere_task_replay is still an error naming gere_replay."""
    pytest.importorskip("pydantic")
    from gere_plugin.axolotl.args import GeReArgs, check_gere_request, gere_arguments_from_cfg

    parsed = GeReArgs(gere_task_replay="task1.jsonl", gere_task_replay_per_step=2)
    assert parsed.gere_task_replay == ["task1.jsonl"]
    check_gere_request({"gere_task_replay": ["task1.jsonl"]})
    assert gere_arguments_from_cfg({"gere_task_replay": ["task1.jsonl"]}).gere_task_replay == ["task1.jsonl"]
    with pytest.raises(GeReConfigError, match="gere_replay is not set"):
        check_gere_request({"gere_task_replay_size": 5})
    with pytest.raises(Exception, match="gere_task_replay_weight"):
        GeReArgs(gere_task_replay=["a.jsonl"], gere_task_replay_weight=2)
