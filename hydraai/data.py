"""Text corpora (built-in, local files, hub datasets), split and sharded."""

from __future__ import annotations

import logging
from pathlib import Path

import datasets
import torch
from datasets import Dataset, concatenate_datasets, load_dataset
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    IidPartitioner,
    LinearPartitioner,
    Partitioner,
)

from hydraai.errors import DataError

logger = logging.getLogger(__name__)

# Progress bars are noise in a federation's logs.
datasets.disable_progress_bars()

BUILTIN = "builtin"
# Loaders of the `datasets` library for each local file type.
FILE_LOADERS = {
    ".txt": "text",
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
}
# Paragraphs shorter than this are merged with the next one into one record.
MIN_RECORD_CHARS = 400


def builtin_corpus() -> Dataset:
    """CPython's reference documentation (pydoc_data.topics) as paragraph records.

    It ships with every CPython, so the default run needs no download. Each record
    carries the topic it came from as its `source`.
    """
    from pydoc_data.topics import topics

    texts, sources, seen = [], [], set()
    for topic in sorted(topics):
        for record in _merge_paragraphs(topics[topic].split("\n\n")):
            # Some topics repeat a passage; a duplicate could land in both splits.
            if record not in seen:
                seen.add(record)
                texts.append(record)
                sources.append(topic)
    return Dataset.from_dict({"text": texts, "source": sources})


def _merge_paragraphs(paragraphs: list[str]) -> list[str]:
    records, current = [], ""
    for paragraph in paragraphs:
        paragraph = paragraph.strip()
        if not paragraph:
            continue
        current = f"{current}\n\n{paragraph}" if current else paragraph
        if len(current) >= MIN_RECORD_CHARS:
            records.append(current)
            current = ""
    if current:
        records.append(current)
    return records


def load_corpus(dataset: str, text_column: str = "text") -> Dataset:
    """Load a corpus as a Dataset with the columns `text` and `source`.

    `dataset` is "builtin", a local `.txt`, `.jsonl` or `.parquet` file, a folder
    of such files, or the name of a dataset on the Hugging Face hub.
    """
    if dataset == BUILTIN:
        return builtin_corpus()

    path = Path(dataset).expanduser()
    if path.exists():
        corpus = _load_local(path, text_column)
    elif dataset.startswith((".", "/", "~")) or Path(dataset).suffix in FILE_LOADERS:
        raise DataError(
            f"dataset path '{dataset}' does not exist; give an existing file or "
            "folder of .txt, .jsonl or .parquet files, or 'builtin'"
        )
    else:
        corpus = _load_hub(dataset, text_column)

    corpus = corpus.filter(lambda row: bool(row["text"] and row["text"].strip()))
    if len(corpus) < 2:
        raise DataError(
            f"dataset '{dataset}' has {len(corpus)} non-empty text record(s); "
            "it needs at least 2 (one to train on, one to validate)"
        )
    return corpus


def _load_local(path: Path, text_column: str) -> Dataset:
    files = sorted(path.rglob("*")) if path.is_dir() else [path]
    files = [f for f in files if f.is_file() and f.suffix in FILE_LOADERS]
    if not files:
        raise DataError(
            f"no .txt, .jsonl, .json or .parquet files in '{path}'; "
            "put text files there or point the dataset at another path"
        )

    # One load per file so that every record knows which file it came from.
    parts = []
    for file in files:
        loader = FILE_LOADERS[file.suffix]
        kwargs = {"sample_by": "paragraph"} if loader == "text" else {}
        try:
            part = load_dataset(loader, data_files=str(file), split="train", **kwargs)
        except Exception as err:
            raise DataError(f"could not read '{file}': {err}") from err
        if loader != "text":
            part = _select_text(part, text_column, str(file))
        part = part.select_columns(["text"]).add_column(
            "source", [file.name] * len(part)
        )
        parts.append(part)
    return concatenate_datasets(parts)


def _load_hub(name: str, text_column: str) -> Dataset:
    try:
        corpus = load_dataset(name, split="train")
    except Exception as err:
        raise DataError(
            f"could not load hub dataset '{name}' ({err.__class__.__name__}: {err}); "
            "check the name and your network, or use a local path or 'builtin'"
        ) from err
    corpus = _select_text(corpus, text_column, name)
    if "source" not in corpus.column_names:
        return corpus.select_columns(["text"])
    return corpus.select_columns(["text", "source"])


def _select_text(corpus: Dataset, text_column: str, origin: str) -> Dataset:
    if text_column not in corpus.column_names:
        raise DataError(
            f"'{origin}' has no column '{text_column}' (it has "
            f"{', '.join(corpus.column_names)}); set text-column to one of them"
        )
    if text_column != "text":
        corpus = corpus.remove_columns(
            [c for c in ["text"] if c in corpus.column_names]
        ).rename_column(text_column, "text")
    return corpus


def split_corpus(
    corpus: Dataset, val_fraction: float, seed: int
) -> tuple[Dataset, Dataset]:
    """Split into (train, validation) records; the same seed gives the same split."""
    split = corpus.train_test_split(test_size=val_fraction, seed=seed, shuffle=True)
    return split["train"], split["test"]


def make_partitioner(
    name: str, num_partitions: int, seed: int, alpha: float = 0.5
) -> Partitioner:
    """A flwr-datasets partitioner: iid, dirichlet (over `source`) or size-skewed."""
    if name == "iid":
        return IidPartitioner(num_partitions)
    if name == "dirichlet":
        return DirichletPartitioner(
            num_partitions,
            partition_by="source",
            alpha=alpha,
            min_partition_size=1,
            seed=seed,
        )
    if name == "size-skewed":
        # Partition i holds a share proportional to i + 1.
        return LinearPartitioner(num_partitions)
    raise DataError(f"unknown partitioner '{name}'; use iid, dirichlet or size-skewed")


def load_partition(
    train: Dataset,
    partitioner: str,
    partition_id: int,
    num_partitions: int,
    seed: int,
    alpha: float = 0.5,
) -> Dataset:
    """The records of one shard of the training split."""
    if not 0 <= partition_id < num_partitions:
        raise DataError(
            f"partition-id {partition_id} is outside [0, {num_partitions}); "
            "give each node a partition-id below num-partitions"
        )
    if num_partitions > len(train):
        raise DataError(
            f"cannot split {len(train)} training records into {num_partitions} "
            "partitions; use fewer nodes or a larger dataset"
        )
    if partitioner == "dirichlet" and "source" not in train.column_names:
        raise DataError(
            "the dirichlet partitioner needs a 'source' column to group records by; "
            "this dataset has none, so use partitioner iid or size-skewed"
        )
    part = make_partitioner(partitioner, num_partitions, seed, alpha)
    part.dataset = train
    return part.load_partition(partition_id)


def encode(tokenizer, texts: list[str], eot_id: int) -> torch.Tensor:
    """Token ids (N,) of all texts in order, each followed by the end-of-text id."""
    ids: list[int] = []
    for encoding in tokenizer.encode_batch(texts):
        ids.extend(encoding.ids)
        ids.append(eot_id)
    return torch.tensor(ids, dtype=torch.long)


def random_batch(
    tokens: torch.Tensor, batch_size: int, block_size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets (batch_size, block_size) at random offsets."""
    block = min(block_size, len(tokens) - 1)
    if block < 1:
        raise DataError(
            f"a text stream of {len(tokens)} tokens is too short to train on"
        )
    starts = torch.randint(0, len(tokens) - block, (batch_size,), generator=generator)
    x = torch.stack([tokens[s : s + block] for s in starts.tolist()])
    y = torch.stack([tokens[s + 1 : s + 1 + block] for s in starts.tolist()])
    return x, y


def eval_windows(
    tokens: torch.Tensor, block_size: int, max_windows: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-overlapping (input, target) windows (W, block) from the start of a stream."""
    block = min(block_size, len(tokens) - 1)
    if block < 1:
        raise DataError(
            f"a text stream of {len(tokens)} tokens is too short to evaluate"
        )
    count = max(1, min(max_windows, (len(tokens) - 1) // block))
    x = tokens[: count * block].view(count, block)
    y = tokens[1 : count * block + 1].view(count, block)
    return x, y
