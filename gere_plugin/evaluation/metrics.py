"""Continual-learning metrics computed from an accuracy matrix.

Notation (0-indexed, ``T`` tasks trained in order ``0 .. T-1``):

* ``R[i][j]`` -- accuracy (or any score where higher is better) on task ``j`` measured right after
  training task ``i``. Entries with ``j > i`` (tasks not trained yet) are allowed and are used by FWT.
* plasticity = ``mean_k R[k][k]`` (each task right after training it), next to which every stability
  measure (BWT, FM, general-ability change) must be read.
* ``b[j]`` -- optional "base row": the score of the model *before* any continual training.

All functions are pure: they take plain nested sequences of numbers and return floats. They raise
``ValueError`` on shapes that make the metric undefined (for example BWT with a single task), rather
than returning a silent 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional

Matrix = Sequence[Sequence[float]]

__all__ = [
    "average_accuracy",
    "average_incremental_accuracy",
    "average_performance",
    "backward_transfer",
    "forward_transfer",
    "forgetting_measure",
    "harmonic_f1",
    "plasticity",
    "continual_summary",
    "mean_and_spread",
    "relative_change",
]


def _check_square(R: Matrix) -> int:
    """Return ``T`` after checking that ``R`` has ``T`` rows of at least ``T`` finite numbers."""
    T = len(R)
    if T == 0:
        raise ValueError("the accuracy matrix is empty")
    for i, row in enumerate(R):
        if len(row) < T:
            raise ValueError(f"row {i} of the accuracy matrix has {len(row)} entries; expected {T}")
        for j in range(T):
            if row[j] is None or not math.isfinite(float(row[j])):
                raise ValueError(f"R[{i}][{j}]={row[j]!r} is not a finite number")
    return T


def average_accuracy(R: Matrix) -> float:
    r"""Average accuracy after the last task (AA).

    .. math:: \mathrm{AA} = \frac{1}{T} \sum_{j=0}^{T-1} R_{T-1,j}
    """
    T = _check_square(R)
    return sum(float(R[T - 1][j]) for j in range(T)) / T


def average_performance(R: Matrix) -> float:
    r"""Average task performance (AP) of the final model, as used by the GeRe paper's F1.

    .. math:: \mathrm{AP} = \frac{1}{T} \sum_{j=0}^{T-1} R_{T-1,j}

    This is numerically the same as :func:`average_accuracy` when ``R`` holds accuracies; it is kept
    as its own name because the paper combines *AP* (whatever per-task score is used: accuracy,
    exact match, ROUGE, ...) with the general score in :func:`harmonic_f1`. For the average over the
    whole sequence see :func:`average_incremental_accuracy`.
    """
    return average_accuracy(R)


def plasticity(R: Matrix) -> float:
    """Mean accuracy on each task right after training it: ``mean_k R[k][k]`` (how well tasks are learned).

    Stability measures (BWT, general-ability change) only mean something next to it: a method that
    "forgets less" because it learns less has a low plasticity.
    """
    T = _check_square(R)
    return sum(R[k][k] for k in range(T)) / T


def average_incremental_accuracy(R: Matrix) -> float:
    r"""Average over the sequence of the mean accuracy on the tasks seen so far.

    .. math:: \mathrm{AIA} = \frac{1}{T} \sum_{i=0}^{T-1} \frac{1}{i+1} \sum_{j=0}^{i} R_{i,j}
    """
    T = _check_square(R)
    total = 0.0
    for i in range(T):
        total += sum(float(R[i][j]) for j in range(i + 1)) / (i + 1)
    return total / T


def backward_transfer(R: Matrix) -> float:
    r"""Backward transfer (BWT, Lopez-Paz & Ranzato 2017). Negative values mean forgetting.

    .. math:: \mathrm{BWT} = \frac{1}{T-1} \sum_{j=0}^{T-2} \left(R_{T-1,j} - R_{j,j}\right)
    """
    T = _check_square(R)
    if T < 2:
        raise ValueError("BWT needs at least 2 tasks")
    return sum(float(R[T - 1][j]) - float(R[j][j]) for j in range(T - 1)) / (T - 1)


def forward_transfer(R: Matrix, base: Sequence[float]) -> float:
    r"""Forward transfer (FWT, Lopez-Paz & Ranzato 2017): effect of earlier tasks on unseen ones.

    .. math:: \mathrm{FWT} = \frac{1}{T-1} \sum_{j=1}^{T-1} \left(R_{j-1,j} - b_j\right)

    ``base[j]`` is the score of the model before any continual training (the base row).
    """
    T = _check_square(R)
    if T < 2:
        raise ValueError("FWT needs at least 2 tasks")
    if base is None or len(base) < T:
        raise ValueError(f"FWT needs a base row with {T} entries")
    return sum(float(R[j - 1][j]) - float(base[j]) for j in range(1, T)) / (T - 1)


def forgetting_measure(R: Matrix) -> float:
    r"""Forgetting measure (FM, Chaudhry et al. 2018). Larger values mean more forgetting.

    For every task except the last, the drop from its best score while the sequence ran (from the
    moment it was trained, ``l >= j``) to its final score:

    .. math:: \mathrm{FM} = \frac{1}{T-1} \sum_{j=0}^{T-2} \left(\max_{l \in \{j, \dots, T-2\}} R_{l,j}
              - R_{T-1,j}\right)
    """
    T = _check_square(R)
    if T < 2:
        raise ValueError("FM needs at least 2 tasks")
    total = 0.0
    for j in range(T - 1):
        best = max(float(R[stage][j]) for stage in range(j, T - 1))
        total += best - float(R[T - 1][j])
    return total / (T - 1)


def harmonic_f1(general: float, ap: float) -> float:
    r"""The GeRe paper's F1: harmonic mean of the general-ability score and AP (same scale).

    .. math:: F_1 = \frac{2 \cdot G \cdot \mathrm{AP}}{G + \mathrm{AP}}

    Returns 0 when both are 0. Both inputs must be non-negative.
    """
    g, a = float(general), float(ap)
    if g < 0 or a < 0 or not math.isfinite(g) or not math.isfinite(a):
        raise ValueError(f"harmonic_f1 needs finite non-negative scores, got {general!r}, {ap!r}")
    if g + a == 0:
        return 0.0
    return 2.0 * g * a / (g + a)


def relative_change(value: float, reference: float) -> float:
    """``(value - reference) / reference``: e.g. the relative perplexity rise over the base model."""
    if reference == 0:
        raise ValueError("relative_change needs a non-zero reference")
    return (float(value) - float(reference)) / float(reference)


def mean_and_spread(values: Sequence[float]) -> dict[str, float]:
    """Mean, sample standard deviation (0 for one value), min, max and count of ``values``."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("mean_and_spread needs at least one value")
    n = len(vals)
    mean = sum(vals) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "min": min(vals), "max": max(vals), "n": n}


def continual_summary(
    R: Matrix, base: Optional[Sequence[float]] = None, general: Optional[float] = None
) -> dict[str, Optional[float]]:
    """Every metric above that is defined for ``R`` (and ``base``/``general`` when given).

    Metrics that need more than one task (BWT, FWT, FM) or a base row are ``None`` when undefined.
    """
    T = _check_square(R)
    out: dict[str, Optional[float]] = {
        "AA": average_accuracy(R),
        "AP": average_performance(R),
        "AIA": average_incremental_accuracy(R),
        "plasticity": plasticity(R),
        "BWT": backward_transfer(R) if T > 1 else None,
        "FM": forgetting_measure(R) if T > 1 else None,
        "FWT": forward_transfer(R, base) if (T > 1 and base is not None) else None,
        "F1": None,
    }
    if general is not None:
        out["F1"] = harmonic_f1(general, out["AP"])  # type: ignore[arg-type]
    return out
