"""``gere build-replay``, ``gere cache-states`` and ``gere keys``: the replay file, the base-model state cache
and the table of every ``gere_*`` key."""

from __future__ import annotations

import argparse

from ..config import GeReConfigError

__all__ = ["BUILD_REPLAY_KEYS", "CACHE_KEYS", "build_replay_main", "cache_states_main", "keys_main"]

#: The gere_* keys `gere build-replay` reads (the rest of its flags are not settings of the trainers).
BUILD_REPLAY_KEYS = ("gere_replay_size", "gere_seed", "gere_replay_text_field", "gere_replay_split")
#: The gere_* keys that decide the state cache (`gere cache-states` shows exactly these).
CACHE_KEYS = (
    "gere_replay", "gere_state_cache", "gere_replay_size", "gere_replay_max_length", "gere_replay_min_tokens",
    "gere_replay_text_field", "gere_replay_split", "gere_seed", "gere_layers", "gere_sigma", "gere_state_batch_size",
)  # fmt: skip


def build_replay_main(argv: list[str]) -> int:
    """`gere build-replay`: sample a general replay set from a corpus into a jsonl file."""
    from ..config import GeReArguments
    from ..data.replay_set import build_replay_file
    from .flags import add_deprecated_flag, add_field_flags

    p = argparse.ArgumentParser(prog="gere build-replay", description="Sample a general replay set into a jsonl file.")
    p.add_argument("--from", dest="corpus", required=True, help="jsonl/json/parquet/txt file or folder, datasets folder or id")
    p.add_argument("--out", required=True, help="output .jsonl (written atomically; an existing file only with --force)")
    add_field_flags(p, GeReArguments, BUILD_REPLAY_KEYS)
    p.add_argument("--min-chars", type=int, default=1, help="drop texts shorter than this (default: 1)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    for old, new in (("--size", "--gere_replay_size"), ("--seed", "--gere_seed"),
                     ("--text-field", "--gere_replay_text_field"), ("--split", "--gere_replay_split")):
        add_deprecated_flag(p, old, new)
    a = p.parse_args(argv)
    GeReArguments(**{k: getattr(a, k) for k in BUILD_REPLAY_KEYS})  # the keys' own validation (names the key)
    n = build_replay_file(
        a.corpus, a.out, size=a.gere_replay_size, seed=a.gere_seed, text_field=a.gere_replay_text_field,
        split=a.gere_replay_split, min_chars=a.min_chars, replace=a.force,
    )  # fmt: skip
    print(f"wrote {n} replay texts to {a.out}")
    return 0


def cache_states_main(argv: list[str]) -> int:
    """`gere cache-states`: build (or reuse, or with --force replace) the base-model state cache."""
    from ..config import GeReArguments, gere_fields
    from .flags import add_field_flags, add_ignored_flags, check_model_source, load_tokenizer_and_config

    p = argparse.ArgumentParser(
        prog="gere cache-states",
        description="Build the base-model state cache that GeRe's TM loss reads. A compatible cache is reused; a "
        "folder that is not a GeRe cache is never touched; an existing cache is replaced only with --force.",
    )
    p.add_argument("--model", help="base model folder (the ORIGINAL base of a continual sequence); required")
    add_field_flags(p, GeReArguments, CACHE_KEYS)
    p.add_argument("--output_dir", help="without --gere_state_cache: write to OUTPUT_DIR/gere_states, where a trainer "
                   "with this output_dir looks for it")
    p.add_argument("--force", action="store_true", help="replace an existing cache (only a folder that IS a GeRe "
                   "cache is ever removed; the new one is built next to it and swapped in atomically)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="(default: float32)")
    p.add_argument("--device", default=None, help="(default: cuda when available, else cpu)")
    add_ignored_flags(p, [f.name for f in gere_fields() if f.name not in CACHE_KEYS])  # accepted before, unused
    a = p.parse_args(argv)
    if not a.model:
        raise GeReConfigError("gere cache-states needs --model: the base model folder whose states GeRe keeps.")
    if a.gere_replay is None:
        raise GeReConfigError("gere cache-states needs --gere_replay: the replay file the trainers will use.")
    if a.gere_state_cache is None and a.output_dir is None:
        raise GeReConfigError(
            "gere cache-states needs --gere_state_cache DIR (or --output_dir DIR: the cache then goes to "
            "DIR/gere_states, the trainers' default for that output_dir)."
        )
    gere_args = GeReArguments(**{k: getattr(a, k) for k in CACHE_KEYS})
    source = check_model_source(a.model, "--model")

    from ..cache.folders import state_cache_folder
    from ..cache.state_cache import ensure_state_cache
    from ..data.replay_set import ReplaySet
    from ..model.hidden import check_layer_indices
    from ..model.introspection import hidden_size_of

    folder = state_cache_folder(gere_args.gere_state_cache, a.output_dir)
    tok, config = load_tokenizer_and_config(source, "--model")
    check_layer_indices(config, gere_args.gere_layers)
    replay = ReplaySet.from_args(gere_args, tok)

    def build():
        import torch
        from transformers import AutoModelForCausalLM

        from ..cache.state_cache import build_state_cache
        from ..model.introspection import pad_token_id

        device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = AutoModelForCausalLM.from_pretrained(source, dtype=getattr(torch, a.dtype)).to(device)
        pad = pad_token_id(tok)
        return build_state_cache(model, replay, gere_args.gere_layers, gere_args.gere_sigma,
                                 gere_args.gere_state_batch_size, pad,
                                 extra_meta={"base_model": a.model, "built_by": "gere cache-states"})

    plan = ensure_state_cache(
        folder, replay, hidden_size_of(config), gere_args.gere_layers, gere_args.gere_sigma, build, force=a.force,
        fix="Pass --force to replace it (only a folder that is a GeRe cache is ever removed), or point "
        "--gere_state_cache at a new folder.",
    )  # fmt: skip
    m = plan.cache.meta if plan.cache is not None else {}
    if plan.action == "reuse":
        print(f"{folder}: a compatible state cache is already there (base model {m.get('base_model')}, "
              f"{m.get('num_samples')} samples); nothing to do. Pass --force to rebuild it.")
        return 0
    print(
        f"{'replaced' if plan.action == 'rebuild' else 'saved'} {folder}: {m['num_samples']} samples, "
        f"{m['total_tokens']} tokens, {m['build_tokens_per_second']:.0f} tokens/s, states neg/inactive/pos = "
        f"{m['state_fractions']['neg']:.3f}/{m['state_fractions']['inactive']:.3f}/{m['state_fractions']['pos']:.3f}"
    )
    return 0


def keys_main(argv: list[str]) -> int:
    """`gere keys`: print the gere_* key table, or check that a file holds the current one."""
    from ..config import keys_markdown

    p = argparse.ArgumentParser(prog="gere keys", description="Print (or check a file's copy of) the gere_* key table.")
    p.add_argument("--check", help="file whose table must equal the generated one (e.g. docs/configuration.md)")
    a = p.parse_args(argv)
    table = keys_markdown()
    if a.check:
        try:
            with open(a.check, encoding="utf-8") as fh:
                text = fh.read()
        except (OSError, UnicodeDecodeError) as e:
            raise GeReConfigError(f"--check {a.check!r} cannot be read ({getattr(e, 'strerror', None) or e}).") from None
        if table not in text:
            print(f"{a.check} does not contain the current gere_* key table; paste the output of `gere keys`.")
            return 1
        print(f"{a.check}: key table up to date")
        return 0
    print(table, end="")
    return 0
