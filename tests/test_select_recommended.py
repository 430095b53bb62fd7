"""benchmarks/select_recommended.py: the dev-only rule that picks the recommended preset, on hand-made numbers."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
select = pytest.importorskip("select_recommended")


PAIR = ["der", "der_paper"]  # the hand-made examples weigh the first two candidates


def dev(plasticity, ap, arc, wiki=-1.0, sciq=-1.0, bwt=-10.0):
    return {"plasticity": plasticity, "AP": ap, "BWT": bwt, "arc_easy": arc,
            "ppl_rise/wiki": wiki, "ppl_rise/sciq_support": sciq}


def test_highest_score_among_admissible_wins():
    pick = select.apply_rule({"plain": dev(90, 60, 30, 20, 25),
                              "der": dev(89.5, 75, 36),           # score 111, admissible
                              "der_paper": dev(88.0, 80, 40)}, PAIR)    # score 120, but plasticity < 90 - 1
    assert pick["chosen"] == "der" and pick["admissible"] is True
    assert pick["candidates"]["der_paper"]["plasticity_ok"] is False
    assert pick["candidates"]["der"]["score"] == pytest.approx(111)


def test_perplexity_rise_makes_a_candidate_inadmissible():
    pick = select.apply_rule({"plain": dev(90, 60, 30), "der": dev(90, 80, 40, sciq=0.5), "der_paper": dev(90, 70, 35)}, PAIR)
    assert pick["chosen"] == "der_paper"
    assert pick["candidates"]["der"] == {"admissible": False, "plasticity_ok": True, "ppl_ok": False, "score": 120}


def test_no_admissible_candidate_falls_back_to_the_score_and_says_so():
    pick = select.apply_rule({"plain": dev(95, 60, 30), "der": dev(90, 70, 35), "der_paper": dev(90, 80, 35)}, PAIR)
    assert pick["chosen"] == "der_paper" and pick["admissible"] is False


def test_ties_go_to_the_cheaper_candidate_and_the_reference_is_required():
    pick = select.apply_rule({"plain": dev(90, 60, 30), "der": dev(90, 70, 35), "der_paper": dev(90, 70, 35)}, PAIR)
    assert pick["chosen"] == PAIR[0]
    with pytest.raises(ValueError, match="reference"):
        select.apply_rule({"der": dev(90, 70, 35), "der_paper": dev(90, 70, 35)}, PAIR)


def test_the_default_candidates_are_all_required_and_weighed():
    metrics = {"plain": dev(90, 60, 30), **{c: dev(90, 70, 35) for c in select.CANDIDATES}}
    metrics["der_paper_rho25"] = dev(89.5, 85, 36)   # the best admissible score
    metrics["der_paper_beta1"] = dev(88.5, 95, 40)   # higher, but learns too little
    pick = select.apply_rule(metrics)
    assert pick["chosen"] == "der_paper_rho25" and set(pick["candidates"]) == set(select.CANDIDATES)
    del metrics["der_paper_beta1"]
    with pytest.raises(ValueError, match="der_paper_beta1"):
        select.apply_rule(metrics)


def test_dev_metrics_from_a_run():
    run = {"matrix": [[0.8, 0.5], [0.6, 0.9]],
           "final": {"general": {"cloze": {"arc_easy": 0.4}, "ppl": {"wiki": 9.0, "sciq_support": 22.0}}}}
    base = {"general": {"ppl": {"wiki": 10.0, "sciq_support": 20.0}}}
    m = select.dev_metrics(run, base)
    assert m["plasticity"] == pytest.approx(85) and m["AP"] == pytest.approx(75) and m["BWT"] == pytest.approx(-20)
    assert m["arc_easy"] == pytest.approx(40)
    assert m["ppl_rise/wiki"] == pytest.approx(-10) and m["ppl_rise/sciq_support"] == pytest.approx(10)


def test_the_recommended_constant_is_the_committed_dev_selections_pick():
    """``continual.RECOMMENDED`` names what the committed dev selection chose, among the rule's candidates, and
    that selection ran every candidate and the reference."""
    import json

    from gere_plugin.continual import RECOMMENDED

    doc = json.loads((select.RESULTS / f"recommended_selection_{select.PRESET}.json").read_text())
    assert doc["selection"]["chosen"] == RECOMMENDED
    assert RECOMMENDED in select.CANDIDATES
    assert {select.REFERENCE, *select.CANDIDATES} <= set(doc["runs"]) <= {select.REFERENCE, *select.CANDIDATES,
                                                                          *select.PENDING}
    assert select.apply_rule({m: r["dev"] for m, r in doc["runs"].items()})["chosen"] == RECOMMENDED
    assert set(doc["selection"]["candidates"]) == set(select.weighed(doc["runs"]))  # the file weighed all it holds


def test_merging_needs_one_base_and_one_precision(tmp_path):
    base = {"tasks": {"a": 0.5}, "general": {"ppl": {"wiki": 20.0}, "cloze": {"arc_easy": 0.5}}}
    assert select.same_base(base, {**base, "general": {**base["general"], "ppl": {"wiki": 20.0 * (1 + 1e-6)}}})
    assert not select.same_base(base, {**base, "general": {**base["general"], "ppl": {"wiki": 21.0}}})
    assert not select.same_base(base, {**base, "tasks": {"a": 0.51}}) and not select.same_base(base, None)
    doc = {"preset": "cpu-fair", "rule": select.RULE, "candidates": [], "dev_sets": {}, "base": base, "runs": {}}
    for name, extra in (("a", {}), ("b", {"bf16": False})):
        (tmp_path / f"{name}.json").write_text(json.dumps({**doc, **extra}))
    with pytest.raises(SystemExit, match="differ in precision"):
        select.main(["--merge", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--out-dir", str(tmp_path)])


def test_a_pending_candidate_is_weighed_once_its_run_is_there():
    """PENDING candidates join the rule after CANDIDATES (ties stay with those) as soon as they have a run."""
    assert select.PENDING and not set(select.PENDING) & set(select.CANDIDATES)
    pending = select.PENDING[0]
    dev = {"plasticity": 90.0, "AP": 80.0, "BWT": -5.0, "arc_easy": 40.0, "ppl_rise/wiki": -1.0}
    runs = {select.REFERENCE: dev, **{c: dev for c in select.CANDIDATES}}
    assert select.weighed(runs) == select.CANDIDATES
    assert select.apply_rule(runs)["chosen"] == select.CANDIDATES[0]  # all tie: the cheapest
    assert select.apply_rule({**runs, pending: dev})["chosen"] == select.CANDIDATES[0]  # a tie stays with it
    better = {**dev, "AP": 81.0}
    assert select.apply_rule({**runs, pending: better})["chosen"] == pending
    assert select.apply_rule({**runs, pending: {**better, "plasticity": 88.0}})["chosen"] == select.CANDIDATES[0]


def test_a_method_uses_its_own_learning_rate_selection_or_one_of_the_same_first_task():
    from forgetting_presets import first_task_signature, shared_selection

    selection = {"gere": {"signature": first_task_signature("gere"), "chosen": 2e-4},
                 "plain": {"signature": first_task_signature("plain"), "grid": {}}}  # unfinished
    assert shared_selection(selection, "gere") == "gere"
    assert shared_selection(selection, "gere_freeze") == "gere"  # its freeze starts at task 2
    assert shared_selection(selection, "plain") is None and shared_selection(selection, "wise") is None
    selection["plain"]["chosen"] = 1e-4
    assert shared_selection(selection, "wise") == "plain"  # WiSE-FT trains as plain SFT, then interpolates
    assert shared_selection(selection, "der_paper") is None  # it trains task 1 as gere_paper, absent here
