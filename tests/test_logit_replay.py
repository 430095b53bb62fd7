"""Logit replay of earlier tasks (``gere_task_replay_logit_weight``): the snapshot and its KL against a naive
full-softmax reference, the term in a real trainer against an independent computation, the KL at 0 on the
snapshot's own model, the checks, and the sequence runner's ``der`` preset.

The naive references use only torch's softmax and Python loops over positions and tokens; the hand loss of
a trainer step uses only the tokenizer and the two models (the snapshot's and the trained one).
"""

from __future__ import annotations

import copy
import json
import logging
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from gere_plugin import GeReSFTTrainer
from gere_plugin.config import GeReArguments, GeReConfigError
from gere_plugin.data.task_rows import Tokenization
from gere_plugin.methods.logit_replay import (
    LogitSnapshot,
    position_ce_kl,
    snapshot_path,
    topk_snapshot,
    write_logit_snapshot,
)
from gere_plugin.monitor.kl import topk_kl

from .conftest import sft_config, write_jsonl
from .test_sft_trainer import FAST, _batches, _ce, _perturb
from .test_task_replay import PER_TASK, _earlier_rows


# ---------------------------------------------------------------------------------------------
# The math, against a naive full softmax
# ---------------------------------------------------------------------------------------------
def _naive_coarse_kl(p: list[float], q: list[float], k: int) -> float:
    """KL(p || q) over p's k most likely tokens plus one bucket for the rest (k = len(p): the full KL)."""
    top = sorted(range(len(p)), key=lambda j: -p[j])[:k]
    kl = sum(p[j] * math.log(p[j] / q[j]) for j in top)
    p_rest = sum(p[j] for j in range(len(p)) if j not in top)
    q_rest = sum(q[j] for j in range(len(q)) if j not in top)
    return kl + (p_rest * math.log(p_rest / q_rest) if p_rest > 0 else 0.0)


@pytest.mark.parametrize("k", [11, 4, 1])
def test_snapshot_kl_matches_naive_softmax(k: int) -> None:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(2, 6, 11, generator=g, dtype=torch.float64) * 2
    model = base + 0.7 * torch.randn(2, 6, 11, generator=g, dtype=torch.float64)
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 0, 1, 1, 1]])  # targets; position t - 1 predicts t
    ids = torch.randint(0, 11, (2, 6), generator=g)
    values, indices, rest = topk_snapshot(base.float(), mask, k)
    positions = [(b, t - 1) for b in range(2) for t in range(1, 6) if mask[b, t]]
    assert values.shape == (len(positions), k) and indices.dtype == torch.int32 and rest.shape == (len(positions),)
    keep = mask[:, 1:].bool()
    targets = ids[:, 1:][keep]
    per = position_ce_kl(model[:, :-1][keep].float(), targets, values, indices, rest,
                         torch.tensor([n != 2 for n in range(len(positions))]))
    for n, (b, t) in enumerate(positions):
        p = torch.softmax(base[b, t], -1).tolist()
        q = torch.softmax(model[b, t], -1).tolist()
        assert float(per[n, 0]) == pytest.approx(-math.log(q[int(targets[n])]), rel=1e-5)
        expected = 0.0 if n == 2 else _naive_coarse_kl(p, q, k)  # position 2: "no snapshot"
        assert float(per[n, 1]) == pytest.approx(expected, rel=1e-4, abs=1e-6)
        full = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
        assert 0 <= float(per[n, 1]) <= full + 1e-6  # the documented approximation: never above the full KL
    same = position_ce_kl(base[:, :-1][keep].float(), targets, values, indices, rest, torch.ones(len(positions), dtype=torch.bool))
    assert float(same[:, 1].abs().max()) < 1e-6


def test_the_term_reuses_the_monitors_kl() -> None:
    """position_ce_kl's KL is the monitor's topk_kl (one home for the math)."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 9, generator=g)
    base = torch.randn(1, 6, 9, generator=g)
    v, i, r = topk_snapshot(base, torch.ones(1, 6, dtype=torch.long), 3)
    logp = torch.log_softmax(logits, -1)
    from gere_plugin.monitor.kl import rest_logmass

    ref = topk_kl(v, logp.gather(-1, i.long()), r, rest_logmass(logp, i))
    got = position_ce_kl(logits, torch.zeros(5, dtype=torch.long), v, i, r, torch.ones(5, dtype=torch.bool))[:, 1]
    assert torch.allclose(got.double(), ref, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# The term in a trainer
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def files(tmp_path: Path) -> list[str]:
    rows = [_earlier_rows(11, "Topic"), _earlier_rows(12, "Question")]
    return [str(write_jsonl(tmp_path / f"task{i}.jsonl", r)) for i, r in enumerate(rows)]


def _config(tmp_path: Path, files: list[str], **kw: Any) -> Any:
    out = dict(FAST, gere_replay=None, gere_task_replay=files, gere_task_replay_size=PER_TASK,
               gere_task_replay_per_step=3, gere_task_replay_logit_weight=0.5)
    out.update(kw)
    return sft_config(tmp_path / "out", **out)


def _snapshot(model: torch.nn.Module, tok: Any, cfg: Any, source: str, k: int) -> Path:
    return write_logit_snapshot(model, source, tok, Tokenization.of_trainer_args(cfg), k, tok.pad_token_id, batch_size=3)


def _hand_row(model: torch.nn.Module, base: torch.nn.Module, tok: Any, row: dict[str, str], k: int,
              with_kl: bool) -> tuple[float, float, int]:
    """CE sum, coarse-KL sum (base's top-k) and count over one prompt/completion row's completion tokens + EOS."""
    ids = tok(row["prompt"] + row["completion"] + tok.eos_token)["input_ids"]
    n_prompt = len(tok(row["prompt"])["input_ids"])
    x = torch.tensor([ids])
    q = torch.softmax(model(x).logits[0].double(), -1)
    p = torch.softmax(base(x).logits[0].double(), -1)
    ce = kl = 0.0
    for t in range(n_prompt, len(ids)):
        ce -= math.log(float(q[t - 1, ids[t]]))
        if with_kl:
            kl += _naive_coarse_kl(p[t - 1].tolist(), q[t - 1].tolist(), k)
    return ce, kl, len(ids) - n_prompt


@pytest.mark.parametrize(("chunk", "accumulation", "general"), [
    ("0", 1, False), ("2", 1, False), ("", 1, False), ("0", 2, False), ("2", 2, False), ("", 2, True), ("", 1, True),
], ids=["full-logits", "chunks-of-2", "default-chunk", "full-logits-acc2", "chunks-of-2-acc2", "replay-acc2", "replay"])
def test_loss_equals_independent_computation(tmp_path, tiny_dir, tiny_tokenizer, sft_dataset, files, replay_file, chunk,
                                             accumulation, general, monkeypatch, caplog):
    from transformers import AutoModelForCausalLM

    if chunk:
        monkeypatch.setenv("GERE_LOGITS_CHUNK", chunk)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir), dtype="float32")
    base = copy.deepcopy(model).eval()
    beta, k = 0.5, 4
    cfg = _config(tmp_path, files, gradient_accumulation_steps=accumulation, per_device_train_batch_size=4 // accumulation,
                  gere_task_replay_topk=k, gere_replay=str(replay_file) if general else None, gere_regularizer="none")
    _snapshot(base, tiny_tokenizer, cfg, files[0], 8)  # stored top-8, compared on its top-4; task 1 has none
    with caplog.at_level(logging.WARNING):
        trainer = GeReSFTTrainer(model=model, args=cfg, train_dataset=sft_dataset, processing_class=tiny_tokenizer)
    assert any("task1.jsonl has no logit snapshot" in r.getMessage() for r in caplog.records)
    term = trainer.gere_step.earlier
    assert term.logits is not None and term.logits.covered == PER_TASK and term.logits.k == k
    _perturb(model)
    model.train()
    batches = _batches(trainer, accumulation)
    num_items = sum((b["labels"][:, 1:] != -100).sum() for b in batches)
    trainer.current_gradient_accumulation_steps = accumulation
    trainer.state.global_step = 0
    got = sum(trainer.compute_loss(model, dict(b), num_items_in_batch=num_items) for b in batches)

    rows = [r for i in (11, 12) for r in _earlier_rows(i, "Topic" if i == 11 else "Question")]
    rho = term.replay.weight
    with torch.no_grad():
        ce_task = sum(_ce(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"])[0]
                      for b in batches) / num_items
        parts = [_hand_row(model, base, tiny_tokenizer, rows[i], k, with_kl=i < PER_TASK)
                 for i in term.replay.schedule.rows_for_step(0)]
        if general:  # vanilla general replay: SFT's mean(task term, replay CE)
            replay = trainer.gere_step.replay
            sums = [_ce(model(torch.tensor([replay.input_ids[i]])).logits, torch.tensor([replay.input_ids[i]]))
                    for i in trainer.gere_step.schedule.rows_for_step(0)]
            ce_replay = float(sum(s for s, _ in sums) / sum(n for _, n in sums))
    ce_sum, kl_sum, count = (sum(x) for x in zip(*parts))
    assert kl_sum > 1e-4  # the perturbation moved the model away from its snapshot
    expected = (1 - rho) * float(ce_task) + rho * (ce_sum + beta * kl_sum) / count
    if general:
        expected = 0.5 * (expected + ce_replay)
    assert float(got) == pytest.approx(expected, rel=2e-4)
    logged = trainer._metrics["train"]["gere/task_replay_kl"]
    assert len(logged) == 1 and logged[0] > 0
    if accumulation == 1:
        covered = sum(c for (_, _, c), i in zip(parts, term.replay.schedule.rows_for_step(0)) if i < PER_TASK)
        assert logged[0] == pytest.approx(kl_sum / covered, rel=2e-4)


def test_kl_is_zero_on_the_snapshot_model_then_grows(tmp_path, tiny_dir, tiny_tokenizer, sft_dataset, files):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir), dtype="float32")
    # k above the vocabulary (300): the whole distribution is kept, the KL is exact
    cfg = _config(tmp_path, files, max_steps=4, learning_rate=5e-3, gere_task_replay_per_step=2,
                  gere_task_replay_logit_weight=1.0, gere_task_replay_topk=1000)
    for f in files:
        assert LogitSnapshot.load(_snapshot(model, tiny_tokenizer, cfg, f, 1000)).k == len(tiny_tokenizer)
    trainer = GeReSFTTrainer(model=model, args=cfg, train_dataset=sft_dataset, processing_class=tiny_tokenizer)
    trainer.train()
    kl = [h["gere/task_replay_kl"] for h in trainer.state.log_history if "gere/task_replay_kl" in h]
    assert len(kl) == 4
    assert abs(kl[0]) < 1e-6  # step 0 runs on the model the snapshot was taken from
    assert kl[-1] > 1e-4 and kl[-1] > 100 * abs(kl[0])


def test_a_resume_sees_another_snapshot(tmp_path, tiny_dir, tiny_tokenizer, sft_dataset, files):
    """What a checkpoint records (and a resume must match) changes with the snapshot's model, not only its rows."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir), dtype="float32")
    cfg = _config(tmp_path, files)

    def recorded() -> dict[str, Any]:
        trainer = GeReSFTTrainer(model=model, args=cfg, train_dataset=sft_dataset, processing_class=tiny_tokenizer)
        return trainer.gere_step.state_dict()["task_replay"]["logit_replay"]

    first = _snapshot(model, tiny_tokenizer, cfg, files[0], 32)
    rows_fp = LogitSnapshot.load(first).fingerprint
    before = recorded()
    assert before["weight"] == 0.5 and before["topk"] == 32 and list(before["snapshots"]) == [files[0]]
    _perturb(model)
    _snapshot(model, tiny_tokenizer, cfg, files[0], 32)
    assert LogitSnapshot.load(first).fingerprint == rows_fp  # the same rows ...
    assert recorded()["snapshots"] != before["snapshots"]  # ... another model's logits


def test_checks_name_the_keys(tmp_path, tiny_dir, tiny_tokenizer, sft_dataset, files):
    from transformers import AutoModelForCausalLM

    with pytest.raises(GeReConfigError, match="gere_task_replay_logit_weight=-0.1 must be a number >= 0"):
        GeReArguments(gere_task_replay_logit_weight=-0.1)
    with pytest.raises(GeReConfigError, match="gere_task_replay_logit_weight='x'"):
        GeReArguments(gere_task_replay_logit_weight="x")
    with pytest.raises(GeReConfigError, match="gere_task_replay_topk=0 is out of range"):
        GeReArguments(gere_task_replay_topk=0)
    with pytest.raises(GeReConfigError, match="gere_task_replay_logit_weight is set but gere_task_replay is not"):
        sft_config(tmp_path / "o", gere_task_replay_logit_weight=0.5)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir), dtype="float32")
    cfg = _config(tmp_path, files, gere_task_replay_topk=16)
    _snapshot(model, tiny_tokenizer, cfg, files[0], 8)
    with pytest.raises(GeReConfigError, match=r"keeps the top 8 tokens but gere_task_replay_topk=16"):
        GeReSFTTrainer(model=model, args=cfg, train_dataset=sft_dataset, processing_class=tiny_tokenizer)
    # a snapshot of other rows is refused by name
    rows = [json.loads(line) for line in Path(files[0]).read_text().splitlines()]
    rows[2]["completion"] = " something else"
    write_jsonl(Path(files[0]), rows)
    with pytest.raises(GeReConfigError, match=r"task0.topk.safetensors does not hold row 2 of .*task0.jsonl"):
        GeReSFTTrainer(model=model, args=_config(tmp_path, files, gere_task_replay_topk=8), train_dataset=sft_dataset,
                       processing_class=tiny_tokenizer)
    snapshot_path(files[0]).write_bytes(b"not a snapshot")
    with pytest.raises(GeReConfigError, match="the logit snapshot .*task0.topk.safetensors cannot be read"):
        LogitSnapshot.load(snapshot_path(files[0]))


# ---------------------------------------------------------------------------------------------
# The sequence runner
# ---------------------------------------------------------------------------------------------
def test_run_sequence_der_writes_snapshots_and_replays_them(tiny_dir, tiny_tokenizer, replay_file, tmp_path):
    from gere_plugin.continual import METHODS, TrainSettings, run_sequence
    from gere_plugin.continual.presets import DER_LOGIT_WEIGHT

    from .test_continual import TASKS

    spec = METHODS["der"]
    assert spec.task_replay and spec.replay and dict(spec.gere)["gere_task_replay_logit_weight"] == DER_LOGIT_WEIGHT
    settings = TrainSettings(
        max_steps=3, warmup_ratio=0.0, per_device_train_batch_size=4, max_length=48, learning_rate=1e-2, gere_replay_size=24,
        gere_replay_max_length=64, gere_replay_per_step=2, gere_state_batch_size=8, logging_steps=1, eval_batch_size=8,
        gere_task_replay_size=6, gere_task_replay_per_step=2, print_logs=False, general_every_task=False,
    )
    result = run_sequence(str(tiny_dir), TASKS, "der", tmp_path / "run", settings=settings, replay=replay_file,
                          state_cache=tmp_path / "states", seed=3)
    kept = result["task_replay"]["kept"]["sentiment"]
    snap = LogitSnapshot.load(kept["logit_snapshot"]["path"])
    assert snap.records.tolist() == list(range(6)) and snap.k == 32
    first, second = result["stages"]
    assert second["task_replay"]["logit_replay"]["snapshots"] == {kept["path"]: snap.content_hash}
    assert kept["logit_snapshot"]["content_hash"] == snap.content_hash
    kl = [h["gere/task_replay_kl"] for h in second["history"] if "gere/task_replay_kl" in h]
    assert len(kl) == 3 and abs(kl[0]) < 1e-6 and kl[-1] > 1e-4  # step 0: the model the snapshot was taken from
    assert not any("gere/task_replay_kl" in h for h in first["history"])


def test_der_trains_the_first_task_as_gere_er() -> None:
    """No earlier task, no logits to replay: the first task's keys (and the benchmark's shared learning-rate
    selection) are gere_er's and gere's."""
    from gere_plugin.continual import METHODS, TrainSettings
    from gere_plugin.continual.runner import check_sequence, stage_gere_keys

    from .test_continual import TASKS

    settings = TrainSettings(gere_task_replay_logit_weight=2.0)
    assert METHODS["der"].gere_kwargs(0) == METHODS["gere"].gere_kwargs(0) == METHODS["gere_er"].gere_kwargs(0)
    first = stage_gere_keys(METHODS["der"], 0, settings, "r.jsonl", None, 1)
    assert "gere_task_replay_logit_weight" not in first
    later = stage_gere_keys(METHODS["der"], 1, settings, "r.jsonl", None, 1, task_replay=[Path("0_a.jsonl")])
    assert later["gere_task_replay_logit_weight"] == 2.0 and later["gere_task_replay"] == ["0_a.jsonl"]
    with pytest.raises(GeReConfigError, match="gere_task_replay_logit_weight sets the strength of methods with "
                                              "logit_replay \\(der, der_paper, der_paper_beta1, der_paper_rho25, der_paper_wise, "
                                              "der_paper_wise_tuned\\); "
                                              "method 'gere_er' does not use it"):
        check_sequence(TASKS, METHODS["gere_er"], settings)


def test_the_stronger_der_paper_variants_differ_only_from_the_second_task_on() -> None:
    """der_paper_rho25 / der_paper_beta1 train the first task exactly as der_paper (so they share its learning-rate
    selection) and change one earlier-task strength from the second task on: the share rho, or the logit beta."""
    from gere_plugin.continual import METHODS, TrainSettings
    from gere_plugin.continual.presets import DER_LOGIT_WEIGHT, DER_STRONG_LOGIT_WEIGHT, DER_STRONG_SHARE
    from gere_plugin.continual.runner import stage_gere_keys

    settings = TrainSettings()
    base = METHODS["der_paper"]
    for name in ("der_paper_rho25", "der_paper_beta1"):
        assert METHODS[name].gere_kwargs(0) == base.gere_kwargs(0)
        assert stage_gere_keys(METHODS[name], 0, settings, "r.jsonl", None, 1) == \
            stage_gere_keys(base, 0, settings, "r.jsonl", None, 1)
    kept = [Path("0_a.jsonl")]
    ref = stage_gere_keys(base, 1, settings, "r.jsonl", None, 1, task_replay=kept)
    rho = stage_gere_keys(METHODS["der_paper_rho25"], 1, settings, "r.jsonl", None, 1, task_replay=kept)
    beta = stage_gere_keys(METHODS["der_paper_beta1"], 1, settings, "r.jsonl", None, 1, task_replay=kept)
    assert ref["gere_task_replay_weight"] is None and ref["gere_task_replay_logit_weight"] == DER_LOGIT_WEIGHT
    assert {k for k in rho if rho[k] != ref.get(k)} == {"gere_task_replay_weight"}
    assert rho["gere_task_replay_weight"] == DER_STRONG_SHARE
    assert {k for k in beta if beta[k] != ref.get(k)} == {"gere_task_replay_logit_weight"}
    assert beta["gere_task_replay_logit_weight"] == DER_STRONG_LOGIT_WEIGHT


def test_der_paper_wise_is_der_paper_with_a_fixed_wise_alpha() -> None:
    from gere_plugin.continual import METHODS, TrainSettings
    from gere_plugin.continual.presets import DER_WISE_ALPHA
    from gere_plugin.continual.runner import stage_gere_keys

    spec, base = METHODS["der_paper_wise"], METHODS["der_paper"]
    assert "wise" in spec.uses and spec.logit_replay and 0 < DER_WISE_ALPHA < 1
    kept = [Path("0_a.jsonl")]
    for k, rows in ((0, ()), (1, kept)):
        keys = stage_gere_keys(spec, k, TrainSettings(), "r.jsonl", None, 1, task_replay=rows)
        ref = stage_gere_keys(base, k, TrainSettings(), "r.jsonl", None, 1, task_replay=rows)
        assert keys.pop("gere_wise_alpha") == DER_WISE_ALPHA and keys == ref  # every task interpolates, the first too
