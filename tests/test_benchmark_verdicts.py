"""benchmarks/forgetting.py verdicts: the issue's targets and the paired comparison, on hand-made runs."""

from __future__ import annotations

import json
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


# ------------------------------------------------------------------------------------------------
# The fair protocol (cpu-fair): learning-rate choice, shared selections, verdicts, merging
# ------------------------------------------------------------------------------------------------
def test_learning_rate_choice_is_best_dev_accuracy_with_ties_to_the_smaller_rate():
    grid = {"0.0001": {"dev_accuracy": 0.80}, "0.0002": {"dev_accuracy": 0.86}, "0.0004": {"dev_accuracy": 0.86}}
    assert forgetting.choose_learning_rate(grid) == pytest.approx(2e-4)
    assert forgetting.choose_learning_rate({"0.0004": {"dev_accuracy": 0.9}, "0.0001": {"dev_accuracy": 0.5}}) == 4e-4


def test_methods_that_train_the_first_task_alike_share_one_selection():
    sig = forgetting.first_task_signature
    assert sig("gere") == sig("gere_freeze")  # the freeze starts at the second task
    assert sig("gere") != sig("gere_paper")  # another weighting
    assert sig("plain") != sig("replay") and sig("l1") != sig("l2")
    # WiSE-FT trains as its base method and interpolates afterwards (alpha chosen on dev items)
    assert sig("wise") == sig("plain") and sig("gere_wise") == sig("gere")
    assert sig("der_paper_rho25") == sig("der_paper_beta1") == sig("der_paper_wise") == sig("der_paper") == sig("gere_paper")


def test_only_the_wise_presets_choose_alpha_on_dev_items():
    from gere_plugin.continual import TrainSettings

    base = TrainSettings(learning_rate=1e-4)
    wise = forgetting.method_settings(base, "gere_wise", 2e-4)
    assert wise.wise_alphas == forgetting.WISE_ALPHA_GRID and wise.learning_rate == 2e-4
    for method in ("plain", "gere", "der_paper", "der_paper_wise"):  # der_paper_wise keeps its fixed alpha
        assert forgetting.method_settings(base, method, 3e-4).wise_alphas == ()
    assert base.learning_rate == 1e-4 and base.wise_alphas == ()  # the shared settings are not changed


def _fair_run(method, seed, plast, final_row, sciq, general):
    tasks = ["a", "b"]
    return {
        "method": method, "seed": seed, "tasks": tasks, "base_row": [0.5, 0.4],
        "base": {"general": {"general_score": 0.40, "ppl": {"wiki": 20.0, "sciq_support": 10.0}}},
        "matrix": [[plast[0], 0.4], [final_row[0], plast[1]]],
        "stages": [{"eval": {"majority_share": {"a": 0.6}}}, {"eval": {"majority_share": {"b": 0.7}}}],
        "final": {"general": {"general_score": general, "ppl": {"wiki": 22.0, "sciq_support": sciq}}},
    }


FAIR_RUNS = [
    _fair_run("plain", 1, [0.9, 0.8], [0.6], 20.0, 0.30),   # ood +100%, cloze -10 points, BWT -0.3
    _fair_run("plain", 2, [0.9, 0.8], [0.7], 20.0, 0.32),   # ood +100%, cloze -8, BWT -0.2
    _fair_run("gere", 1, [0.89, 0.8], [0.8], 11.0, 0.39),   # ood +10%, cloze -1, BWT -0.09
    _fair_run("gere", 2, [0.89, 0.8], [0.8], 13.0, 0.41),   # ood +30%, cloze +1, BWT -0.09
]


def test_fair_verdicts_match_hand_computation():
    base = {"tasks": {"a": 0.5, "b": 0.4}}
    v = forgetting.fair_verdicts(summarize_runs(FAIR_RUNS), FAIR_RUNS, base)
    g = v["per_method"]["gere"]
    assert g["ood_ppl_rise_share_of_plain"] == pytest.approx(0.20 / 1.00)
    assert g["cloze_drop_share_of_plain"] == pytest.approx(0.0 / 9.0)
    assert g["plasticity_minus_plain_points"] == pytest.approx(100 * (0.845 - 0.85))
    assert g["BWT_minus_plain_points"] == pytest.approx(100 * (-0.09 + 0.25))
    c = v["checks"]
    assert c["plain_learns/a/accuracy_at_least_base_plus_15"] is True  # 0.9 >= 0.5 + 0.15
    assert c["plain_learns/b/accuracy_at_least_base_plus_15"] is True  # 0.8 >= 0.4 + 0.15
    assert c["plain_learns/a/majority_share_at_most_0.75"] is True
    assert c["gere/ood_ppl_rise_at_most_25pct_of_plain"] is True
    assert c["gere/plasticity_within_2_points_of_plain"] is True
    assert c["gere/BWT_at_least_plain"] is True
    assert v["issue_target_met"] is True
    # a GeRe that learns less fails the plasticity target even though it forgets less
    lazy = [r if r["method"] != "gere" else {**r, "matrix": [[0.8, 0.4], [0.8, 0.7]]} for r in FAIR_RUNS]
    v2 = forgetting.fair_verdicts(summarize_runs(lazy), lazy, base)
    assert v2["checks"]["gere/plasticity_within_2_points_of_plain"] is False
    assert v2["issue_target_met"] is False


def test_recommended_checks_match_hand_computation(tmp_path):
    rec = forgetting.RECOMMENDED
    runs = FAIR_RUNS + [
        # plasticity 0.895 (plain 0.85), BWT -0.04, ood ppl -10%, wiki +10%, cloze +1 point over the base
        _fair_run(rec, 1, [0.9, 0.89], [0.86], 9.0, 0.41),
        _fair_run(rec, 2, [0.9, 0.89], [0.86], 9.0, 0.41),
    ]
    cost = tmp_path / "cost.json"
    cost.write_text(json.dumps({"summary": {rec: {"step_s_vs_plain": 1.4, "peak_added_mib_vs_plain": 1.35}}}))
    ratios = forgetting.cost_ratios(rec, [tmp_path / "missing.json", cost])
    assert ratios == {"step_s_vs_plain": 1.4, "peak_added_mib_vs_plain": 1.35, "source": "cost.json"}
    summary = summarize_runs(runs)
    v = forgetting.fair_verdicts(summary, runs, {"tasks": {"a": 0.5, "b": 0.4}})
    per_method = v["per_method"]
    out = forgetting.recommended_checks(summary, per_method, v["plain"], rec, ratios)
    c = out["checks"]
    assert c["plasticity_at_least_plain_minus_1_point"] is True
    assert c["BWT_at_least_minus_5_points"] is True  # -4 points
    assert c["ppl_rise_sciq_support_at_most_0"] is True
    assert c["ppl_rise_wiki_at_most_0"] is False  # 22 vs 20: +10%
    assert c["cloze_drop_at_most_25pct_of_plain"] is True
    assert c["step_time_at_most_1.5x_plain"] is True and c["peak_memory_at_most_1.3x_plain"] is False
    assert c["on_general_vs_AP_frontier"] is True and out["better_on_both_axes"] == []
    assert out["missed"] == ["peak_memory_at_most_1.3x_plain", "ppl_rise_wiki_at_most_0"]
    assert out["all_met"] is False
    # without a cost measurement the cost checks are undecided, never passed
    blind = forgetting.recommended_checks(summary, per_method, v["plain"], rec, {})
    assert blind["checks"]["step_time_at_most_1.5x_plain"] is None and blind["all_met"] is False
    # a method better on both axes takes the preset off the frontier
    best = runs + [_fair_run("oracle", 1, [0.9, 0.9], [0.9], 9.0, 0.45)]
    s2 = summarize_runs(best)
    v2 = forgetting.fair_verdicts(s2, best, {"tasks": {"a": 0.5, "b": 0.4}})
    off = forgetting.recommended_checks(s2, v2["per_method"], v2["plain"], rec, ratios)
    assert off["checks"]["on_general_vs_AP_frontier"] is False and off["better_on_both_axes"] == ["oracle"]
    assert forgetting.recommended_checks(summary, {}, v["plain"], rec, ratios) == {"method": rec, "measured": False}


def test_merge_combines_parallel_invocations_and_refuses_duplicates(tmp_path):
    settings = {"methods": ["plain"], "seeds": [1], "max_steps": 40, "method_specs": {"plain": {}}}
    a = {"preset": "cpu-fair", "settings": settings, "runs": FAIR_RUNS[:2], "lr_selection": {"plain": {"chosen": 1e-4}},
         "base": None, "timings": {"x": 1}}
    b = {"preset": "cpu-fair", "settings": {**settings, "methods": ["gere"], "method_specs": {"gere": {}}},
         "runs": FAIR_RUNS[2:], "lr_selection": {"gere": {"chosen": 2e-4}}, "base": None, "timings": {"x": 2}}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    pa, pb = tmp_path / "a" / "r.json", tmp_path / "b" / "r.json"
    pa.write_text(json.dumps(a))
    pb.write_text(json.dumps(b))
    merged = forgetting.merge_results([pa, pb])
    assert len(merged["runs"]) == 4 and set(merged["lr_selection"]) == {"plain", "gere"}
    assert merged["settings"]["methods"] == ["plain", "gere"]
    assert merged["timings"] == {"a/x": 1, "b/x": 2}
    with pytest.raises(SystemExit, match="appears twice"):
        forgetting.merge_results([pa, pa])
    pb.write_text(json.dumps({**b, "settings": {**b["settings"], "max_steps": 50}}))
    with pytest.raises(SystemExit, match="max_steps"):
        forgetting.merge_results([pa, pb])


def test_settings_comparison_tolerates_settings_added_later_at_their_default():
    old = {"max_steps": 40, "methods": ["plain"]}
    new = {"max_steps": 40, "methods": ["gere"], "gere_task_replay_size": 100}  # a later field, at its default
    assert forgetting.settings_differ(old, new) == []
    assert forgetting.settings_differ(old, {**new, "gere_task_replay_size": 50}) == ["gere_task_replay_size"]
    assert forgetting.settings_differ(old, {**new, "max_steps": 30}) == ["max_steps"]


def test_method_specs_of_older_files_compare_equal_at_the_new_fields_defaults():
    import dataclasses

    from gere_plugin.continual import METHODS

    new = dataclasses.asdict(METHODS["gere"])  # tuples, every current field
    old = {k: (list(v) if isinstance(v, tuple) else v) for k, v in new.items() if k != "task_replay"}
    assert forgetting.method_spec_json(old) == forgetting.method_spec_json(new)
    assert forgetting.method_spec_json({**old, "task_replay": True}) != forgetting.method_spec_json(new)
    assert forgetting.method_spec_json({**old, "freeze_layers": 3}) != forgetting.method_spec_json(new)


def test_write_outputs_draws_the_monitor_of_runs_that_recorded_it(tmp_path):
    """``--monitor-steps``: runs whose stages hold ``gere/monitor_*`` get a monitor table and ``_monitor.png``."""
    def history(rises: list[float]) -> list[dict[str, float]]:
        return [{"step": 5.0 * i, "gere/monitor_ppl": 20.0 * (1 + r), "gere/monitor_ppl_rise": r,
                 "gere/monitor_kl": 0.1 * r, "gere/monitor_task_kl": 0.2 * r} for i, r in enumerate(rises)]

    runs = [dict(r, stages=[{"steps": 10, "history": history([0.0, 0.3, 0.6] if r["method"] == "plain" else
                                                                      [0.0, 0.05, 0.1])}])
            for r in RUNS if r["method"] in ("plain", "gere")]
    doc = {"runs": runs, "base": BASE}
    forgetting.write_outputs(doc, "cpu-small", tmp_path)
    png = tmp_path / "forgetting_cpu-small_monitor.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (tmp_path / "forgetting_cpu-small.md").read_text()
    assert "Forgetting monitor" in table and "plain (seed 1)" in table
    # runs without monitor values: no monitor outputs
    forgetting.write_outputs({"runs": RUNS, "base": BASE}, "cpu-medium", tmp_path)
    assert not (tmp_path / "forgetting_cpu-medium_monitor.png").exists()
    assert "Forgetting monitor" not in (tmp_path / "forgetting_cpu-medium.md").read_text()


def test_task_replay_verdicts_add_the_minus_two_point_bwt_floor():
    base = {"tasks": {"a": 0.5, "b": 0.4}}
    keeps = [_fair_run("gere_er", 1, [0.89, 0.8], [0.88], 11.0, 0.39),   # BWT -1 point
             _fair_run("gere_er", 2, [0.89, 0.8], [0.88], 11.0, 0.39)]
    v = forgetting.fair_verdicts(summarize_runs(FAIR_RUNS + keeps), FAIR_RUNS + keeps, base)
    t = v["task_replay_checks"]
    assert t["gere_er/BWT_at_least_-2_points"] is True
    assert t["gere_er/BWT_at_least_plain"] is True  # -1 >= -25
    assert t["gere_er/ood_ppl_rise_at_most_25pct_of_plain"] is True  # +10% of +100%
    assert v["task_replay_target_met"] is True
    # BWT -5 points: still better than plain SFT's -25, but below the floor of -2
    slips = [{**r, "matrix": [[0.89, 0.4], [0.84, 0.8]]} for r in keeps]
    v2 = forgetting.fair_verdicts(summarize_runs(FAIR_RUNS + slips), FAIR_RUNS + slips, base)
    assert v2["task_replay_checks"]["gere_er/BWT_at_least_plain"] is True
    assert v2["task_replay_checks"]["gere_er/BWT_at_least_-2_points"] is False
    assert v2["task_replay_target_met"] is False
    assert v2["issue_target_met"] is True  # issue 12's GeRe checks do not depend on gere_er
    # without gere_er runs nothing is decided
    assert forgetting.fair_verdicts(summarize_runs(FAIR_RUNS), FAIR_RUNS, base)["task_replay_target_met"] is False
