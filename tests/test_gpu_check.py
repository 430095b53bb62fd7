"""benchmarks/gpu_check.py end to end in its reduced CPU mode, so the GPU check does not rot before a GPU
runs it: every section runs (QLoRA is skipped with its reason), the JSON has every field the full run
writes, and the correctness checks pass. Performance values are recorded, never asserted (CPU numbers)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .scripts.runner import child_env

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.mark.slow
def test_gpu_check_reduced_mode_runs_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--reduced", "--out", str(out), "--workdir", str(tmp_path / "w")],
                          env=child_env(), capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    result = json.loads(out.read_text())
    assert result["mode"].startswith("reduced")
    sections = result["sections"]
    assert sections["qlora_sft"]["status"] == "skipped" and "CUDA" in sections["qlora_sft"]["reason"]
    dpo = sections["lora_dpo"]
    assert dpo["status"] == "ran", dpo.get("traceback")
    assert dpo["tm_by_step"][0] == 0.0 and dpo["out_of_state_by_step"][0] == 0.0  # fp32 on CPU: exactly 0
    assert dpo["frozen_parameters"] > 0 and dpo["frozen_changed"] == []
    perf = sections["performance"]
    assert perf["status"] == "ran", perf.get("traceback")
    for key in ("tm_vs_vanilla_step_time", "tm_vs_plain_step_time", "vanilla_vs_plain_step_time",
                "tm_vs_vanilla_peak_memory", "tm_vs_plain_peak_memory"):
        assert perf["ratios"][key] > 0
    assert perf["state_build"]["build_vs_inference_backbone"] > 0
    assert set(perf["memory"]) == {"plain", "vanilla", "tm", "l2"}
    correctness = {k: v for k, v in result["checks"].items() if v["kind"] == "correctness"}
    assert correctness and all(v["pass"] for v in correctness.values()), correctness
    assert {"tm_vs_vanilla_step_time", "tm_vs_plain_peak_memory", "state_build_vs_inference_tokens_per_s"} <= set(result["checks"])
    assert result["environment"]["torch"]
