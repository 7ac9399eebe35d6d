"""BlendedFedAvg: the blend arithmetic by hand, the weight cap and every rejection."""

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.proto.node_pb2 import NodeInfo
from flwr.supercore.task_identity import TaskIdentity

from hydraai.protocol import ARRAYS, METRICS, REPORT
from hydraai.strategy import BlendedFedAvg

TOKENIZER_SHA = "t" * 64


class Nodes:
    """The part of a Grid that sampling reads: which nodes are connected."""

    def __init__(self, node_ids):
        self.node_ids = list(node_ids)

    def get_node_ids(self):
        return self.node_ids

    def get_nodes(self):
        return [NodeInfo(node_id=n) for n in self.node_ids]


@pytest.fixture(autouse=True)
def task_identity():
    # Messages can only be built inside a run; give this process one.
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


def arrays(w, b, dtype=np.float32):
    return ArrayRecord(
        {"w": Array(np.array(w, dtype=dtype)), "b": Array(np.array(b, dtype=dtype))}
    )


def start_round(strategy, global_arrays, node_ids):
    """configure_train for round 1; returns the messages sent, by node."""
    messages = strategy.configure_train(
        1, global_arrays, ConfigRecord(), Nodes(node_ids)
    )
    return {m.metadata.dst_node_id: m for m in messages}


def reply(to, arrays_, examples=40, steps=5, loss=2.0, user="alice", **report):
    fields = {
        "user-id": user,
        "model-sha256": to.content["config"]["model-sha256"],
        "tokenizer-sha256": TOKENIZER_SHA,
    }
    fields.update(report)
    content = RecordDict(
        {
            ARRAYS: arrays_,
            METRICS: MetricRecord(
                {
                    "num-examples": examples,
                    "train-loss": loss,
                    "train-steps": steps,
                    "train-tokens": examples * 8,
                }
            ),
            REPORT: ConfigRecord(fields),
        }
    )
    return Message(content, reply_to=to)


def make_strategy(blend_rate=0.1):
    return BlendedFedAvg(
        blend_rate=blend_rate,
        assigned_steps=5,
        assigned_examples=40,
        tokenizer_sha256=TOKENIZER_SHA,
        min_available_nodes=1,
        min_train_nodes=1,
    )


def values(record):
    return {k: v.numpy().tolist() for k, v in record.items()}


def test_blend_of_weighted_average_computed_by_hand():
    strategy = make_strategy()
    sent = start_round(strategy, arrays([1.0, 2.0], [0.0]), [11, 12])
    replies = [
        reply(sent[11], arrays([3.0, 4.0], [1.0]), examples=10),
        reply(sent[12], arrays([5.0, 6.0], [3.0]), examples=30),
    ]
    new, metrics = strategy.aggregate_train(1, replies)

    # average w = (10*[3,4] + 30*[5,6]) / 40 = [4.5, 5.5]; b = (10*1 + 30*3) / 40 = 2.5
    # new = 0.9 * global + 0.1 * average
    assert values(new)["w"] == pytest.approx([0.9 * 1 + 0.45, 0.9 * 2 + 0.55])
    assert values(new)["b"] == pytest.approx([0.25])
    assert new["w"].dtype == "float32"
    assert metrics["accepted"] == 2 and metrics["rejected"] == 0
    # Train loss is averaged with the same weights: (10*2 + 30*2) / 40.
    assert metrics["train-loss"] == pytest.approx(2.0)


def test_blend_rate_one_is_plain_fedavg():
    strategy = make_strategy(blend_rate=1.0)
    sent = start_round(strategy, arrays([1.0, 1.0], [1.0]), [1, 2])
    new, _ = strategy.aggregate_train(
        1,
        [
            reply(sent[1], arrays([2.0, 4.0], [0.0])),
            reply(sent[2], arrays([4.0, 8.0], [2.0])),
        ],
    )
    assert values(new) == {"w": [3.0, 6.0], "b": [1.0]}


def test_claiming_more_work_than_assigned_is_rejected():
    strategy = make_strategy()
    sent = start_round(strategy, arrays([1.0, 1.0], [1.0]), [1, 2, 3])
    new, _ = strategy.aggregate_train(
        1,
        [
            reply(sent[1], arrays([3.0, 3.0], [3.0]), examples=100_000),
            reply(sent[2], arrays([3.0, 3.0], [3.0]), steps=6),
            reply(sent[3], arrays([5.0, 5.0], [5.0]), examples=40),
        ],
    )
    # Only node 3 counts: new = 0.9 * 1 + 0.1 * 5 = 1.4.
    assert values(new)["w"] == pytest.approx([1.4, 1.4])
    outcomes = {o.node_id: o for o in strategy.outcomes}
    assert outcomes[1].status == "rejected"
    assert "claims 100000 examples, more than the 40 assigned" in outcomes[1].reason
    assert "claims 6 steps, more than the 5 assigned" in outcomes[2].reason


def bad_replies(sent):
    """One broken reply per kind, each sent by its own node."""
    good = arrays([9.0, 9.0], [9.0])
    nan = arrays([np.nan, 1.0], [1.0])
    missing = ArrayRecord({"w": Array(np.array([1.0, 1.0], dtype=np.float32))})
    extra = ArrayRecord({**{k: v for k, v in good.items()}, "x": Array(np.zeros(1))})
    return {
        2: (reply(sent[2], nan), "rejected", "NaN or infinite"),
        3: (reply(sent[3], missing), "rejected", "missing ['b']"),
        4: (reply(sent[4], extra), "rejected", "unexpected ['x']"),
        5: (reply(sent[5], arrays([1.0, 1.0, 1.0], [1.0])), "rejected", "expected"),
        6: (
            reply(sent[6], arrays([1.0, 1.0], [1.0], np.float64)),
            "rejected",
            "float64",
        ),
        7: (
            Message(
                RecordDict({ARRAYS: good, REPORT: ConfigRecord({"user-id": "u"})}),
                reply_to=sent[7],
            ),
            "rejected",
            "another tokenizer",
        ),
        8: (reply(sent[8], good, loss=float("inf")), "rejected", "train-loss"),
        9: (Message(Error(code=0, reason="boom"), reply_to=sent[9]), "failed", "boom"),
        10: (reply(sent[10], good, **{"model-sha256": "0" * 64}), "rejected", "stale"),
        11: (
            reply(sent[11], good, **{"tokenizer-sha256": "x"}),
            "rejected",
            "tokenizer",
        ),
        12: (reply(sent[12], good, steps=0), "rejected", "no training steps"),
        13: (reply(sent[13], good, examples=-5), "rejected", "negative"),
        # Node 14 never answers.
    }


def test_each_bad_reply_is_rejected_with_its_reason_and_left_out():
    strategy = make_strategy()
    global_arrays = arrays([1.0, 1.0], [1.0])
    sent = start_round(strategy, global_arrays, range(1, 15))
    cases = bad_replies(sent)
    honest = reply(sent[1], arrays([3.0, 3.0], [3.0]))
    new, metrics = strategy.aggregate_train(
        1, [honest] + [m for m, _, _ in cases.values()]
    )

    # The model is what the honest reply alone gives: 0.9 * 1 + 0.1 * 3.
    assert values(new)["w"] == pytest.approx([1.2, 1.2])
    outcomes = {o.node_id: o for o in strategy.outcomes}
    assert outcomes[1].status == "completed" and outcomes[1].user_id == "alice"
    for node_id, (_, status, reason) in cases.items():
        assert outcomes[node_id].status == status, node_id
        assert reason in outcomes[node_id].reason, (node_id, outcomes[node_id].reason)
    assert outcomes[14].status == "failed" and "no reply" in outcomes[14].reason
    assert (metrics["accepted"], metrics["rejected"], metrics["failed"]) == (1, 11, 2)


def test_a_round_with_every_reply_rejected_leaves_the_model_unchanged():
    strategy = make_strategy()
    sent = start_round(strategy, arrays([1.0, 1.0], [1.0]), [1, 2])
    new, metrics = strategy.aggregate_train(
        1,
        [
            reply(sent[1], arrays([np.inf, 1.0], [1.0])),
            Message(Error(code=0, reason="crashed"), reply_to=sent[2]),
        ],
    )
    assert new is None
    assert metrics["accepted"] == 0 and metrics["failed"] == 1


def test_round_offset_numbers_a_resumed_run_on():
    strategy = make_strategy()
    strategy.round_offset = 4
    sent = start_round(strategy, arrays([1.0, 1.0], [1.0]), [1])
    assert sent[1].content["config"]["server-round"] == 5


def test_evaluation_replies_without_a_finite_loss_are_dropped():
    strategy = make_strategy()
    messages = strategy.configure_evaluate(
        1, arrays([1.0, 1.0], [1.0]), ConfigRecord(), Nodes([1, 2, 3])
    )
    sent = {m.metadata.dst_node_id: m for m in messages}

    def evaluation(node_id, loss, count):
        metrics = MetricRecord({"eval-loss": loss, "num-examples": count})
        return Message(RecordDict({METRICS: metrics}), reply_to=sent[node_id])

    result = strategy.aggregate_evaluate(
        1,
        [evaluation(1, 2.0, 100), evaluation(2, 4.0, 300), evaluation(3, np.nan, 10)],
    )
    assert result["eval-loss"] == pytest.approx((2.0 * 100 + 4.0 * 300) / 400)


class RegisteredNodes(Nodes):
    """Nodes that authenticated with keys registered under names."""

    def __init__(self, names):
        super().__init__(names)
        self.names = names

    def get_nodes(self):
        return [
            NodeInfo(node_id=n, name=name, public_key=b"key-" + name.encode())
            for n, name in self.names.items()
        ]


def test_registered_name_is_paid_and_a_false_claim_is_rejected():
    strategy = make_strategy()
    global_arrays = arrays([1.0, 1.0], [1.0])
    messages = strategy.configure_train(
        1, global_arrays, ConfigRecord(), RegisteredNodes({1: "alice", 2: "bob"})
    )
    sent = {m.metadata.dst_node_id: m for m in messages}
    strategy.aggregate_train(
        1,
        [
            reply(sent[1], arrays([2.0, 2.0], [2.0]), user="alice"),
            reply(sent[2], arrays([2.0, 2.0], [2.0]), user="alice"),
        ],
    )
    outcomes = {o.node_id: o for o in strategy.outcomes}
    assert outcomes[1].status == "completed" and outcomes[1].user_id == "alice"
    assert outcomes[2].status == "rejected" and outcomes[2].user_id == "bob"
    assert "registered as 'bob'" in outcomes[2].reason


def test_float16_transfer_sends_half_precision_and_keeps_a_float32_model():
    strategy = make_strategy()
    strategy.transfer_dtype = "float16"
    global_arrays = arrays([1.0001, 2.0], [0.5])
    sent = start_round(strategy, global_arrays, [1, 2])
    assert sent[1].content["arrays"]["w"].dtype == "float16"

    new, _ = strategy.aggregate_train(
        1,
        [
            reply(sent[1], arrays([3.0, 4.0], [0.5], np.float16)),
            reply(sent[2], arrays([3.0, 4.0], [0.5])),  # float32: refused
        ],
    )
    # The update is taken against what was sent (1.0001 rounds to 1.0 in
    # float16) and applied to the float32 model: 1.0001 + 0.1 * (3 - 1).
    assert new["w"].dtype == "float32"
    assert values(new)["w"] == pytest.approx([1.2001, 2.2], abs=1e-6)
    rejected = next(o for o in strategy.outcomes if o.node_id == 2)
    assert "float32" in rejected.reason and "expected float16" in rejected.reason
