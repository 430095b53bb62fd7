"""Base-model states: thresholds and labels recomputed independently, cache format, errors."""

import json
import os
from pathlib import Path

import pytest
import torch

from gere_plugin.losses import INACTIVE, NEG, POS
from gere_plugin.replay import ReplaySet
from gere_plugin.states import (
    StateCache,
    StateCacheError,
    build_state_cache,
    pack_2bit,
    pack_trits,
    unpack_2bit,
    unpack_trits,
)

from .conftest import build_model, build_tokenizer, general_texts


@pytest.mark.parametrize("shape", [(5,), (3, 7), (2, 3, 9), (4, 1, 4)])
def test_pack_round_trip(shape):
    codes = torch.randint(0, 3, shape, dtype=torch.uint8)
    packed = pack_2bit(codes)
    assert packed.shape[-1] == (shape[-1] + 3) // 4
    assert torch.equal(unpack_2bit(packed, shape[-1]), codes)
    trits = pack_trits(codes)
    assert trits.shape[-1] == (shape[-1] + 4) // 5
    assert torch.equal(unpack_trits(trits, shape[-1]), codes)


@pytest.fixture
def replay(tiny_tokenizer):
    return ReplaySet.from_texts(general_texts(24, seed=5), tiny_tokenizer, size=20, max_length=24, seed=1)


def test_thresholds_and_labels_match_independent_computation(tiny_model, tiny_tokenizer, replay):
    cache = build_state_cache(tiny_model, replay, layers=[-1, 2], sigma=0.5, batch_size=3, pad_token_id=0, progress=False)
    # Independent: one sample at a time (no padding at all), plain torch statistics.
    per_layer = {-1: [], 2: []}
    with torch.no_grad():
        for ids in replay.input_ids:
            out = tiny_model(torch.tensor([ids]), output_hidden_states=True)
            for layer in per_layer:
                per_layer[layer].append(out.hidden_states[layer][0])
    for li, layer in enumerate([-1, 2]):
        h = torch.cat(per_layer[layer])  # [tokens, H]
        mu, std = h.mean(0), h.std(0, unbiased=False)
        torch.testing.assert_close(cache.mu[li], mu, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(cache.std[li], std, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(cache.pos[li], mu + 0.5 * std, atol=1e-5, rtol=1e-4)
        expected = torch.full(h.shape, INACTIVE)
        expected[h >= cache.pos[li]] = POS
        expected[h <= cache.neg[li]] = NEG
        got = torch.cat([cache.labels_for([i], len(ids))[0, :, li] for i, ids in enumerate(replay.input_ids)])
        agree = (got.long() == expected).float().mean().item()
        assert agree > 0.999, f"layer {layer}: only {agree:.4f} of labels agree"
    frac = cache.meta["state_fractions"]
    assert 0.2 < frac["inactive"] < 0.95 and frac["pos"] > 0 and frac["neg"] > 0


def test_save_load_round_trip_and_reported_size(tmp_path, tiny_model, replay):
    cache = build_state_cache(tiny_model, replay, progress=False)
    cache.save(tmp_path / "c")
    loaded = StateCache.load(tmp_path / "c")
    assert torch.equal(loaded.packed, cache.packed)
    assert torch.equal(loaded.pos, cache.pos)
    assert loaded.meta["replay_fingerprint"] == replay.fingerprint
    on_disk = (tmp_path / "c" / "labels.bin").stat().st_size
    assert on_disk == replay.num_tokens * ((32 + 4) // 5)
    assert not list(tmp_path.glob(".c.tmp-*")), "temporary folder left behind"
    # overwrite keeps exactly one cache
    cache.save(tmp_path / "c")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_save_removes_temporaries_of_dead_processes_only(tmp_path, tiny_model, replay):
    import subprocess
    import sys

    from gere_plugin.cache.io import owner_tag

    host = owner_tag().rsplit("-", 1)[0]
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid is no longer running
    killed = tmp_path / f".c.tmp-{host}-{dead.pid}-deadbeef"
    killed_old = tmp_path / f".c.old-{host}-{dead.pid}-deadbeef"
    running = tmp_path / f".c.tmp-{host}-{os.getppid()}-0badcafe"  # a live process: a save in progress
    other_node = tmp_path / f".c.tmp-anotherhost-{dead.pid}-12345678"  # cannot check another host's pids
    legacy = tmp_path / ".c.tmp-1234abcd"  # written before names carried host and pid
    for d in (killed, killed_old, running, other_node, legacy):
        d.mkdir()
        (d / "labels.bin").write_bytes(b"partial")
    cache = build_state_cache(tiny_model, replay, progress=False)
    cache.save(tmp_path / "c")
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(["c", running.name, other_node.name, legacy.name])
    assert StateCache.load(tmp_path / "c").meta["replay_fingerprint"] == replay.fingerprint


def test_format_is_at_most_one_sixteenth_of_fp32():
    n, t, h = 1000, 512, 4096
    fp32 = n * t * h * 4
    assert StateCache.format_nbytes(n, n * t, h) <= fp32 / 16


def test_format_nbytes_matches_disk(tmp_path, tiny_model, replay):
    cache = build_state_cache(tiny_model, replay, progress=False)
    cache.save(tmp_path / "c")
    data = (tmp_path / "c" / "labels.bin").stat().st_size
    assert data == StateCache.format_nbytes(len(replay), replay.num_tokens, 32) - 16 * 32 - 8 * (len(replay) + 1)


def test_truncated_and_corrupted_files_are_detected(tmp_path, tiny_model, replay):
    build_state_cache(tiny_model, replay, progress=False).save(tmp_path / "c")
    labels = tmp_path / "c" / "labels.bin"
    raw = labels.read_bytes()
    labels.write_bytes(raw[:-5])
    with pytest.raises(StateCacheError, match="truncated"):
        StateCache.load(tmp_path / "c")
    flipped = bytearray(raw)
    flipped[10] ^= 0xFF
    labels.write_bytes(bytes(flipped))
    with pytest.raises(StateCacheError, match="checksum.*Delete"):
        StateCache.load(tmp_path / "c")
    (tmp_path / "c" / "meta.json").write_text("{not json")
    with pytest.raises(StateCacheError, match="corrupted"):
        StateCache.load(tmp_path / "c")


def test_cache_from_other_tokenizer_or_hidden_size_is_rejected(tmp_path, tiny_model, replay):
    cache = build_state_cache(tiny_model, replay, progress=False)
    cache.check_compatible(replay, 32, [-1], 1.0, "x")  # matches
    with pytest.raises(StateCacheError, match="hidden size 32.*64"):
        cache.check_compatible(replay, 64, [-1], 1.0, "x")
    other_dir = tmp_path / "tok2"
    other_dir.mkdir()
    tok2 = build_tokenizer(other_dir)
    tok2.add_tokens(["zzzextra"])
    other = ReplaySet.from_texts(general_texts(24, seed=5), tok2, size=20, max_length=24, seed=1)
    with pytest.raises(StateCacheError, match="another tokenizer"):
        cache.check_compatible(other, 32, [-1], 1.0, "x")
    with pytest.raises(StateCacheError, match="gere_sigma"):
        cache.check_compatible(replay, 32, [-1], 2.0, "x")
    with pytest.raises(StateCacheError, match="gere_layers"):
        cache.check_compatible(replay, 32, [-2], 1.0, "x")


def test_bad_layer_index_names_the_key(tiny_model, replay):
    with pytest.raises(Exception, match="gere_layers"):
        build_state_cache(tiny_model, replay, layers=[99], progress=False)


def test_meta_records_provenance(tmp_path, tiny_model, replay):
    cache = build_state_cache(tiny_model, replay, progress=False)
    cache.save(tmp_path / "c")
    meta = json.loads(Path(tmp_path / "c" / "meta.json").read_text())
    for key in ("replay_fingerprint", "tokenizer_fingerprint", "hidden_size", "layers", "sigma", "files"):
        assert key in meta
    assert meta["hidden_size"] == 32 and meta["num_samples"] == 20


def test_tiny_build_helper_sanity(tmp_path):
    tok = build_tokenizer(tmp_path)
    model = build_model(tmp_path, tok, hidden=16, layers=1)
    assert model.config.hidden_size == 16
