"""The forgetting benchmark's result files: writing the JSON, table and plots of a run (:func:`write_outputs`),
comparing the settings of two result files (:func:`settings_differ`, :func:`method_spec_json`) and merging the
files of parallel invocations (:func:`merge_results`). Used by ``forgetting.py``, which re-exports these names."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import set_offline_defaults  # noqa: E402

set_offline_defaults()  # before transformers / datasets are imported

from forgetting_presets import PRESETS  # noqa: E402
from forgetting_verdicts import fair_verdicts, verdicts  # noqa: E402

from gere_plugin.continual import MethodSpec, TrainSettings  # noqa: E402
from gere_plugin.evaluation.report import (  # noqa: E402
    markdown_table,
    monitor_series,
    monitor_table,
    plot_monitor,
    plot_summary,
    summarize_runs,
)


def slim_run(run: dict[str, Any]) -> dict[str, Any]:
    """Drop per-item predictions from a run before storing it."""
    def strip(general: Optional[dict[str, Any]]) -> None:
        if general:
            general.pop("pred", None)
    for stage in run.get("stages", []):
        strip(stage.get("eval", {}).get("general"))
    return run


def write_outputs(doc: dict[str, Any], preset: str, out_dir: Path) -> None:
    runs = doc["runs"]
    if runs:
        summary = summarize_runs(runs)
        doc["summary"] = summary
        if PRESETS.get(preset, {}).get("lr_grid") or PRESETS.get(preset, {}).get("lr_by_method"):
            doc["verdicts"] = fair_verdicts(summary, runs, doc.get("base"))
        else:
            doc["verdicts"] = verdicts(summary, runs)
        table = markdown_table(summary)
        monitored = [r for r in runs if monitor_series(r) is not None]
        if monitored:  # --monitor-steps: the forgetting monitor's curves over the training steps
            table += "\nForgetting monitor (perplexity rise over the original base; KL to the model at each task's start):\n\n"
            table += monitor_table(monitored)
            plot_monitor(monitored, out_dir / f"forgetting_{preset}_monitor.png",
                         title=f"forgetting monitor over training steps ({preset})")
        (out_dir / f"forgetting_{preset}.md").write_text(table, encoding="utf-8")
        plot_summary(summary, out_dir / f"forgetting_{preset}.png")
    tmp = out_dir / f".forgetting_{preset}.json.tmp"
    tmp.write_text(json.dumps(doc, indent=1, default=float), encoding="utf-8")
    os.replace(tmp, out_dir / f"forgetting_{preset}.json")


def settings_differ(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Settings keys whose values differ between two result files (methods, seeds and method specs are
    compared elsewhere). A key only one file has counts as equal when its value there is the
    :class:`TrainSettings` default: files written before a setting existed stay comparable."""
    defaults = {f.name: getattr(TrainSettings(), f.name) for f in dataclasses.fields(TrainSettings)}

    def value(d: dict[str, Any], k: str) -> str:
        return json.dumps(d[k] if k in d else defaults.get(k), default=float)

    return sorted(k for k in set(a) | set(b) if k not in ("methods", "seeds", "method_specs") and value(a, k) != value(b, k))


def method_spec_json(spec: dict[str, Any]) -> str:
    """A method spec as canonical JSON: fields a file written before they existed take the
    :class:`MethodSpec` default, and tuples compare equal to the lists JSON stores them as."""
    defaults = {f.name: f.default for f in dataclasses.fields(MethodSpec)
                if f.default is not dataclasses.MISSING}
    return json.dumps(json.loads(json.dumps({**defaults, **spec}, default=str)), sort_keys=True)


def _timing_key(path: Path, key: str) -> str:
    """A timing's key in a merged file: prefixed once with the folder of the invocation that measured it (keys
    merged before keep their prefix; the repeated ``results/`` prefixes of older merges are collapsed)."""
    while key.startswith("results/results/"):
        key = key[len("results/"):]
    return key if "/" in key else f"{path.parent.name}/{key}"


def merge_results(paths: list[Path]) -> dict[str, Any]:
    """One result document from several of the same preset and settings (methods may differ; a
    (method, seed) pair must not appear twice). Learning-rate selections and timings are combined."""
    docs = [json.loads(p.read_text(encoding="utf-8")) for p in paths]
    first = docs[0]
    for path, doc in zip(paths[1:], docs[1:]):
        if doc.get("preset") != first.get("preset"):
            raise SystemExit(f"--merge: {path} is preset {doc.get('preset')}, {paths[0]} is {first.get('preset')}")
        differ = settings_differ(first["settings"], doc["settings"])
        if differ:
            raise SystemExit(f"--merge: {path} has other settings than {paths[0]}: {', '.join(differ)}")
    merged = {**first, "runs": [], "lr_selection": {}, "timings": {}}
    merged["settings"] = dict(first["settings"])
    seen: set[tuple[str, int]] = set()
    for path, doc in zip(paths, docs):
        for run in doc.get("runs", []):
            key = (run["method"], run["seed"])
            if key in seen:
                raise SystemExit(f"--merge: {key[0]} seed {key[1]} appears twice (again in {path})")
            seen.add(key)
            merged["runs"].append(run)
        merged["lr_selection"].update(doc.get("lr_selection", {}))
        merged["timings"].update({_timing_key(path, k): v for k, v in doc.get("timings", {}).items()})
        merged["settings"]["methods"] = list(dict.fromkeys(merged["settings"]["methods"] + doc["settings"]["methods"]))
        merged["settings"]["seeds"] = sorted(set(merged["settings"]["seeds"]) | set(doc["settings"]["seeds"]))
        merged["settings"]["method_specs"] = {**merged["settings"].get("method_specs", {}),
                                              **doc["settings"].get("method_specs", {})}
    merged["merged_from"] = [str(p) for p in paths]
    return merged
