"""GeRe under DeepSpeed ZeRO-2 / ZeRO-3 on 2 CPU processes (DeepSpeed's CPU accelerator over gloo).

Optional: skipped unless ``deepspeed`` is importable (``make test-deepspeed`` installs it). Measured
here with deepspeed 0.19.8, torch 2.13 CPU: ZeRO-3 runs a step where micro-batch 1 holds no replay rows
on any rank; ZeRO-3 with replay rows on rank 0 only (one row per step) dies with gloo's "collective
mismatch" (it would hang on NCCL) and is refused by the guard; ZeRO-2 runs that uneven layout, so the
guard leaves ZeRO-1/2 alone. See tests/scripts/deepspeed_tiny.py for how the engine is set up.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest

from .conftest import write_jsonl
from .scripts import runner

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).with_name("scripts") / "deepspeed_tiny.py"


@pytest.fixture(scope="module")
def task_data(tmp_path_factory: Any, sft_dataset: Any) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("deepspeed") / "task.jsonl", sft_dataset.to_list())


def _run(out: Path, tiny_dir: Path, task_data: Path, replay_file: Path, extra: list[str], timeout: float = 420) -> runner.Launch:
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(runner.free_port()),
           str(SCRIPT), "--model", str(tiny_dir), "--data", str(task_data), "--replay", str(replay_file), "--output", str(out),
           *extra]
    env = runner.child_env()
    env["TORCH_EXTENSIONS_DIR"] = str(out / "torch_extensions")  # never share a JIT build lock with other runs
    return runner.launch(cmd, env, timeout)


def _rows_per_step(out: Path) -> dict[int, list[int]]:
    rows: dict[int, list[int]] = {}
    for r in range(2):
        for m in json.loads((out / f"rank{r}.json").read_text())["micro"]:
            assert math.isfinite(m["loss"])
            rows.setdefault(m["step"], []).extend(m["rows"])
    return rows


def test_zero3_runs_micro_batches_without_replay_rows(tmp_path: Path, tiny_dir: Path, task_data: Path, replay_file: Path) -> None:
    run = _run(tmp_path, tiny_dir, task_data, replay_file, ["--stage", "3", "--accum", "2", "--per_step", "2"])
    assert run.returncode == 0, f"({run.seconds:.0f}s, timed out: {run.timed_out})\n{run.stderr[-5000:]}"
    assert all(len(r) == 2 for r in _rows_per_step(tmp_path).values())
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(rec["stage"] == 3 for rec in ranks)
    assert all(not m["rows"] for rec in ranks for m in rec["micro"] if m["micro"] == 1)


def test_zero3_uneven_layout_is_refused(tmp_path: Path, tiny_dir: Path, task_data: Path, replay_file: Path) -> None:
    run = _run(tmp_path, tiny_dir, task_data, replay_file, ["--stage", "3", "--per_step", "1"])
    assert run.returncode not in (0, None), f"({run.seconds:.0f}s, timed out: {run.timed_out})\n{run.stderr[-5000:]}"
    assert "GeReConfigError" in run.stderr and "ZeRO-3" in run.stderr, run.stderr[-5000:]


def test_zero3_uneven_layout_breaks_without_the_guard(tmp_path: Path, tiny_dir: Path, task_data: Path, replay_file: Path) -> None:
    run = _run(tmp_path, tiny_dir, task_data, replay_file, ["--stage", "3", "--per_step", "1", "--skip_guard"], timeout=120)
    assert run.returncode != 0 and "GERE_DS_DONE" not in run.stdout  # gloo: collective mismatch (NCCL: a hang)


def test_zero2_runs_the_uneven_layout(tmp_path: Path, tiny_dir: Path, task_data: Path, replay_file: Path) -> None:
    run = _run(tmp_path, tiny_dir, task_data, replay_file, ["--stage", "2", "--per_step", "1", "--steps", "3"])
    assert run.returncode == 0, f"({run.seconds:.0f}s, timed out: {run.timed_out})\n{run.stderr[-5000:]}"
    rows = _rows_per_step(tmp_path)
    assert sorted(rows) == [0, 1, 2] and all(len(r) == 1 for r in rows.values())
