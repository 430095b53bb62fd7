"""benchmarks/forgetting.py verdicts: the issue's targets and the paired comparison, on hand-made runs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
forgetting = pytest.importorskip("forgetting")

from gere_plugin.evaluation.report import summarize_runs  # noqa: E402

BASE = {"general": {"general_score": 0.40, "ppl": {"wiki": 20.0, "sciq_support": 10.0}}}


def run(method, seed, general, wiki, sciq, last_row):
    return {
        "method": method, "seed": seed, "tasks": ["a", "b"], "base": BASE, "base_row": [0.5, 0.5],
        "matrix": [[last_row[0], 0.5], last_row],
        "final": {"general": {"general_score": general, "ppl": {"wiki": wiki, "sciq_support": sciq}}},
    }


RUNS = [
    run("plain", 1, 0.30, 40.0, 20.0, [0.8, 0.9]),   # drop 10 points, ppl +100% / +100%
    run("plain", 2, 0.32, 44.0, 22.0, [0.8, 0.8]),   # drop 8 points, +120% / +120%
    run("gere", 1, 0.37, 22.0, 11.0, [0.8, 0.9]),    # drop 3, +10% / +10%
    run("gere", 2, 0.39, 22.0, 12.0, [0.7, 0.9]),    # drop 1, +10% / +20%
    run("replay", 1, 0.36, 30.0, 12.0, [0.8, 0.8]),
    run("replay", 2, 0.38, 26.0, 13.0, [0.8, 0.8]),
]


def test_targets_and_paired_differences_match_hand_computation():
    v = forgetting.verdicts(summarize_runs(RUNS), RUNS)
    drops = v["cloze_drop_points"]
    assert drops["plain"] == pytest.approx(9.0) and drops["gere"] == pytest.approx(2.0)
    assert drops["replay"] == pytest.approx(3.0)
    # ppl rise: plain mean 110%, gere 10% (wiki) and 15% (sciq)
    assert v["gere_ppl_rise_over_plain/wiki"] == pytest.approx(0.10 / 1.10)
    assert v["gere_ppl_rise_over_plain/sciq_support"] == pytest.approx(0.15 / 1.10)
    # AP: plain (85 + 80) / 2 = 82.5, gere (85 + 80) / 2 = 82.5
    assert v["gere_minus_plain_AP_points"] == pytest.approx(0.0, abs=1e-9)
    assert all(v["checks"].values()) and v["issue_target_met"] is True
    paired = v["paired_gere_minus_replay"]
    assert paired["seeds"] == [1, 2]
    assert paired["general"]["per_seed"] == pytest.approx([1.0, 1.0])
    assert paired["ppl_rise/wiki"]["per_seed"] == pytest.approx([10 - 50, 10 - 30])
    assert paired["AP"]["per_seed"] == pytest.approx([85 - 80, 80 - 80])


def test_a_cloze_drop_above_half_of_plains_fails_the_target():
    worse = [r if r["method"] != "gere" else {**r, "final": {"general": {**r["final"]["general"],
                                                                         "general_score": 0.34}}} for r in RUNS]
    v = forgetting.verdicts(summarize_runs(worse), worse)
    assert v["cloze_drop_points"]["gere"] == pytest.approx(6.0)
    assert v["checks"]["gere_cloze_drop_at_most_half_of_plain"] is False
    assert v["issue_target_met"] is False
