"""The ClientApp's receive step: reused models and the per-partition token cache."""

import torch
from flwr.app import ArrayRecord

from hydraai import client_app
from hydraai.config import RunConfig
from hydraai.data import load_corpus
from hydraai.model import ModelConfig, SimpleTransformer
from hydraai.tokenizer import fingerprint, train_tokenizer

TASK = RunConfig(block_size=16, n_embd=32, n_layer=1, n_head=2, vocab_size=300)


def weights(vocab_size: int, seed: int) -> ArrayRecord:
    torch.manual_seed(seed)
    return ArrayRecord(
        SimpleTransformer(ModelConfig.from_run(TASK, vocab_size)).state_dict()
    )


def values(arrays: ArrayRecord) -> dict:
    return {k: v.numpy().tolist() for k, v in arrays.items()}


def test_a_reused_model_holds_only_the_latest_weights_and_replies_keep_theirs():
    tokenizer = train_tokenizer(load_corpus("builtin")["text"][:50], vocab_size=300)
    payload = tokenizer.to_str()
    first = weights(tokenizer.get_vocab_size(), seed=0)
    second = weights(tokenizer.get_vocab_size(), seed=1)

    # A reply made from the first task's model, then a second task in the process.
    model = client_app.build_model(TASK, payload, fingerprint(payload), first)
    reply = ArrayRecord(model.state_dict())
    again = client_app.build_model(TASK, payload, fingerprint(payload), second)

    assert again is model
    assert values(ArrayRecord(again.state_dict())) == values(second)
    assert values(reply) == values(first) != values(second)


def test_every_partition_of_a_simulation_stays_cached_across_rounds():
    tokenizer = train_tokenizer(load_corpus("builtin")["text"][:50], vocab_size=300)
    payload, sha = tokenizer.to_str(), fingerprint(tokenizer.to_str())
    client_app._local_tokens.cache_clear()

    # Ten partitions served in turn by one process, for train and evaluate, twice.
    for _ in range(2):
        for partition in range(10):
            node = {"partition-id": partition, "num-partitions": 10}
            client_app.local_tokens(TASK, node, payload, sha)
            client_app.local_tokens(TASK, node, payload, sha)
    info = client_app._local_tokens.cache_info()
    assert (info.misses, info.hits) == (10, 30)
