"""Crashes, resumes and damaged state caches.

* A training subprocess is SIGKILLed after ``checkpoint-2`` is complete (its ``gere_state.json``, the
  last file a checkpoint gets, exists) and while step 3 is done but not saved; it is then resumed
  from ``checkpoint-2`` with ``trainer.train(resume_from_checkpoint=...)``. Replay rows, step count
  and the logged loss / ``gere/*`` values of the resumed steps must equal an uninterrupted run's.
* A process killed inside ``StateCache.save`` (between the data files and ``meta.json``) leaves only
  a ``.<name>.tmp-*`` sibling, never a folder that a later run would load; the next run rebuilds.
* Damaged caches (flipped bytes, truncated or missing files, wrong shapes, corrupted ``meta.json``)
  are refused by ``StateCache.load`` with a message that names ``gere_state_cache`` and says to
  delete / rebuild; caches of another tokenizer or hidden size are refused by the compatibility check.

The subprocess tests are ``slow``; the damaged-cache tests run in about a second.
"""

from __future__ import annotations

import json
import shutil
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gere_plugin.config import GeReArguments
from gere_plugin.replay import ReplaySet
from gere_plugin.states import StateCache, StateCacheError, build_state_cache

from .conftest import build_model, general_texts, sft_config, write_jsonl
from .scripts import runner

STEPS = 6
SAVE = 2
KILL_AT = 3  # the killed run hangs once global_step reaches 3: checkpoint-2 saved, step 3 done, not saved
PER_STEP = 2
REPLAY_SIZE = 16
REL_TOL = 1e-5
COMPARED = ("loss", "grad_norm", "gere/reg_loss", "gere/replay_ce", "gere/weight")


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


@pytest.fixture(scope="module")
def task_data(tmp_path_factory: Any, sft_dataset: Any) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("task") / "task.jsonl", sft_dataset.to_list())


def _common(tiny_dir: Path, task_data: Path, replay_file: Path) -> list[str]:
    return [
        "--model", str(tiny_dir), "--data", str(task_data), "--replay", str(replay_file),
        "--batch", "2", "--accum", "2", "--max_steps", str(STEPS), "--save_steps", str(SAVE),
        "--per_step", str(PER_STEP), "--replay_size", str(REPLAY_SIZE), "--sampling", "random",
    ]  # fmt: skip


def _steps_with_rows(path: Path) -> set[int]:
    if not path.exists():
        return set()
    return {json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()}


@pytest.mark.slow
def test_sigkill_then_resume_matches_an_uninterrupted_run(
    tmp_path: Path, tiny_dir: Path, task_data: Path, replay_file: Path
) -> None:
    common = _common(tiny_dir, task_data, replay_file)
    ref = runner.run(common, tmp_path / "ref", tmp_path / "ref_replay.jsonl")

    out, log, marker = tmp_path / "run", tmp_path / "killed.log", tmp_path / "hanging"
    killed_replay = tmp_path / "killed_replay.jsonl"
    proc = runner.start([*common, "--hang_at_step", str(KILL_AT), "--hang_marker", str(marker)], out, log, killed_replay)
    ckpt = out / f"checkpoint-{SAVE}"
    runner.wait_for(
        lambda: marker.exists() and (ckpt / "gere_state.json").exists() and KILL_AT - 1 in _steps_with_rows(killed_replay),
        proc, log, what=f"checkpoint-{SAVE} and replay rows of step {KILL_AT - 1}",
    )  # fmt: skip
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert not (out / f"checkpoint-{2 * SAVE}").exists() and not (out / "history.json").exists()
    assert json.loads((ckpt / "gere_state.json").read_text())["global_step"] == SAVE

    resumed = runner.run([*common, "--resume", str(ckpt)], out, tmp_path / "resumed_replay.jsonl")

    # Replay rows: the killed run did steps 0..KILL_AT-1, the resumed run redoes SAVE..STEPS-1, all as
    # the uninterrupted run did them, with exactly PER_STEP rows per step.
    ref_rows = runner.replay_rows(str(tmp_path / "ref_replay.jsonl"))
    killed_rows = runner.replay_rows(str(killed_replay))
    resumed_rows = runner.replay_rows(str(tmp_path / "resumed_replay.jsonl"))
    assert sorted(ref_rows) == list(range(STEPS))
    assert sorted(killed_rows) == list(range(KILL_AT))
    assert sorted(resumed_rows) == list(range(SAVE, STEPS)), "the resumed run must continue at the checkpoint step"
    for parts in ref_rows.values():
        assert sum(len(r) for r in parts.values()) == PER_STEP
    for step in killed_rows:
        assert killed_rows[step] == ref_rows[step], f"killed run, step {step}"
    for step in resumed_rows:
        assert resumed_rows[step] == ref_rows[step], f"resumed run, step {step}"

    # Logged values: the resumed history carries steps 1..SAVE from the checkpoint and adds the rest.
    ref_logs, res_logs = ref.step_logs(), resumed.step_logs()
    assert sorted(res_logs) == sorted(ref_logs) == list(range(1, STEPS + 1))
    # gere/weight is absent where the regularizer is exactly 0 (step 1): both runs must agree on that too
    for step in range(1, STEPS + 1):
        assert [k for k in COMPARED if k in res_logs[step]] == [k for k in COMPARED if k in ref_logs[step]], step
    assert "gere/weight" not in ref_logs[1] and "gere/weight" in ref_logs[STEPS]
    pairs = [(s, k) for s in range(1, STEPS + 1) for k in COMPARED if k in ref_logs[s]]
    worst = max(_rel(res_logs[s][k], ref_logs[s][k]) for s, k in pairs)
    print(f"max relative difference, resumed vs uninterrupted: {worst:.3g}")
    for step, key in pairs:
        assert _rel(res_logs[step][key], ref_logs[step][key]) <= REL_TOL, (
            f"step {step} {key}: resumed {res_logs[step][key]!r} vs uninterrupted {ref_logs[step][key]!r}"
        )
    assert ref_logs[STEPS]["gere/reg_loss"] > 0
    assert json.loads((out / f"checkpoint-{STEPS}" / "gere_state.json").read_text())["global_step"] == STEPS
    # the resumed run reused the state cache the killed run had completed before training
    assert [r for r, _, _ in resumed.log_lines("reusing base-model state cache")] == [0]
    assert resumed.log_lines("built base-model states") == []


@pytest.mark.slow
def test_sigkill_while_saving_the_state_cache_leaves_nothing_usable(
    tmp_path: Path, tiny_dir: Path, task_data: Path, replay_file: Path, tiny_tokenizer: Any, sft_dataset: Any
) -> None:
    from transformers import AutoModelForCausalLM

    from gere_plugin import GeReSFTTrainer

    out, log, marker = tmp_path / "run", tmp_path / "killed.log", tmp_path / "hanging"
    args = [*_common(tiny_dir, task_data, replay_file), "--build_only", "--hang_in_cache_save"]
    proc = runner.start([*args, "--hang_marker", str(marker)], out, log)
    runner.wait_for(marker.exists, proc, log, what="the hang inside StateCache.save")
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL

    cache = out / "gere_states"
    assert not cache.exists(), "a half-written cache must never appear under its final name"
    partial = [p for p in out.iterdir() if p.name.startswith(".gere_states.tmp-")]
    assert len(partial) == 1, [p.name for p in out.iterdir()]
    assert (partial[0] / "labels.bin").exists() and not (partial[0] / "meta.json").exists()

    # The next run in the same output_dir ignores the debris and builds a complete cache.
    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir), dtype="float32")
    cfg = sft_config(
        out, gradient_checkpointing=False, gere_replay=str(replay_file), gere_replay_size=REPLAY_SIZE
    )
    trainer = GeReSFTTrainer(model=model, args=cfg, train_dataset=sft_dataset, processing_class=tiny_tokenizer)
    loaded = StateCache.load(cache)
    assert loaded.meta["replay_fingerprint"] == trainer.gere_step.replay.fingerprint
    assert int(loaded.offsets[-1]) == trainer.gere_step.replay.num_tokens


# ---------------------------------------------------------------------------------------------
# Damaged or foreign caches (fast)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def built_cache(tmp_path_factory: Any, tiny_dir: Path, replay_file: Path, tiny_tokenizer: Any) -> Path:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir), dtype="float32")
    replay = _replay(replay_file, tiny_tokenizer)
    cache = build_state_cache(model, replay, [-1], 1.0, batch_size=8, pad_token_id=tiny_tokenizer.pad_token_id, progress=False)
    folder = tmp_path_factory.mktemp("cache") / "gere_states"
    cache.save(folder)
    return folder


def _replay(replay_file: Path, tok: Any) -> ReplaySet:
    args = GeReArguments(gere_replay=str(replay_file), gere_replay_size=REPLAY_SIZE, gere_replay_max_length=32)
    return ReplaySet.from_args(args, tok)


def _flip(name: str, at: float = 0.5) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        data = bytearray((folder / name).read_bytes())
        i = int(len(data) * at)
        data[i] ^= 0xFF
        (folder / name).write_bytes(bytes(data))

    return damage


def _truncate(name: str, keep: float) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[: int(len(data) * keep)])

    return damage


def _write(name: str, data: bytes) -> Callable[[Path], None]:
    return lambda folder: (folder / name).write_bytes(data)


def _edit_meta(**changes: Any) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        meta = json.loads((folder / "meta.json").read_text())
        meta.update(changes)
        (folder / "meta.json").write_text(json.dumps(meta))

    return damage


def _shape_plus_one(index: int) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        meta = json.loads((folder / "meta.json").read_text())
        meta["packed_shape"][index] += 1
        (folder / "meta.json").write_text(json.dumps(meta))

    return damage


def _hidden_size_doubled(folder: Path) -> None:
    meta = json.loads((folder / "meta.json").read_text())
    meta["hidden_size"] *= 2
    (folder / "meta.json").write_text(json.dumps(meta))


# id -> (damage, substring of the specific diagnosis)
DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    "labels-flipped-byte": (_flip("labels.bin"), "checksum"),
    "labels-flipped-first-byte": (_flip("labels.bin", 0.0), "checksum"),
    "thresholds-flipped-byte": (_flip("thresholds.safetensors", 0.9), "checksum"),
    "labels-truncated": (_truncate("labels.bin", 0.5), "truncated"),
    "labels-truncated-to-zero": (_truncate("labels.bin", 0.0), "truncated"),
    "labels-extra-bytes": (lambda f: open(f / "labels.bin", "ab").write(b"\0" * 7), "bytes"),
    "labels-missing": (lambda f: (f / "labels.bin").unlink(), "missing"),
    "thresholds-missing": (lambda f: (f / "thresholds.safetensors").unlink(), "missing"),
    "meta-garbage": (_write("meta.json", b"\x00\x17garbage{"), "corrupted"),
    "meta-truncated": (_truncate("meta.json", 0.5), "corrupted"),
    "meta-empty": (_write("meta.json", b""), "corrupted"),
    "meta-not-utf8": (_write("meta.json", b'{"format_version": "\xff\xfe"}'), "corrupted"),
    "meta-missing": (lambda f: (f / "meta.json").unlink(), "meta.json"),
    "meta-wrong-format-version": (_edit_meta(format_version=999), "format version"),
    "meta-wrong-packed-shape-tokens": (_shape_plus_one(0), "shape"),
    "meta-wrong-packed-shape-width": (_shape_plus_one(-1), "shape"),
    "meta-wrong-hidden-size": (_hidden_size_doubled, "shape"),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damaged_cache_is_refused_with_rebuild_advice(case: str, built_cache: Path, tmp_path: Path) -> None:
    folder = tmp_path / "gere_states"
    shutil.copytree(built_cache, folder)
    StateCache.load(folder)  # the copy is sound before the damage
    damage, diagnosis = DAMAGE[case]
    damage(folder)
    with pytest.raises(StateCacheError) as err:
        StateCache.load(folder)
    msg = str(err.value)
    assert "gere_state_cache" in msg and str(folder) in msg, msg
    assert "Delete" in msg and "rebuilt" in msg, msg
    assert diagnosis in msg, f"{case}: {diagnosis!r} not in {msg}"


@pytest.mark.parametrize(
    "case",
    [
        pytest.param("meta-not-an-object", id="meta-not-an-object"),
        pytest.param("meta-without-packed-shape", id="meta-without-packed-shape"),
        pytest.param("meta-without-file-checksums", id="meta-without-file-checksums"),
    ],
)
def test_incomplete_meta_is_refused_with_rebuild_advice(case: str, built_cache: Path, tmp_path: Path) -> None:
    folder = tmp_path / "gere_states"
    shutil.copytree(built_cache, folder)
    meta = json.loads((folder / "meta.json").read_text())
    if case == "meta-not-an-object":
        (folder / "meta.json").write_text(json.dumps([meta]))
    elif case == "meta-without-packed-shape":
        del meta["packed_shape"]
        (folder / "meta.json").write_text(json.dumps(meta))
    else:
        del meta["files"]
        (folder / "meta.json").write_text(json.dumps(meta))
        _flip("labels.bin")(folder)
    with pytest.raises(StateCacheError) as err:
        StateCache.load(folder)
    assert "gere_state_cache" in str(err.value) and "Delete" in str(err.value)


def _other_tokenizer() -> Any:
    """A tokenizer with another vocabulary (word-level) than the tiny model's BPE tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(general_texts(200, seed=9), trainer=trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>")


def test_cache_of_another_tokenizer_is_refused(built_cache: Path, replay_file: Path) -> None:
    cache = StateCache.load(built_cache)
    other = _replay(replay_file, _other_tokenizer())
    with pytest.raises(StateCacheError) as err:
        cache.check_compatible(other, cache.hidden_size, cache.layers, 1.0, str(built_cache))
    msg = str(err.value)
    assert "gere_state_cache" in msg and "another tokenizer" in msg and "Delete" in msg


def test_cache_of_another_hidden_size_is_refused_by_the_trainer(
    built_cache: Path, tmp_path: Path, tiny_tokenizer: Any, sft_dataset: Any, replay_file: Path
) -> None:
    from gere_plugin import GeReSFTTrainer

    wider = build_model(tmp_path / "wider", tiny_tokenizer, hidden=64)
    cfg = sft_config(
        tmp_path / "out", gradient_checkpointing=False, gere_replay=str(replay_file),
        gere_replay_size=REPLAY_SIZE, gere_state_cache=str(built_cache),
    )  # fmt: skip
    with pytest.raises(StateCacheError) as err:
        GeReSFTTrainer(model=wider, args=cfg, train_dataset=sft_dataset, processing_class=tiny_tokenizer)
    msg = str(err.value)
    assert "gere_state_cache" in msg and "hidden size 32" in msg and "hidden size 64" in msg
    assert "new folder" in msg and "--force" in msg, msg  # the fix; the trainer itself never replaces a cache


def test_folder_without_meta_is_never_used_as_a_cache(
    built_cache: Path, tmp_path: Path, tiny_model: Any, tiny_tokenizer: Any, sft_dataset: Any, replay_file: Path
) -> None:
    """A half-copied cache (data files, no meta.json) under the configured name is refused, not rebuilt over."""
    from gere_plugin import GeReSFTTrainer

    folder = tmp_path / "copied"
    shutil.copytree(built_cache, folder)
    (folder / "meta.json").unlink()
    cfg = sft_config(
        tmp_path / "out", gradient_checkpointing=False, gere_replay=str(replay_file),
        gere_replay_size=REPLAY_SIZE, gere_state_cache=str(folder),
    )  # fmt: skip
    with pytest.raises(StateCacheError) as err:
        GeReSFTTrainer(model=tiny_model, args=cfg, train_dataset=sft_dataset, processing_class=tiny_tokenizer)
    assert "gere_state_cache" in str(err.value) and "no GeRe meta.json" in str(err.value)
    assert sorted(p.name for p in folder.iterdir()) == ["labels.bin", "thresholds.safetensors"]
