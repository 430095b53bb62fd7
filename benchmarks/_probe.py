"""A benchmark's probe in a fresh process: the spec goes in as a JSON file, the result comes back on stdout as one
``PROBE {json}`` line. Each probe measures its own process (peak memory cannot be told apart inside one process).
The memory readings themselves are :func:`gere_plugin.continual.cost.reset_peak_rss` and ``peak_rss``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

#: The line prefix a probe prints its result after.
PREFIX = "PROBE "


def run_probe_process(script: str | Path, spec: dict[str, Any], spec_file: Path, what: str,
                      env: Optional[dict[str, str]] = None) -> dict[str, Any]:
    """Write ``spec`` to ``spec_file``, run ``script --probe spec_file`` in a fresh Python and return its result;
    raise ``RuntimeError`` naming ``what`` with the end of its stderr when it fails or prints no result."""
    spec_file.write_text(json.dumps(spec))
    proc = subprocess.run([sys.executable, str(script), "--probe", str(spec_file)], capture_output=True, text=True,
                          env=env)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith(PREFIX)]
    if proc.returncode != 0 or not line:
        raise RuntimeError(f"memory probe {what} failed:\n{proc.stderr[-4000:]}")
    return json.loads(line[-1][len(PREFIX):])


def print_probe_result(result: dict[str, Any]) -> None:
    """Inside the probe: hand ``result`` back to :func:`run_probe_process`."""
    print(PREFIX + json.dumps(result), flush=True)
