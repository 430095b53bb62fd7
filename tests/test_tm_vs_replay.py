"""benchmarks/tm_vs_replay.py: paired differences with t-intervals, on hand-made runs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
tvr = pytest.importorskip("tm_vs_replay")

BASE = {"general": {"general_score": 0.40, "ppl": {"wiki": 20.0}}}


def run(method, seed, general, wiki, last_row):
    return {"method": method, "seed": seed, "base": BASE, "matrix": [[last_row[0], 0.5], last_row],
            "final": {"general": {"general_score": general, "ppl": {"wiki": wiki}}}}


def test_interval_matches_hand_computation():
    st = tvr.interval([1.0, 3.0])  # mean 2, sd sqrt(2), half = 12.706 * sqrt(2) / sqrt(2)
    assert st["mean"] == pytest.approx(2.0)
    assert st["low"] == pytest.approx(2.0 - 12.706) and st["high"] == pytest.approx(2.0 + 12.706)
    assert st["excludes_zero"] is False
    tight = tvr.interval([2.0, 2.1, 1.9])
    assert tight["excludes_zero"] is True
    assert tvr.interval([5.0])["low"] is None


def test_compare_pairs_seeds_present_in_both():
    gere = [run("gere", 1, 0.38, 21.0, [0.8, 0.9]), run("gere", 2, 0.36, 22.0, [0.7, 0.9]),
            run("gere", 3, 0.30, 30.0, [0.7, 0.9])]
    replay = [run("replay", 1, 0.34, 25.0, [0.8, 0.9]), run("replay", 2, 0.35, 24.0, [0.6, 0.9])]
    out = tvr.compare(gere, replay, "gere")
    assert out["seeds"] == [1, 2]
    assert out["general"]["per_seed"] == pytest.approx([4.0, 1.0])
    assert out["ppl_rise/wiki"]["per_seed"] == pytest.approx([-20.0, -10.0])  # 5% vs 25%, 10% vs 20%
    assert out["AP"]["per_seed"] == pytest.approx([0.0, 5.0])


def _results_file(path, method, per_step, lr=2e-4):
    import json

    runs = [{**run(method, s, 0.35 + s / 100, 21.0 + s, [0.7, 0.9]), "settings": {"learning_rate": lr}} for s in (1, 2)]
    path.write_text(json.dumps({"settings": {"learning_rate": lr, "gere_replay_per_step": per_step,
                                             "per_device_train_batch_size": 8}, "runs": runs}))
    return str(path)


def test_main_writes_the_named_pair_and_refuses_another_replay_ratio(tmp_path):
    gere = _results_file(tmp_path / "gere.json", "gere", 1)
    replay = _results_file(tmp_path / "replay.json", "replay", 1)
    out = tmp_path / "out"
    assert tvr.main(["--fair", gere, "--replay", replay, "--methods", "gere", "--stem", "low", "--out-dir", str(out)]) == 0
    import json

    doc = json.loads((out / "low.json").read_text())
    assert doc["replay_per_step"] == 1 and doc["task_rows_per_step"] == 8 and doc["comparisons"]["gere"]["seeds"] == [1, 2]
    assert "1 replay rows per step, 8 task rows" in (out / "low.md").read_text()
    other = _results_file(tmp_path / "replay2.json", "replay", 2)
    with pytest.raises(SystemExit, match="gere_replay_per_step: 1 in .*gere.json, 2 in .*replay2.json"):
        tvr.main(["--fair", gere, "--replay", other, "--methods", "gere", "--out-dir", str(out)])
    wider = json.loads(Path(replay).read_text())
    wider["settings"]["per_device_train_batch_size"] = 16  # 1 row per 16 task rows is another ratio too
    (tmp_path / "replay16.json").write_text(json.dumps(wider))
    with pytest.raises(SystemExit, match="task rows per step .per_device_train_batch_size: 8 in .*, 16 in"):
        tvr.main(["--fair", gere, "--replay", str(tmp_path / "replay16.json"), "--methods", "gere",
                  "--out-dir", str(out)])
