"""Replay sources, seeded sampling, tokenization without special tokens, fingerprints."""

import json

import pytest

from gere_plugin.config import GeReArguments
from gere_plugin.replay import ReplayError, ReplaySet, load_records

from .conftest import general_texts, write_jsonl

TEXTS = general_texts(20, seed=21)


@pytest.fixture
def sources(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = {}
    out["jsonl"] = write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in TEXTS])
    (tmp_path / "b.json").write_text(json.dumps([{"text": t} for t in TEXTS]))
    out["json"] = tmp_path / "b.json"
    (tmp_path / "c.json").write_text(json.dumps({"data": [{"text": t} for t in TEXTS]}))
    out["json_data"] = tmp_path / "c.json"
    (tmp_path / "d.txt").write_text("\n".join(TEXTS) + "\n")
    out["txt"] = tmp_path / "d.txt"
    pq.write_table(pa.table({"text": TEXTS}), tmp_path / "e.parquet")
    out["parquet"] = tmp_path / "e.parquet"
    folder = tmp_path / "folder"
    folder.mkdir()
    write_jsonl(folder / "1.jsonl", [{"text": t} for t in TEXTS[:10]])
    (folder / "2.txt").write_text("\n".join(TEXTS[10:]))
    out["folder"] = folder
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": TEXTS})}).save_to_disk(str(tmp_path / "hf"))
    out["hf_folder"] = tmp_path / "hf"
    return out


@pytest.mark.parametrize("kind", ["jsonl", "json", "json_data", "txt", "parquet", "folder", "hf_folder"])
def test_every_source_kind_loads_the_same_texts(sources, kind):
    texts = sorted(r["text"] for r in load_records(str(sources[kind])))
    assert texts == sorted(TEXTS)


def test_sampling_is_seeded_and_tokenized_without_special_tokens(tiny_tokenizer, replay_file):
    args = GeReArguments(gere_replay=str(replay_file), gere_replay_size=10, gere_replay_max_length=8)
    a = ReplaySet.from_args(args, tiny_tokenizer)
    b = ReplaySet.from_args(args, tiny_tokenizer)
    assert a.texts == b.texts and a.fingerprint == b.fingerprint and len(a) == 10
    c = ReplaySet.from_args(GeReArguments(gere_replay=str(replay_file), gere_replay_size=10, gere_replay_max_length=8,
                                          gere_seed=1), tiny_tokenizer)
    assert c.texts != a.texts and c.fingerprint != a.fingerprint
    assert all(len(ids) <= 8 for ids in a.input_ids)
    specials = set(tiny_tokenizer.all_special_ids)
    assert not any(set(ids) & specials for ids in a.input_ids)
    assert a.input_ids[0] == tiny_tokenizer(a.texts[0], add_special_tokens=False)["input_ids"][:8]


def test_whole_file_gives_one_set_under_every_seed(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "r.jsonl", [{"text": t} for t in TEXTS])
    sets = [ReplaySet.from_args(GeReArguments(gere_replay=str(path), gere_replay_size=len(TEXTS), gere_seed=s),
                                tiny_tokenizer) for s in (0, 1, 7)]
    assert all(r.texts == TEXTS for r in sets)  # source order, whatever the seed
    assert len({r.fingerprint for r in sets}) == 1  # so one state cache serves every seed
    # a subset depends on the seed, and is still kept in source order
    sub = [ReplaySet.from_args(GeReArguments(gere_replay=str(path), gere_replay_size=8, gere_seed=s), tiny_tokenizer)
           for s in (0, 1)]
    assert sub[0].texts != sub[1].texts and sub[0].fingerprint != sub[1].fingerprint
    for r in sub:
        pos = [TEXTS.index(t) for t in r.texts]
        assert pos == sorted(pos)


def test_fingerprint_depends_on_max_length(tiny_tokenizer, replay_file):
    a = ReplaySet.from_args(GeReArguments(gere_replay=str(replay_file), gere_replay_size=10, gere_replay_max_length=8), tiny_tokenizer)
    b = ReplaySet.from_args(GeReArguments(gere_replay=str(replay_file), gere_replay_size=10, gere_replay_max_length=9), tiny_tokenizer)
    assert a.fingerprint != b.fingerprint


def test_collate_pads_right_and_masks_labels(tiny_tokenizer, replay_file):
    rs = ReplaySet.from_args(GeReArguments(gere_replay=str(replay_file), gere_replay_size=10, gere_replay_max_length=30), tiny_tokenizer)
    i, j = sorted(range(10), key=lambda k: len(rs.input_ids[k]))[:: 9]
    batch = rs.collate([i, j], pad_token_id=0)
    assert batch["input_ids"].shape == (2, len(rs.input_ids[j]))
    assert batch["attention_mask"][0].sum().item() == len(rs.input_ids[i])
    assert (batch["labels"][0][len(rs.input_ids[i]):] == -100).all()


def test_missing_text_field_lists_fields(tmp_path, tiny_tokenizer):
    p = write_jsonl(tmp_path / "x.jsonl", [{"content": t} for t in TEXTS])
    with pytest.raises(ReplayError, match=r"gere_replay_text_field='text'.*content"):
        ReplaySet.from_args(GeReArguments(gere_replay=str(p), gere_replay_size=5), tiny_tokenizer)
