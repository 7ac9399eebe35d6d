"""Text generation with the latest global model that a run checkpointed."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer

from hydraai.checkpoint import Checkpoint, latest_run_dir
from hydraai.config import RunConfig
from hydraai.model import ModelConfig, SimpleTransformer


def generate_text(
    prompt: str,
    max_new_tokens: int = 64,
    output_dir: str | Path = "outputs",
    temperature: float = 0.8,
    top_k: int = 40,
) -> str:
    """The prompt's continuation by the newest checkpoint under output_dir."""
    checkpoint = Checkpoint.load(latest_run_dir(Path(output_dir)))
    config = RunConfig.from_run_config(checkpoint.config)
    tokenizer = Tokenizer.from_str(checkpoint.tokenizer_json)
    model = SimpleTransformer(ModelConfig.from_run(config, tokenizer.get_vocab_size()))
    model.load_state_dict(
        {k: torch.from_numpy(v) for k, v in checkpoint.arrays.items()}
    )
    model.eval()

    ids = tokenizer.encode(prompt).ids or [tokenizer.token_to_id("<|endoftext|>")]
    out = model.generate(
        torch.tensor([ids]), max_new_tokens, temperature=temperature, top_k=top_k
    )
    return tokenizer.decode(out[0, len(ids) :].tolist())
