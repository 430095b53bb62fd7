"""``axolotl gere ...``: GeRe subcommands for the Axolotl CLI.

Axolotl 0.19 adds the click commands named in the ``axolotl.cli_commands`` entry-point group to
its CLI; this package registers ``gere = gere_plugin.axolotl.cli:gere_command`` (a click group):

* ``axolotl gere check CONFIG.yml ...``: the GeRe config check (:func:`~gere_plugin.axolotl.check_config`),
  e.g. ``gere_*`` keys that stock Axolotl would silently drop because the plugin line is missing.
* ``axolotl gere build-cache CONFIG.yml``: load the model and tokenizer exactly as the YAML says and
  build the base-model state cache ahead of training (training then only loads it).
* ``axolotl gere tiny-model OUT_DIR``: write a tiny random Llama + tokenizer for the CPU recipes.
* ``axolotl gere keys``: the table of every ``gere_*`` key.

Each command is also a plain function (:func:`check_configs`, :func:`build_cache`,
:func:`make_tiny_model`). Heavy imports (torch, Axolotl) happen inside the commands.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import click

from ..config import GeReConfigError

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Plain functions
# ---------------------------------------------------------------------------------------------
def check_configs(paths: Sequence[str], echo: Any = print, num_processes: Optional[int] = None) -> int:
    """Check each config with :func:`check_config`; print the reports; return the number that failed."""
    from .check import check_config

    failed = 0
    for path in paths:
        try:
            result = check_config(path, raise_on_error=False, num_processes=num_processes)
        except GeReConfigError as e:
            echo(f"{path}: {e}")
            failed += 1
            continue
        echo(result.report())
        failed += 0 if result.ok else 1
    return failed


def _load_axolotl_cfg(config: str, overrides: Optional[dict] = None) -> Any:
    """Load + validate + normalise an Axolotl config the way ``axolotl train`` does (no datasets)."""
    from axolotl.cli.config import load_cfg

    return load_cfg(config, **(overrides or {}))


def state_cache_dir(cfg: Any) -> Path:
    """Where training looks for the state cache: ``gere_state_cache`` or ``<output_dir>/gere_states``."""
    from ..cache.folders import state_cache_folder

    return state_cache_folder(cfg.get("gere_state_cache"), cfg.get("output_dir"))


def _config_hidden_size(cfg: Any) -> Optional[int]:
    """The model's hidden size from its config alone (no weights); ``None`` when it cannot be read."""
    from ..model.introspection import hidden_size_of

    try:
        from axolotl.loaders.utils import load_model_config

        return hidden_size_of(load_model_config(cfg))
    except Exception:  # the model load reports real problems itself; this is only an early check
        return None


def build_cache(config: str, force: bool = False, overrides: Optional[dict] = None) -> Path:
    """Build the base-model state cache for an Axolotl config before training; return its folder.

    The model and tokenizer are loaded by Axolotl's own loaders from the YAML (quantization, dtype,
    device map and adapter included); with an adapter the states come from the adapter-disabled
    model, i.e. the base, as during training. What happens to the folder is decided before the model
    is loaded (:func:`gere_plugin.states.ensure_state_cache`, as for the trainers and ``gere
    cache-states``): a compatible cache is kept, a foreign folder is refused, and an existing cache is
    replaced only with ``force``. Only ``gere_regularizer: tm`` needs a cache.
    """
    import torch

    from ..cache.state_cache import build_state_cache, ensure_state_cache
    from ..cli.flags import check_model_source
    from ..data.replay_set import ReplaySet
    from ..model.hidden import check_layer_indices
    from ..model.introspection import is_peft, pad_token_id, tokenizer_of
    from .args import gere_arguments_from_cfg
    from .check import load_config_mapping

    raw = {**load_config_mapping(config)[1], **(overrides or {})}
    model_key = "base_model_config" if raw.get("base_model_config") else "base_model"
    if raw.get(model_key):  # before Axolotl's loader turns a missing folder into a hub-id error
        check_model_source(str(raw[model_key]), f"{model_key}:")
    cfg = _load_axolotl_cfg(config, overrides)
    gere_args = gere_arguments_from_cfg(cfg)
    if gere_args.gere_replay is None:
        raise GeReConfigError(
            f"{config}: gere_replay is not set, so there is nothing to build a state cache for."
        )
    if gere_args.gere_regularizer != "tm":
        raise GeReConfigError(
            f"{config}: gere_regularizer={gere_args.gere_regularizer!r} needs no state cache (only 'tm' does)."
        )
    folder = state_cache_dir(cfg)

    from axolotl.loaders import ModelLoader, load_tokenizer

    tokenizer = tokenizer_of(load_tokenizer(cfg))
    replay = ReplaySet.from_args(gere_args, tokenizer)
    layers = list(gere_args.gere_layers)
    sigma = float(gere_args.gere_sigma)

    def build():
        model, _ = ModelLoader(cfg, tokenizer).load()
        model.eval()
        check_layer_indices(model, layers)
        param_dtype = next(model.parameters()).dtype
        autocast = None
        if param_dtype == torch.float32:
            autocast = (
                torch.bfloat16
                if cfg.get("bf16") is True
                else (torch.float16 if cfg.get("fp16") is True else None)
            )
        pad = pad_token_id(tokenizer)
        base_ctx = model.disable_adapter() if is_peft(model) else contextlib.nullcontext()
        with base_ctx:
            return build_state_cache(
                model,
                replay,
                layers,
                sigma,
                batch_size=gere_args.gere_state_batch_size,
                pad_token_id=pad,
                autocast_dtype=autocast,
                progress=True,
                extra_meta={"base_model": cfg.get("base_model"), "built_by": "axolotl gere build-cache"},
            )

    plan = ensure_state_cache(
        folder, replay, _config_hidden_size(cfg), layers, sigma, build, force=force,
        fix="Pass --force to replace it (only a folder that is a GeRe cache is ever removed), or point "
        "gere_state_cache at a new folder.",
    )  # fmt: skip
    assert plan.cache is not None
    if plan.action == "reuse":
        click.echo(
            f"gere: state cache {folder} is up to date (base model {plan.cache.meta.get('base_model')}); use --force to rebuild."
        )
        return folder
    size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
    click.echo(
        f"gere: {'replaced' if plan.action == 'rebuild' else 'wrote'} the state cache for {len(replay)} replay samples "
        f"({replay.num_tokens} tokens) in {folder} ({size / 1024**2:.2f} MiB)."
    )
    return folder


def make_tiny_model(out_dir: str, hidden: int = 32, layers: int = 4, seed: int = 0) -> Path:
    """Write a tiny random Llama (``layers`` x ``hidden``) and a small byte-level BPE tokenizer to ``out_dir``.

    The tokenizer is trained on the tiny recipes' own data, so everything stays offline. Only for
    smoke tests: the model is random.
    """
    import json

    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data_dir = Path(__file__).resolve().parents[2] / "recipes" / "axolotl" / "data"
    texts: list[str] = []
    for f in sorted(data_dir.glob("*.jsonl")) if data_dir.is_dir() else []:
        for line in f.read_text(encoding="utf-8").splitlines():
            if line.strip():
                texts.extend(str(v) for v in json.loads(line).values())
    if not texts:
        texts = ["the quick brown fox jumps over the lazy dog", "Review: good Sentiment: positive negative"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        texts,
        trainer=trainers.BpeTrainer(
            vocab_size=512,
            special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=fast.pad_token_id,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(str(out))
    fast.save_pretrained(str(out))
    return out


# ---------------------------------------------------------------------------------------------
# click commands (the ``axolotl.cli_commands`` entry point points at ``gere_command``)
# ---------------------------------------------------------------------------------------------
@click.group(name="gere")
def gere_command() -> None:
    """GeRe (general samples replay) tools: check configs, build the state cache."""


@gere_command.command(name="check")
@click.argument(
    "configs", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=str)
)
@click.option(
    "--num-processes",
    type=click.IntRange(min=1),
    default=None,
    help="Training processes (GPUs) the config will run on, for the batch-layout checks (default: $WORLD_SIZE).",
)
def check_cmd(configs: tuple[str, ...], num_processes: Optional[int]) -> None:
    """Check Axolotl YAMLs for GeRe mistakes Axolotl drops silently (e.g. a missing plugin line), and for
    what training would find only later; every problem is listed."""
    failed = check_configs(configs, echo=click.echo, num_processes=num_processes)
    if failed:
        sys.exit(1)


@gere_command.command(name="build-cache")
@click.argument("config", type=click.Path(exists=True, dir_okay=False, path_type=str))
@click.option(
    "--force",
    is_flag=True,
    help="Replace an existing cache (compatible or not). Only a folder that IS a GeRe cache is ever removed.",
)
def build_cache_cmd(config: str, force: bool) -> None:
    """Load the model as CONFIG says and build the base-model state cache before training."""
    try:
        build_cache(config, force=force)
    except GeReConfigError as e:
        raise click.ClickException(str(e)) from None
    except (ValueError, OSError) as e:  # Axolotl's own validation and loaders on bad input: a message, no traceback
        raise click.ClickException(f"{config}: {e}") from None


@gere_command.command(name="tiny-model")
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=str))
def tiny_model_cmd(out_dir: str) -> None:
    """Write a tiny random Llama + tokenizer to OUT_DIR (for the tiny CPU recipes)."""
    path = make_tiny_model(out_dir)
    click.echo(f"gere: wrote a tiny random Llama + tokenizer to {path}")


@gere_command.command(name="keys")
def keys_cmd() -> None:
    """Print the Markdown table of every gere_* key."""
    from ..config import keys_markdown

    click.echo(keys_markdown())
