"""Updates as vectors: robust aggregates, server optimizers, defences, by hand."""

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from hydraai.aggregation import Defences, Layout, ServerOptimizer, aggregate
from hydraai.data import eval_windows
from hydraai.model import ModelConfig, SimpleTransformer
from hydraai.server_app import DescentProbe


def test_layout_round_trip_keeps_names_shapes_and_dtypes():
    record = ArrayRecord(
        {
            "a": Array(np.arange(6, dtype=np.float32).reshape(2, 3)),
            "b": Array(np.array([7.0], dtype=np.float16)),
        }
    )
    layout = Layout.of(record)
    flat = layout.flatten(record)
    assert flat.tolist() == [0, 1, 2, 3, 4, 5, 7]
    back = layout.unflatten(flat)
    assert back["a"].numpy().tolist() == [[0, 1, 2], [3, 4, 5]]
    assert back["b"].dtype == "float16"
    assert layout.unflatten(flat, "float16")["a"].dtype == "float16"


def test_weighted_mean_trimmed_mean_and_median():
    updates = [np.array([1.0, 10.0]), np.array([2.0, 20.0]), np.array([9.0, -90.0])]
    mean = aggregate(updates, [1, 1, 2], "mean")
    assert mean.tolist() == pytest.approx([(1 + 2 + 18) / 4, (10 + 20 - 180) / 4])
    assert aggregate(updates, [1, 1, 1], "median").tolist() == [2.0, 10.0]
    # Cutting one reply from each end of three leaves the middle one.
    trimmed = aggregate(updates, [1, 1, 1], "trimmed-mean", trim_fraction=0.34)
    assert trimmed.tolist() == [2.0, 10.0]
    # Too few replies to cut any: the plain mean.
    untrimmed = aggregate(updates, [1, 1, 1], "trimmed-mean", trim_fraction=0.2)
    assert untrimmed.tolist() == pytest.approx([4.0, -20.0])


def test_server_optimizers_step_by_hand():
    g, u = np.array([1.0]), np.array([2.0])
    assert ServerOptimizer("none").step(g, u, 0.1).tolist() == pytest.approx([1.2])

    momentum = ServerOptimizer("momentum", momentum=0.5)
    assert momentum.step(g, u, 0.1).tolist() == pytest.approx([1.2])  # v = 2
    assert momentum.step(g, u, 0.1).tolist() == pytest.approx([1.3])  # v = 3

    nesterov = ServerOptimizer("nesterov", momentum=0.5)
    # v = 2, step = 0.1 * (2 + 0.5 * 2) = 0.3; then v = 3, step = 0.1 * 3.5.
    assert nesterov.step(g, u, 0.1).tolist() == pytest.approx([1.3])
    assert nesterov.step(g, u, 0.1).tolist() == pytest.approx([1.35])

    # Its own learning rate replaces the blend rate: 0.7 * (2 + 0.5 * 2) = 2.1.
    outer = ServerOptimizer("nesterov", momentum=0.5, learning_rate=0.7)
    assert outer.step(g, u, 0.1).tolist() == pytest.approx([3.1])
    # Plain blending ignores it.
    plain = ServerOptimizer("none", learning_rate=0.7)
    assert plain.step(g, u, 0.1).tolist() == pytest.approx([1.2])


def test_defences_bound_size_work_and_direction():
    defences = Defences(
        learning_rate=0.01, max_update_factor=3.0, min_update_factor=0.25
    )
    honest = np.array([0.05, -0.02, 0.001])  # 5 steps move a parameter ~0.05
    downhill = np.array([1.0, -0.5, 0.0])
    assert defences.problem(honest, 5, 5, downhill) == ""
    assert "too large" in defences.problem(honest * 1e3, 5, 5, downhill)
    assert "free rider" in defences.problem(honest * 0, 5, 5, downhill)
    # A node that did 1 step but reports 5 moved 5 times too little.
    assert "free rider" in defences.problem(honest / 5, 5, 5, downhill)
    assert defences.problem(honest / 5, 1, 5, downhill) == ""
    assert "not point downhill" in defences.problem(-honest, 5, 5, downhill)
    assert defences.problem(-honest, 5, 5, None) == ""


def test_warmup_lowers_both_bounds_by_the_rate_it_holds_back():
    plain = Defences(learning_rate=0.01)
    warm = Defences(learning_rate=0.01, warmup_steps=4)
    # 10 steps at 0.01; with the warmup the first 4 run at 1/5 .. 4/5 of it.
    assert plain.reach(10) == pytest.approx(0.1)
    assert warm.reach(10) == pytest.approx(0.01 * (6 + (1 + 2 + 3 + 4) / 5))
    downhill = np.array([1.0, 0.0])
    # 0.25: under 3 x 0.1 but over 3 x 0.08.
    assert plain.problem(np.array([0.25, 0.0]), 10, 10, downhill) == ""
    assert "too large" in warm.problem(np.array([0.25, 0.0]), 10, 10, downhill)
    # 0.022: over 0.25 x 0.08 but under 0.25 x 0.1.
    assert "free rider" in plain.problem(np.array([0.022, 0.0]), 10, 10, downhill)
    assert warm.problem(np.array([0.022, 0.0]), 10, 10, downhill) == ""


def test_outliers_need_three_updates_and_are_judged_against_the_median():
    defences = Defences(learning_rate=0.01, outlier_factor=3.0)
    assert defences.outliers([1.0, 100.0]) == [False, False]
    assert defences.outliers([1.0, 1.2, 0.9, 5.0]) == [False, False, False, True]


def test_descent_probe_is_the_sign_of_the_negative_gradient_each_call_afresh():
    config = ModelConfig(vocab_size=50, block_size=8, n_embd=16, n_layer=1, n_head=2)
    tokens = torch.randint(
        0, 50, (8 * 4 + 1,), generator=torch.Generator().manual_seed(1)
    )
    model = SimpleTransformer(config)
    arrays = ArrayRecord(model.state_dict())
    probe = DescentProbe(config, tokens)

    x, y = eval_windows(tokens, config.block_size, len(tokens))
    _, loss = model(x, y)
    loss.backward()
    params = dict(model.named_parameters())
    # AdamW's first step: one learning rate against each gradient's sign.
    expected = np.concatenate(
        [-np.sign(params[n].grad.numpy().ravel()) for n in arrays]
    )

    # Called twice: gradients must not pile up across rounds.
    for _ in range(2):
        assert np.allclose(probe(arrays), expected, atol=1e-6)
    # The probe follows the weights it is given.
    moved = ArrayRecord({k: v * 1.5 for k, v in model.state_dict().items()})
    assert not np.allclose(probe(moved), expected, atol=1e-3)
