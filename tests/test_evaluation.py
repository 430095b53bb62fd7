"""Evaluation: continual-learning metrics, perplexity, cloze/label scoring, exact match, report."""

from __future__ import annotations

import json
import math
import struct

import pytest
import torch

from gere_plugin.evaluation import metrics as M
from gere_plugin.evaluation.general import cloze_accuracy
from gere_plugin.evaluation.report import load_runs, markdown_table, summarize_runs, write_report
from gere_plugin.evaluation.scoring import continuation_logprobs, greedy_generate, perplexity
from gere_plugin.evaluation.tasks import (
    ClassificationItem,
    GenerationItem,
    MCItem,
    exact_match_accuracy,
    label_accuracy,
    normalize_answer,
)

# A 3-task accuracy matrix R[i][j] (after training task i, accuracy on task j) and a base row.
R = [
    [0.80, 0.30, 0.20],
    [0.60, 0.90, 0.25],
    [0.50, 0.70, 0.85],
]
BASE = [0.50, 0.40, 0.10]


# --------------------------------------------------------------------------- metrics


def test_average_accuracy_and_ap_hand_computed():
    assert M.average_accuracy(R) == pytest.approx((0.50 + 0.70 + 0.85) / 3)
    assert M.average_performance(R) == pytest.approx(0.68333333)


def test_bwt_hand_computed():
    # ((0.50 - 0.80) + (0.70 - 0.90)) / 2 = -0.25
    assert M.backward_transfer(R) == pytest.approx(-0.25)


def test_fwt_hand_computed():
    # ((R[0][1] - b1) + (R[1][2] - b2)) / 2 = ((0.30 - 0.40) + (0.25 - 0.10)) / 2 = 0.025
    assert M.forward_transfer(R, BASE) == pytest.approx(0.025)


def test_forgetting_measure_uses_best_earlier_score():
    # task 0: max(0.80, 0.60) - 0.50 = 0.30 ; task 1: max(0.90) - 0.70 = 0.20 -> mean 0.25
    assert M.forgetting_measure(R) == pytest.approx(0.25)
    # FM differs from -BWT when a task improved after it was trained and then dropped
    R2 = [[0.5, 0.0], [0.9, 0.8]]
    R3 = [[0.5, 0.0, 0.0], [0.9, 0.8, 0.0], [0.6, 0.8, 0.7]]
    assert M.forgetting_measure(R2) == pytest.approx(-0.4)  # no forgetting: it improved
    assert M.forgetting_measure(R3) == pytest.approx(((0.9 - 0.6) + (0.8 - 0.8)) / 2)
    assert M.backward_transfer(R3) == pytest.approx(((0.6 - 0.5) + (0.8 - 0.8)) / 2)


def test_average_incremental_accuracy_hand_computed():
    expected = (0.80 + (0.60 + 0.90) / 2 + (0.50 + 0.70 + 0.85) / 3) / 3
    assert M.average_incremental_accuracy(R) == pytest.approx(expected)


def test_harmonic_f1():
    assert M.harmonic_f1(0.4, 0.6) == pytest.approx(2 * 0.4 * 0.6 / 1.0)
    assert M.harmonic_f1(0.0, 0.0) == 0.0
    assert M.harmonic_f1(0.5, 0.5) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        M.harmonic_f1(-0.1, 0.5)


def test_metrics_reject_undefined_shapes():
    with pytest.raises(ValueError):
        M.backward_transfer([[0.7]])
    with pytest.raises(ValueError):
        M.forward_transfer(R, [0.1])
    with pytest.raises(ValueError):
        M.average_accuracy([[0.1, 0.2], [0.3]])
    with pytest.raises(ValueError):
        M.average_accuracy([])


def test_continual_summary_and_spread():
    s = M.continual_summary(R, BASE, general=0.5)
    assert s["BWT"] == pytest.approx(-0.25)
    assert s["FWT"] == pytest.approx(0.025)
    assert s["F1"] == pytest.approx(M.harmonic_f1(0.5, s["AP"]))
    single = M.continual_summary([[0.7]])
    assert single["BWT"] is None and single["FWT"] is None and single["F1"] is None
    spread = M.mean_and_spread([1.0, 2.0, 3.0])
    assert spread["mean"] == pytest.approx(2.0) and spread["std"] == pytest.approx(1.0)
    assert M.mean_and_spread([4.0])["std"] == 0.0
    assert M.relative_change(15.0, 10.0) == pytest.approx(0.5)


# --------------------------------------------------------------------------- scoring on a tiny model


def _manual_nll(model, ids: list[int]) -> tuple[float, int]:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
    logp = torch.log_softmax(logits, -1)
    nll = -logp.gather(-1, torch.tensor(ids[1:]).unsqueeze(-1)).sum()
    return float(nll), len(ids) - 1


def _ids(tok, text: str) -> list[int]:
    bos = [tok.bos_token_id] if tok("a")["input_ids"][0] == tok.bos_token_id else []
    return bos + tok(text, add_special_tokens=False)["input_ids"]


TEXTS = [
    "the river was great and the city is lovely.",
    "a film about music.",
    "people of the island first saw the planet in winter because the ocean was light and the forest was "
    "a garden of energy.",
]


def test_perplexity_matches_manual_token_weighted_computation(tiny_model, tiny_tokenizer):
    tiny_model.eval()
    total_nll, total_tok = 0.0, 0
    for text in TEXTS:
        nll, n = _manual_nll(tiny_model, _ids(tiny_tokenizer, text))
        total_nll += nll
        total_tok += n
    expected = math.exp(total_nll / total_tok)
    got_batched = perplexity(tiny_model, tiny_tokenizer, TEXTS, max_length=128, batch_size=3)
    got_single = perplexity(tiny_model, tiny_tokenizer, TEXTS, max_length=128, batch_size=1)
    assert got_batched["tokens"] == total_tok
    assert got_batched["ppl"] == pytest.approx(expected, rel=1e-4)
    assert got_single["ppl"] == pytest.approx(expected, rel=1e-4)


def test_perplexity_truncates_to_max_length(tiny_model, tiny_tokenizer):
    res = perplexity(tiny_model, tiny_tokenizer, TEXTS, max_length=8, batch_size=2)
    assert res["tokens"] == 3 * 7


def test_continuation_logprobs_batched_equal_unbatched(tiny_model, tiny_tokenizer):
    pairs = [("the river was", " great"), ("a film about music and", " the ocean was light"), ("", " people")]
    batched = continuation_logprobs(tiny_model, tiny_tokenizer, pairs, batch_size=3)
    for (ctx, cont), score in zip(pairs, batched):
        ctx_ids = _ids(tiny_tokenizer, ctx) or [tiny_tokenizer.eos_token_id]  # empty: after BOS, else EOS
        cont_ids = tiny_tokenizer(cont, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = tiny_model(input_ids=torch.tensor([ctx_ids + cont_ids])).logits[0].float()
        logp = torch.log_softmax(logits, -1)
        manual = sum(float(logp[len(ctx_ids) - 1 + t, c]) for t, c in enumerate(cont_ids))
        assert score.logprob == pytest.approx(manual, abs=1e-4)
        assert score.n_tokens == len(cont_ids)
        assert score.n_chars == len(cont)


@pytest.fixture
def uniform_model(tiny_model):
    """The tiny model with a zero output head: every next-token distribution is uniform."""
    with torch.no_grad():
        tiny_model.lm_head.weight.zero_()
    return tiny_model


def test_cloze_prefers_higher_length_normalised_loglik(uniform_model, tiny_tokenizer):
    # Under a uniform model, log p(choice) = -n_tokens * log(V): the raw score favours the choice with
    # fewer tokens, the per-character score favours the one with more characters per token.
    V = uniform_model.config.vocab_size
    long_choice, short_choice = " positive", " x y"
    n_long = len(tiny_tokenizer(long_choice, add_special_tokens=False)["input_ids"])
    n_short = len(tiny_tokenizer(short_choice, add_special_tokens=False)["input_ids"])
    raw = [-n_long * math.log(V), -n_short * math.log(V)]
    norm = [raw[0] / len(long_choice), raw[1] / len(short_choice)]
    assert norm[0] > norm[1]  # the constructed example is informative
    item = MCItem("Review: the film was", (long_choice, short_choice), gold=0)
    res = cloze_accuracy(uniform_model, tiny_tokenizer, [item])
    assert res["pred_norm"] == [0]
    assert res["acc_norm"] == 1.0
    expected_raw = max(range(2), key=lambda c: raw[c])
    assert res["pred"] == [expected_raw]
    scores = continuation_logprobs(uniform_model, tiny_tokenizer, [(item.context, c) for c in item.choices])
    assert [s.logprob for s in scores] == pytest.approx(raw, abs=1e-4)


def test_label_accuracy_counts_argmax_label(uniform_model, tiny_tokenizer):
    labels = (" positive", " negative and bad")
    n_tok = [len(tiny_tokenizer(w, add_special_tokens=False)["input_ids"]) for w in labels]
    assert n_tok[0] < n_tok[1]
    # uniform model: the label with fewer tokens always wins (summed log-prob)
    items = [ClassificationItem(f"Review: text {i} Sentiment:", labels, gold=i % 3 == 0) for i in range(6)]
    res = label_accuracy(uniform_model, tiny_tokenizer, items)
    assert res["predictions"] == [0] * 6
    assert res["accuracy"] == pytest.approx(sum(1 for it in items if it.gold == 0) / 6)


def test_item_validation():
    with pytest.raises(ValueError):
        MCItem("q", (" a",), 0)
    with pytest.raises(ValueError):
        MCItem("q", (" a", " b"), 2)
    with pytest.raises(ValueError):
        ClassificationItem("q", (" a", " a"), 0)
    assert ClassificationItem("q", (" a", " b"), 1).as_prompt_completion() == {"prompt": "q", "completion": " b"}


def test_normalize_answer():
    assert normalize_answer("  The Eiffel tower.\nmore") == "eiffel tower"
    assert normalize_answer("An apple!") == "apple"


def _manual_greedy(model, tok, prompt: str, n: int) -> str:
    ids = _ids(tok, prompt)
    new: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
            new.append(nxt)
            if nxt == tok.eos_token_id:
                break
    return tok.decode(new, skip_special_tokens=True)


def test_greedy_generate_with_left_padding_matches_unbatched(tiny_model, tiny_tokenizer):
    tiny_model.eval()
    prompts = ["the river", "a film about music and the city was"]
    outs = greedy_generate(tiny_model, tiny_tokenizer, prompts, max_new_tokens=4, batch_size=2)
    manual = [_manual_greedy(tiny_model, tiny_tokenizer, p, 4) for p in prompts]
    assert outs == manual
    items = [GenerationItem(p, (m,)) for p, m in zip(prompts, manual)]
    assert exact_match_accuracy(tiny_model, tiny_tokenizer, items, max_new_tokens=4)["accuracy"] == 1.0
    wrong = [GenerationItem(p, ("zzz not this",)) for p in prompts]
    assert exact_match_accuracy(tiny_model, tiny_tokenizer, wrong, max_new_tokens=4)["accuracy"] == 0.0


# --------------------------------------------------------------------------- report


def _fake_run(method: str, seed: int, final_ppl: float, final_row: list[float]) -> dict:
    general_base = {"ppl": {"wiki": 20.0}, "cloze": {"arc_easy": 0.5}, "general_score": 0.5}
    general_final = {"ppl": {"wiki": final_ppl}, "cloze": {"arc_easy": 0.45}, "general_score": 0.45}
    return {
        "method": method,
        "seed": seed,
        "tasks": ["t1", "t2"],
        "matrix": [[0.9, 0.3], final_row],
        "base_row": [0.5, 0.4],
        "base": {"tasks": {"t1": 0.5, "t2": 0.4}, "general": general_base},
        "final": {"tasks": {"t1": final_row[0], "t2": final_row[1]}, "general": general_final},
    }


def test_report_writes_table_and_png(tmp_path):
    runs = [
        _fake_run("plain", 1, 30.0, [0.6, 0.9]),
        _fake_run("plain", 2, 32.0, [0.5, 0.9]),
        _fake_run("gere", 1, 21.0, [0.8, 0.88]),
    ]
    (tmp_path / "a.json").write_text(json.dumps({"runs": runs[:2]}))
    (tmp_path / "b.json").write_text(json.dumps(runs[2]))
    loaded = load_runs([tmp_path / "a.json", tmp_path / "b.json"])
    assert [r["method"] for r in loaded] == ["plain", "plain", "gere"]
    summary = summarize_runs(loaded)
    # plain: ppl rise (30/20 - 1, 32/20 - 1) = (0.5, 0.6); BWT = (0.6-0.9, 0.5-0.9) = (-0.3, -0.4)
    assert summary["plain"]["metrics"]["ppl_rise"]["mean"] == pytest.approx(0.55)
    assert summary["plain"]["metrics"]["BWT"]["mean"] == pytest.approx(-0.35)
    assert summary["gere"]["metrics"]["ppl_rise"]["mean"] == pytest.approx(0.05)
    # plasticity = accuracy on each task right after training it: (R[0][0] + R[1][1]) / 2
    assert summary["plain"]["metrics"]["plasticity"]["mean"] == pytest.approx(0.9)
    assert summary["gere"]["metrics"]["plasticity"]["mean"] == pytest.approx((0.9 + 0.88) / 2)
    assert summary["gere"]["metrics"]["plasticity/t2"]["mean"] == pytest.approx(0.88)
    assert summary["plain"]["metrics"]["general_change"]["mean"] == pytest.approx(-0.05)
    table = markdown_table(summary)
    assert "| plasticity | t1 after training it | t2 after training it | BWT |" in table
    lines = table.strip().splitlines()
    assert lines[0].startswith("| method") and len(lines) == 2 + 3  # header, rule, base + 2 methods
    assert any(line.startswith("| plain | 2 |") for line in lines)
    md, png = tmp_path / "out.md", tmp_path / "out.png"
    text = write_report([tmp_path / "a.json", tmp_path / "b.json"], md, png)
    assert md.read_text() == text
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert width > 500 and height > 300


def test_report_cost_columns_are_hand_computed_per_step_time_and_largest_added_memory():
    """s/step = all train seconds / all steps of the sequence; memory = the largest stage's addition."""
    runs = []
    for seed, (secs, added) in enumerate([((4.0, 8.0), (100.0, 300.0)), ((6.0, 6.0), (200.0, 100.0))], 1):
        run = _fake_run("ewc", seed, 22.0, [0.7, 0.9])
        run["stages"] = [{"steps": 4, "train_seconds": s, "memory": {"kind": "cpu_rss", "added_mb": m}}
                         for s, m in zip(secs, added)]
        runs.append(run)
    runs.append(_fake_run("plain", 1, 30.0, [0.6, 0.9]))  # an older file: no cost recorded
    summary = summarize_runs(runs)
    assert summary["ewc"]["metrics"]["step_seconds"]["mean"] == pytest.approx((12 / 8 + 12 / 8) / 2)
    assert summary["ewc"]["metrics"]["memory_added_mb"]["mean"] == pytest.approx((300 + 200) / 2)
    assert "step_seconds" not in summary["plain"]["metrics"]
    table = markdown_table(summary)
    assert table.splitlines()[0].endswith("| s/step | added memory MiB |")
    assert any(line.startswith("| ewc | 2 |") and line.endswith("| 1.50 ± 0.00 | 250 ± 71 |") for line in table.splitlines())
    assert any(line.startswith("| plain |") and line.endswith("| - | - |") for line in table.splitlines())
    # without any cost recorded the table keeps its former columns
    assert "s/step" not in markdown_table(summarize_runs(runs[2:]))


def test_summary_refuses_runs_of_different_base_models():
    """One table has one base row: runs measured against another base (general values or task accuracies) are
    refused by name, not summarized against the first run's base."""
    same = [_fake_run("plain", 1, 30.0, [0.6, 0.9]), _fake_run("gere", 1, 21.0, [0.8, 0.9])]
    assert summarize_runs(same)["base"]["metrics"]["ppl"]["mean"] == pytest.approx(20.0)
    other_machine = _fake_run("gere", 2, 21.0, [0.8, 0.9])
    other_machine["base"]["general"]["ppl"]["wiki"] = 20.0 * (1 + 1e-7)  # another machine's last bits: the same base
    assert summarize_runs(same + [other_machine])["base"]["metrics"]["ppl"]["mean"] == pytest.approx(20.0)
    other_ppl = _fake_run("gere", 2, 21.0, [0.8, 0.9])
    other_ppl["base"]["general"]["ppl"]["wiki"] = 25.0
    with pytest.raises(ValueError, match=r"run 'gere' seed 2 was evaluated against another base model"):
        summarize_runs(same + [other_ppl])
    other_row = _fake_run("l2", 3, 21.0, [0.8, 0.9])
    other_row["base_row"] = [0.55, 0.4]
    with pytest.raises(ValueError, match=r"run 'l2' seed 3"):
        summarize_runs(same + [other_row])


def test_peak_memory_sees_an_allocation_made_inside_it():
    from gere_plugin.continual import PeakMemory

    if torch.cuda.is_available() or PeakMemory._rss_mb() is None:
        pytest.skip("the CPU RSS sampler needs /proc and no CUDA")
    import time

    with PeakMemory(interval=0.005) as mem:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        time.sleep(0.1)
        del block
    rec = mem.record()
    assert rec["kind"] == "cpu_rss" and rec["added_mb"] >= 48, rec


def test_report_rejects_files_without_runs(tmp_path):
    (tmp_path / "bad.json").write_text(json.dumps({"something": 1}))
    with pytest.raises(ValueError):
        load_runs([tmp_path / "bad.json"])


def test_label_accuracy_single_token_fast_path_equals_pair_scoring(tiny_model, tiny_tokenizer):
    # label words that the tiny BPE tokenizer encodes as exactly one token
    decoded = (tiny_tokenizer.decode([i]) for i in range(len(tiny_tokenizer)))
    singles = [w for w in decoded if w.strip() and len(tiny_tokenizer(w, add_special_tokens=False)["input_ids"]) == 1]
    labels = tuple(dict.fromkeys(singles))[-2:]
    assert len(labels) == 2
    items = [ClassificationItem(p, labels, g) for p, g in [("the river was", 0), ("a film about music and", 1),
                                                           ("people of the island", 1)]]
    fast = label_accuracy(tiny_model, tiny_tokenizer, items, fast=True)
    slow = label_accuracy(tiny_model, tiny_tokenizer, items, fast=False)
    assert fast["predictions"] == slow["predictions"]
    assert fast["scores"] == [pytest.approx(s, abs=1e-4) for s in slow["scores"]]


def test_evaluate_cli_writes_perplexity_json(tiny_dir, tmp_path, capsys):
    from gere_plugin.evaluation.cli import evaluate_main

    texts = tmp_path / "held.txt"
    texts.write_text("\n".join(TEXTS) + "\n")
    out = tmp_path / "eval.json"
    assert evaluate_main(["--model", str(tiny_dir), "--ppl", str(texts), "--max-length", "128", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["general"]["n"]["ppl/held"] == 3
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir), dtype=torch.float32)
    expected = perplexity(model, AutoTokenizer.from_pretrained(str(tiny_dir)), TEXTS, max_length=128)["ppl"]
    assert doc["general"]["ppl"]["held"] == pytest.approx(expected, rel=1e-5)
    assert json.loads(capsys.readouterr().out)["general"]["ppl"]["held"] == doc["general"]["ppl"]["held"]
