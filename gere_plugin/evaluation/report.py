"""Tables and plots from continual-learning result JSON files.

A result file is what :func:`gere_plugin.continual.run_sequence` writes (one method, one seed) or
what ``benchmarks/forgetting.py`` writes (many). Both are normalised by :func:`load_runs` into a list
of *run* dicts with at least::

    {"method": str, "seed": int, "tasks": [names], "matrix": [[acc]], "base": {...}, "final": {...}}

where ``base``/``final`` hold ``general`` (perplexities, cloze accuracies, general score) measured
before the first and after the last task. :func:`summarize_runs` groups runs by method and computes
mean and spread over seeds; :func:`markdown_table` and :func:`plot_summary` (from :mod:`.summary_plot`, with
:func:`pareto_front` and :func:`frontier_panels`) render them. Runs trained
with the forgetting monitor (``gere_monitor``) also get :func:`monitor_table` and :func:`plot_monitor`:
held-out perplexity rise and ``KL(base || model)`` over the training steps of every run.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from .metrics import continual_summary, mean_and_spread, relative_change
from .summary_plot import frontier_panels, pareto_front, plot_summary, plot_task_curves, tasks_png_for

__all__ = ["frontier_panels", "load_runs", "markdown_table", "monitor_series", "monitor_table", "pareto_front",
           "plot_monitor", "plot_summary", "plot_task_curves", "report_main", "summarize_runs", "tasks_png_for",
           "write_report"]


def load_runs(paths: Sequence[str | Path]) -> list[dict[str, Any]]:
    """Read result JSON files and return their runs (a file holds one run or ``{"runs": [...]}``)."""
    from ..config import GeReConfigError

    runs: list[dict[str, Any]] = []
    for path in paths:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise GeReConfigError(f"{path}: no such result file.") from None
        except IsADirectoryError:
            raise GeReConfigError(f"{path} is a folder; pass the result JSON files in it (e.g. {path}/*.json).") from None
        except (OSError, UnicodeDecodeError) as e:
            raise GeReConfigError(f"{path} cannot be read ({getattr(e, 'strerror', None) or e}).") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise GeReConfigError(
                f"{path} line {e.lineno} column {e.colno}: not valid JSON ({e.msg}). Result files are what "
                "`gere sequence`, run_sequence or benchmarks/forgetting.py write."
            ) from None
        found = data["runs"] if isinstance(data, dict) and "runs" in data else [data]
        if not isinstance(found, list):
            raise GeReConfigError(f"{path}: 'runs' must be a list of runs.")
        for i, run in enumerate(found):
            if not isinstance(run, dict) or "matrix" not in run or "method" not in run:
                raise GeReConfigError(f"{path}: run {i} needs 'method' and 'matrix' keys (is this a result file?).")
            runs.append(run)
    if not runs:
        raise GeReConfigError("no runs found in the given files")
    return runs


def _run_metrics(run: dict[str, Any], ppl_key: str) -> dict[str, Optional[float]]:
    """Scalar metrics of one run: continual metrics, final general score and perplexity rise."""
    base_row = run.get("base_row")
    final_general = run.get("final", {}).get("general", {})
    base_general = run.get("base", {}).get("general", {})
    general = final_general.get("general_score")
    out: dict[str, Optional[float]] = dict(continual_summary(run["matrix"], base_row, general))
    out["general_score"] = general
    ppl = final_general.get("ppl", {}).get(ppl_key)
    base_ppl = base_general.get("ppl", {}).get(ppl_key)
    out["ppl"] = ppl
    out["ppl_rise"] = relative_change(ppl, base_ppl) if ppl is not None and base_ppl else None
    for name, value in final_general.get("ppl", {}).items():
        out[f"ppl/{name}"] = value
        b = base_general.get("ppl", {}).get(name)
        out[f"ppl_rise/{name}"] = relative_change(value, b) if b else None
    for name, value in final_general.get("cloze", {}).items():
        out[f"cloze/{name}"] = value
    base_score = base_general.get("general_score")
    out["general_change"] = general - base_score if general is not None and base_score is not None else None
    stages = run.get("stages") or []
    for j, task in enumerate(run.get("tasks", [])):
        out[f"final/{task}"] = run["matrix"][-1][j]
        if j < len(run["matrix"]):
            out[f"plasticity/{task}"] = run["matrix"][j][j]  # right after training it
        share = (stages[j].get("eval", {}).get("majority_share", {}).get(task) if j < len(stages) else None)
        out[f"majority_after/{task}"] = share
    lr = (run.get("settings") or {}).get("learning_rate")
    out["learning_rate"] = float(lr) if lr is not None else None
    # cost (runs written before these were recorded have neither)
    steps = sum(int(s.get("steps") or 0) for s in stages)
    if steps and all("train_seconds" in s for s in stages):
        out["step_seconds"] = sum(float(s["train_seconds"]) for s in stages) / steps
    added = [s["memory"]["added_mb"] for s in stages if isinstance(s.get("memory"), dict)]
    if added:
        out["memory_added_mb"] = max(added)
    return out


def close(a: Any, b: Any, rel: float = 1e-4) -> bool:
    """Whether two JSON-like values are equal, numbers within ``rel`` of each other (the same evaluation on two
    machines differs in the last bits of a perplexity)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k], rel) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(close(x, y, rel) for x, y in zip(a, b))
    numbers = (int, float)
    if isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool) and not isinstance(b, bool):
        return a == b or abs(a - b) <= rel * max(abs(a), abs(b))
    return a == b


def _check_one_base(runs: Sequence[dict[str, Any]]) -> None:
    """ValueError when the runs were measured against different base models (their ``base`` general values or
    ``base_row`` differ beyond :func:`close`): one table has one base row, and every rise in it is read against
    that base."""
    def key(run: dict[str, Any]) -> list[Any]:
        return [(run.get("base") or {}).get("general"), run.get("base_row")]

    ref = key(runs[0])
    for run in runs[1:]:
        if not close(key(run), ref):
            raise ValueError(
                f"summarize_runs: run {run.get('method')!r} seed {run.get('seed')} was evaluated against another base "
                f"model than run {runs[0].get('method')!r} seed {runs[0].get('seed')} (their base general values or "
                "base task accuracies differ). Summarize runs of one base model together, and report other bases apart."
            )


def summarize_runs(runs: Sequence[dict[str, Any]], ppl_key: str = "wiki") -> dict[str, dict[str, Any]]:
    """Group runs by method; for every scalar metric return ``mean_and_spread`` over seeds.

    Also returns the per-method mean accuracy matrix (``matrix_mean``) for the sequence plot and the
    base model's values (``"base"`` entry) when the runs carry them. All runs must share one base model
    (ValueError naming the first run that does not).
    """
    by_method: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        by_method.setdefault(run["method"], []).append(run)
    summary: dict[str, dict[str, Any]] = {}
    for method, group in by_method.items():
        per_run = [_run_metrics(r, ppl_key) for r in group]
        keys = sorted({k for m in per_run for k in m})
        stats = {}
        for key in keys:
            vals = [m[key] for m in per_run if m.get(key) is not None]
            if vals:
                stats[key] = mean_and_spread(vals)
        T = len(group[0]["matrix"])
        matrix_mean = [
            [sum(r["matrix"][i][j] for r in group) / len(group) for j in range(len(group[0]["matrix"][i]))]
            for i in range(T)
        ]
        summary[method] = {
            "metrics": stats,
            "seeds": sorted({r.get("seed") for r in group if r.get("seed") is not None}),
            "tasks": group[0].get("tasks", []),
            "matrix_mean": matrix_mean,
        }
    first = runs[0]
    _check_one_base(runs)
    base_general = first.get("base", {}).get("general")
    if base_general:
        summary["base"] = {
            "metrics": {
                "general_score": mean_and_spread([base_general.get("general_score") or 0.0]),
                "ppl": mean_and_spread([base_general.get("ppl", {}).get(ppl_key, math.nan)]),
                **{f"ppl/{k}": mean_and_spread([v]) for k, v in base_general.get("ppl", {}).items()},
                **{f"cloze/{k}": mean_and_spread([v]) for k, v in base_general.get("cloze", {}).items()},
                **({"AP": mean_and_spread([sum(first["base_row"]) / len(first["base_row"])])}
                   if first.get("base_row") else {}),
                **(
                    {f"final/{t}": mean_and_spread([v]) for t, v in zip(first.get("tasks", []), first["base_row"])}
                    if first.get("base_row")
                    else {}
                ),
            },
            "seeds": [],
            "tasks": first.get("tasks", []),
            "matrix_mean": [],
        }
    return summary


def _fmt(stat: Optional[dict[str, float]], pct: bool = False, digits: int = 2) -> str:
    if stat is None or stat.get("mean") is None or (isinstance(stat["mean"], float) and math.isnan(stat["mean"])):
        return "-"
    scale = 100.0 if pct else 1.0
    text = f"{stat['mean'] * scale:.{digits}f}"
    if stat.get("n", 1) > 1:
        text += f" ± {stat['std'] * scale:.{digits}f}"
    return text


def markdown_table(summary: dict[str, dict[str, Any]], ppl_key: str = "wiki") -> str:
    """A Markdown table: one row per method (base first); plasticity, stability and general ability apart.

    * **plasticity**: accuracy on each task right after training it (and their mean);
    * **stability**: BWT (change of earlier tasks' accuracy by the end) and AP (mean final accuracy);
    * **general ability**: perplexity rise on each held-out set, cloze accuracy, general-score change;
    * **cost** (when the runs recorded it): wall seconds per optimizer step over the whole sequence and the
      largest memory a stage added while building its trainer and training (:class:`~gere_plugin.continual.PeakMemory`).

    Accuracies are in percent; ``±`` is the sample standard deviation over seeds.
    """
    methods = [m for m in summary if m == "base"] + [m for m in summary if m != "base"]
    any_method = next((summary[m] for m in methods if m != "base"), summary[methods[0]])
    tasks = any_method.get("tasks", [])
    ppl_names = sorted({k.split("/", 1)[1] for m in methods for k in summary[m]["metrics"] if k.startswith("ppl/")})
    cloze_names = sorted(
        {k.split("/", 1)[1] for m in methods for k in summary[m]["metrics"] if k.startswith("cloze/")}
    )
    has_lr = any("learning_rate" in summary[m]["metrics"] for m in methods)
    header = ["method", "seeds"] + (["lr"] if has_lr else [])
    header += ["plasticity"] + [f"{t} after training it" for t in tasks]
    header += ["BWT", "AP"] + [f"{t} (final)" for t in tasks]
    header += [f"Δppl {n}" for n in ppl_names] + [f"{n} acc" for n in cloze_names] + ["general", "Δgeneral"]
    has_cost = any("step_seconds" in summary[m]["metrics"] for m in methods)
    if has_cost:  # wall seconds per optimizer step; memory added while building and training (peak, MiB)
        header += ["s/step", "added memory MiB"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method in methods:
        st = summary[method]["metrics"]
        row = [method, str(len(summary[method]["seeds"])) if method != "base" else "-"]
        if has_lr:
            lr = st.get("learning_rate")
            row.append(f"{lr['mean']:.0e}" if lr and lr.get("std", 0) == 0 else _fmt(lr, digits=5))
        row += [_fmt(st.get("plasticity"), pct=True, digits=1)]
        row += [_fmt(st.get(f"plasticity/{t}"), pct=True, digits=1) for t in tasks]
        row += [_fmt(st.get(k), pct=True, digits=1) for k in ("BWT", "AP")]
        row += [_fmt(st.get(f"final/{t}"), pct=True, digits=1) for t in tasks]
        for n in ppl_names:
            rise = st.get(f"ppl_rise/{n}")
            row.append(_fmt(rise, pct=True, digits=1) + ("%" if rise else ""))
        row += [_fmt(st.get(f"cloze/{n}"), pct=True, digits=1) for n in cloze_names]
        row += [_fmt(st.get("general_score"), pct=True, digits=1), _fmt(st.get("general_change"), pct=True, digits=1)]
        if has_cost:
            row += [_fmt(st.get("step_seconds"), digits=2), _fmt(st.get("memory_added_mb"), digits=0)]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# The forgetting monitor over training steps
# ---------------------------------------------------------------------------------------------
MONITOR_SERIES = ("ppl_rise", "kl", "task_kl", "out_of_state")


def monitor_series(run: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The monitor values of one run over its training steps, or ``None`` when it has none.

    Returns ``{"steps": [...], "ppl_rise": [...], "kl": [...], "task_kl": [...], "out_of_state": [...],
    "boundaries": [steps where a task ended]}``. Steps count on across tasks (task ``k``'s step 0 is the
    last step of task ``k-1``). ``ppl_rise`` is relative to the ORIGINAL base (the first task's step 0:
    each task's monitor compares with its own start, and the absolute perplexity links them); the KLs
    compare with the model at the start of each task. A value a pass did not log is ``None``.
    """
    out: dict[str, Any] = {"steps": [], **{k: [] for k in MONITOR_SERIES}, "boundaries": []}
    offset, base_ppl = 0, None
    for stage in run.get("stages") or []:
        for rec in stage.get("history") or []:
            if "gere/monitor_ppl" not in rec:
                continue
            ppl = float(rec["gere/monitor_ppl"])
            if base_ppl is None:
                base_ppl = ppl / (1.0 + float(rec.get("gere/monitor_ppl_rise", 0.0)))
            out["steps"].append(offset + int(rec["step"]))
            out["ppl_rise"].append(ppl / base_ppl - 1.0)
            for key in ("kl", "task_kl", "out_of_state"):
                value = rec.get(f"gere/monitor_{key}")
                out[key].append(float(value) if value is not None else None)
        offset += int(stage.get("steps") or 0)
        out["boundaries"].append(offset)
    return out if out["steps"] else None


def _run_label(run: dict[str, Any], runs: Sequence[dict[str, Any]]) -> str:
    several = sum(r["method"] == run["method"] for r in runs) > 1
    return f"{run['method']} (seed {run.get('seed')})" if several else str(run["method"])


def monitor_table(runs: Sequence[dict[str, Any]]) -> str:
    """A Markdown table of the monitored runs: last and largest perplexity rise, last KLs."""
    header = ["run", "passes", "steps", "ppl rise (last)", "ppl rise (max)", "KL general (last)", "KL task (last)",
              "out of state (last)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run in runs:
        series = monitor_series(run)
        if series is None:
            continue

        def last(key: str, fmt: str, series: dict[str, Any] = series) -> str:
            vals = [v for v in series[key] if v is not None]
            return format(vals[-1], fmt) if vals else "-"

        row = [_run_label(run, runs), str(len(series["steps"])), str(series["steps"][-1]),
               f"{100 * series['ppl_rise'][-1]:+.1f}%", f"{100 * max(series['ppl_rise']):+.1f}%",
               last("kl", ".4f"), last("task_kl", ".4f"), last("out_of_state", ".3f")]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def plot_monitor(runs: Sequence[dict[str, Any]], out_png: str | Path, title: Optional[str] = None) -> Path:
    """Held-out perplexity rise, KL(base || model) on held-out text and on training rows over the
    training steps, one line per run (one colour per method); dotted lines mark where a task ended."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    monitored = [(run, monitor_series(run)) for run in runs]
    monitored = [(run, series) for run, series in monitored if series is not None]
    if not monitored:
        from ..config import GeReConfigError

        raise GeReConfigError("no run in these result files has forgetting-monitor values (train with gere_monitor).")
    panels = [("ppl_rise", "held-out perplexity rise over the base (%)", 100.0),
              ("kl", "KL(base || model) on held-out text", 1.0),
              ("task_kl", "KL(base || model) on the task's rows", 1.0)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    methods = list(dict.fromkeys(run["method"] for run, _ in monitored))
    for ax, (key, label, scale) in zip(axes, panels):
        for run, series in monitored:
            points = [(x, v * scale) for x, v in zip(series["steps"], series[key]) if v is not None]
            if points:
                ax.plot(*zip(*points), marker="o", markersize=3, color=colors[methods.index(run["method"]) % len(colors)],
                        label=_run_label(run, runs))
        for boundary in monitored[0][1]["boundaries"][:-1]:
            ax.axvline(boundary, color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].axhline(0, color="grey", linewidth=1)
    fig.suptitle(title or "Forgetting monitor: general-ability drift while training", fontsize=11)
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def monitor_png_for(out_png: str | Path) -> Path:
    """Where ``gere report --png X.png`` puts the monitor curves: ``X_monitor.png``."""
    p = Path(out_png)
    return p.with_name(f"{p.stem}_monitor{p.suffix or '.png'}")


def write_report(
    paths: Sequence[str | Path], out_md: Optional[str | Path] = None, out_png: Optional[str | Path] = None,
    ppl_key: str = "wiki", monitor_png: Optional[str | Path] = None,
) -> str:
    """Load ``paths``, print-ready Markdown table as the return value; optionally write it and a PNG.

    Runs with forgetting-monitor values add a second table, and their curves go to ``monitor_png``
    (default: next to ``out_png``, see :func:`monitor_png_for`).
    """
    runs = load_runs(paths)
    summary = summarize_runs(runs, ppl_key=ppl_key)
    table = markdown_table(summary, ppl_key=ppl_key)
    monitored = any(monitor_series(run) is not None for run in runs)
    if monitored:
        table += "\nForgetting monitor (perplexity rise over the original base; KL to the model at each task's start):\n\n"
        table += monitor_table(runs)
    if out_md is not None:
        Path(out_md).parent.mkdir(parents=True, exist_ok=True)
        Path(out_md).write_text(table, encoding="utf-8")
    if out_png is not None:
        plot_summary(summary, out_png, ppl_key=ppl_key)
    if monitored and (monitor_png is not None or out_png is not None):
        plot_monitor(runs, monitor_png if monitor_png is not None else monitor_png_for(out_png))  # type: ignore[arg-type]
    return table


def report_main(argv: Optional[Sequence[str]] = None) -> int:
    """``gere report RESULT.json [...] [--md OUT.md] [--png OUT.png]``: table to stdout (+ files)."""
    parser = argparse.ArgumentParser(prog="gere report", description="Summarise continual-learning result files.")
    parser.add_argument("results", nargs="+", help="result JSON files (run_sequence or benchmark output)")
    parser.add_argument("--md", help="also write the Markdown table here")
    parser.add_argument("--png", help="also write the plot here (and the per-task curves as NAME_tasks.png)")
    parser.add_argument("--ppl-key", default="wiki", help="held-out set whose perplexity rise is plotted")
    parser.add_argument("--monitor-png", help="forgetting-monitor curves (runs trained with gere_monitor); default "
                        "with --png: next to it, as NAME_monitor.png")
    args = parser.parse_args(argv)
    from ..config import GeReConfigError

    for flag, out in (("--md", args.md), ("--png", args.png), ("--monitor-png", args.monitor_png)):
        if out and Path(out).is_dir():
            example = {"--md": "report.md", "--png": "report.png", "--monitor-png": "report_monitor.png"}[flag]
            raise GeReConfigError(f"{flag} {out!r} is a folder; give the file to write, e.g. {out}/{example}.")
    print(write_report(args.results, args.md, args.png, ppl_key=args.ppl_key, monitor_png=args.monitor_png), end="")
    return 0
