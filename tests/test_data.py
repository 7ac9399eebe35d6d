"""Corpora, splits, partitions and the shared tokenizer."""

import json

import pytest
import torch

from hydraai.data import (
    encode,
    eval_windows,
    load_corpus,
    load_partition,
    random_batch,
    split_corpus,
)
from hydraai.errors import DataError, TokenizerMismatch
from hydraai.tokenizer import eot_id, fingerprint, from_json, train_tokenizer


@pytest.fixture(scope="module")
def builtin():
    return load_corpus("builtin")


def test_builtin_corpus_is_real_english_prose(builtin):
    text = " ".join(builtin["text"])
    assert len(text) > 350_000
    assert text.count(" the ") > 1000
    assert set(builtin.column_names) == {"text", "source"}


def test_split_is_disjoint_and_repeatable(builtin):
    train, val = split_corpus(builtin, 0.1, seed=7)
    train_again, _ = split_corpus(builtin, 0.1, seed=7)
    assert train["text"] == train_again["text"]
    assert not set(train["text"]) & set(val["text"])
    assert len(train) + len(val) == len(builtin)
    assert abs(len(val) - 0.1 * len(builtin)) <= 1


@pytest.mark.parametrize("partitioner", ["iid", "dirichlet", "size-skewed"])
def test_partitions_are_disjoint_and_cover_the_training_split(builtin, partitioner):
    train, _ = split_corpus(builtin, 0.1, seed=42)
    shards = [load_partition(train, partitioner, i, 4, seed=42) for i in range(4)]
    texts = [t for shard in shards for t in shard["text"]]
    assert sorted(texts) == sorted(train["text"])
    assert all(len(shard) > 0 for shard in shards)


def test_size_skewed_partitions_grow_with_partition_id(builtin):
    train, _ = split_corpus(builtin, 0.1, seed=42)
    sizes = [len(load_partition(train, "size-skewed", i, 4, seed=42)) for i in range(4)]
    assert sizes == sorted(sizes) and sizes[-1] > 3 * sizes[0]


def test_partition_id_out_of_range_is_a_clear_error(builtin):
    with pytest.raises(DataError, match="partition-id 4 is outside"):
        load_partition(builtin, "iid", 4, 4, seed=0)


def test_local_txt_jsonl_and_parquet_files(tmp_path):
    (tmp_path / "a.txt").write_text("first paragraph here\n\nsecond one there\n")
    rows = [{"body": "a json line"}, {"body": "another line"}]
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    corpus = load_corpus(str(tmp_path), text_column="body")
    assert sorted(corpus["source"]) == ["a.txt", "a.txt", "b.jsonl", "b.jsonl"]
    assert "a json line" in corpus["text"]

    from datasets import Dataset

    Dataset.from_dict({"text": ["x y z", "p q r"]}).to_parquet(tmp_path / "c.parquet")
    assert load_corpus(str(tmp_path / "c.parquet"))["text"] == ["x y z", "p q r"]


def test_missing_text_column_names_the_columns_found(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"content": "hello"}\n{"content": "again"}\n')
    with pytest.raises(DataError, match="no column 'text' \\(it has content\\)"):
        load_corpus(str(tmp_path / "d.jsonl"))


def test_missing_local_path_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_corpus(str(tmp_path / "nothing.txt"))


def test_tokenizer_round_trip_and_fingerprint_check(builtin):
    tokenizer = train_tokenizer(builtin["text"][:200], vocab_size=500)
    assert tokenizer.get_vocab_size() <= 500
    text = "Ünïcode and plain text: def f(x): return x  # ok"
    assert tokenizer.decode(tokenizer.encode(text).ids) == text

    payload = tokenizer.to_str()
    rebuilt = from_json(payload, fingerprint(payload))
    assert rebuilt.encode(text).ids == tokenizer.encode(text).ids
    with pytest.raises(TokenizerMismatch, match="SHA-256"):
        from_json(payload.replace("<|endoftext|>", "<|end|>"), fingerprint(payload))


def test_encode_separates_records_and_batches_are_shifted_by_one(builtin):
    tokenizer = train_tokenizer(builtin["text"][:100], vocab_size=400)
    eot = eot_id(tokenizer)
    ids = encode(tokenizer, ["one two", "three"], eot)
    assert (ids == eot).sum() == 2 and ids[-1] == eot

    stream = torch.arange(100)
    x, y = random_batch(stream, 4, 8, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 8) and torch.equal(y, x + 1)
    xs, ys = eval_windows(stream, 8, max_windows=5)
    assert xs.shape == (5, 8) and torch.equal(ys, xs + 1)


def test_a_hub_name_goes_to_the_hub_and_fails_cleanly_offline(monkeypatch):
    import datasets

    # Tests never touch the network: the hub is switched off, not mocked.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match="could not load hub dataset 'org/corpus'"):
        load_corpus("org/corpus")
