"""GeReGRPOTrainer on 2 processes (CPU DDP over gloo, ``accelerate launch``), real TRL GRPO generation.

One run: 2 ranks x 2 micro-batches per optimizer step (gradient accumulation 2), 6 replay rows per
step (so the rows do NOT divide evenly over the 4 micro-batch slots: 2, 2, 1, 1), and a generation
batch that spans 2 optimizer steps (``steps_per_generation=4``) and is trained on twice (``num_iterations=2``):
TRL then calls ``compute_loss`` on buffered slices while ``global_step`` advances. The replay step
must still put exactly ``gere_replay_per_step`` rows in every optimizer step summed over ranks, no
row on two ranks, each (micro-batch, rank) exactly the schedule's rows; the state cache is built
once (rank 0) and the ``gere/*`` metrics describe the whole step. Losses are not compared with a
1-process run: each rank samples its own completions.

The rows are even over RANKS in every micro-batch (6 = 3 per rank): with a rank that runs the extra
replay forward while another does not, DDP's per-forward buffer broadcast (``broadcast_buffers``,
on by default) waits forever, for every trainer family alike (seen here with 3 rows: a hang).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gere_plugin.mixing import ReplaySchedule

from .conftest import write_jsonl
from .scripts import runner

pytestmark = pytest.mark.slow

STEPS = 4
PER_STEP = 6
ACCUM = 2
RANKS = 2
REPLAY_SIZE = 16
SEED = 42  # gere_seed default


@pytest.fixture(scope="module")
def ddp(tmp_path_factory: Any, tiny_dir: Path, replay_file: Path, sft_dataset: Any) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("grpo-multiprocess")
    data = write_jsonl(root / "task.jsonl", sft_dataset.to_list())
    args = [
        "--trainer", "grpo", "--model", str(tiny_dir), "--data", str(data), "--replay", str(replay_file),
        "--batch", "2", "--accum", str(ACCUM), "--max_steps", str(STEPS), "--per_step", str(PER_STEP),
        "--replay_size", str(REPLAY_SIZE), "--num_generations", "2", "--steps_per_generation", "4",
        "--num_iterations", "2",
    ]  # fmt: skip
    run = runner.run(args, root / "ddp", root / "ddp_replay_{rank}.jsonl", num_processes=RANKS)
    return {"run": run, "rows": runner.replay_rows(str(root / "ddp_replay_{rank}.jsonl"), ranks=RANKS)}


def test_exact_replay_rows_per_optimizer_step_over_accumulation_and_ranks(ddp: dict[str, Any]) -> None:
    rows = ddp["rows"]
    schedule = ReplaySchedule(REPLAY_SIZE, PER_STEP, SEED)
    assert sorted(rows) == list(range(STEPS)), f"steps logged: {sorted(rows)}"
    for step, parts in rows.items():
        assert sorted(parts) == [(m, r) for m in range(ACCUM) for r in range(RANKS)], f"step {step}: {sorted(parts)}"
        merged = [row for part in parts.values() for row in part]
        assert len(merged) == PER_STEP, f"step {step}: {len(merged)} replay rows over ranks, expected {PER_STEP}"
        assert len(set(merged)) == PER_STEP, f"step {step}: a replay row twice: {parts}"
        assert sorted(merged) == sorted(schedule.rows_for_step(step))
        for (micro, rank), part in parts.items():
            assert part == schedule.rows_for_micro(step, micro, ACCUM, rank=rank, world_size=RANKS)


def test_cache_built_once_and_metrics_describe_the_step(ddp: dict[str, Any]) -> None:
    run = ddp["run"]
    assert [r for r, _, _ in run.log_lines(r"built base-model states")] == [0]
    assert [r for r, _, _ in run.log_lines(r"reusing base-model state cache")] == [1]
    logs = run.step_logs()
    assert sorted(logs) == list(range(1, STEPS + 1))
    for step, h in logs.items():
        assert h["gere/replay_rows"] == PER_STEP, f"step {step}"
        assert h["gere/replay_ce"] > 0 and "entropy" in h
        if "gere/weight" in h:
            assert h["gere/weight"] >= 0
    assert logs[1]["gere/reg_loss"] == 0.0  # every rank still holds the base model
    assert all(logs[s]["gere/reg_loss"] > 0 for s in range(2, STEPS + 1))
