"""Pieces shared by the command-line entry points (``gere ...``).

* Flags are generated from dataclass fields (:class:`~gere_plugin.GeReArguments` for every
  ``gere_*`` key, :class:`~gere_plugin.continual.TrainSettings` for ``gere sequence``), so a setting
  has one spelling, one help text and one validation in every command.
* Old spellings (``--size``, ``--replay-size``, ...) keep working through hidden aliases that print a
  deprecation note.
* Model folders and output paths are checked before anything is loaded or written, with messages
  that name the flag and the fix (never a network error for a folder that does not exist).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional, Union

from ..config import GeReConfigError

__all__ = [
    "add_deprecated_flag",
    "add_field_flags",
    "add_ignored_flags",
    "check_model_source",
    "load_tokenizer_and_config",
    "str_to_bool",
]


def str_to_bool(value: Union[str, bool]) -> bool:
    """``true``/``false`` (also yes/no, 1/0) as on TRL's command line."""
    if isinstance(value, bool):
        return value
    v = value.strip().lower()
    if v in ("true", "yes", "1", "y", "t"):
        return True
    if v in ("false", "no", "0", "n", "f"):
        return False
    raise argparse.ArgumentTypeError(f"{value!r} is not true or false")


def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) is Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value)
    return str(value)


def add_field_flags(
    parser: argparse.ArgumentParser,
    cls: type,
    names: Sequence[str],
    defaults: Optional[dict[str, Any]] = None,
) -> None:
    """Add one ``--<field>`` flag per dataclass field of ``cls`` in ``names`` (type, choices and help
    from the field; ``defaults`` overrides the field default). Booleans take ``true``/``false`` (a bare
    ``--flag`` means true); lists take several values."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    defaults = defaults or {}
    for name in names:
        f = fields[name]
        if name in defaults:
            default = defaults[name]
        elif f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = None
        tp = _unwrap_optional(hints[name])
        kwargs: dict[str, Any] = {"dest": name, "default": default}
        help_text = f.metadata.get("help", "")
        if typing.get_origin(tp) in (list, tuple):
            (item,) = typing.get_args(tp)[:1]
            kwargs.update(nargs="+", type=item, metavar=item.__name__.upper())
        elif tp is bool:
            kwargs.update(nargs="?", const=True, type=str_to_bool, metavar="{true,false}")
        elif tp in (int, float, str):
            kwargs.update(type=tp, metavar={int: "N", float: "X", str: "VALUE"}[tp])
        if f.metadata.get("choices"):
            kwargs["choices"] = list(f.metadata["choices"])
            kwargs.pop("metavar", None)
        if default is not None:  # the help may describe the key's own default: then name this command's
            label = "this command's default" if "default" in help_text.lower() else "default"
            help_text = f"{help_text} ({label}: {_shown(default)})"
        kwargs["help"] = help_text.replace("%", "%%")
        parser.add_argument(f"--{name}", **kwargs)


class _DeprecatedFlag(argparse.Action):
    """A hidden old spelling of a flag: stores into the new flag's destination and says so on stderr."""

    def __init__(self, option_strings: Sequence[str], dest: str, new_flag: str = "", **kwargs: Any) -> None:
        self.new_flag = new_flag
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: Optional[str] = None) -> None:
        print(f"{parser.prog}: note: {option_string} is deprecated, use {self.new_flag} (same meaning).", file=sys.stderr)
        setattr(namespace, self.dest, values if values is not None else self.const)


def add_deprecated_flag(parser: argparse.ArgumentParser, old: str, new: str) -> None:
    """Accept ``old`` as a hidden alias of the already added flag ``new`` (same type and number of values)."""
    target = next(a for a in parser._actions if new in a.option_strings)
    kwargs: dict[str, Any] = {"nargs": target.nargs, "type": target.type, "choices": target.choices}
    if isinstance(target, argparse._StoreTrueAction):
        kwargs = {"nargs": 0, "const": True}
    elif target.nargs == "?":
        kwargs["const"] = target.const
    parser.add_argument(old, dest=target.dest, action=_DeprecatedFlag, new_flag=new, default=argparse.SUPPRESS,
                        help=argparse.SUPPRESS, **kwargs)


class _IgnoredFlag(argparse.Action):
    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: Optional[str] = None) -> None:
        print(f"{parser.prog}: note: {option_string} does not affect what this command does; ignored.", file=sys.stderr)


def add_ignored_flags(parser: argparse.ArgumentParser, names: Sequence[str]) -> None:
    """Accept (hidden, with a note) flags a command once took but does not use, so old command lines run."""
    for name in names:
        parser.add_argument(f"--{name}", dest=f"_ignored_{name}", nargs="+", action=_IgnoredFlag,
                            default=argparse.SUPPRESS, help=argparse.SUPPRESS)


# ---------------------------------------------------------------------------------------------
# Models and paths
# ---------------------------------------------------------------------------------------------
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def check_model_source(model: str, flag: str = "--model") -> str:
    """Return the local folder (or hub id) ``model`` names; raise :class:`GeReConfigError` naming ``flag``.

    A path that does not exist is reported as such, not as the network error ``from_pretrained``
    would give offline. A name shaped like a Hugging Face Hub id (``org/name``) is passed on: it may
    be in the local cache.
    """
    path = Path(os.path.expanduser(model))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise GeReConfigError(
                f"{flag} {model!r} is a folder without config.json, so it is not a saved model. Point {flag} at the "
                "folder that save_pretrained wrote (config.json, model weights, tokenizer files)."
            )
        return str(path)
    if path.exists():
        raise GeReConfigError(f"{flag} {model!r} is a file; it must be a model folder (save_pretrained output).")
    if model.startswith((".", "/", "~")) or not _HUB_ID.match(model):
        raise GeReConfigError(
            f"{flag} {model!r}: the folder does not exist ({path.resolve()}). Check the path (relative paths start "
            f"at {os.getcwd()})."
        )
    return model


def load_tokenizer_and_config(source: str, flag: str = "--model", tokenizer: Optional[str] = None) -> tuple[Any, Any]:
    """``(tokenizer, config)`` of a model folder or cached hub id, without loading the weights."""
    from transformers import AutoConfig, AutoTokenizer

    local = Path(source).is_dir()
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as e:
        if local:
            raise GeReConfigError(f"{flag} {source!r}: config.json cannot be read ({str(e).splitlines()[0]}).") from None
        raise GeReConfigError(
            f"{flag} {source!r}: no such folder ({Path(source).resolve()}), and no model of that id in the local "
            "Hugging Face cache. Point it at a saved model folder."
        ) from None
    tok_source = tokenizer or source
    try:
        tok = AutoTokenizer.from_pretrained(tok_source)
    except (OSError, ValueError, TypeError) as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise GeReConfigError(
            f"{'--tokenizer' if tokenizer else flag} {tok_source!r}: no tokenizer could be loaded ({reason}). Save "
            "the tokenizer next to the model (tokenizer.save_pretrained)."
        ) from None
    return tok, config
