"""A rule-based reward for the tiny CPU GRPO recipes (no reward model, no downloads).

Axolotl loads it by dotted path (``trl.reward_funcs: [recipes.axolotl.tiny_rewards.vowel_share_reward]``),
so the repository root must be importable: run from the repository root with ``PYTHONPATH=.``. The
TRL recipe takes the same dotted path, or the file form ``recipes/axolotl/tiny_rewards.py:vowel_share_reward``.

The reward is deliberately simple and varies between completions of one prompt, so GRPO's
group-relative advantages are not all zero and the policy really trains.
"""

from __future__ import annotations

from typing import Any

VOWELS = frozenset("aeiouAEIOU")


def _text(completion: Any) -> str:
    """A completion as text: plain prompts give strings, conversational ones a list of messages."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list):
        return " ".join(str(m.get("content", "")) if isinstance(m, dict) else str(m) for m in completion)
    return str(completion)


def vowel_share_reward(completions: list[Any], **kwargs: Any) -> list[float]:
    """Share of vowels among the letters of each completion (0 for a completion without letters)."""
    out = []
    for completion in completions:
        letters = [ch for ch in _text(completion) if ch.isalpha()]
        out.append(sum(ch in VOWELS for ch in letters) / len(letters) if letters else 0.0)
    return out
