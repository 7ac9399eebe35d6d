"""A ClientApp whose nodes misbehave on purpose, one fault per partition-id."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from hydraai import client_app as honest
from hydraai.protocol import ARRAYS, METRICS, REPORT


def faulty_client_app(
    faults: dict[int, str], record_dir: Path, silent_seconds: float = 0.0
) -> ClientApp:
    """Nodes train honestly, then the node of each partition-id applies its fault.

    Honest nodes (no fault) save what they were sent and what they replied in
    record_dir, so a test can compute the model the honest replies alone give.
    """
    app = ClientApp()

    @app.train()
    def train(msg: Message, context) -> Message:
        partition_id = int(context.node_config["partition-id"])
        fault = faults.get(partition_id, "honest")
        server_round = int(msg.content["config"]["server-round"])
        if fault == "error":
            raise RuntimeError("injected failure: this volunteer's trainer crashed")
        if fault in ("silent", "slow") and server_round > 1:
            time.sleep(silent_seconds)
        if fault == "stale" and server_round > 1:
            return _replay(record_dir / f"stale-{server_round - 1}", msg)

        reply = honest.train(msg, context)
        if fault == "honest":
            _save(record_dir / f"honest-{server_round}", msg, reply)
        if fault == "stale":
            _save(record_dir / f"stale-{server_round}", msg, reply)
        if fault in ("honest", "stale", "silent", "slow"):
            return reply
        return Message(corrupt(fault, msg.content, reply.content), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context) -> Message:
        return honest.evaluate(msg, context)

    return app


def corrupt(fault: str, sent: RecordDict, content: RecordDict) -> RecordDict:
    """The honest reply content with one fault applied."""
    arrays = {k: v.numpy().copy() for k, v in content[ARRAYS].items()}
    base = {k: v.numpy().astype(np.float64) for k, v in sent[ARRAYS].items()}
    metrics = dict(content[METRICS])
    first = next(iter(arrays))

    if fault == "nan":
        arrays[first].flat[0] = np.nan
    elif fault == "inf":
        arrays[first].flat[-1] = np.inf
    elif fault == "missing-array":
        del arrays[first]
    elif fault == "extra-array":
        arrays["backdoor.weight"] = np.zeros(4, dtype=np.float32)
    elif fault == "renamed-array":
        arrays["renamed." + first] = arrays.pop(first)
    elif fault == "wrong-shape":
        arrays[first] = arrays[first][..., :-1].copy()
    elif fault == "wrong-dtype":
        arrays[first] = arrays[first].astype(np.float64)
    elif fault in ("scaled-1e3", "scaled-1e6", "sign-flip"):
        factor = {"scaled-1e3": 1e3, "scaled-1e6": 1e6, "sign-flip": -1.0}[fault]
        arrays = {
            k: (base[k] + factor * (v - base[k])).astype(v.dtype)
            for k, v in arrays.items()
        }
    elif fault == "noise":
        # The honest update's magnitudes with random signs: as large as honest
        # work, so it passes the size bounds, but it points nowhere.
        rng = np.random.default_rng(0)
        arrays = {
            k: (
                base[k] + np.abs(v - base[k]) * rng.choice([-1.0, 1.0], v.shape)
            ).astype(v.dtype)
            for k, v in arrays.items()
        }
    elif fault == "free-rider":
        arrays = {k: sent[ARRAYS][k].numpy().copy() for k in arrays}
    elif fault == "inflated-examples":
        metrics["num-examples"] = 10**9
    elif fault == "missing-metrics":
        del metrics["num-examples"]
    elif fault == "non-numeric-metrics":
        # A MetricRecord holds numbers only, so the claim comes as a ConfigRecord.
        return RecordDict(
            {
                ARRAYS: content[ARRAYS],
                METRICS: ConfigRecord({**{k: str(v) for k, v in metrics.items()}}),
                REPORT: content[REPORT],
            }
        )
    else:
        raise ValueError(f"unknown fault '{fault}'")

    return RecordDict(
        {
            ARRAYS: ArrayRecord(
                {k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()}
            ),
            METRICS: type(content[METRICS])(metrics),
            REPORT: content[REPORT],
        }
    )


def _save(prefix: Path, msg: Message, reply: Message) -> None:
    """The arrays sent and replied, and the reply's metrics and report."""
    sent = {f"sent/{k}": v.numpy() for k, v in msg.content[ARRAYS].items()}
    got = {f"reply/{k}": v.numpy() for k, v in reply.content[ARRAYS].items()}
    np.savez(prefix.with_suffix(".npz"), **sent, **got)
    meta = {
        METRICS: dict(reply.content[METRICS]),
        REPORT: dict(reply.content[REPORT]),
    }
    prefix.with_suffix(".json").write_text(json.dumps(meta))


def _replay(prefix: Path, msg: Message) -> Message:
    """Send an earlier round's reply again, as a stale node would."""
    saved = np.load(prefix.with_suffix(".npz"))
    meta = json.loads(prefix.with_suffix(".json").read_text())
    arrays = {
        k.removeprefix("reply/"): saved[k] for k in saved if k.startswith("reply/")
    }

    content = RecordDict(
        {
            ARRAYS: ArrayRecord({k: Array(v) for k, v in arrays.items()}),
            METRICS: MetricRecord(meta[METRICS]),
            REPORT: ConfigRecord(meta[REPORT]),
        }
    )
    return Message(content, reply_to=msg)


def honest_expectation(record_dir: Path, server_round: int, blend_rate: float) -> dict:
    """The global model after a round in which only the honest node was accepted."""
    saved = np.load(record_dir / f"honest-{server_round}.npz")
    names = [k.removeprefix("sent/") for k in saved if k.startswith("sent/")]
    expected = {}
    for name in names:
        sent = saved[f"sent/{name}"].astype(np.float64)
        reply = saved[f"reply/{name}"].astype(np.float64)
        expected[name] = sent + blend_rate * (reply - sent)
    return expected
