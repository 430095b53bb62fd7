"""The offline GPU bundle's one script: install the missing wheels aside, run the GPU check and the scale benchmark.

Run on an air-gapped machine with one CUDA GPU and torch / transformers / accelerate / peft preinstalled
(the bundle is written by ``make gpu-bundle``; ``run.sh`` at its top calls this file)::

    sh gpu-bundle/run.sh --out RESULTS_DIR          # about 8 minutes at most
    sh gpu-bundle/run.sh --cpu-smoke --out DIR      # tiny shapes on the CPU (the test suite's run)

1. ``install``: every wheel of ``wheels/`` whose distribution the running Python lacks is installed with
   ``pip install --no-deps --no-index --target TMP`` (a temporary folder; a wheel is unzipped there if pip
   is missing) and ``TMP`` goes first on the children's ``PYTHONPATH``. Nothing is ever installed over the
   machine's packages, and the wheels of :data:`NEVER_INSTALL` (torch, transformers, ...) are refused.
2. ``gpu_check``: ``benchmarks/gpu_check.py --random-weights`` (SmolLM2-135M's shape from ``assets/smollm2``,
   seeded random weights; texts from ``assets/wiki_lead_sections.jsonl.gz``): QLoRA 4-bit and LoRA-DPO
   correctness in bf16, step time, peak memory, state build.
3. ``gpu_scale``: ``benchmarks/gpu_scale.py``: 1B full fine-tune and 8B LoRA shapes, a process per variant.

Each part runs under its own time limit (a subprocess timeout) inside the whole run's limit; everything
goes into the output folder: ``bundle_run.json`` (parts, status, time, and the issue's targets with
``value`` / ``target`` / ``pass``), ``gpu_check.json``, ``gpu_scale.json`` and ``logs/``. The exit status
is 1 when a part failed or ran out of time (what it wrote is kept), else 0.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any, Optional

#: distributions the machine brings and the bundle must never replace
NEVER_INSTALL = frozenset({"torch", "transformers", "accelerate", "peft", "numpy", "pandas", "pyarrow", "safetensors",
                           "tokenizers", "triton", "huggingface-hub", "xxhash"})
#: seconds: the whole run and each part (full run; the CPU smoke run is not time-critical)
LIMITS = {"full": {"total": 480, "install": 60, "gpu_check": 180, "scale_child": 120},
          "smoke": {"total": 600, "install": 60, "gpu_check": 300, "scale_child": 300}}
TEXTS = "assets/wiki_lead_sections.jsonl.gz"
TOKENIZER = "assets/smollm2"


def bundle_root(given: Optional[Path]) -> Path:
    """The bundle folder: ``--bundle``, else the folder two levels above this file (``src/benchmarks/``)."""
    root = given or Path(__file__).resolve().parents[2]
    if not (root / "assets").is_dir() or not (root / "src").is_dir():
        raise SystemExit(f"{root} is not a GPU bundle (no assets/ and src/): pass --bundle DIR")
    return root


def wheel_distribution(path: Path) -> str:
    """The normalised distribution name of a wheel file (``bitsandbytes-0.50.2-py3-...whl`` -> ``bitsandbytes``)."""
    return re.sub(r"[-_.]+", "-", path.name.split("-")[0]).lower()


def installed(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def install_wheels(wheels: list[Path], target: Path, timeout: float, log: Path) -> dict[str, Any]:
    """Install the wheels this Python lacks into ``target`` (never over installed packages)."""
    plan: dict[str, Any] = {}
    todo = []
    for whl in sorted(wheels):
        dist = wheel_distribution(whl)
        if dist in NEVER_INSTALL:
            plan[whl.name] = "refused: the machine's own package is never replaced"
        elif installed(dist):
            plan[whl.name] = f"skipped: {dist} {installed(dist)} is installed"
        else:
            plan[whl.name] = "installed"
            todo.append(whl)
    method = "none needed"
    if todo:
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--no-compile",
               "--disable-pip-version-check", "--target", str(target), *map(str, todo)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        log.write_text(f"$ {' '.join(cmd)}\n{proc.stdout}\n--- stderr ---\n{proc.stderr}")
        method = "pip install --no-deps --target"
        if proc.returncode != 0:  # no pip on the machine: a wheel is a zip laid out for site-packages
            for whl in todo:
                with zipfile.ZipFile(whl) as zf:
                    zf.extractall(target)
            method = "unzipped (pip failed: see logs/install.log)"
    return {"target": str(target), "wheels": plan, "method": method}


def run_part(name: str, cmd: list[str], env: dict[str, str], timeout: float, logs: Path) -> dict[str, Any]:
    """Run one part under ``timeout`` seconds; its output goes to ``logs/<name>.log``."""
    print(f"== {name} (limit {timeout:.0f}s)", flush=True)
    t0 = time.perf_counter()
    with open(logs / f"{name}.log", "w", encoding="utf-8") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        try:
            rc: Optional[int] = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, timeout=max(timeout, 1)).returncode
            status = "passed" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            rc, status = None, "timeout"
    wall = time.perf_counter() - t0
    print(f"   {status} in {wall:.0f}s", flush=True)
    return {"status": status, "exit_status": rc, "wall_s": wall, "limit_s": timeout, "command": cmd}


def targets(check: Optional[dict[str, Any]], scale: Optional[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The issue's targets, each ``value`` / ``target`` / ``pass`` (``pass`` None where nothing was measured)."""
    out: dict[str, dict[str, Any]] = {}
    for key, val in ((scale or {}).get("targets") or {}).items():
        out[f"gpu_scale.{key}"] = dict(val)
    checks = (check or {}).get("checks") or {}
    for key, val in checks.items():
        if val["kind"] == "performance" and val["target"] != "(reported)":
            out[f"gpu_check.{key}"] = dict(val)
    dtype = ((check or {}).get("settings") or {}).get("dtype", "bfloat16")
    for section, label in (("qlora_sft", "4-bit"), ("lora_dpo", dtype)):
        mine = {k: v for k, v in checks.items() if k.startswith(section + ".") and v["kind"] == "correctness"}
        status = ((check or {}).get("sections") or {}).get(section, {}).get("status")
        ok = None if not mine else all(v["pass"] for v in mine.values())
        out[f"gpu_check.{section}.correctness"] = {
            "kind": "correctness", "value": {k: v["pass"] for k, v in mine.items()} or status,
            "target": f"every correctness check passes ({label})", "pass": ok}
    return out


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "gpu-bundle-results"))
    ap.add_argument("--bundle", type=Path, default=None)
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU, no GPU needed")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    a = ap.parse_args(argv)
    root = bundle_root(a.bundle)
    mode = "smoke" if a.cpu_smoke else "full"
    limits = LIMITS[mode]
    out = a.out.resolve()
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    work = (a.work or Path(tempfile.mkdtemp(prefix="gere-gpu-bundle-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    result: dict[str, Any] = {"script": "gpu_bundle_run.py", "mode": mode, "bundle": str(root), "out": str(out),
                              "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "python": sys.version.split()[0],
                              "limits_s": limits, "random_weights": True, "parts": {}}
    manifest = root / "MANIFEST.json"
    if manifest.is_file():
        result["bundle_manifest"] = {k: v for k, v in json.loads(manifest.read_text()).items() if k != "files"}

    def save() -> None:
        result["wall_s"] = time.perf_counter() - t0
        (out / "bundle_run.json").write_text(json.dumps(result, indent=1, default=str))

    def left(limit: float) -> float:
        return min(limit, limits["total"] - (time.perf_counter() - t0))

    site = work / "site-packages"
    site.mkdir(exist_ok=True)
    t_install = time.perf_counter()
    try:
        inst = install_wheels(list((root / "wheels").glob("*.whl")), site, left(limits["install"]), logs / "install.log")
        result["parts"]["install"] = {"status": "passed", **inst}
    except Exception as err:  # noqa: BLE001 - recorded; the later parts say what is missing
        result["parts"]["install"] = {"status": "failed", "error": f"{type(err).__name__}: {err}"}
    result["parts"]["install"]["wall_s"] = time.perf_counter() - t_install
    save()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(root / "src"), *filter(None, [env.get("PYTHONPATH")])])
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="disabled",
               TOKENIZERS_PARALLELISM="false", GERE_CACHE_DIR=str(work / "gere-cache"))
    if a.cpu_smoke:
        env["OMP_NUM_THREADS"] = "1"
    bench = root / "src" / "benchmarks"
    texts, tokenizer = root / TEXTS, root / TOKENIZER
    check_cmd = [sys.executable, str(bench / "gpu_check.py"), "--random-weights", "--model-folder", str(tokenizer),
                 "--texts", str(texts), "--out", str(out / "gpu_check.json"), "--workdir", str(work / "gpu_check")]
    if a.cpu_smoke:
        check_cmd += ["--reduced", "--sections", "qlora_sft,lora_dpo"]
    result["parts"]["gpu_check"] = run_part("gpu_check", check_cmd, env, left(limits["gpu_check"]), logs)
    save()
    budget = left(limits["total"]) - 15  # the scale run stops starting children in time to write its JSON
    scale_cmd = [sys.executable, str(bench / "gpu_scale.py"), "--texts", str(texts), "--tokenizer", str(tokenizer),
                 "--out", str(out / "gpu_scale.json"), "--logs", str(logs), "--workdir", str(work / "gpu_scale"),
                 "--budget-s", f"{max(budget - 10, 1):.0f}", "--child-timeout-s", str(limits["scale_child"])]
    if a.cpu_smoke:
        scale_cmd.append("--smoke")
    result["parts"]["gpu_scale"] = run_part("gpu_scale", scale_cmd, env, max(budget, 1), logs)
    loaded = {}
    for name in ("gpu_check", "gpu_scale"):
        path = out / f"{name}.json"
        try:
            loaded[name] = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            loaded[name] = None
            result["parts"][name]["json"] = f"{path.name} missing or unreadable"
    result["environment"] = (loaded["gpu_check"] or loaded["gpu_scale"] or {}).get("environment")
    result["targets"] = targets(loaded["gpu_check"], loaded["gpu_scale"])
    failed = [n for n, p in result["parts"].items() if p["status"] != "passed"]
    result["failed_parts"] = failed
    save()
    print(f"wrote {out / 'bundle_run.json'} in {result['wall_s']:.0f}s" + (f"; failed: {', '.join(failed)}" if failed else ""))
    for key, val in result["targets"].items():
        mark = "----" if val["pass"] is None else "PASS" if val["pass"] else "FAIL"
        print(f"  {mark} {key}: {val['value']} ({val['target']})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
