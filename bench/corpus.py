"""The default run's data, built once per process: tokenizer, splits and streams."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer

from hydraai.config import RunConfig
from hydraai.data import encode, load_corpus, split_corpus
from hydraai.model import ModelConfig, SimpleTransformer
from hydraai.tokenizer import eot_id, train_tokenizer


@dataclass(frozen=True)
class Corpus:
    """The built-in corpus as the default run sees it."""

    tokenizer: Tokenizer
    train_tokens: torch.Tensor
    val_tokens: torch.Tensor

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()


@functools.cache
def default_corpus(config: RunConfig) -> Corpus:
    """Split and tokenise the corpus exactly as the ServerApp does."""
    train, val = split_corpus(
        load_corpus(config.dataset, config.text_column),
        config.val_fraction,
        config.seed,
    )
    tokenizer = train_tokenizer(train["text"], config.vocab_size)
    eot = eot_id(tokenizer)
    return Corpus(
        tokenizer,
        encode(tokenizer, train["text"], eot),
        encode(tokenizer, val["text"], eot),
    )


def default_model(
    vocab_size: int, config: RunConfig, seed: int = 42
) -> SimpleTransformer:
    """The config's SimpleTransformer with seeded weights."""
    torch.manual_seed(seed)
    return SimpleTransformer(ModelConfig.from_run(config, vocab_size))


def flops_per_token(model: SimpleTransformer) -> tuple[float, int]:
    """Training FLOPs per token, 6*N + 12*n_layer*n_embd*block_size, and N.

    N counts the parameters that take part in matrix multiplies: all of them
    but the two embedding tables, which are looked up, not multiplied (the
    vocabulary head is untied, so it counts). The second term is attention's
    QK^T and AV products, forward and backward, over a full block; it counts
    the causal mask's upper triangle too, as the PaLM paper's formula does.
    """
    config = model.config
    n = model.num_params()
    n -= model.tok_emb.weight.numel() + model.pos_emb.weight.numel()
    attention = 12 * config.n_layer * config.n_embd * config.block_size
    return 6 * n + attention, n
