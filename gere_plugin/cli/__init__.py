"""The ``gere`` command.

Commands:
    gere build-replay --from CORPUS --out replay.jsonl [--gere_replay_size N]
                                            sample a replay file from any corpus
    gere cache-states --model DIR --gere_replay replay.jsonl --gere_state_cache DIR [--force]
                                            build the base-model state cache (reuse / refuse / replace)
    gere keys [--check docs/configuration.md]         the table of every gere_* key
    gere evaluate ... / gere report ...     evaluation (see docs/evaluation.md)
    gere sequence --model DIR --task NAME TRAIN TEST ... --gere_replay R --out DIR [--method M]
                                            fine-tune a task sequence, evaluate each stage
                                            (default: the recommended preset)

Every gere_* setting has the spelling of config.py (--gere_replay_size, ...) in every command; the old
spellings (--size, --replay-size, ...) still work and print a deprecation note. `gere COMMAND --help`
lists a command's flags.
"""

from __future__ import annotations

import difflib
import logging
import sys
from typing import Optional

from ..config import GeReConfigError
from .replay import BUILD_REPLAY_KEYS, CACHE_KEYS, build_replay_main, cache_states_main, keys_main

__all__ = ["BUILD_REPLAY_KEYS", "CACHE_KEYS", "COMMANDS", "main"]


def _delegate(module: str, func: str, argv: list[str]) -> int:
    import importlib

    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        print(f"this subcommand needs extra packages: {e}. Install with `pip install gere-plugin[eval]`.", file=sys.stderr)
        return 2
    return int(getattr(mod, func)(argv) or 0)


COMMANDS = {
    "build-replay": build_replay_main,
    "cache-states": cache_states_main,
    "keys": keys_main,
    "evaluate": lambda argv: _delegate("gere_plugin.evaluation.cli", "evaluate_main", argv),
    "report": lambda argv: _delegate("gere_plugin.evaluation.cli", "report_main", argv),
    "sequence": lambda argv: _delegate("gere_plugin.cli.sequence", "sequence_main", argv),
}


def main(argv: Optional[list[str]] = None) -> int:
    """Run one ``gere`` command; returns the exit status (2 for bad input, with a message, no traceback)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    command = argv[0]
    if command not in COMMANDS:
        close = difflib.get_close_matches(command, list(COMMANDS), n=1)
        hint = f" Did you mean `gere {close[0]}`?" if close else ""
        print(f"gere: unknown command {command!r}.{hint} Commands: {', '.join(COMMANDS)} "
              "(`gere --help` says what each does).", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return COMMANDS[command](argv[1:])
    except GeReConfigError as e:
        print(f"gere {command}: error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # argparse: --help (0) or a flag it could not parse (2, message printed)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)

