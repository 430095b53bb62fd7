"""Choosing WiSE-FT's ``alpha`` (``gere_wise_alpha``) on the dev split: :func:`select_wise_alpha` (pure).

The rule, written down before any test split is read:

1. **Plasticity guard.** A candidate is eligible when the dev accuracy of the task just trained, after
   interpolating with it, is at most ``tolerance`` points (default 1) below that of ``alpha = 1`` (the trained
   model, which must be among the candidates). A smaller ``alpha`` that forgets less because it learned less
   is not eligible.
2. **Stability.** Among the eligible candidates, the one with the highest mean dev accuracy over the earlier
   tasks of the sequence wins.
3. **Ties, and the first task** (no earlier task, or equal earlier accuracies): the smallest ``alpha``, the
   weights closest to the model the task started from (and so to its general ability, which the dev split
   does not measure).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Optional, Union

__all__ = ["select_wise_alpha"]

#: Two mean accuracies closer than this (in points) are a tie.
TIE = 1e-9


def _mean(values: Union[float, Sequence[float]]) -> float:
    if isinstance(values, (int, float)):
        return float(values)
    values = [float(v) for v in values]
    return sum(values) / len(values) if values else math.nan


def select_wise_alpha(
    current: Mapping[float, float],
    earlier: Optional[Mapping[float, Union[float, Sequence[float]]]] = None,
    tolerance: float = 1.0,
) -> float:
    """The ``alpha`` the module docstring's rule picks.

    Args:
        current: candidate ``alpha`` -> dev accuracy (points, 0-100) of the task just trained, after
            interpolating with that ``alpha``; must hold ``1.0``.
        earlier: candidate ``alpha`` -> dev accuracies of the earlier tasks (a list, one per task, or their
            mean); ``None``, empty lists or an empty mapping for the first task. Same candidates as ``current``.
        tolerance: how many points of the trained model's current-task dev accuracy an eligible ``alpha``
            may give up (>= 0).
    """
    if not current:
        raise ValueError("select_wise_alpha: no candidate alpha was given")
    if 1.0 not in current:
        raise ValueError(
            "select_wise_alpha: the candidates must include alpha = 1.0 (the trained model, whose current-task dev "
            f"accuracy is the plasticity reference); got {sorted(current)}"
        )
    bad = [a for a in current if not (isinstance(a, (int, float)) and 0 < a <= 1)]
    if bad:
        raise ValueError(f"select_wise_alpha: every alpha must be in (0, 1]; got {bad}")
    if not (isinstance(tolerance, (int, float)) and tolerance >= 0):
        raise ValueError(f"select_wise_alpha: tolerance={tolerance!r} must be a number of points >= 0")
    earlier = earlier or {}
    if earlier and set(earlier) != set(current):
        raise ValueError(
            f"select_wise_alpha: current and earlier accuracies cover other candidates ({sorted(current)} vs "
            f"{sorted(earlier)})"
        )
    floor = float(current[1.0]) - float(tolerance)
    eligible = sorted(a for a, acc in current.items() if float(acc) >= floor)  # alpha = 1 always is
    means = {a: _mean(earlier[a]) for a in eligible} if earlier else {}
    if not means or any(math.isnan(m) for m in means.values()):
        return float(eligible[0])
    best = max(means.values())
    return float(min(a for a in eligible if means[a] >= best - TIE))
