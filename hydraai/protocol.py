"""What travels between coordinator and volunteers: record keys and fingerprints."""

from __future__ import annotations

import hashlib

from flwr.app import ArrayRecord

# Record keys in a message's RecordDict.
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
# The reply's ConfigRecord: who did the work and for which model and tokenizer.
REPORT = "report"

# Run config keys a client needs to do its task; the server sends them each round.
TASK_KEYS = (
    "local-steps",
    "batch-size",
    "learning-rate",
    "warmup-steps",
    "block-size",
    "n-embd",
    "n-layer",
    "n-head",
    "dropout",
    "dataset",
    "text-column",
    "val-fraction",
    "partitioner",
    "dirichlet-alpha",
    "seed",
    "transfer-dtype",
)

# Metrics every training reply must carry, all finite and >= 0.
TRAIN_METRICS = ("num-examples", "train-loss", "train-steps", "train-tokens")


def arrays_sha256(arrays: ArrayRecord) -> str:
    """A fingerprint of a model's weights: names, shapes, dtypes and bytes."""
    digest = hashlib.sha256()
    for name, array in arrays.items():
        digest.update(name.encode())
        digest.update(str(tuple(array.shape)).encode())
        digest.update(array.dtype.encode())
        digest.update(array.data)
    return digest.hexdigest()
