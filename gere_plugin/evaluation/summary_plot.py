"""The forgetting benchmark's figure: general ability vs task accuracy, forgetting, stability vs plasticity.

:func:`frontier_panels` decides what goes where (pure: which methods each panel draws, the Pareto
front of each frontier panel, which perplexity rises are clipped to the axis edge) and
:func:`plot_summary` draws it, so the tests check content rather than pixels. The figure has

* **A** general ability (ARC-Easy accuracy) vs AP with the Pareto front; with more than
  ``max_series`` methods it is split into this package's methods and the peers (``plain`` in both);
* **B** perplexity rise on the held-out set outside the replay domain vs AP, the axis clipped so the
  crowd near 0 stays readable (methods beyond the edge are drawn on it with an arrow and their value);
* **C** stability (BWT) vs plasticity.

One colour and marker per method in every panel; labels are placed next to their points where they
do not overlap (a thin leader line when moved away). Per-task accuracy along the sequence goes to a
second figure of small multiples, one subplot per method (:func:`plot_task_curves`).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

__all__ = ["DEFAULT_PEERS", "FrontierPanel", "SummaryPlotData", "auto_ppl_clip", "frontier_panels", "pareto_front",
           "plot_summary", "plot_task_curves", "tasks_png_for"]

#: Methods that are not this package's own (baselines and other papers' methods): the "peers" panel.
DEFAULT_PEERS: frozenset[str] = frozenset({"plain", "l2", "flow", "ewc", "task_kl", "osf", "sdft", "kl", "l1", "wise"})
#: The method drawn in both frontier panels when they are split: what every other method is read against.
REFERENCE = "plain"
#: Held-out set outside the replay domain (the replay pool is Wikipedia-like, so is the ``wiki`` set).
OUT_OF_REPLAY_PPL = "sciq_support"

Point = tuple[float, float]


def pareto_front(points: Mapping[str, Point]) -> list[str]:
    """Names of the points that no other point dominates, both coordinates "higher is better".

    ``q`` dominates ``p`` when ``q >= p`` on both coordinates and ``q > p`` on at least one. Invariant:
    no returned point dominates another returned point, and every point not returned is dominated by a
    returned one (dominance is transitive and the set is finite). Equal points do not dominate each
    other, so duplicates on the front are all kept. Coordinates must be finite (drop NaN first).
    Returned by ``x`` ascending (so ``y`` descending: a staircase), ties by name.
    """
    ranked = sorted(points.items(), key=lambda kv: (-kv[1][0], -kv[1][1], kv[0]))
    front: list[str] = []
    best_y_right = -math.inf  # largest y among points with a strictly larger x
    i = 0
    while i < len(ranked):
        x = ranked[i][1][0]
        j = i
        while j < len(ranked) and ranked[j][1][0] == x:
            j += 1
        top_y = ranked[i][1][1]  # the group of equal x is sorted by y descending
        if top_y > best_y_right:
            front += [name for name, (_, y) in ranked[i:j] if y == top_y]
        best_y_right = max(best_y_right, top_y)
        i = j
    return sorted(front, key=lambda n: (points[n][0], -points[n][1], n))


@dataclass
class FrontierPanel:
    """One general-ability-vs-AP panel: its title, the methods it draws and their Pareto front."""

    title: str
    methods: list[str]
    front: list[str]


@dataclass
class SummaryPlotData:
    """Everything :func:`plot_summary` draws, in points (accuracy x 100) and percent.

    ``methods`` lists every method in summary order (its index is its colour and marker). Coordinates
    are ``{method: (x, y)}`` means; a method missing a metric is absent from that panel's mapping.
    ``ppl_x`` holds the x drawn in the forgetting panel: the true rise, or ``ppl_clip`` for the ``clipped`` methods.
    """

    methods: list[str]
    frontier: list[FrontierPanel]
    general_ap: dict[str, Point]
    ppl_name: Optional[str]
    ppl_ap: dict[str, Point]
    ppl_x: dict[str, float]
    ppl_clip: Optional[float]
    clipped: list[str]
    stability: dict[str, Point]
    base: dict[str, float] = field(default_factory=dict)


def _mean(metrics: Mapping[str, Any], key: str, scale: float = 100.0) -> Optional[float]:
    stat = metrics.get(key)
    if not isinstance(stat, Mapping) or stat.get("mean") is None:
        return None
    value = float(stat["mean"])
    return value * scale if math.isfinite(value) else None


def _pairs(summary: Mapping[str, Any], methods: Iterable[str], kx: str, ky: str) -> dict[str, Point]:
    out: dict[str, Point] = {}
    for m in methods:
        x, y = _mean(summary[m]["metrics"], kx), _mean(summary[m]["metrics"], ky)
        if x is not None and y is not None:
            out[m] = (x, y)
    return out


def auto_ppl_clip(rises: Sequence[float]) -> Optional[float]:
    """Right edge of the forgetting panel (percent), or ``None`` when every rise fits.

    1.3 x the 90th percentile (nearest rank below) of the rises, at least 10%: a method far beyond the
    rest (OSF at +112% next to a crowd within +-30%) is drawn at the edge instead of squeezing them.
    """
    if not rises:
        return None
    ordered = sorted(rises)
    limit = max(1.3 * ordered[math.floor(0.9 * (len(ordered) - 1))], 10.0)
    return limit if ordered[-1] > limit else None


def frontier_panels(
    summary: Mapping[str, Any],
    peers: Collection[str] = DEFAULT_PEERS,
    *,
    max_series: int = 10,
    ppl_key: str = "wiki",
    ppl_clip: Optional[float] = None,
) -> SummaryPlotData:
    """What each panel of :func:`plot_summary` draws (pure; see :class:`SummaryPlotData`).

    Frontier panels: methods with both ``general_score`` and ``AP``. More than ``max_series`` of them
    split into "this package's methods" (not in ``peers``) and "peers" (in ``peers``), with
    :data:`REFERENCE` (``plain``) in both; a side left with nothing but ``plain`` keeps one panel.
    Each panel's front is :func:`pareto_front` of its own methods' means. The forgetting panel uses the perplexity
    rise on :data:`OUT_OF_REPLAY_PPL` when any method has it, else on ``ppl_key``; ``ppl_clip`` (percent)
    overrides :func:`auto_ppl_clip`.
    """
    methods = [m for m in summary if m != "base"]
    general_ap = _pairs(summary, methods, "general_score", "AP")
    plotted = [m for m in methods if m in general_ap]
    frontier: list[FrontierPanel] = []
    if plotted:
        groups = [("General ability vs task accuracy", plotted)]
        if len(plotted) > max_series:
            ours = [m for m in plotted if m not in peers or m == REFERENCE]
            theirs = [m for m in plotted if m in peers]
            if set(ours) - {REFERENCE} and set(theirs) - {REFERENCE}:
                groups = [("this package's methods", ours), ("peers (other methods)", theirs)]
        for title, group in groups:
            frontier.append(FrontierPanel(title, group, pareto_front({m: general_ap[m] for m in group})))
    with_ppl = [n for n in (OUT_OF_REPLAY_PPL, ppl_key) if any(f"ppl_rise/{n}" in summary[m]["metrics"] for m in methods)]
    ppl_name = with_ppl[0] if with_ppl else None
    ppl_ap = _pairs(summary, methods, f"ppl_rise/{ppl_name}", "AP") if ppl_name else {}
    clip = ppl_clip if ppl_clip is not None else auto_ppl_clip([x for x, _ in ppl_ap.values()])
    clipped = [m for m, (x, _) in ppl_ap.items() if clip is not None and x > clip]
    ppl_x = {m: (clip if m in clipped and clip is not None else x) for m, (x, _) in ppl_ap.items()}
    base_metrics = summary.get("base", {}).get("metrics", {})
    base = {k: v for k, v in (("general", _mean(base_metrics, "general_score")), ("AP", _mean(base_metrics, "AP")))
            if v is not None}
    return SummaryPlotData(
        methods=methods, frontier=frontier, general_ap=general_ap, ppl_name=ppl_name, ppl_ap=ppl_ap, ppl_x=ppl_x,
        ppl_clip=clip if clipped else None, clipped=clipped,
        stability=_pairs(summary, methods, "plasticity", "BWT"), base=base,
    )


# ---------------------------------------------------------------------------------------------
# Drawing
# ---------------------------------------------------------------------------------------------
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", "h", "p")  # not ">": it marks a clipped point


def _style(index: int) -> tuple[Any, str]:
    """Colour and marker of the method at ``index``: tab20's ten dark shades first, then the light
    ones; the marker shifts by one every 10 so no two of the first 100 methods look the same."""
    import matplotlib

    colours = matplotlib.colormaps["tab20"].colors
    k = index % 20
    return colours[2 * k if k < 10 else 2 * (k - 10) + 1], _MARKERS[(index + index // 10) % len(_MARKERS)]


def _text_colour(colour: Any) -> tuple[float, float, float]:
    """``colour`` darkened until it reads as text on white (tab20's light shades do not)."""
    r, g, b = colour[:3]
    luminance = 0.299 * r + 0.587 * g + 0.114 * b
    scale = min(1.0, 0.5 / luminance) if luminance > 0 else 1.0
    return r * scale, g * scale, b * scale


@dataclass
class _Label:
    x: float
    y: float
    text: str
    color: Any
    bold: bool = False


def _overlap(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return w * h if w > 0 and h > 0 else 0.0


def _place_labels(ax: Any, labels: Sequence[_Label], fontsize: float = 7.5) -> None:
    """Annotate each point with its label where it overlaps neither other labels nor points.

    Greedy in display pixels: front members (bold) first, then from the top; candidate offsets on
    rings of growing radius around the point; the first free one wins, else the least-overlapping.
    A label moved beyond the first ring gets a thin leader line to its point. Call after the axes'
    limits and the figure layout are final.
    """
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    px_per_pt = fig.dpi / 72.0
    points = [ax.transData.transform((lab.x, lab.y)) for lab in labels]
    r = 5 * px_per_pt  # a marker's half width
    obstacles = [(px - r, py - r, px + r, py + r) for px, py in points]
    placed: list[tuple[float, float, float, float]] = []
    order = sorted(range(len(labels)), key=lambda i: (not labels[i].bold, -labels[i].y, labels[i].text))
    rings = (6.0, 14.0, 24.0, 36.0, 50.0, 66.0, 84.0)
    angles = (30, 150, 330, 210, 0, 180, 90, 270, 60, 120, 300, 240, 15, 165, 345, 195)
    for i in order:
        lab, (px, py) = labels[i], points[i]
        probe = ax.text(0, 0, lab.text, fontsize=fontsize, fontweight="bold" if lab.bold else "normal")
        extent = probe.get_window_extent(renderer)
        probe.remove()
        w, h = extent.width + 4, extent.height + 2
        best: Optional[tuple[float, float, float, str, str, tuple[float, float, float, float]]] = None
        for radius in rings:
            for angle in angles:
                dx, dy = radius * math.cos(math.radians(angle)), radius * math.sin(math.radians(angle))
                ha = "left" if dx > 0.3 * radius else "right" if dx < -0.3 * radius else "center"
                va = "bottom" if dy > 0.3 * radius else "top" if dy < -0.3 * radius else "center"
                x0 = px + dx * px_per_pt - {"left": 0.0, "center": w / 2, "right": w}[ha]
                y0 = py + dy * px_per_pt - {"bottom": 0.0, "center": h / 2, "top": h}[va]
                box = (x0, y0, x0 + w, y0 + h)
                if box[0] < frame.x0 or box[2] > frame.x1 or box[1] < frame.y0 or box[3] > frame.y1:
                    continue
                cost = sum(_overlap(box, o) for o in placed) + sum(_overlap(box, o) for o in obstacles)
                if best is None or cost < best[0]:
                    best = (cost, dx, dy, ha, va, box)
                if cost == 0:
                    break
            if best is not None and best[0] == 0:
                break
        if best is None:  # nowhere inside the axes: next to the point, whatever it covers
            best = (0.0, 5.0, 5.0, "left", "bottom", (px, py, px + w, py + h))
        _, dx, dy, ha, va, box = best
        leader = {"arrowstyle": "-", "lw": 0.5, "color": lab.color, "shrinkA": 0, "shrinkB": 3} \
            if math.hypot(dx, dy) > rings[0] + 1 else None
        ax.annotate(lab.text, (lab.x, lab.y), xytext=(dx, dy), textcoords="offset points", ha=ha, va=va,
                    fontsize=fontsize, fontweight="bold" if lab.bold else "normal", color=lab.color,
                    arrowprops=leader, annotation_clip=False, zorder=6,
                    bbox={"boxstyle": "round,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.75})
        placed.append(box)


def _limits(values: Iterable[float], spread: Iterable[float] = (), pad: float = 0.06, at_least: float = 2.0,
            reach: float = 0.15) -> tuple[float, float]:
    """Axis limits around ``values`` (means, references) with ``pad`` of their span (at least ``at_least``)
    on each side, widened for the error-bar ends in ``spread`` by at most ``reach`` of the span: one wide
    error bar is cut at the edge rather than squeezing every point together."""
    vals = list(values)
    lo, hi = min(vals), max(vals)
    span = max(hi - lo, at_least)
    ends = list(spread)
    lo_end = max(min([lo, *ends]), lo - reach * span)
    hi_end = min(max([hi, *ends]), hi + reach * span)
    return min(lo - pad * span, lo_end - 0.02 * span), max(hi + pad * span, hi_end + 0.02 * span)


def _err(summary: Mapping[str, Any], method: str, key: str) -> float:
    """Standard deviation over seeds in points (0 for one seed or a missing metric)."""
    stat = summary[method]["metrics"].get(key) or {}
    return 100.0 * float(stat.get("std") or 0.0) if stat.get("n", 1) > 1 else 0.0


def tasks_png_for(out_png: str | Path) -> Path:
    """Where :func:`plot_summary` puts the per-task curves: ``X_tasks.png`` next to ``X.png``."""
    p = Path(out_png)
    return p.with_name(f"{p.stem}_tasks{p.suffix or '.png'}")


@dataclass
class _Canvas:
    """Draws methods with fixed styles; remembers each axes' labels and the extent of what it drew."""

    summary: Mapping[str, Any]
    style: dict[str, tuple[Any, str]]
    labels: dict[Any, list[_Label]] = field(default_factory=dict)
    xs: dict[Any, list[float]] = field(default_factory=dict)
    ys: dict[Any, list[float]] = field(default_factory=dict)
    x_ends: dict[Any, list[float]] = field(default_factory=dict)
    y_ends: dict[Any, list[float]] = field(default_factory=dict)

    def limits(self, axes: Sequence[Any]) -> tuple[tuple[float, float], tuple[float, float]]:
        """x and y limits that hold what was drawn on all of ``axes`` (see :func:`_limits`)."""
        return (_limits([v for ax in axes for v in self.xs[ax]], [v for ax in axes for v in self.x_ends.get(ax, [])]),
                _limits([v for ax in axes for v in self.ys[ax]], [v for ax in axes for v in self.y_ends.get(ax, [])]))

    def point(self, ax: Any, m: str, x: float, y: float, kx: str, ky: str, *, bold: bool = False,
              label: Optional[str] = None, marker: Optional[str] = None) -> None:
        """Method ``m`` at ``(x, y)`` with error bars from metrics ``kx``/``ky`` (``kx=""``: none on x)."""
        colour, mk = self.style[m]
        xerr = _err(self.summary, m, kx) if kx else 0.0
        yerr = _err(self.summary, m, ky)
        if xerr or yerr:
            ax.errorbar(x, y, xerr=xerr or None, yerr=yerr or None, fmt="none", ecolor=colour, elinewidth=0.7,
                        capsize=2, alpha=0.55, zorder=2)
        ax.plot(x, y, marker=marker or mk, color=colour, ms=6.5, mec="black" if bold else colour,
                mew=1.0 if bold else 0.5, linestyle="none", zorder=4)
        self.labels.setdefault(ax, []).append(_Label(x, y, label or m, _text_colour(colour), bold))
        self.xs.setdefault(ax, []).append(x)
        self.ys.setdefault(ax, []).append(y)
        self.x_ends.setdefault(ax, []).extend((x - xerr, x + xerr))
        self.y_ends.setdefault(ax, []).extend((y - yerr, y + yerr))

    def reference(self, ax: Any, x: Optional[float], y: Optional[float], star: bool = False) -> None:
        """The base model: a dotted line at ``x``, a dashed one at ``y``, a star where they cross."""
        if x is not None:
            ax.axvline(x, color="grey", linestyle=":", linewidth=1, zorder=1)
            self.xs.setdefault(ax, []).append(x)
        if y is not None:
            ax.axhline(y, color="grey", linestyle="--", linewidth=1, zorder=1)
            self.ys.setdefault(ax, []).append(y)
        if star and x is not None and y is not None:
            ax.plot(x, y, marker="*", color="grey", ms=11, mec="black", mew=0.5, linestyle="none", zorder=4)
            self.labels.setdefault(ax, []).append(_Label(x, y, "base", "dimgrey"))


def _draw_frontier(canvas: _Canvas, ax: Any, data: SummaryPlotData, panel: FrontierPanel) -> None:
    for m in panel.methods:
        x, y = data.general_ap[m]
        canvas.point(ax, m, x, y, "general_score", "AP", bold=m in panel.front)
    for other in data.frontier:
        if other is not panel:  # the other panel's front, faint, to compare the two
            ax.step(*zip(*[data.general_ap[m] for m in other.front]), where="pre", color="grey", alpha=0.6,
                    linestyle="--", linewidth=1, zorder=2)
    ax.step(*zip(*[data.general_ap[m] for m in panel.front]), where="pre", color="black", linewidth=1.2, zorder=3)
    canvas.reference(ax, data.base.get("general"), data.base.get("AP"), star=True)
    ax.set_xlabel("general ability: ARC-Easy accuracy (points)  → better")
    ax.set_ylabel("AP: mean final task accuracy (points)  ↑ better")


def _draw_ppl(canvas: _Canvas, ax: Any, data: SummaryPlotData) -> None:
    for m, (rise, ap) in data.ppl_ap.items():
        if m in data.clipped:
            canvas.point(ax, m, data.ppl_x[m], ap, "", "AP", label=f"{m} ({rise:+.0f}%)", marker=">")
        else:
            canvas.point(ax, m, rise, ap, f"ppl_rise/{data.ppl_name}", "AP")
    canvas.reference(ax, 0.0, data.base.get("AP"))
    ax.set_xlabel(f"perplexity rise over base on {data.ppl_name} (%)  ← better")
    ax.set_ylabel("AP: mean final task accuracy (points)  ↑ better")


def _draw_stability(canvas: _Canvas, ax: Any, data: SummaryPlotData) -> None:
    for m, (x, y) in data.stability.items():
        canvas.point(ax, m, x, y, "plasticity", "BWT")
    ax.axhline(0.0, color="grey", linestyle="--", linewidth=1, zorder=1)  # no forgetting (when in view)
    ax.set_xlabel("plasticity: accuracy right after training each task (points)  → better")
    ax.set_ylabel("BWT: change of earlier tasks by the end (points)  ↑ better")


def plot_summary(
    summary: dict[str, dict[str, Any]],
    out_png: str | Path,
    ppl_key: str = "wiki",
    *,
    peers: Collection[str] = DEFAULT_PEERS,
    max_series: int = 10,
    ppl_clip: Optional[float] = None,
    tasks_png: bool | str | Path = True,
) -> Path:
    """Draw the summary figure (panels as in :func:`frontier_panels`) to ``out_png`` and return its path.

    Error bars are the sample standard deviation over seeds; grey lines mark the base model. A panel
    none of whose methods has its metrics is left out (e.g. no ARC-Easy score in old presets). With
    ``tasks_png`` (default ``True``: :func:`tasks_png_for`, or a path) the per-task accuracy along the
    sequence is also drawn there, one small subplot per method (:func:`plot_task_curves`).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    data = frontier_panels(summary, peers, max_series=max_series, ppl_key=ppl_key, ppl_clip=ppl_clip)
    canvas = _Canvas(summary, {m: _style(k) for k, m in enumerate(data.methods)})
    n_panels = len(data.frontier) + bool(data.ppl_ap) + bool(data.stability)
    shown = [m for m in data.methods if m in data.general_ap or m in data.ppl_ap or m in data.stability]
    handles = [Line2D([], [], marker=canvas.style[m][1], color=canvas.style[m][0], linestyle="none", label=m)
               for m in shown]
    handles.append(Line2D([], [], color="grey", linestyle="--", label="base model"))
    if data.frontier:
        handles.append(Line2D([], [], color="black", linewidth=1.2, label="Pareto front (bold labels)"))
    if len(data.frontier) > 1:
        handles.append(Line2D([], [], color="grey", alpha=0.6, linestyle="--", label="the other panel's front"))
    ncol = min(10, len(handles))
    legend_in = 0.22 * math.ceil(len(handles) / ncol) + 0.25
    fig = plt.figure(figsize=(5.0 * max(n_panels, 1), 4.6 + legend_in))
    axes = [fig.add_subplot(1, max(n_panels, 1), k + 1) for k in range(n_panels)]
    titles = []
    for ax, panel in zip(axes, data.frontier):
        _draw_frontier(canvas, ax, data, panel)
        titles.append(panel.title if len(data.frontier) == 1 else f"General ability vs task accuracy: {panel.title}")
    if data.frontier:  # identical axes for the split panels
        first = axes[0]
        xlim, ylim = canvas.limits(axes[:len(data.frontier)])
        for ax in axes[:len(data.frontier)]:
            ax.set_xlim(*xlim)
            ax.set_ylim(*ylim)
            if ax is not first:
                ax.sharex(first)
                ax.sharey(first)
    k = len(data.frontier)
    if data.ppl_ap:
        ax = axes[k]
        _draw_ppl(canvas, ax, data)
        xlim, ylim = canvas.limits([ax])
        if data.ppl_clip is not None:
            xlim = (xlim[0], data.ppl_clip + 0.04 * (data.ppl_clip - xlim[0]))
            ax.axvline(data.ppl_clip, color="grey", linewidth=0.6, alpha=0.6)
            ax.text(data.ppl_clip, 0.5, f"beyond {data.ppl_clip:.0f}%: drawn at the edge ", rotation=90, ha="right",
                    va="center", fontsize=7, color="grey", transform=ax.get_xaxis_transform())
        ax.set_xlim(*xlim)
        ax.set_ylim(*ylim)
        titles.append("Forgetting outside the replay domain")
        k += 1
    if data.stability:
        ax = axes[k]
        _draw_stability(canvas, ax, data)
        xlim, ylim = canvas.limits([ax])
        ax.set_xlim(*xlim)
        ax.set_ylim(*ylim)
        titles.append("Stability vs plasticity")
    for ax, letter, title in zip(axes, "ABCDE", titles):
        ax.set_title(f"{letter}. {title}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
        ax.xaxis.label.set_size(8.5)
        ax.yaxis.label.set_size(8.5)
    if not axes:
        fig.text(0.5, 0.5, "no method has the metrics these panels need", ha="center", va="center")
    fig.legend(handles=handles, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, legend_in / (4.6 + legend_in), 1, 1))
    for ax in axes:  # after the layout: labels are placed in display pixels
        _place_labels(ax, canvas.labels.get(ax, []))
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    if tasks_png is not False:
        plot_task_curves(summary, tasks_png_for(out) if tasks_png is True else tasks_png)
    return out


def plot_task_curves(summary: Mapping[str, Any], out_png: str | Path) -> Optional[Path]:
    """Accuracy of every task after each training stage, one small subplot per method (shared axes;
    the dotted line is the base model's accuracy on that task). ``None`` (nothing written) when no
    method has a mean accuracy matrix."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in summary if m != "base" and summary[m].get("matrix_mean")]
    if not methods:
        return None
    tasks: list[str] = list(summary[methods[0]].get("tasks") or [])
    ncols = min(5, len(methods))
    nrows = math.ceil(len(methods) / ncols)
    fig, grid = plt.subplots(nrows, ncols, figsize=(3.0 * ncols, 2.4 * nrows + 0.6), sharex=True, sharey=True,
                             squeeze=False)
    colours = [_style(j)[0] for j in range(max(len(tasks), 1))]
    base = summary.get("base", {}).get("metrics", {})
    for ax, m in zip(grid.flat, methods):
        mat = summary[m]["matrix_mean"]
        for j, task in enumerate(summary[m].get("tasks") or tasks):
            stages = list(range(j, len(mat)))
            ax.plot(stages, [100 * mat[i][j] for i in stages], marker="o", ms=3, color=colours[j % len(colours)],
                    label=task)
            b = _mean(base, f"final/{task}")
            if b is not None:
                ax.axhline(b, color=colours[j % len(colours)], linestyle=":", linewidth=0.8)
        ax.set_title(m, fontsize=9)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    for ax in list(grid.flat)[len(methods):]:
        ax.set_visible(False)
    for col in range(ncols):  # tick labels under the lowest subplot of each column
        lowest = grid[(len(methods) - 1 - col) // ncols, col]
        lowest.xaxis.set_tick_params(labelbottom=True)
        lowest.set_xticks(range(len(tasks)))
        lowest.set_xticklabels([f"after {t}" for t in tasks], rotation=20, fontsize=7)
    for row in grid:
        row[0].set_ylabel("accuracy (%)", fontsize=8)
    handles, names = grid.flat[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=len(names), fontsize=8, frameon=False)
    fig.suptitle("Each task's accuracy along the sequence (dotted: base model)", fontsize=10)
    fig.tight_layout(rect=(0, 0.5 / (2.4 * nrows + 0.6), 1, 0.97))
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
