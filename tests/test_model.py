"""The SimpleTransformer: shapes, causality, generation and learning."""

import torch

from hydraai.model import ModelConfig, SimpleTransformer

TINY = ModelConfig(vocab_size=50, block_size=16, n_embd=32, n_layer=2, n_head=4)


def make_model(seed: int = 0) -> SimpleTransformer:
    torch.manual_seed(seed)
    return SimpleTransformer(TINY).eval()


def test_logits_shape_and_loss():
    model = make_model()
    idx = torch.randint(0, 50, (3, 10))
    logits, loss = model(idx, idx)
    assert logits.shape == (3, 10, 50)
    # An untrained model is close to uniform: loss near ln(50) = 3.91.
    assert 3.5 < loss.item() < 4.3


def test_changing_a_later_token_leaves_earlier_logits_unchanged():
    model = make_model()
    idx = torch.randint(0, 50, (1, 16))
    changed = idx.clone()
    changed[0, 9] = (idx[0, 9] + 1) % 50

    before, _ = model(idx)
    after, _ = model(changed)
    assert torch.equal(before[0, :9], after[0, :9])
    # The changed position and everything after it do see the change.
    assert not torch.allclose(before[0, 9:], after[0, 9:])


def test_generate_extends_by_max_new_tokens_within_vocab():
    model = make_model()
    prompt = torch.tensor([[1, 2, 3]])
    out = model.generate(prompt, max_new_tokens=20, temperature=0.9, top_k=5)
    assert out.shape == (1, 23)
    assert torch.equal(out[:, :3], prompt)
    assert int(out.max()) < 50 and int(out.min()) >= 0


def test_top_k_one_is_greedy():
    model = make_model()
    prompt = torch.tensor([[4, 5]])
    out = model.generate(prompt, max_new_tokens=1, top_k=1)
    logits, _ = model(prompt)
    assert out[0, -1].item() == logits[0, -1].argmax().item()


def test_sequence_longer_than_block_size_is_refused():
    model = make_model()
    try:
        model(torch.zeros((1, 17), dtype=torch.long))
    except ValueError as err:
        assert "block_size 16" in str(err)
    else:
        raise AssertionError("a 17-token input was accepted by a 16-token model")


def test_a_few_steps_memorise_a_repeated_sequence():
    model = make_model().train()
    data = torch.arange(16).repeat(4, 1) % 50
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(30):
        _, loss = model(data[:, :-1], data[:, 1:])
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < first / 3
