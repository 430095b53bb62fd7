"""Item types and task-accuracy evaluators.

* :class:`MCItem` -- a multiple-choice cloze item (context, choices, gold index), scored by
  :func:`gere_plugin.evaluation.general.cloze_accuracy`.
* :class:`ClassificationItem` -- a prompt whose answer is one of a few label words; scored by
  :func:`label_accuracy` (the label word with the highest log-likelihood after the prompt wins).
* :class:`GenerationItem` -- a prompt with reference answers; scored by :func:`exact_match_accuracy`
  (greedy decoding, normalised exact match).
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

from .scoring import continuation_logprobs, greedy_generate, next_token_logprobs

__all__ = [
    "ClassificationItem",
    "GenerationItem",
    "MCItem",
    "exact_match_accuracy",
    "label_accuracy",
    "normalize_answer",
]


@dataclass(frozen=True)
class MCItem:
    """A multiple-choice cloze item: ``context`` is followed by one of ``choices``; ``gold`` is correct.

    Choices are scored as continuations of the context, so they normally start with a space.
    """

    context: str
    choices: tuple[str, ...]
    gold: int

    def __post_init__(self) -> None:
        if len(self.choices) < 2:
            raise ValueError("an MCItem needs at least 2 choices")
        if not 0 <= self.gold < len(self.choices):
            raise ValueError(f"gold index {self.gold} is out of range for {len(self.choices)} choices")


@dataclass(frozen=True)
class ClassificationItem:
    """A classification prompt whose answer is ``label_words[gold]`` (e.g. ``" positive"``)."""

    prompt: str
    label_words: tuple[str, ...]
    gold: int

    def __post_init__(self) -> None:
        if len(set(self.label_words)) != len(self.label_words) or len(self.label_words) < 2:
            raise ValueError("a ClassificationItem needs at least 2 distinct label words")
        if not 0 <= self.gold < len(self.label_words):
            raise ValueError(f"gold index {self.gold} is out of range for {len(self.label_words)} labels")

    @property
    def completion(self) -> str:
        """The gold label word: the training target in prompt/completion format."""
        return self.label_words[self.gold]

    def as_prompt_completion(self) -> dict[str, str]:
        """The item as a TRL prompt/completion row."""
        return {"prompt": self.prompt, "completion": self.completion}


@dataclass(frozen=True)
class GenerationItem:
    """A prompt with one or more acceptable reference answers (compared after normalisation)."""

    prompt: str
    answers: tuple[str, ...] = field(default_factory=tuple)


def label_accuracy(
    model: Any,
    tokenizer: Any,
    items: Sequence[ClassificationItem],
    batch_size: int = 16,
    max_length: int = 512,
    fast: bool = True,
) -> dict[str, Any]:
    """Accuracy of picking the label word with the highest summed log-likelihood after the prompt.

    The summed (not length-normalised) log-probability is used because label words are a fixed
    closed set. When every label word is a single token (and ``fast``), one forward per prompt
    gives all label scores (:func:`~.scoring.next_token_logprobs`); otherwise every (prompt, label)
    pair is scored. Returns ``accuracy``, ``n``, per-item ``predictions`` (indices into
    ``label_words``) and ``scores`` (log-likelihood of each label word).
    """
    if not items:
        raise ValueError("label_accuracy needs at least one item")
    table = _single_token_labels(tokenizer, items) if fast else None
    if table is not None:
        words, ids = table
        logp = next_token_logprobs(model, tokenizer, [it.prompt for it in items], ids, max_length, batch_size)
        all_scores = [[float(logp[n, words.index(w)]) for w in it.label_words] for n, it in enumerate(items)]
    else:
        pairs = [(it.prompt, word) for it in items for word in it.label_words]
        scores = continuation_logprobs(model, tokenizer, pairs, max_length=max_length, batch_size=batch_size)
        all_scores, pos = [], 0
        for it in items:
            all_scores.append([s.logprob for s in scores[pos : pos + len(it.label_words)]])
            pos += len(it.label_words)
    predictions = [max(range(len(s)), key=lambda c: s[c]) for s in all_scores]
    correct = sum(int(p == it.gold) for p, it in zip(predictions, items))
    return {"accuracy": correct / len(items), "n": len(items), "predictions": predictions, "scores": all_scores}


def _single_token_labels(tokenizer: Any, items: Sequence[ClassificationItem]) -> Optional[tuple[list[str], list[int]]]:
    """``(words, token ids)`` when every label word of every item is exactly one token, else ``None``."""
    words = sorted({w for it in items for w in it.label_words})
    ids = []
    for w in words:
        toks = tokenizer(w, add_special_tokens=False)["input_ids"]
        if len(toks) != 1:
            return None
        ids.append(int(toks[0]))
    return words, ids


_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lower-case, keep the first line, drop punctuation and articles, squeeze whitespace."""
    text = text.strip().split("\n", 1)[0].lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match_accuracy(
    model: Any,
    tokenizer: Any,
    items: Sequence[GenerationItem],
    max_new_tokens: int = 16,
    batch_size: int = 8,
) -> dict[str, Any]:
    """Share of items whose greedy output equals one of the answers after :func:`normalize_answer`."""
    if not items:
        raise ValueError("exact_match_accuracy needs at least one item")
    outputs = greedy_generate(
        model, tokenizer, [it.prompt for it in items], max_new_tokens=max_new_tokens, batch_size=batch_size
    )
    hits = [
        any(normalize_answer(out) == normalize_answer(ans) for ans in it.answers)
        for it, out in zip(items, outputs)
    ]
    return {"accuracy": sum(hits) / len(items), "n": len(items), "outputs": outputs}
