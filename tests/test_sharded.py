"""GeRe with sharded parameters (torch FSDP2 ``fully_shard`` over gloo, 2 CPU processes) and the guard
against replay layouts that would hang.

What has to hold, and why: a micro-batch without replay rows skips the replay forward. When a forward
talks to the other ranks (FSDP / ZeRO-3 all-gather parameters), a rank that skips it while another
runs it pairs the wrong collectives and training hangs. The guard refuses exactly the layouts where
some micro-batch has replay rows on some ranks but not on others (``per_step`` neither a multiple of
the world size nor at least accumulation x world size), and only when the replay forward has
collectives: under DDP the replay forwards run through the unwrapped model (no buffer broadcast). Layouts where a micro-batch has no rows on *every* rank, or where
ranks hold different numbers of rows, are fine, and must give the same training as one process.

Measured here (torch 2.13 CPU, gloo, tiny Llama, fp32): the allowed layouts match one process with the
same micro-batch layout to ~1e-8 (gradients) and ~1e-6 (parameters after two steps); an uneven layout
with the guard bypassed never finishes (killed after the timeout); 2-process DDP with one replay row
per step runs, buffer broadcasting on (the default) or off. The subprocess tests are ``slow`` (about
30 s per run).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from gere_plugin.mixing import ReplaySchedule
from gere_plugin.trainer import forward_collectives, uneven_micro_batches

from .conftest import write_jsonl
from .scripts import runner

RUN_TIMEOUT = 420
HANG_TIMEOUT = 75


# ---- the rule, against the schedule ------------------------------------------------------------
@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("accumulation", [1, 2, 3])
def test_uneven_rule_is_exactly_the_schedule(world: int, accumulation: int) -> None:
    for per_step in range(1, accumulation * world + 4):
        schedule = ReplaySchedule(4 * per_step, per_step, seed=0)
        uneven = False
        for step in range(3):
            for micro in range(accumulation):
                has = [bool(schedule.rows_for_micro(step, micro, accumulation, r, world)) for r in range(world)]
                uneven |= any(has) and not all(has)
        assert uneven_micro_batches(per_step, world, accumulation) == uneven, (per_step, world, accumulation)


def test_forward_collectives_names_the_reason() -> None:
    args = SimpleNamespace(ddp_broadcast_buffers=None)
    ddp = SimpleNamespace(args=args, is_fsdp_enabled=False)
    assert forward_collectives(ddp, 1) is None
    assert forward_collectives(ddp, 2) is None  # the replay forwards bypass the DDP wrapper
    fsdp = SimpleNamespace(args=args, is_fsdp_enabled=True)
    assert forward_collectives(fsdp, 1) is None
    assert "FSDP" in forward_collectives(fsdp, 2)
    zero3 = SimpleNamespace(args=args, is_fsdp_enabled=False,
                            accelerator=SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=3))))
    assert "ZeRO-3" in forward_collectives(zero3, 2)
    zero2 = SimpleNamespace(args=args, is_fsdp_enabled=False,
                            accelerator=SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=2))))
    assert forward_collectives(zero2, 2) is None  # parameters are whole on every rank


# ---- 2-process FSDP2 runs ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def task_data(tmp_path_factory: Any, sft_dataset: Any) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("sharded") / "task.jsonl", sft_dataset.to_list())


def _fsdp(out: Path, nproc: int, tiny_dir: Path, task_data: Path, replay_file: Path, extra: list[str],
          timeout: float = RUN_TIMEOUT) -> runner.Launch:
    out.mkdir(parents=True, exist_ok=True)
    args = ["--model", str(tiny_dir), "--data", str(task_data), "--replay", str(replay_file), "--output", str(out), *extra]
    return runner.launch(runner.fsdp_command(args, nproc), runner.child_env(), timeout)


def _records(out: Path, nproc: int) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


CASES = {
    # micro-batch 1 of every step holds no replay rows on either rank
    "rows-in-some-micro-batches": dict(accum=2, per_step=2, extra=[]),
    # rank 0 holds 2 rows, rank 1 one: different numbers of head chunks; lm_head is an FSDP unit of its
    # own, so every chunk all-gathers it (the ranks pad to the same number of calls)
    "unequal-rows-head-unit": dict(accum=1, per_step=3, extra=["--shard_lm_head"]),
    "kl": dict(accum=2, per_step=2, extra=["--regularizer", "kl"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_fsdp2_two_processes_match_one_process(tmp_path: Path, tiny_dir: Path, task_data: Path, replay_file: Path,
                                               case: str) -> None:
    c = CASES[case]
    common = ["--steps", "2", "--per_step", str(c["per_step"]), "--chunk", "5", *c["extra"]]
    two = _fsdp(tmp_path / "fsdp", 2, tiny_dir, task_data, replay_file, ["--accum", str(c["accum"]), *common])
    assert two.returncode == 0, f"2-process FSDP2 run failed or hung ({two.seconds:.0f}s):\n{two.stderr[-5000:]}"
    one = _fsdp(tmp_path / "one", 1, tiny_dir, task_data, replay_file,
                ["--accum", str(2 * c["accum"]), "--no_shard", *[a for a in common if a != "--shard_lm_head"]])
    assert one.returncode == 0, one.stderr[-5000:]
    ranks, (ref,) = _records(tmp_path / "fsdp", 2), _records(tmp_path / "one", 1)
    assert all(r["chunked"] for r in ranks) and ref["chunked"]
    # the replay rows: exactly per_step per step over ranks; rank r's micro m is the 1-process micro m*2+r
    by_step: dict[int, list[int]] = {}
    for r, rec in enumerate(ranks):
        for m in rec["micro"]:
            by_step.setdefault(m["step"], []).extend(m["rows"])
            twin = ref["micro"][m["step"] * 2 * c["accum"] + m["micro"] * 2 + r]
            assert twin["rows"] == m["rows"]
            assert _rel(m["loss"] / 2, twin["loss"]) <= 1e-5, (m, twin)  # a rank's loss is x world size
    assert all(len(rows) == c["per_step"] for rows in by_step.values())
    if case == "rows-in-some-micro-batches":
        assert all(not m["rows"] for rec in ranks for m in rec["micro"] if m["micro"] == 1)
    if case == "unequal-rows-head-unit":
        assert {len(m["rows"]) for rec in ranks for m in rec["micro"]} == {1, 2}
    worst_grad = max(_rel(ranks[0]["grad_sums"][k], ref["grad_sums"][k]) for k in ref["grad_sums"])
    # [sum, sum of |.|] of every full parameter; a signed sum can nearly cancel, so both are compared on
    # the scale of the sum of absolute values
    worst_param = max(max(abs(a - b) for a, b in zip(ranks[0]["param_sums"][k], ref["param_sums"][k])) / ref["param_sums"][k][1]
                      for k in ref["param_sums"])
    print(f"{case}: max relative difference, first-step gradients {worst_grad:.2g}, parameters after 2 steps {worst_param:.2g}")
    assert worst_grad <= 1e-6 and worst_param <= 1e-5


@pytest.mark.slow
def test_fsdp2_uneven_layout_is_refused(tmp_path: Path, tiny_dir: Path, task_data: Path, replay_file: Path) -> None:
    run = _fsdp(tmp_path / "o", 2, tiny_dir, task_data, replay_file, ["--accum", "1", "--per_step", "1", "--steps", "1"])
    assert run.returncode not in (0, None)
    assert "GeReConfigError" in run.stderr and "gere_replay_per_step=1" in run.stderr and "FSDP" in run.stderr


@pytest.mark.slow
def test_fsdp2_uneven_layout_hangs_without_the_guard(tmp_path: Path, tiny_dir: Path, task_data: Path,
                                                     replay_file: Path) -> None:
    """Why the guard exists: rank 0 runs a replay forward (all-gathers) that rank 1 never joins. The
    mismatched collectives either hang or, when gloo sees the other rank's collective of another size,
    abort (both were observed on this machine); the run never finishes."""
    run = _fsdp(tmp_path / "o", 2, tiny_dir, task_data, replay_file,
                ["--accum", "1", "--per_step", "1", "--steps", "2", "--skip_guard"], timeout=HANG_TIMEOUT)
    assert run.timed_out or run.returncode != 0, f"expected a hang or an abort, got exit {run.returncode}"
    if not run.timed_out:
        assert "all_gather" in run.stderr or "gloo" in run.stderr, run.stderr[-3000:]  # a collective failed
    assert "GERE_FSDP_DONE" not in run.stdout


# ---- 2-process DDP: uneven rows run (the replay forwards bypass the wrapper) ------------------------
def _ddp(tmp_path: Path, tiny_dir: Path, task_data: Path, replay_file: Path, extra: list[str], timeout: float) -> runner.Launch:
    out = tmp_path / "ddp"
    out.mkdir(parents=True, exist_ok=True)
    args = ["--model", str(tiny_dir), "--data", str(task_data), "--replay", str(replay_file), "--output", str(out),
            "--batch", "2", "--accum", "1", "--max_steps", "2", "--per_step", "1", "--replay_size", "16", *extra]
    return runner.launch(runner.command(args, 2, workdir=tmp_path), runner.child_env(tmp_path / "replay_{rank}.jsonl"),
                         timeout)


@pytest.mark.slow
@pytest.mark.parametrize("broadcast", ["true", "false"])
def test_ddp_uneven_layout_runs(tmp_path: Path, tiny_dir: Path, task_data: Path, replay_file: Path,
                                broadcast: str) -> None:
    """Rank 0 replays one row, rank 1 none, with the chunked replay CE, whether DDP broadcasts buffers or not."""
    run = _ddp(tmp_path, tiny_dir, task_data, replay_file, ["--ddp_broadcast_buffers", broadcast], RUN_TIMEOUT)
    assert run.returncode == 0, f"({run.seconds:.0f}s, timed out: {run.timed_out})\n{run.stderr[-5000:]}"
    rows = runner.replay_rows(str(tmp_path / "replay_{rank}.jsonl"), ranks=2)
    assert sorted(rows) == [0, 1]
    for parts in rows.values():
        assert sorted(len(p) for p in parts.values()) == [0, 1]  # rank 0 replays, rank 1 does not
