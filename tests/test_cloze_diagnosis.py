"""benchmarks/cloze_diagnosis.py: the measurement functions against hand computations, and its scorer against the
benchmark's (``continuation_logprobs`` / ``cloze_accuracy`` / ``perplexity``) on the tiny random model."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
cd = pytest.importorskip("cloze_diagnosis")

from gere_plugin.evaluation.general import cloze_accuracy  # noqa: E402
from gere_plugin.evaluation.scoring import continuation_logprobs, next_token_logprobs, perplexity  # noqa: E402
from gere_plugin.evaluation.tasks import MCItem  # noqa: E402


def test_predictions_summed_and_per_character_first_on_ties():
    scores = [[-4.0, -2.0, -3.0], [-1.0, -1.0], [-6.0, -3.0]]
    assert cd.predictions(scores) == [1, 0, 1]  # the tie goes to the first choice, as in cloze_accuracy
    # per character: item 0: -1.0, -1.0, -0.75 -> 2; item 1: -0.5, -1.0 -> 0; item 2: -2.0, -3.0 -> 0
    chars = [[4, 2, 4], [2, 1], [3, 1]]
    assert cd.predictions(scores, chars) == [2, 0, 0]
    assert cd.predictions([[-3.0, -1.0]], [[0, 0]]) == [1]  # 0 characters count as 1
    assert cd.accuracy([2, 0, 0], [2, 1, 0]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="3 predictions for 2"):
        cd.accuracy([0, 1, 2], [0, 1])


def test_calibrated_scores_subtract_the_unconditional_logprob():
    cond = [[-5.0, -2.0], [-3.0, -4.0, -1.0]]
    uncond = [[-8.0, -1.0], [-3.5, -6.0, -0.5]]
    cal = cd.calibrated_scores(cond, uncond)
    assert cal == [[3.0, -1.0], [0.5, 2.0, -0.5]]
    assert cd.predictions(cal) == [0, 1]  # the raw scores would pick [1, 2]
    with pytest.raises(ValueError, match="2 conditional and 1 unconditional"):
        cd.calibrated_scores([[-1.0, -2.0]], [[-1.0]])
    with pytest.raises(ValueError, match="2 conditional items but 1"):
        cd.calibrated_scores(cond, uncond[:1])


def test_flip_counts_by_hand():
    golds = [0, 1, 2, 0, 1]
    base = [0, 1, 0, 1, 0]   # right, right, wrong, wrong, wrong
    new = [1, 1, 2, 2, 0]    # wrong, right, right, wrong (other choice), wrong (same)
    f = cd.flip_counts(base, new, golds)
    assert (f["right_to_wrong"], f["wrong_to_right"], f["net"], f["changed_choice"]) == (1, 1, 0, 3)
    assert f["right_to_wrong_share"] == pytest.approx(0.2) and f["changed_share"] == pytest.approx(0.6)
    assert f["net"] == round((cd.accuracy(new, golds) - cd.accuracy(base, golds)) * len(golds))
    with pytest.raises(ValueError):
        cd.flip_counts([0], [0, 1], [0, 1])


def test_choice_shift_correct_vs_mean_of_wrong():
    base = [[-1.0, -2.0, -3.0], [-4.0, -4.0]]
    new = [[-2.0, -2.0, -1.0], [-4.0, -7.0]]
    golds = [0, 1]
    # item 0: deltas -1, 0, +2 -> correct -1, wrong mean +1, margin -2; item 1: deltas 0, -3 -> correct -3, wrong 0
    r = cd.choice_shift(base, new, golds)
    assert r["correct"] == pytest.approx(-2.0)
    assert r["wrong"] == pytest.approx(0.5)
    assert r["margin"] == pytest.approx(-2.5)
    assert r["all_choices"] == pytest.approx((-1 + 0 + 2 + 0 - 3) / 5)


def test_label_mass_sums_the_group_columns():
    probs = torch.tensor([[0.10, 0.20, 0.05], [0.30, 0.00, 0.15]])
    lp = probs.log()
    r = cd.label_mass(lp, {"a": [0, 1], "b": [2]})
    assert r["a"] == pytest.approx((0.30 + 0.30) / 2)
    assert r["b"] == pytest.approx((0.05 + 0.15) / 2)
    assert r["all"] == pytest.approx((0.35 + 0.45) / 2)
    with pytest.raises(ValueError):
        cd.label_mass(torch.zeros(0, 3), {"a": [0]})


def test_without_label_mass_renormalises_the_first_token():
    cond = [[-2.0, -3.0], [-1.0, -5.0]]
    out = cd.without_label_mass(cond, [0.5, 0.0])
    # p / (1 - 0.5) doubles every choice's probability of item 0; a mass of 0 changes nothing
    assert out[0] == pytest.approx([-2.0 + math.log(2), -3.0 + math.log(2)])
    assert out[1] == [-1.0, -5.0]
    with pytest.raises(ValueError, match="outside"):
        cd.without_label_mass(cond, [1.0, 0.0])


def test_shares_label_word_whole_words_only():
    labels = {"positive", "law", "art"}
    assert cd.shares_label_word(" a positive charge", labels)
    assert cd.shares_label_word(" Newton's first Law", labels)
    assert not cd.shares_label_word(" positively charged", labels)
    assert not cd.shares_label_word(" part of the heart", labels)


def test_relative_l2_and_kl_by_hand():
    base = torch.tensor([[[3.0, 4.0], [1.0, 0.0], [9.0, 9.0]]])
    moved = torch.tensor([[[3.0, 5.0], [1.0, 0.0], [0.0, 0.0]]])
    mask = torch.tensor([[1, 1, 0]])  # the third token is padding
    total, n = cd.relative_l2_sums(moved, base, mask)
    assert n == 2 and total == pytest.approx(1 / 5 + 0.0)
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0]]])  # p = (.5, .5), (.75, .25)
    other = torch.tensor([[[math.log(3.0), 0.0], [math.log(3.0), 0.0]]])  # q = (.75, .25) twice
    kl, m = cd.mean_kl(logits, other, torch.tensor([[1, 1]]))
    want = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)  # KL(p || q) at the first position, 0 after
    assert m == 2 and kl == pytest.approx(want, abs=1e-6)


def test_grouped_and_length_buckets():
    assert cd.grouped([1, 2, 3, 4, 5], [2, 3]) == [[1, 2], [3, 4, 5]]
    assert [cd.length_bucket(k) for k in (1, 2, 3, 4, 9)] == ["1 token", "2-3 tokens", "2-3 tokens", "4+ tokens",
                                                              "4+ tokens"]


MC = [
    MCItem("Question: which one is a river?\nAnswer:", (" the river", " a city", " music"), 0),
    MCItem("Question: what is water?\nAnswer:", (" light", " the ocean water of the world"), 1),
    MCItem("", (" yes", " no"), 0),  # an empty context is scored after BOS/EOS
]


def test_token_logprobs_sum_to_the_benchmark_scorer(tiny_model, tiny_tokenizer):
    pairs = [(it.context, ch) for it in MC for ch in it.choices] + [("Answer:", " the river")]
    label_ids = [int(tiny_tokenizer(w, add_special_tokens=False)["input_ids"][0]) for w in (" the", " a")]
    mine, labels, dist = cd.choice_token_logprobs(tiny_model, tiny_tokenizer, pairs, batch_size=3, label_ids=label_ids)
    ref = continuation_logprobs(tiny_model, tiny_tokenizer, pairs, batch_size=2)
    # the label rows are the next-token log-probs after each context (the benchmark's label scorer's numbers)
    ctx_pairs = [i for i, (c, _) in enumerate(pairs) if c]
    direct = next_token_logprobs(tiny_model, tiny_tokenizer, [pairs[i][0] for i in ctx_pairs], label_ids, batch_size=2)
    assert labels is not None and torch.allclose(labels[ctx_pairs], direct, atol=1e-5)
    assert dist.shape == (len(tiny_tokenizer),) and float(dist.sum()) == pytest.approx(1.0, abs=1e-6)
    assert float(dist[label_ids[0]]) == pytest.approx(float(labels[:, 0].double().exp().mean()), abs=1e-6)
    assert [len(t) for t in mine] == [r.n_tokens for r in ref]
    for t, r in zip(mine, ref):
        assert sum(t) == pytest.approx(r.logprob, abs=1e-4)
    # acc_norm of the benchmark = per-character argmax of these sums
    res = cloze_accuracy(tiny_model, tiny_tokenizer, MC, batch_size=4)
    sizes = [len(it.choices) for it in MC]
    sums = cd.grouped([sum(t) for t in mine[:sum(sizes)]], sizes)
    chars = cd.grouped([len(ch) for _, ch in pairs[:sum(sizes)]], sizes)
    assert cd.predictions(sums, chars) == res["pred_norm"]
    assert cd.predictions(sums) == res["pred"]


def test_text_passes_nll_matches_perplexity_and_self_drift_is_zero(tiny_model, tiny_tokenizer, tiny_dir):
    from transformers import AutoModelForCausalLM

    texts = ["the river and the city were great.", "a story of music and light", "water"]
    twin = AutoModelForCausalLM.from_pretrained(str(tiny_dir), dtype="float32")
    ids = [int(tiny_tokenizer(" river", add_special_tokens=False)["input_ids"][0])]
    r = cd.text_passes(tiny_model, twin, tiny_tokenizer, texts, ids, max_length=32, batch_size=2)
    ref = perplexity(tiny_model, tiny_tokenizer, texts, max_length=32, batch_size=3)
    assert r["nll"] == pytest.approx(ref["nll"], rel=1e-5)
    assert r["tokens"] == int(ref["tokens"])
    assert len(r["layer_rel_l2"]) == tiny_model.config.num_hidden_layers + 1
    assert max(r["layer_rel_l2"]) == pytest.approx(0.0, abs=1e-6) and r["kl_base_model"] == pytest.approx(0.0, abs=1e-6)
    # one label log-prob per real token, equal to a direct forward's
    n_tokens = sum(len(tiny_tokenizer(t, add_special_tokens=False)["input_ids"]) + len(cd.bos_prefix(tiny_tokenizer))
                   for t in texts)
    assert r["label_logprobs"].shape == (n_tokens, 1)
    seq = cd.bos_prefix(tiny_tokenizer) + tiny_tokenizer(texts[2], add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        direct = torch.log_softmax(tiny_model(input_ids=torch.tensor([seq])).logits[0].float(), -1)[:, ids[0]]
    last = r["label_logprobs"][-len(seq):, 0]
    assert torch.allclose(last, direct, atol=1e-5)
    # a moved model drifts: scale one decoder layer's output projection
    with torch.no_grad():
        twin.model.layers[1].mlp.down_proj.weight.mul_(3.0)
    moved = cd.text_passes(tiny_model, twin, tiny_tokenizer, texts, ids, max_length=32, batch_size=2)
    assert moved["layer_rel_l2"][1] == pytest.approx(0.0, abs=1e-6)  # layers before the change do not move
    assert moved["layer_rel_l2"][2] > 1e-3 and moved["kl_base_model"] > 0
    wc = cd.weight_change(tiny_model, twin)
    assert wc["layer 1"] == pytest.approx(0.0) and wc["layer 2"] > 0


def test_top_gains_and_prefixes():
    base = torch.tensor([0.5, 0.3, 0.1, 0.1])
    new = torch.tensor([0.2, 0.3, 0.4, 0.1])
    top = cd.top_gains(new, base, k=2)
    assert top[0] == (2, pytest.approx(0.1), pytest.approx(0.4))  # +0.3 first, then an unchanged token (+0.0)
    assert top[1][0] in (1, 3)
    assert cd.wiki_prefixes(["one two  three four", "short"], chars=12) == ["one two", "short"]
