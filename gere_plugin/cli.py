"""The ``gere`` command.

Subcommands:
    gere build-replay --from CORPUS --size N --out replay.jsonl   sample a replay file from any corpus
    gere cache-states --model DIR --gere_replay replay.jsonl ...   build the base-model state cache
    gere keys [--check README.md]                                  the table of every gere_* key
    gere evaluate ... / gere report ...                            evaluation (see docs/evaluation.md)
    gere sequence --model DIR --task NAME TRAIN TEST ... --method gere --replay R --out DIR
                                                                   fine-tune a task sequence, evaluate each stage
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional

from .config import GeReConfigError


def _build_replay(argv: list[str]) -> int:
    from .replay import build_replay_file

    p = argparse.ArgumentParser(prog="gere build-replay", description="Sample a general replay set into a jsonl file.")
    p.add_argument("--from", dest="corpus", required=True, help="jsonl/json/parquet/txt file or folder, datasets folder or id")
    p.add_argument("--out", required=True, help="output .jsonl (written atomically)")
    p.add_argument("--size", type=int, default=1000, help="number of texts (gere_replay_size)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--text-field", default="text", help="column with the text (gere_replay_text_field)")
    p.add_argument("--split", default="train", help="split of a datasets folder or id (gere_replay_split)")
    p.add_argument("--min-chars", type=int, default=1, help="drop texts shorter than this")
    a = p.parse_args(argv)
    n = build_replay_file(a.corpus, a.out, size=a.size, seed=a.seed, text_field=a.text_field, split=a.split, min_chars=a.min_chars)
    print(f"wrote {n} replay texts to {a.out}")
    return 0


def _cache_states(argv: list[str]) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser

    from .config import GeReArguments
    from .replay import ReplaySet
    from .states import build_state_cache

    p = HfArgumentParser(GeReArguments, prog="gere cache-states", description="Build the base-model state cache.")
    p.add_argument("--model", required=True, help="base model folder or id (the ORIGINAL base of a continual sequence)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    (gere_args, extra) = p.parse_args_into_dataclasses(args=argv)
    if gere_args.gere_replay is None or gere_args.gere_state_cache is None:
        raise GeReConfigError("gere cache-states needs --gere_replay and --gere_state_cache.")
    tok = AutoTokenizer.from_pretrained(extra.model)
    model = AutoModelForCausalLM.from_pretrained(extra.model, dtype=getattr(torch, extra.dtype)).to(extra.device)
    replay = ReplaySet.from_args(gere_args, tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    cache = build_state_cache(model, replay, gere_args.gere_layers, gere_args.gere_sigma, gere_args.gere_state_batch_size, pad)
    cache.save(gere_args.gere_state_cache)
    m = cache.meta
    print(
        f"saved {gere_args.gere_state_cache}: {m['num_samples']} samples, {m['total_tokens']} tokens, "
        f"{m['build_tokens_per_second']:.0f} tokens/s, states neg/inactive/pos = "
        f"{m['state_fractions']['neg']:.3f}/{m['state_fractions']['inactive']:.3f}/{m['state_fractions']['pos']:.3f}"
    )
    return 0


def _keys(argv: list[str]) -> int:
    from .config import keys_markdown

    p = argparse.ArgumentParser(prog="gere keys", description="Print (or check a file's copy of) the gere_* key table.")
    p.add_argument("--check", help="file whose table must equal the generated one (e.g. README.md)")
    a = p.parse_args(argv)
    table = keys_markdown()
    if a.check:
        with open(a.check, encoding="utf-8") as fh:
            if table not in fh.read():
                print(f"{a.check} does not contain the current gere_* key table; paste the output of `gere keys`.")
                return 1
        print(f"{a.check}: key table up to date")
        return 0
    print(table, end="")
    return 0


def _delegate(module: str, func: str, argv: list[str]) -> int:
    import importlib

    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        print(f"this subcommand needs extra packages: {e}. Install with `pip install gere-plugin[eval]`.", file=sys.stderr)
        return 2
    return int(getattr(mod, func)(argv) or 0)


COMMANDS = {
    "build-replay": _build_replay,
    "cache-states": _cache_states,
    "keys": _keys,
    "evaluate": lambda argv: _delegate("gere_plugin.evaluation.cli", "evaluate_main", argv),
    "report": lambda argv: _delegate("gere_plugin.evaluation.cli", "report_main", argv),
    "sequence": lambda argv: _delegate("gere_plugin.sequence_cli", "sequence_main", argv),
}


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__)
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return COMMANDS[argv[0]](argv[1:])
    except GeReConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
