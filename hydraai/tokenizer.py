"""The byte-level BPE tokenizer that the coordinator trains and every client shares."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from hydraai.errors import TokenizerMismatch

EOT = "<|endoftext|>"


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE with at most vocab_size tokens on the given texts.

    The result can be smaller than vocab_size when the text offers fewer merges,
    so the model must take its vocabulary size from the tokenizer.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def fingerprint(tokenizer_json: str) -> str:
    """The SHA-256 of a tokenizer's JSON, which names it on the wire."""
    return hashlib.sha256(tokenizer_json.encode("utf-8")).hexdigest()


def from_json(tokenizer_json: str, expected_sha256: str) -> Tokenizer:
    """Rebuild a tokenizer sent by the coordinator after checking its fingerprint."""
    found = fingerprint(tokenizer_json)
    if found != expected_sha256:
        raise TokenizerMismatch(
            f"the tokenizer received has SHA-256 {found[:12]}..., but the "
            f"coordinator announced {expected_sha256[:12]}...; the message was "
            "damaged or mixed up, so this task is refused"
        )
    return Tokenizer.from_str(tokenizer_json)


def eot_id(tokenizer: Tokenizer) -> int:
    """The id of the end-of-text token that separates records."""
    token_id = tokenizer.token_to_id(EOT)
    if token_id is None:
        raise TokenizerMismatch(f"the tokenizer has no {EOT} token; retrain it")
    return token_id
