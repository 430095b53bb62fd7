"""Performance invariants that do not depend on timing.

* A training step never touches the disk for GeRe: the state cache and the replay set are read
  once when the trainer is built, then live in memory (the reference implementation ``torch.load``s
  one file per replay sample in every step).
* The state cache on disk is at most 1/16 of the fp32 hidden states it replaces.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from .conftest import general_texts, sft_config, write_jsonl


class OpenRecorder:
    """Records every file opened while active, via the interpreter's ``open`` audit event.

    ``sys.addaudithook`` sees ``open()``, ``io.open``, ``os.open`` and ``pathlib`` reads alike. A hook
    cannot be removed, so one recorder is installed per process and switched on and off.
    """

    _instance: OpenRecorder | None = None

    def __init__(self) -> None:
        self.active = False
        self.paths: list[str] = []

    @classmethod
    def get(cls) -> OpenRecorder:
        if cls._instance is None:
            cls._instance = cls()
            sys.addaudithook(cls._instance._hook)
        return cls._instance

    def _hook(self, event: str, args: tuple[Any, ...]) -> None:
        if not self.active or event != "open" or not args:
            return
        path = args[0]
        if isinstance(path, (str, bytes, os.PathLike)):
            self.paths.append(os.path.realpath(os.fsdecode(path)))

    def __enter__(self) -> OpenRecorder:
        self.paths = []
        self.active = True
        return self

    def __exit__(self, *exc: object) -> None:
        self.active = False

    def under(self, folder: Path) -> list[str]:
        root = os.path.realpath(folder)
        return [p for p in self.paths if p == root or p.startswith(root + os.sep)]


def _tm_trainer(tmp_path: Path, tiny_model, tiny_tokenizer, sft_dataset, replay_file: Path, cache: Path):
    from gere_plugin import GeReSFTTrainer

    args = sft_config(
        tmp_path / "out",
        gere_replay=str(replay_file),
        gere_regularizer="tm",
        gere_state_cache=str(cache),
        gere_replay_per_step=2,
    )
    return GeReSFTTrainer(
        model=tiny_model, args=args, train_dataset=sft_dataset, processing_class=tiny_tokenizer
    )


def _step(trainer, batch, num_items, step: int) -> None:
    trainer.state.global_step = step
    trainer.current_gradient_accumulation_steps = 1
    trainer.training_step(trainer.model, dict(batch), num_items)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)


def test_training_steps_open_no_cache_or_replay_file(
    tmp_path, tiny_model, tiny_tokenizer, sft_dataset, replay_file
):
    from gere_plugin.states import StateCache

    cache = tmp_path / "states"
    trainer = _tm_trainer(tmp_path, tiny_model, tiny_tokenizer, sft_dataset, replay_file, cache)
    assert (cache / "meta.json").exists(), "the trainer should have written its state cache to disk"
    trainer.create_optimizer()
    samples, num_items = trainer.get_batch_samples(
        iter(trainer.get_train_dataloader()), 1, trainer.args.device
    )
    batch = samples[0]
    _step(trainer, batch, num_items, 0)  # first step: lazy initialisation is allowed to do anything

    recorder = OpenRecorder.get()
    with recorder:
        for step in range(1, 5):  # different steps replay different rows
            _step(trainer, batch, num_items, step)
    assert [h["step"] for h in trainer.gere_step.history] == [0, 1, 2, 3, 4]
    assert recorder.under(cache) == [], f"training steps opened state-cache files: {recorder.under(cache)}"
    replay = os.path.realpath(replay_file)
    assert replay not in recorder.paths, "training steps re-read the replay file"

    # The recorder is not blind: loading the cache from disk is seen.
    with recorder:
        StateCache.load(cache)
    assert recorder.under(cache), "the open recorder did not see StateCache.load reading the cache"


def test_state_cache_on_disk_is_at_most_one_sixteenth_of_fp32(tmp_path, tiny_model, tiny_tokenizer):
    from gere_plugin.replay import ReplaySet
    from gere_plugin.states import build_state_cache

    max_length = 64
    texts = general_texts(400, seed=11, min_words=70, max_words=90)
    path = write_jsonl(tmp_path / "long.jsonl", [{"text": t} for t in texts])
    replay = ReplaySet.from_texts(
        texts, tiny_tokenizer, size=400, max_length=max_length, seed=0, source=str(path)
    )
    n, t = len(replay), max_length
    assert int(replay.lengths.min()) == t, (
        "every sample should fill max_length, so N x T is the real token count"
    )
    cache = build_state_cache(
        tiny_model, replay, [-1], 1.0, batch_size=32, pad_token_id=tiny_tokenizer.pad_token_id, progress=False
    )
    folder = tmp_path / "states"
    cache.save(folder)
    on_disk = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    h = cache.hidden_size
    fp32 = n * t * h * 4
    assert on_disk <= fp32 / 16, f"cache is {on_disk} bytes = 1/{fp32 / on_disk:.1f} of the {fp32} fp32 bytes"
    # It really holds every label: the in-memory labels round-trip from the saved files.
    from gere_plugin.states import StateCache

    loaded = StateCache.load(folder)
    assert loaded.labels_for([0, n - 1], t).shape == (2, t, 1, h)


@pytest.mark.parametrize("width", [1, 17, 64])
def test_labels_for_matches_per_sample_slices(tiny_model, tiny_tokenizer, replay_file, width):
    """The vectorised gather in ``labels_for`` equals slicing each sample and padding with INACTIVE."""
    import torch

    from gere_plugin.losses import INACTIVE
    from gere_plugin.replay import ReplaySet
    from gere_plugin.states import build_state_cache

    texts = [json.loads(line)["text"] for line in replay_file.read_text().splitlines()]
    replay = ReplaySet.from_texts(texts, tiny_tokenizer, size=32, max_length=32, seed=0)
    cache = build_state_cache(
        tiny_model,
        replay,
        [-1, 2],
        1.0,
        batch_size=5,
        pad_token_id=tiny_tokenizer.pad_token_id,
        progress=False,
    )
    rows = [3, 0, 31, 3, 17]
    got = cache.labels_for(rows, width)
    assert got.shape == (len(rows), width, 2, cache.hidden_size)
    for j, i in enumerate(rows):
        a, b = int(cache.offsets[i]), int(cache.offsets[i + 1])
        n = min(b - a, width)
        one = cache.labels_for([i], b - a)[0]  # a single full-length sample
        assert torch.equal(got[j, :n], one[:n])
        assert bool((got[j, n:] == INACTIVE).all())
