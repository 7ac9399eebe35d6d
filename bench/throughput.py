"""Section 1: tokens/s of the ClientApp's training loop against a plain one, and MFU."""

from __future__ import annotations

import copy
import statistics
import time

import torch

from bench.common import (
    SectionResult,
    declared_config,
    matmul_ceiling,
    new_section,
    print_table,
    say,
)
from bench.corpus import default_corpus, default_model, flops_per_token
from hydraai.config import RunConfig
from hydraai.model import SimpleTransformer
from hydraai.training import evaluate_loss, train_steps


def plain_loop(
    model: SimpleTransformer,
    tokens: torch.Tensor,
    steps: int,
    batch_size: int,
    learning_rate: float,
    generator: torch.Generator,
) -> int:
    """The textbook loop: random windows by one gather, AdamW; returns tokens."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    block = model.config.block_size
    offsets = torch.arange(block + 1)
    model.train()
    for _ in range(steps):
        starts = torch.randint(
            0, len(tokens) - block, (batch_size, 1), generator=generator
        )
        chunk = tokens[starts + offsets]  # (B, block + 1)
        _, loss = model(chunk[:, :-1], chunk[:, 1:])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return steps * batch_size * block


def compare(
    config: RunConfig, tokens: torch.Tensor, vocab_size: int, steps: int, repeats: int
) -> tuple[SimpleTransformer, list[float], list[float]]:
    """tokens/s of train_steps and of the plain loop, repeat by repeat."""
    # Two copies of the same seeded model: the ClientApp's loop and the plain one.
    ours = default_model(vocab_size, config)
    plain = copy.deepcopy(ours)
    generator = torch.Generator().manual_seed(0)
    warm_up = (tokens, 2, config.batch_size, config.learning_rate)
    train_steps(ours, *warm_up, seed=0)
    plain_loop(plain, *warm_up, generator)

    # Alternate which goes first, so that drift in the machine's speed cancels.
    ours_rates, plain_rates = [], []
    args = (tokens, steps, config.batch_size, config.learning_rate)
    for repeat in range(repeats):
        for first in (True, False) if repeat % 2 == 0 else (False, True):
            start = time.perf_counter()
            if first:
                done = train_steps(
                    ours, *args, seed=repeat + 1, warmup_steps=config.warmup_steps
                ).tokens
                ours_rates.append(done / (time.perf_counter() - start))
            else:
                done = plain_loop(plain, *args, generator)
                plain_rates.append(done / (time.perf_counter() - start))
        say(
            f"  batch {config.batch_size}, repeat {repeat + 1}: train_steps "
            f"{ours_rates[-1]:,.0f} tok/s, plain {plain_rates[-1]:,.0f} tok/s"
        )
    return ours, ours_rates, plain_rates


def run(quick: bool) -> SectionResult:
    section = new_section("throughput", "1. Client training throughput", quick)
    declared = declared_config()
    corpus = default_corpus(declared)
    steps, repeats = (3, 2) if quick else (6, 4)
    # The batch of 16, and the project's current default if it differs.
    batches = sorted({16, declared.batch_size}, reverse=True)
    section.settings = {
        "model": f"n-embd {declared.n_embd}, n-layer {declared.n_layer}, "
        f"n-head {declared.n_head}, block {declared.block_size}, "
        f"vocab {corpus.vocab_size} (the tokenizer's real size)",
        "batch sizes": ", ".join(map(str, batches)),
        "learning rate": declared.learning_rate,
        "timing": f"{repeats} alternating repeats of {steps} steps per loop and "
        "batch, after 2 warm-up steps; the median; wall time of the whole call, "
        "fresh AdamW included",
    }
    # The ceiling is measured before and after the loops; the higher one counts.
    ceiling = matmul_ceiling()
    table = section.table(
        "Training throughput (median of repeats)",
        ["loop", "batch", "tokens/s", "s/step", "GFLOP/s", "MFU", "vs plain"],
    )
    ratios = {}
    for batch in batches:
        config = declared.replace(batch_size=batch)
        model, ours, plain = compare(
            config, corpus.train_tokens, corpus.vocab_size, steps, repeats
        )
        per_token, n_matmul = flops_per_token(model)
        ours_rate, plain_rate = statistics.median(ours), statistics.median(plain)
        ratios[batch] = (ours_rate / plain_rate, ours_rate, plain_rate, ours, plain)
        for name, rate in (("hydraai train_steps", ours_rate), ("plain", plain_rate)):
            table.rows.append(
                [
                    name,
                    batch,
                    rate,
                    batch * config.block_size / rate,
                    rate * per_token / 1e9,
                    "",  # MFU, once the ceiling is final
                    f"{rate / plain_rate:.1%}",
                ]
            )
    ceiling = max(ceiling, matmul_ceiling())
    for row in table.rows:
        row[5] = f"{row[4] * 1e9 / ceiling:.0%}"
    print_table(table)

    # Forward only, as the server's validation and the nodes' evaluation run it.
    windows = 32 if quick else 64
    start = time.perf_counter()
    _, scored = evaluate_loss(model, corpus.val_tokens, max_windows=windows)
    eval_rate = scored / (time.perf_counter() - start)

    facts = section.table("Model and machine", ["figure", "value"])
    facts.rows += [
        ["parameters (all)", model.num_params()],
        ["N: parameters in matmuls (all but the embeddings)", n_matmul],
        ["training FLOPs/token = 6N + 12*n_layer*n_embd*block", per_token],
        ["fp32 matmul ceiling, best square 1024/2048 (GFLOP/s)", ceiling / 1e9],
        ["forward-only tokens/s (evaluate_loss, batch 16)", eval_rate],
    ]
    for batch, (_, _, _, ours, plain) in ratios.items():
        facts.rows.append(
            [
                f"per-repeat ratio train_steps/plain, batch {batch}",
                ", ".join(f"{a / b:.3f}" for a, b in zip(ours, plain, strict=True)),
            ]
        )
    print_table(facts)
    for batch, (ratio, ours_rate, plain_rate, _, _) in ratios.items():
        section.target(
            f"train_steps >= 90% of the plain loop's tokens/s (batch {batch})",
            f"{ratio:.1%} ({ours_rate:,.0f} vs {plain_rate:,.0f} tokens/s)",
            ratio >= 0.9,
        )
    section.note(
        f"MFU = tokens/s x {per_token / 1e6:.1f} MFLOP/token / "
        f"{ceiling / 1e9:.0f} GFLOP/s, the best fp32 square matmul (1024 and 2048, "
        "10 runs each, before and after the loops)."
    )
    return section
