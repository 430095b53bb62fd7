"""The summary figure: the Pareto front against a naive reference, what each panel draws, PNGs written."""

from __future__ import annotations

import random
import struct
from pathlib import Path
from typing import Any, Optional

import pytest

from gere_plugin.evaluation.report import frontier_panels, pareto_front, plot_summary
from gere_plugin.evaluation.summary_plot import DEFAULT_PEERS, auto_ppl_clip, tasks_png_for


def naive_front(points: dict[str, tuple[float, float]]) -> list[str]:
    """O(n^2): a name stays unless another point is >= on both coordinates and > on one."""

    def dominates(q: tuple[float, float], p: tuple[float, float]) -> bool:
        return q[0] >= p[0] and q[1] >= p[1] and (q[0] > p[0] or q[1] > p[1])

    return sorted(n for n, p in points.items() if not any(dominates(q, p) for m, q in points.items() if m != n))


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("n", [1, 2, 7, 40])
def test_pareto_front_matches_the_naive_reference(seed: int, n: int) -> None:
    rng = random.Random(1000 * seed + n)
    for grid in (None, 4):  # continuous coordinates, then a 4x4 grid full of ties and duplicates
        points = {f"m{i}": ((rng.randrange(grid), rng.randrange(grid)) if grid else (rng.random(), rng.random()))
                  for i in range(n)}
        front = pareto_front(points)
        assert sorted(front) == naive_front(points)
        xs = [points[m][0] for m in front]
        assert xs == sorted(xs)  # a staircase: x ascending ...
        ys = [points[m][1] for m in front]
        assert ys == sorted(ys, reverse=True)  # ... and y descending


def test_pareto_front_hand_cases_with_ties() -> None:
    assert pareto_front({}) == []
    assert pareto_front({"a": (1.0, 1.0)}) == ["a"]
    # duplicates do not dominate each other: both stay
    assert pareto_front({"b": (2.0, 2.0), "a": (2.0, 2.0), "c": (1.0, 2.0)}) == ["a", "b"]
    # equal x: only the higher y stays; equal y: only the higher x stays
    assert pareto_front({"low": (1.0, 1.0), "high": (1.0, 3.0), "right": (2.0, 3.0)}) == ["right"]
    assert pareto_front({"left": (1.0, 5.0), "mid": (2.0, 4.0), "under": (2.0, 1.0), "right": (3.0, 0.0)}) == [
        "left", "mid", "right"]


# 16 methods (general %, AP %, perplexity rise on sciq_support as a fraction): 9 of this package's
# (plain included), 8 peers (plain included).
ROWS: dict[str, tuple[float, float, float]] = {
    "plain": (32.0, 68.0, 0.28),
    "gere": (35.0, 68.5, -0.007),
    "replay": (34.0, 68.5, -0.006),
    "gere_er": (35.0, 79.0, -0.003),
    "gere_freeze": (34.0, 67.8, -0.049),
    "gere_paper": (39.7, 68.9, -0.0045),
    "der": (38.0, 75.0, 0.01),
    "der_paper": (39.7, 68.9, 0.02),  # ties with gere_paper: both on the front
    "gere_tm": (30.0, 64.0, 0.05),
    "l2": (40.2, 70.7, 0.31),
    "flow": (34.9, 69.3, 0.24),
    "ewc": (32.7, 69.1, 0.23),
    "task_kl": (37.0, 68.4, 0.25),
    "osf": (34.6, 79.8, 1.11),
    "sdft": (44.0, 66.3, 0.058),
    "kl": (40.2, 65.0, 0.90),  # same x as l2, lower AP: dominated
}


def stat(value: float, std: float = 0.0, n: int = 1) -> dict[str, float]:
    return {"mean": value, "std": std, "min": value, "max": value, "n": n}


def method_entry(metrics: dict[str, float], std: float = 0.0, n: int = 1,
                 matrix: Optional[list[list[float]]] = None) -> dict[str, Any]:
    return {"metrics": {k: stat(v, std, n) for k, v in metrics.items()}, "seeds": list(range(n)),
            "tasks": ["t1", "t2"] if matrix else [], "matrix_mean": matrix or []}


def sixteen_methods() -> dict[str, dict[str, Any]]:
    summary = {
        m: method_entry({"general_score": g / 100, "AP": ap / 100, "ppl_rise/sciq_support": rise,
                         "ppl_rise/wiki": rise / 2, "BWT": -0.3 + 0.01 * k, "plasticity": 0.9 - 0.005 * k},
                        std=0.01, n=3, matrix=[[0.9, 0.3], [0.6 + 0.01 * k, 0.88]])
        for k, (m, (g, ap, rise)) in enumerate(ROWS.items())
    }
    summary["base"] = method_entry({"general_score": 0.424, "AP": 0.622})
    return summary


def three_methods_without_general_score() -> dict[str, dict[str, Any]]:
    """An old preset: no ARC-Easy score, no sciq_support set, no per-stage matrix, base without AP."""
    summary = {m: method_entry({"AP": ap, "BWT": bwt, "plasticity": pl, "ppl_rise/wiki": rise})
               for m, (ap, bwt, pl, rise) in {"plain": (0.57, -0.1, 0.8, 3.9), "gere": (0.63, 0.02, 0.78, 0.28),
                                              "replay": (0.61, -0.09, 0.79, 0.59)}.items()}
    summary["base"] = method_entry({"ppl": 20.0})
    return summary


def test_frontier_panels_splits_sixteen_methods_and_fronts_are_pareto_of_each_panel() -> None:
    data = frontier_panels(sixteen_methods())
    assert data.methods == list(ROWS)
    assert [p.title for p in data.frontier] == ["this package's methods", "peers (other methods)"]
    ours, theirs = data.frontier
    assert ours.methods == ["plain", "gere", "replay", "gere_er", "gere_freeze", "gere_paper", "der", "der_paper",
                            "gere_tm"]
    assert theirs.methods == ["plain", "l2", "flow", "ewc", "task_kl", "osf", "sdft", "kl"]
    assert max(len(ours.methods), len(theirs.methods)) <= 10
    # hand-computed: gere is under gere_er (same x), gere_paper and der_paper tie (both kept)
    assert ours.front == ["gere_er", "der", "der_paper", "gere_paper"]
    assert theirs.front == ["osf", "l2", "sdft"]  # kl: same x as l2, lower AP
    for panel in data.frontier:  # what the figure draws is pareto_front of the panel's means
        assert panel.front == pareto_front({m: data.general_ap[m] for m in panel.methods})
    assert data.general_ap["gere_er"] == pytest.approx((35.0, 79.0))
    assert data.base == pytest.approx({"general": 42.4, "AP": 62.2})


def test_frontier_panels_clips_far_perplexity_rises_to_the_edge() -> None:
    data = frontier_panels(sixteen_methods())
    assert data.ppl_name == "sciq_support"  # preferred over ppl_key="wiki": outside the replay domain
    # 16 rises in %, sorted; the 90th percentile (nearest rank below) is the 14th: 31 -> clip 1.3 * 31 = 40.3
    assert data.ppl_clip == pytest.approx(40.3)
    assert data.clipped == ["osf", "kl"]
    assert data.ppl_x["osf"] == pytest.approx(40.3) and data.ppl_x["kl"] == pytest.approx(40.3)
    assert data.ppl_ap["osf"] == pytest.approx((111.0, 79.8))  # the true rise is kept for the label
    assert data.ppl_x["plain"] == pytest.approx(28.0) and data.ppl_x["gere_freeze"] == pytest.approx(-4.9)
    assert frontier_panels(sixteen_methods(), ppl_clip=100.0).clipped == ["osf"]
    assert frontier_panels(sixteen_methods(), ppl_clip=200.0).ppl_clip is None


def test_auto_ppl_clip_hand_values() -> None:
    assert auto_ppl_clip([]) is None
    assert auto_ppl_clip([1.0, 2.0, 3.0]) is None  # everything fits under the 10% floor
    assert auto_ppl_clip([28.0, 59.0, 390.0]) == pytest.approx(1.3 * 59.0)  # rank floor(0.9 * 2) = 1
    assert auto_ppl_clip([-5.0, 0.0, 50.0]) == pytest.approx(10.0)  # floor of 10%


def test_frontier_panels_keeps_one_panel_when_few_methods_or_one_side_is_empty() -> None:
    summary = sixteen_methods()
    few = {m: summary[m] for m in ("plain", "gere", "osf", "base")}
    assert [p.methods for p in frontier_panels(few).frontier] == [["plain", "gere", "osf"]]
    peers_only = {m: summary[m] for m in ("plain", "l2", "flow", "ewc", "task_kl", "osf", "sdft", "kl", "base")}
    assert [len(p.methods) for p in frontier_panels(peers_only, max_series=5).frontier] == [8]
    # a custom peer set moves methods between the panels; plain stays in both
    data = frontier_panels(summary, peers=DEFAULT_PEERS | {"der", "der_paper"})
    assert "der" in data.frontier[1].methods and "der" not in data.frontier[0].methods
    assert "plain" in data.frontier[0].methods and "plain" in data.frontier[1].methods


def test_frontier_panels_skips_missing_metrics() -> None:
    data = frontier_panels(three_methods_without_general_score())
    assert data.frontier == [] and data.general_ap == {}
    assert data.ppl_name == "wiki"  # no sciq_support: falls back to ppl_key
    assert data.ppl_clip == pytest.approx(1.3 * 59.0) and data.clipped == ["plain"]
    expected = {"plain": (80.0, -10.0), "gere": (78.0, 2.0), "replay": (79.0, -9.0)}
    assert data.stability.keys() == expected.keys()
    for m, point in expected.items():
        assert data.stability[m] == pytest.approx(point)
    assert data.base == {}


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_plot_summary_renders_sixteen_methods_and_the_task_curves(tmp_path: Path) -> None:
    out = plot_summary(sixteen_methods(), tmp_path / "fig.png")
    assert out == tmp_path / "fig.png"
    width, height = png_size(out)
    assert width >= 4 * 500 and height > 400  # four panels: two frontier panels, forgetting, stability
    assert tasks_png_for(out) == tmp_path / "fig_tasks.png"
    width, height = png_size(tmp_path / "fig_tasks.png")
    assert width > 500 and height > 300


def test_plot_summary_renders_without_general_score(tmp_path: Path) -> None:
    out = plot_summary(three_methods_without_general_score(), tmp_path / "old.png", tasks_png=tmp_path / "t.png")
    width, height = png_size(out)
    assert 2 * 500 <= width < 3 * 500  # no frontier panel: forgetting and stability only
    assert not (tmp_path / "t.png").exists()  # no per-stage matrix: no task curves
    png_size(plot_summary(three_methods_without_general_score(), tmp_path / "none.png", tasks_png=False))
    assert not (tmp_path / "none_tasks.png").exists()
