"""benchmarks/method_cost.py: its summary (medians over rounds, ranges, ratios to plain SFT) on hand-made runs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
method_cost = pytest.importorskip("method_cost")


def rec(method, step_s, once_s, mib):
    return {"method": method, "step_s": step_s, "once_s": once_s, "peak_added_mib": mib}


def test_summary_takes_medians_over_rounds_and_divides_by_plains_median():
    runs = [
        rec("plain", 4.0, 1.0, 1000.0), rec("plain", 6.0, 3.0, 1200.0), rec("plain", 5.0, 2.0, 1100.0),
        rec("ewc", 8.0, 100.0, 3000.0), rec("ewc", 12.0, 140.0, 3400.0),
        rec("osf", 5.5, 9.0, None),  # no memory figure (no /proc): stays unknown, not zero
    ]
    s = method_cost.summarize(runs, ["plain", "ewc", "osf", "gere"])
    assert list(s) == ["plain", "ewc", "osf"]  # a method without runs is left out
    assert s["plain"]["step_s"] == 5.0 and s["plain"]["step_s_range"] == [4.0, 6.0]
    assert s["ewc"]["step_s"] == 10.0 and s["ewc"]["once_s"] == 120.0 and s["ewc"]["rounds"] == 2
    assert s["ewc"]["step_s_vs_plain"] == pytest.approx(2.0)
    assert s["ewc"]["peak_added_mib_vs_plain"] == pytest.approx(3200.0 / 1100.0)
    assert s["plain"]["step_s_vs_plain"] == 1.0
    assert s["osf"]["peak_added_mib"] is None and s["osf"]["peak_added_mib_vs_plain"] is None
    table = method_cost.markdown(s, 42.0)
    assert "| ewc | 10.00 | 2.00 | 120.0 | 3200 | 2.91 |" in table
    assert "| osf | 5.50 | 1.10 | 9.0 | - | - |" in table
    assert "42.0 s" in table


def test_without_plain_there_is_no_ratio():
    s = method_cost.summarize([rec("gere", 7.0, 1.0, 900.0)], ["gere"])
    assert s["gere"]["step_s_vs_plain"] is None and s["gere"]["peak_added_mib_vs_plain"] is None


def test_a_separate_variant_runs_its_preset_and_names_files_without_a_slash():
    assert method_cost.preset_of("der_paper/separate") == "der_paper"
    assert method_cost.preset_of("der_paper") == "der_paper"
    assert method_cost.file_stem("der_paper/separate") == "der_paper-separate"
    with pytest.raises(SystemExit, match="unknown method"):
        method_cost.main(["--methods", "plain", "der_papr/separate"])


def test_bf16_warning_names_the_missing_cpu_flags_and_the_fp32_switch(monkeypatch):
    import _env
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    warning = _env.slow_bf16_warning("fpu sse2 avx avx2 fma")
    assert warning is not None and "avx512_bf16" in warning and "--precision fp32" in warning
    assert _env.slow_bf16_warning("fpu avx2 avx512f avx512_bf16") is None
    assert _env.slow_bf16_warning("fpu avx2 amx_bf16 amx_tile") is None
    assert _env.slow_bf16_warning("fpu avx2 avx512_bf16x") is not None  # whole flags only
