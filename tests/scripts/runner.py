"""Launch :mod:`tests.scripts.train_tiny` in subprocesses (1 process, or 2-process CPU DDP) and read
back what it wrote: replay logs, ``log_history`` and per-rank log lines."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

SCRIPT = Path(__file__).with_name("train_tiny.py")

# Accelerate 1.13 on a CPU-only machine: `accelerate launch --cpu --num_processes 2` starts ONE process
# (the simple launcher spawns several only through mpirun). A multi-GPU launch config starts
# `torch.distributed.run` (2 local processes); with `use_cpu=True` in the TrainingArguments and
# ACCELERATE_USE_CPU=true every rank then runs on the CPU and accelerate picks MULTI_CPU over gloo.
ACCELERATE_CPU_DDP_CONFIG = """\
compute_environment: LOCAL_MACHINE
distributed_type: MULTI_GPU
num_machines: 1
num_processes: {num_processes}
machine_rank: 0
mixed_precision: 'no'
dynamo_config: {{}}
gpu_ids: all
rdzv_backend: static
same_network: true
main_training_function: main
use_cpu: true
"""

# Not anchored at the line start: another rank's progress bar (no newline) may precede a log line.
LOG_LINE = re.compile(r"\[rank(\d+)\] (\d+\.\d+) (\S+) (\w+): (.*)$")


def free_port() -> int:
    """A TCP port that is free right now (for the rank-0 rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def child_env(replay_log: Optional[Path] = None) -> dict[str, str]:
    """Environment of a child run: offline, 1 thread per process, CPU, no trackers."""
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        WANDB_DISABLED="true",
        WANDB_MODE="disabled",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        ACCELERATE_USE_CPU="true",
        PYTHONUNBUFFERED="1",
        HF_DATASETS_DISABLE_PROGRESS_BARS="1",
    )
    # ACCELERATE_LOG_LEVEL: importing axolotl (in-process Axolotl tests) sets it to WARNING, which would
    # hide the INFO lines these runs are checked for.
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GERE_REPLAY_LOG", "ACCELERATE_LOG_LEVEL"):
        env.pop(k, None)
    if replay_log is not None:
        env["GERE_REPLAY_LOG"] = str(replay_log)
    return env


def command(args: list[str], num_processes: int = 1, workdir: Optional[Path] = None) -> list[str]:
    """The command line of one run of ``train_tiny.py`` with ``args`` on ``num_processes`` CPU processes."""
    if num_processes == 1:
        return [sys.executable, str(SCRIPT), *args]
    assert workdir is not None, "a multi-process launch needs a folder for its accelerate config"
    cfg = workdir / "accelerate_cpu_ddp.yaml"
    cfg.write_text(ACCELERATE_CPU_DDP_CONFIG.format(num_processes=num_processes))
    launch = ["-m", "accelerate.commands.launch", "--config_file", str(cfg), "--main_process_port", str(free_port())]
    return [sys.executable, *launch, str(SCRIPT), *args]


@dataclass
class Run:
    """A finished (or killed) run: its output folder and captured stdout/stderr."""

    output: Path
    stdout: str
    stderr: str
    returncode: int

    def history(self) -> list[dict]:
        return json.loads((self.output / "history.json").read_text())

    def step_logs(self) -> dict[int, dict]:
        """``log_history`` entries of training steps (those with a ``loss``), by global step."""
        return {int(h["step"]): h for h in self.history() if "loss" in h}

    def log_lines(self, pattern: str) -> list[tuple[int, float, str]]:
        """``(rank, unix time, message)`` of the script's log lines whose message matches ``pattern``."""
        out = []
        for line in self.stderr.splitlines():
            m = LOG_LINE.search(line)
            if m and re.search(pattern, m.group(5)):
                out.append((int(m.group(1)), float(m.group(2)), m.group(5)))
        return out


def run(
    args: list[str], output: Path, replay_log: Optional[Path] = None, num_processes: int = 1, timeout: float = 600
) -> Run:
    """Run ``train_tiny.py --output OUTPUT ARGS`` to the end; raise with its log tail if it fails."""
    output.mkdir(parents=True, exist_ok=True)
    cmd = command([*args, "--output", str(output)], num_processes, workdir=output.parent)
    proc = subprocess.run(cmd, env=child_env(replay_log), capture_output=True, text=True, timeout=timeout)
    result = Run(output, proc.stdout, proc.stderr, proc.returncode)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
    return result


def start(args: list[str], output: Path, log_file: Path, replay_log: Optional[Path] = None) -> subprocess.Popen:
    """Start a 1-process run in the background; stdout+stderr go to ``log_file`` (no pipe to fill up)."""
    output.mkdir(parents=True, exist_ok=True)
    fh = open(log_file, "w")  # the child inherits the descriptor; the parent closes its copy at once
    try:
        return subprocess.Popen(
            command([*args, "--output", str(output)]), env=child_env(replay_log), stdout=fh, stderr=subprocess.STDOUT
        )
    finally:
        fh.close()


def wait_for(predicate, proc: subprocess.Popen, log_file: Path, timeout: float = 300, what: str = "") -> None:
    """Poll ``predicate()`` until true; fail with the child's log if the child exits first or time runs out."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"child exited ({proc.returncode}) before {what}:\n{log_file.read_text()[-6000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise AssertionError(f"timed out waiting for {what}:\n{log_file.read_text()[-6000:]}")
        time.sleep(0.2)


def replay_rows(path_pattern: str, ranks: int = 1, field: str = "rows") -> dict[int, dict[tuple[int, int], list[int]]]:
    """Read ``GERE_REPLAY_LOG`` files: ``{step: {(micro, rank): rows}}`` (a repeated key is an error).

    ``field``: ``rows`` (general replay) or ``task_rows`` (earlier-task replay)."""
    out: dict[int, dict[tuple[int, int], list[int]]] = defaultdict(dict)
    for rank in range(ranks):
        path = Path(path_pattern.replace("{rank}", str(rank)))
        for line in path.read_text().splitlines():
            e = json.loads(line)
            key = (int(e["micro"]), int(e["rank"]))
            assert key not in out[int(e["step"])], f"micro-batch {key} of step {e['step']} logged twice in {path}"
            out[int(e["step"])][key] = list(e[field])
    return dict(out)
