"""benchmarks/memory.py: the target rule and the peak-RSS probe, without running the (minutes-long) benchmark."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import memory  # noqa: E402


def _run(step: int, total: int) -> dict:
    return {"peak_step_bytes": step, "peak_total_bytes": total}


def test_targets_compare_each_variant_with_plain_at_its_vocabulary() -> None:
    results = {
        "32000": {"plain": _run(100, 1000), "tm": _run(104, 1010), "kl": _run(106, 1500), "tm_full": _run(140, 1100)},
        "256000": {"plain": _run(200, 2000), "tm": _run(200, 2000)},  # kl not measured here: no check invented
    }
    checks = memory.check_targets(results)
    assert set(checks) == {
        "tm_vs_plain_step_peak[vocab=32000]", "kl_vs_plain_step_peak[vocab=32000]", "tm_vs_plain_total_peak[vocab=32000]",
        "tm_vs_plain_step_peak[vocab=256000]", "tm_vs_plain_total_peak[vocab=256000]",
    }
    assert checks["tm_vs_plain_step_peak[vocab=32000]"] == {"value": 1.04, "target": "<= 1.05", "pass": True}
    assert checks["kl_vs_plain_step_peak[vocab=32000]"]["pass"] is False  # 1.06
    assert memory.ratios(results)["32000"]["tm_full_vs_plain_step_peak"] == pytest.approx(1.4)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux /proc only")
def test_peak_rss_sees_an_allocation_after_a_reset() -> None:
    before = memory.reset_peak_rss()
    block = bytearray(64 * 2**20)
    block[:: 4096] = b"x" * len(block[:: 4096])  # touch every page
    assert memory.peak_rss() - before >= 60 * 2**20
    del block
