"""Optional bridge to lm-evaluation-harness (``pip install lm_eval``).

lm-evaluation-harness downloads its task data from the Hugging Face Hub unless the datasets are in
the local cache, so this adapter is for machines that have them; the built-in cloze evaluation in
:mod:`.general` works fully offline. When ``lm_eval`` is not importable, :func:`lm_eval_available`
is False and :func:`run_lm_eval` raises :class:`LmEvalUnavailable` with the install command.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from typing import Any, Optional

__all__ = ["LmEvalUnavailable", "lm_eval_available", "run_lm_eval", "extract_scores"]


class LmEvalUnavailable(RuntimeError):
    """``lm_eval`` is not installed."""


def lm_eval_available() -> bool:
    """True when ``lm_eval`` can be imported."""
    return importlib.util.find_spec("lm_eval") is not None


def extract_scores(results: dict[str, Any], preferred: Sequence[str] = ("acc_norm,none", "acc,none")) -> dict[str, float]:
    """Pick one headline number per task from an lm-eval ``results`` dict (``acc_norm`` before ``acc``)."""
    out: dict[str, float] = {}
    for task, metrics in results.get("results", {}).items():
        for key in preferred:
            if key in metrics and isinstance(metrics[key], (int, float)):
                out[task] = float(metrics[key])
                break
    return out


def run_lm_eval(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[str],
    limit: Optional[int] = None,
    batch_size: int = 8,
    num_fewshot: int = 0,
) -> dict[str, float]:
    """Run lm-evaluation-harness ``tasks`` on an in-memory HF ``model``; return ``{task: score}``.

    Uses ``lm_eval.models.huggingface.HFLM`` wrapping the given model and tokenizer, so no weights are
    loaded from disk or the Hub. Task data must already be cached locally when offline.
    """
    if not lm_eval_available():
        raise LmEvalUnavailable("lm-evaluation-harness is not installed. Install it with: pip install lm_eval")
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    results = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), limit=limit, num_fewshot=num_fewshot)
    return extract_scores(results or {})
