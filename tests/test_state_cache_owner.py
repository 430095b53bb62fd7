"""One owner of the state cache: no entry point deletes or modifies what GeRe did not create.

The three entry points that provide a cache (the TRL trainers, ``gere cache-states`` and ``axolotl gere
build-cache``) all go through :func:`gere_plugin.states.ensure_state_cache`. Each is pointed at

* a folder of user notes,
* a copy of a model folder (model.safetensors, config, tokenizer),
* another model's GeRe cache (hidden size 64; the run's model has 32),

with and (for the two commands) without ``--force``. Every file must come out byte-identical, and the
refusal must come before any forward pass (``build_state_cache`` is replaced by a function that fails
the test). ``--force`` replaces only a folder that IS a GeRe cache, atomically.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gere_plugin.cli import main
from gere_plugin.config import GeReArguments, GeReConfigError
from gere_plugin.replay import ReplaySet
from gere_plugin.states import (
    StateCache,
    StateCacheError,
    build_state_cache,
    ensure_state_cache,
    is_state_cache,
    plan_state_cache,
)

from .conftest import build_model, sft_config

REPLAY_SIZE = 32
MAX_LEN = 32


def snapshot(root: Path) -> dict[str, tuple[int, str, int]]:
    """``{relative path: (size, sha256, mtime_ns)}`` of every file under ``root`` (folders as size -1)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_dir():
            out[rel] = (-1, "", 0)
        else:
            out[rel] = (p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
    return out


def _replay(tokenizer: Any, replay_file: Path) -> ReplaySet:
    args = GeReArguments(gere_replay=str(replay_file), gere_replay_size=REPLAY_SIZE, gere_replay_max_length=MAX_LEN)
    return ReplaySet.from_args(args, tokenizer)


@pytest.fixture(scope="module")
def other_model_cache(tmp_path_factory: Any, tiny_tokenizer: Any, replay_file: Path) -> Path:
    """A valid GeRe cache of ANOTHER model (hidden 64) on the same replay set and tokenizer."""
    d = tmp_path_factory.mktemp("wide")
    wide = build_model(d / "model", tiny_tokenizer, hidden=64)
    cache = build_state_cache(wide, _replay(tiny_tokenizer, replay_file), progress=False)
    cache.save(d / "cache")
    return d / "cache"


def _notes(base: Path) -> Path:
    d = base / "notes"
    (d / "sub").mkdir(parents=True)
    (d / "todo.md").write_text("- read the GeRe paper\n")
    (d / "sub" / "data.csv").write_text("a,b\n1,2\n")
    return d


def _model_copy(base: Path, tiny_dir: Path) -> Path:
    return Path(shutil.copytree(tiny_dir, base / "model-copy"))


def _other_cache(base: Path, other: Path) -> Path:
    return Path(shutil.copytree(other, base / "other-cache"))


TARGETS: dict[str, tuple[Callable[..., Path], tuple[str, ...]]] = {
    # target -> (make it, what the refusal must say besides gere_state_cache)
    "user-notes": (lambda base, tiny, other: _notes(base), ("not empty", "never deletes")),
    "model-folder": (lambda base, tiny, other: _model_copy(base, tiny), ("not empty", "model.safetensors")),
    "other-model-cache": (lambda base, tiny, other: _other_cache(base, other), ("hidden size 64",)),
}


@pytest.fixture
def no_forward(monkeypatch: Any) -> None:
    """Any state build fails the test: refusals must come before a forward pass."""

    def forbidden(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("build_state_cache ran although the folder had to be refused first")

    import gere_plugin.cache.state_cache
    import gere_plugin.trainer.resources

    monkeypatch.setattr(gere_plugin.cache.state_cache, "build_state_cache", forbidden)
    monkeypatch.setattr(gere_plugin.trainer.resources, "build_state_cache", forbidden)


# ---------------------------------------------------------------------------------------------
# 1. The TRL trainers
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("target", sorted(TARGETS))
def test_trainer_never_touches_a_folder_it_did_not_create(
    target: str, tmp_path: Path, tiny_dir: Path, tiny_model: Any, tiny_tokenizer: Any, sft_dataset: Any,
    replay_file: Path, other_model_cache: Path, no_forward: None,
) -> None:  # fmt: skip
    from gere_plugin import GeReSFTTrainer

    make, expected = TARGETS[target]
    folder = make(tmp_path, tiny_dir, other_model_cache)
    before = snapshot(tmp_path)
    cfg = sft_config(
        tmp_path / "out", gradient_checkpointing=False, gere_replay=str(replay_file), gere_replay_size=REPLAY_SIZE,
        gere_replay_max_length=MAX_LEN, gere_state_cache=str(folder),
    )  # fmt: skip
    with pytest.raises(StateCacheError) as err:
        GeReSFTTrainer(model=tiny_model, args=cfg, train_dataset=sft_dataset, processing_class=tiny_tokenizer)
    msg = str(err.value)
    assert "gere_state_cache" in msg and str(folder) in msg
    for part in expected:
        assert part in msg, msg
    after = snapshot(tmp_path)
    assert {k: v for k, v in after.items() if not k.startswith("out")} == before


def test_trainer_default_folder_is_output_dir_gere_states_and_never_foreign(
    tmp_path: Path, tiny_model: Any, tiny_tokenizer: Any, sft_dataset: Any, replay_file: Path, no_forward: None
) -> None:
    """The one default-folder rule: <output_dir>/gere_states; user files there are refused, not replaced."""
    from gere_plugin import GeReSFTTrainer

    out = tmp_path / "out"
    (out / "gere_states").mkdir(parents=True)
    (out / "gere_states" / "mine.txt").write_text("keep me")
    before = snapshot(tmp_path)
    cfg = sft_config(out, gradient_checkpointing=False, gere_replay=str(replay_file), gere_replay_size=REPLAY_SIZE,
                     gere_replay_max_length=MAX_LEN)
    with pytest.raises(StateCacheError, match=r"gere_state_cache=.*out/gere_states.*mine\.txt"):
        GeReSFTTrainer(model=tiny_model, args=cfg, train_dataset=sft_dataset, processing_class=tiny_tokenizer)
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------------------------------------
# 2. gere cache-states
# ---------------------------------------------------------------------------------------------
def _cache_states(tiny_dir: Path, replay_file: Path, folder: Path, *extra: str) -> list[str]:
    return ["cache-states", "--model", str(tiny_dir), "--gere_replay", str(replay_file), "--gere_replay_size",
            str(REPLAY_SIZE), "--gere_replay_max_length", str(MAX_LEN), "--gere_state_cache", str(folder), *extra]


@pytest.mark.parametrize("force", [False, True], ids=["plain", "force"])
@pytest.mark.parametrize("target", sorted(TARGETS))
def test_cache_states_never_touches_a_folder_it_did_not_create(
    target: str, force: bool, tmp_path: Path, tiny_dir: Path, replay_file: Path, other_model_cache: Path,
    no_forward: None, capsys: Any,
) -> None:  # fmt: skip
    if force and target == "other-model-cache":
        pytest.skip("--force replaces a folder that IS a GeRe cache: test_force_replaces_only_a_gere_cache")
    make, expected = TARGETS[target]
    folder = make(tmp_path, tiny_dir, other_model_cache)
    before = snapshot(tmp_path)
    rc = main(_cache_states(tiny_dir, replay_file, folder, *(["--force"] if force else [])))
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "gere_state_cache" in err and "Traceback" not in err
    for part in expected:
        assert part in err, err
    assert "--force" in err or force or target != "other-model-cache"
    assert snapshot(tmp_path) == before


def test_force_replaces_only_a_gere_cache(
    tmp_path: Path, tiny_dir: Path, replay_file: Path, other_model_cache: Path, capsys: Any
) -> None:
    """With --force another model's cache (a GeRe cache) is replaced, atomically, by this model's."""
    folder = _other_cache(tmp_path, other_model_cache)
    assert is_state_cache(folder)
    assert main(_cache_states(tiny_dir, replay_file, folder, "--force")) == 0
    assert "replaced" in capsys.readouterr().out
    cache = StateCache.load(folder)
    assert cache.hidden_size == 32 and cache.meta["built_by"] == "gere cache-states"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other-cache"], "temporary or old folders left behind"
    # a GeRe cache mixed with a user file is not a GeRe cache: even --force leaves it alone
    (folder / "README.md").write_text("my notes about this cache")
    before = snapshot(tmp_path)
    assert main(_cache_states(tiny_dir, replay_file, folder, "--force")) == 2
    assert "other files (README.md)" in capsys.readouterr().err
    assert snapshot(tmp_path) == before


def test_cache_states_reuses_a_compatible_cache_and_rebuilds_only_with_force(
    tmp_path: Path, tiny_dir: Path, replay_file: Path, capsys: Any
) -> None:
    folder = tmp_path / "states"
    assert main(_cache_states(tiny_dir, replay_file, folder)) == 0
    first = snapshot(tmp_path)
    assert main(_cache_states(tiny_dir, replay_file, folder)) == 0
    assert "already there" in capsys.readouterr().out
    assert snapshot(tmp_path) == first, "a compatible cache must be left as it is"
    assert main(_cache_states(tiny_dir, replay_file, folder, "--force")) == 0
    assert snapshot(tmp_path)["states/meta.json"] != first["states/meta.json"]
    # another replay set: refused without --force, naming the keys that differ
    before = snapshot(tmp_path)
    assert main(_cache_states(tiny_dir, replay_file, folder, "--gere_seed", "7", "--gere_replay_size", "16")) == 2
    assert "another replay set" in capsys.readouterr().err
    assert snapshot(tmp_path) == before


def test_cache_states_writes_into_an_empty_folder_and_the_trainers_default(
    tmp_path: Path, tiny_dir: Path, replay_file: Path
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(_cache_states(tiny_dir, replay_file, empty)) == 0
    assert is_state_cache(empty)
    out = tmp_path / "run"
    argv = [a for a in _cache_states(tiny_dir, replay_file, empty) if a not in ("--gere_state_cache", str(empty))]
    assert main([*argv, "--output_dir", str(out)]) == 0
    assert is_state_cache(out / "gere_states")  # where a trainer with output_dir=out looks


def test_damaged_cache_is_replaced_with_force_but_an_unreadable_meta_never(
    tmp_path: Path, tiny_dir: Path, replay_file: Path, capsys: Any
) -> None:
    folder = tmp_path / "states"
    assert main(_cache_states(tiny_dir, replay_file, folder)) == 0
    labels = folder / "labels.bin"
    labels.write_bytes(labels.read_bytes()[:-3])
    assert main(_cache_states(tiny_dir, replay_file, folder)) == 2
    assert "truncated" in capsys.readouterr().err
    assert main(_cache_states(tiny_dir, replay_file, folder, "--force")) == 0
    assert StateCache.load(folder).meta["num_samples"] == REPLAY_SIZE
    (folder / "meta.json").write_text("{not json")
    before = snapshot(tmp_path)
    assert main(_cache_states(tiny_dir, replay_file, folder, "--force")) == 2
    assert "cannot tell" in capsys.readouterr().err
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------------------------------------
# 3. axolotl gere build-cache
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def plugin_manager_reset() -> Any:
    """A fresh Axolotl PluginManager singleton (and none left behind)."""
    pytest.importorskip("axolotl")
    from axolotl.integrations.base import PluginManager

    PluginManager._instance = None
    PluginManager._cfg = None
    yield
    PluginManager._instance = None
    PluginManager._cfg = None


def _axolotl_config(tmp_path: Path, tiny_dir: Path, folder: Path) -> Path:
    import yaml

    from .test_axolotl_train import prepare_recipe

    work = tmp_path / "axo"
    work.mkdir()
    cfg, raw = prepare_recipe("tiny-cpu-sft-full.yml", work, tiny_dir)
    raw["gere_state_cache"] = str(folder)
    cfg.write_text(yaml.safe_dump(raw, sort_keys=False))
    return cfg


@pytest.mark.parametrize("force", [False, True], ids=["plain", "force"])
@pytest.mark.parametrize("target", sorted(TARGETS))
def test_axolotl_build_cache_never_touches_a_folder_it_did_not_create(
    target: str, force: bool, tmp_path: Path, tiny_dir: Path, other_model_cache: Path, no_forward: None,
    plugin_manager_reset: None,
) -> None:  # fmt: skip
    from click.testing import CliRunner

    from gere_plugin.axolotl.cli import gere_command

    if force and target == "other-model-cache":
        pytest.skip("--force replaces a folder that IS a GeRe cache (tested through gere cache-states)")
    make, expected = TARGETS[target]
    folder = make(tmp_path, tiny_dir, other_model_cache)
    cfg = _axolotl_config(tmp_path, tiny_dir, folder)
    before = snapshot(folder)
    result = CliRunner().invoke(gere_command, ["build-cache", str(cfg), *(["--force"] if force else [])])
    assert result.exit_code == 1, result.output
    assert "gere_state_cache" in result.output and "Traceback" not in result.output
    for part in expected:
        assert part in result.output, result.output
    assert snapshot(folder) == before


# ---------------------------------------------------------------------------------------------
# The library functions themselves
# ---------------------------------------------------------------------------------------------
def test_save_refuses_to_replace_what_is_not_a_cache(tmp_path: Path, tiny_model: Any, tiny_tokenizer: Any,
                                                     replay_file: Path) -> None:
    cache = build_state_cache(tiny_model, _replay(tiny_tokenizer, replay_file), progress=False)
    notes = _notes(tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(StateCacheError, match="never deletes"):
        cache.save(notes)
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(StateCacheError, match="is a file"):
        cache.save(tmp_path / "a-file")
    assert {k: v for k, v in snapshot(tmp_path).items() if k != "a-file"} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary folder left behind"


def test_plan_decides_without_running_the_model(tmp_path: Path, tiny_model: Any, tiny_tokenizer: Any,
                                                replay_file: Path) -> None:
    replay = _replay(tiny_tokenizer, replay_file)
    assert plan_state_cache(tmp_path / "new", replay, 32, [-1], 1.0).action == "build"
    built = ensure_state_cache(tmp_path / "c", replay, 32, [-1], 1.0,
                               lambda: build_state_cache(tiny_model, replay, progress=False))
    assert built.action == "build" and is_state_cache(tmp_path / "c")

    def never() -> StateCache:
        raise AssertionError("a compatible cache must be reused")

    reused = ensure_state_cache(tmp_path / "c", replay, 32, [-1], 1.0, never)
    assert reused.action == "reuse" and reused.cache is not None
    assert plan_state_cache(tmp_path / "c", replay, 32, [-1], 1.0, force=True).action == "rebuild"
    for kwargs, says in (({"hidden_size": 64}, "hidden size"), ({"layers": [-2]}, "gere_layers"),
                         ({"sigma": 2.0}, "gere_sigma")):
        args = {"hidden_size": 32, "layers": [-1], "sigma": 1.0, **kwargs}
        with pytest.raises(StateCacheError, match=says):
            plan_state_cache(tmp_path / "c", replay, args["hidden_size"], args["layers"], args["sigma"])
    with pytest.raises(GeReConfigError, match="gere_state_cache"):
        plan_state_cache(_notes(tmp_path), replay, 32, [-1], 1.0, force=True)


def test_cache_meta_is_json_with_provenance(tmp_path: Path, tiny_dir: Path, replay_file: Path) -> None:
    assert main(_cache_states(tiny_dir, replay_file, tmp_path / "c")) == 0
    meta = json.loads((tmp_path / "c" / "meta.json").read_text())
    assert meta["base_model"] == str(tiny_dir) and meta["built_by"] == "gere cache-states"
