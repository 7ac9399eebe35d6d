"""BlendedFedAvg: FedAvg over checked replies, blended into the global model."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import Counter
from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from hydraai.aggregation import Defences, Layout, ServerOptimizer, aggregate
from hydraai.ledger import Ledger, TaskOutcome
from hydraai.protocol import ARRAYS, METRICS, REPORT, TRAIN_METRICS, arrays_sha256

logger = logging.getLogger(__name__)


class BlendedFedAvg(FedAvg):
    """Federated averaging over checked replies, blended into the global model.

    The new global model is ``(1 - blend_rate) * global + blend_rate * average``,
    where the average is over the replies that pass every check, each weighted
    by the examples it trained on; a reply claiming more than was assigned is
    rejected, so no claim can buy more weight or pay.
    A reply that fails a check is left out and recorded with its reason; a
    round with no accepted reply leaves the global model as it was.

    Internally each reply becomes an update (its weights minus the weights it
    was sent), so that robust aggregates, a server optimizer and half-precision
    transfer all work on the same quantity.

    Parameters
    ----------
    blend_rate : float (default: 0.1)
        Share of the client average in the new global model, in (0, 1].
    assigned_steps : int (default: 1)
        Local training steps each sampled node is asked to run.
    assigned_examples : int (default: 1)
        Training examples those steps cover; the cap on a reply's weight.
    tokenizer_sha256 : str (default: "")
        Fingerprint of the tokenizer every reply must have used.
    tokenizer_json : str (default: "")
        The tokenizer itself, sent with every task (added per message, so that
        Flower's summary of the run's config stays short).
    round_offset : int (default: 0)
        Rounds completed before this start; a resumed run numbers on from there.
    ledger : Ledger or None (default: None)
        Where each sampled node's task is recorded as assigned.
    run_name : str (default: "")
        The run the tasks belong to in the ledger.
    defences : Defences or None (default: None)
        Bounds, free-rider, direction and outlier checks on each update.
    downhill : callable or None (default: None)
        Maps the global model to AdamW's first step on held-out text, for the
        direction check.
    aggregation : str (default: "mean")
        "mean" (weighted), "trimmed-mean" or "median", coordinate-wise.
    trim_fraction : float (default: 0.2)
        Share of replies cut from each end by "trimmed-mean".
    server_optimizer : ServerOptimizer or None (default: None)
        How the aggregate update is applied; None is plain blending.
    transfer_dtype : str (default: "float32")
        dtype of the weights sent to nodes and expected back.
    **kwargs
        Passed to Flower's FedAvg (fractions, minimum nodes, record keys).
    """

    def __init__(
        self,
        blend_rate: float = 0.1,
        assigned_steps: int = 1,
        assigned_examples: int = 1,
        tokenizer_sha256: str = "",
        tokenizer_json: str = "",
        round_offset: int = 0,
        ledger: Ledger | None = None,
        run_name: str = "",
        defences: Defences | None = None,
        downhill: Callable[[ArrayRecord], np.ndarray] | None = None,
        aggregation: str = "mean",
        trim_fraction: float = 0.2,
        server_optimizer: ServerOptimizer | None = None,
        transfer_dtype: str = "float32",
        **kwargs,
    ) -> None:
        if not 0.0 < blend_rate <= 1.0:
            raise ValueError(f"blend_rate must be in (0, 1], got {blend_rate}")
        super().__init__(**kwargs)
        self.blend_rate = blend_rate
        self.assigned_steps = assigned_steps
        self.assigned_examples = assigned_examples
        self.tokenizer_sha256 = tokenizer_sha256
        self.tokenizer_json = tokenizer_json
        self.round_offset = round_offset
        self.ledger = ledger
        self.run_name = run_name
        self.defences = defences
        self.downhill = downhill
        self.aggregation = aggregation
        self.trim_fraction = trim_fraction
        self.server_optimizer = server_optimizer or ServerOptimizer()
        self.transfer_dtype = transfer_dtype

        self.current_arrays: ArrayRecord | None = None
        # The global model as sent to nodes, in transfer_dtype, and its hash.
        self.sent_arrays: ArrayRecord | None = None
        self.current_vector: np.ndarray | None = None
        self.sent_vector: np.ndarray | None = None
        self.current_sha256 = ""
        self.layout: Layout | None = None
        self.sampled_nodes: list[int] = []
        # This round's task messages; the Grid sets their message ids on sending.
        self.sent_messages: list[Message] = []
        # Registered names of authenticated nodes, by node id.
        self.registered: dict[int, str] = {}
        self._warned_unauthenticated = False
        # Outcome of every task of the last training round, for the ledger.
        self.outcomes: list[TaskOutcome] = []
        # Seconds the nodes report having trained in the last round, summed.
        self.client_seconds = 0.0

    def summary(self) -> None:
        """Log the blend settings, then FedAvg's own summary."""
        logger.info(
            "BlendedFedAvg: blend-rate %s, %d steps (%d examples) per task",
            self.blend_rate,
            self.assigned_steps,
            self.assigned_examples,
        )
        super().summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample nodes and send each the global model with its fingerprint."""
        self.current_arrays = arrays
        self.layout = Layout.of(arrays)
        # Flattened once here; aggregate_train steps from one, measures from the other.
        self.current_vector = self.layout.flatten(arrays)
        self.sent_arrays, self.sent_vector = arrays, self.current_vector
        if self.transfer_dtype != "float32":
            self.sent_arrays = self.layout.unflatten(
                self.current_vector, self.transfer_dtype
            )
            self.sent_vector = self.layout.flatten(self.sent_arrays)
        self.current_sha256 = arrays_sha256(self.sent_arrays)
        config["model-sha256"] = self.current_sha256
        config["tokenizer-sha256"] = self.tokenizer_sha256
        config["tokenizer-json"] = self.tokenizer_json
        config["transfer-dtype"] = self.transfer_dtype

        messages = list(
            super().configure_train(
                self.round_offset + server_round, self.sent_arrays, config, grid
            )
        )
        self.sampled_nodes = [m.metadata.dst_node_id for m in messages]
        self.sent_messages = messages
        self._learn_identities(grid)
        if self.ledger is not None:
            self.ledger.assign_tasks(
                self.run_name,
                self.round_offset + server_round,
                self.sampled_nodes,
                self.assigned_steps,
                self.assigned_examples,
            )
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Check each reply, average the accepted ones and blend them in."""
        server_round += self.round_offset
        replies = list(replies)
        self.client_seconds = sum(reported_seconds(msg) for msg in replies)
        assert self.current_arrays is not None, "configure_train must run first"

        # Judge every reply on its own; a node that sent nothing has failed.
        accepted: list[tuple[Message, float]] = []
        self.outcomes = []
        for msg in replies:
            outcome, weight = self._judge(msg)
            self.outcomes.append(outcome)
            if outcome.status == "completed":
                accepted.append((msg, weight))
            else:
                logger.warning(
                    "round %d: %s reply of node %d (%s): %s",
                    server_round,
                    outcome.status,
                    outcome.node_id,
                    outcome.user_id or "unknown user",
                    outcome.reason,
                )
        answered = {o.node_id for o in self.outcomes}
        for node_id in self.sampled_nodes:
            if node_id not in answered:
                reason = "no reply before the round timeout"
                user_id = self.registered.get(node_id)
                self.outcomes.append(
                    TaskOutcome(node_id, "failed", user_id=user_id, reason=reason)
                )
                logger.warning(
                    "round %d: node %d failed: %s", server_round, node_id, reason
                )

        # Screen the updates of the well-formed replies against each other.
        updates = self._screen_updates(server_round, accepted)
        accepted = [(msg, w) for msg, w in accepted if msg in updates]

        # Combine the accepted updates and step the global model.
        metrics = self._round_metrics(accepted)
        if not accepted:
            logger.warning(
                "round %d: no reply accepted; the global model is unchanged",
                server_round,
            )
            return None, metrics
        combined = aggregate(
            [updates[msg] for msg, _ in accepted],
            [w for _, w in accepted],
            self.aggregation,
            self.trim_fraction,
        )
        new = self.server_optimizer.step(self.current_vector, combined, self.blend_rate)
        return self.layout.unflatten(new), metrics

    def _screen_updates(
        self, server_round: int, candidates: list[tuple[Message, float]]
    ) -> dict[Message, np.ndarray]:
        """The updates that pass the defences, by reply; the rest are rejected."""
        updates = {
            m: self.layout.flatten(m.content[ARRAYS]) - self.sent_vector
            for m, _ in candidates
        }
        if self.defences is None or not updates:
            return updates

        # Each update on its own: size, work done, direction.
        downhill = self.downhill(self.current_arrays) if self.downhill else None
        for msg in list(updates):
            steps = int(msg.content[METRICS]["train-steps"])
            reason = self.defences.problem(
                updates[msg], steps, self.assigned_steps, downhill
            )
            if reason:
                self._reject(server_round, msg, reason)
                del updates[msg]

        # Then against each other: far longer than the round's median.
        norms = [float(np.linalg.norm(u)) for u in updates.values()]
        median = float(np.median(norms)) if norms else 0.0
        flagged = self.defences.outliers(norms)
        for msg, norm, outlier in zip(list(updates), norms, flagged, strict=True):
            if outlier:
                reason = (
                    f"outlier: update norm {norm:.3g} is more than "
                    f"{self.defences.outlier_factor}x the round median {median:.3g}"
                )
                self._reject(server_round, msg, reason)
                del updates[msg]
        return updates

    def _reject(self, server_round: int, msg: Message, reason: str) -> None:
        """Turn a completed outcome into a rejected one."""
        node_id = msg.metadata.src_node_id
        for i, outcome in enumerate(self.outcomes):
            if outcome.node_id == node_id:
                self.outcomes[i] = dataclasses.replace(
                    outcome, status="rejected", reason=reason
                )
                logger.warning(
                    "round %d: rejected reply of node %d (%s): %s",
                    server_round,
                    node_id,
                    outcome.user_id or "unknown user",
                    reason,
                )

    def _learn_identities(self, grid: Grid) -> None:
        """Note the registered name of each authenticated node.

        With SuperNode authentication the SuperLink knows each node's public key
        and the name it was registered under; that name, not the user-id a
        reply claims, is who gets paid.
        """
        nodes = list(grid.get_nodes())
        self.registered = {n.node_id: n.name for n in nodes if n.public_key and n.name}
        if not self.registered and not self._warned_unauthenticated:
            self._warned_unauthenticated = True
            logger.warning(
                "nodes are not authenticated: user ids are self-asserted and rewards "
                "are not protected; start the SuperLink with --enable-supernode-auth "
                "and register each volunteer's key to pay registered identities"
            )

    def _task_node(self, msg: Message) -> int:
        """The node whose task a reply answers.

        The SuperLink answers for a node that stopped sending heartbeats with
        an error reply from its own node id; that failure is the lost node's.
        """
        node_id = msg.metadata.src_node_id
        if node_id in self.sampled_nodes:
            return node_id
        for sent in self.sent_messages:
            message_id = sent.metadata.message_id
            if message_id and message_id == msg.metadata.reply_to_message_id:
                return sent.metadata.dst_node_id
        return node_id

    def _judge(self, msg: Message) -> tuple[TaskOutcome, float]:
        """The reply's outcome, and its aggregation weight if accepted."""
        node_id = self._task_node(msg)
        registered = self.registered.get(node_id)
        if msg.has_error():
            reason = f"error reply: {msg.error.reason}"
            return TaskOutcome(
                node_id, "failed", user_id=registered, reason=reason
            ), 0.0

        report = msg.content.config_records.get(REPORT)
        claimed = report.get("user-id") if report is not None else None
        claimed = claimed if isinstance(claimed, str) and claimed.strip() else None
        user_id = registered or claimed
        reason = self._problem(msg)
        if not reason and registered and claimed != registered:
            reason = (
                f"claims user-id '{claimed}', but the node is registered "
                f"as '{registered}'"
            )
        metrics = msg.content.metric_records.get(METRICS)
        if reason:
            return TaskOutcome(node_id, "rejected", user_id=user_id, reason=reason), 0.0

        # A reply weighs, and is paid, for the work it did, at most the assignment.
        steps = int(metrics["train-steps"])
        examples = int(metrics["num-examples"])
        outcome = TaskOutcome(
            node_id,
            "completed",
            user_id=user_id,
            reported_steps=steps,
            reported_examples=examples,
            reported_tokens=int(metrics["train-tokens"]),
            train_loss=float(metrics["train-loss"]),
        )
        return outcome, float(examples)

    def _problem(self, msg: Message) -> str:
        """Why a reply cannot be accepted, or "" if it can."""
        content = msg.content
        report = content.config_records.get(REPORT)
        claimed = report.get("user-id") if report is not None else None
        if not isinstance(claimed, str) or not claimed.strip():
            return f"no '{REPORT}' record with a non-empty user-id"
        if report.get("tokenizer-sha256") != self.tokenizer_sha256:
            return "trained with another tokenizer"
        if report.get("model-sha256") != self.current_sha256:
            return "trained from another global model (stale or replayed reply)"

        metrics = content.metric_records.get(METRICS)
        if metrics is None:
            return f"no '{METRICS}' record"
        for key in TRAIN_METRICS:
            value = metrics.get(key)
            if (
                not isinstance(value, (int, float))
                or not math.isfinite(value)
                or value < 0
            ):
                return f"metric '{key}' is missing, not a number or negative: {value!r}"
        if metrics["train-steps"] <= 0 or metrics["num-examples"] <= 0:
            return "reports no training steps or examples"
        if metrics["num-examples"] > self.assigned_examples:
            return (
                f"claims {metrics['num-examples']} examples, more than the "
                f"{self.assigned_examples} assigned"
            )
        if metrics["train-steps"] > self.assigned_steps:
            return (
                f"claims {metrics['train-steps']} steps, more than the "
                f"{self.assigned_steps} assigned"
            )

        arrays = content.array_records.get(ARRAYS)
        if arrays is None:
            return f"no '{ARRAYS}' record"
        return check_arrays(arrays, self.sent_arrays)

    def _round_metrics(self, accepted: list[tuple[Message, float]]) -> MetricRecord:
        counts = Counter(o.status for o in self.outcomes)
        metrics = MetricRecord(
            {
                "accepted": counts["completed"],
                "rejected": counts["rejected"],
                "failed": counts["failed"],
                "train-tokens": sum(
                    o.reported_tokens for o in self.outcomes if o.status == "completed"
                ),
            }
        )
        if accepted:
            contents = [
                RecordDict(
                    {
                        "m": MetricRecord(
                            {
                                "train-loss": m.content[METRICS]["train-loss"],
                                "weight": w,
                            }
                        )
                    }
                )
                for m, w in accepted
            ]
            metrics["train-loss"] = aggregate_metricrecords(contents, "weight")[
                "train-loss"
            ]
        return metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send the new global model for evaluation on the nodes' own data."""
        config["tokenizer-sha256"] = self.tokenizer_sha256
        config["tokenizer-json"] = self.tokenizer_json
        if self.transfer_dtype != "float32":
            layout = Layout.of(arrays)
            arrays = layout.unflatten(layout.flatten(arrays), self.transfer_dtype)
        return super().configure_evaluate(
            self.round_offset + server_round, arrays, config, grid
        )

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Average the evaluation replies that carry a finite loss; drop the rest."""
        usable = []
        for msg in replies:
            metrics = (
                None if msg.has_error() else msg.content.metric_records.get(METRICS)
            )
            loss = metrics.get("eval-loss") if metrics is not None else None
            count = metrics.get("num-examples") if metrics is not None else None
            if (
                isinstance(loss, (int, float))
                and math.isfinite(loss)
                and isinstance(count, (int, float))
                and count > 0
            ):
                usable.append(
                    RecordDict(
                        {"m": MetricRecord({"eval-loss": loss, "num-examples": count})}
                    )
                )
            else:
                logger.debug(
                    "evaluation reply of node %d dropped", msg.metadata.src_node_id
                )
        if not usable:
            return None
        return aggregate_metricrecords(usable, "num-examples")


def reported_seconds(msg: Message) -> float:
    """The training seconds a reply reports, or 0 if it reports none usable."""
    metrics = None if msg.has_error() else msg.content.metric_records.get(METRICS)
    value = metrics.get("train-seconds") if metrics is not None else None
    ok = isinstance(value, (int, float)) and math.isfinite(value) and value >= 0
    return float(value) if ok else 0.0


def check_arrays(arrays: ArrayRecord, reference: ArrayRecord) -> str:
    """Why arrays cannot stand in for the reference model, or "" if they can."""
    missing = [k for k in reference if k not in arrays]
    extra = [k for k in arrays if k not in reference]
    if missing or extra:
        return f"array names differ: missing {missing[:3]}, unexpected {extra[:3]}"
    for name, ref in reference.items():
        array = arrays[name]
        if tuple(array.shape) != tuple(ref.shape) or array.dtype != ref.dtype:
            return (
                f"array '{name}' is {array.dtype}{list(array.shape)}, "
                f"expected {ref.dtype}{list(ref.shape)}"
            )
        try:
            values = array.numpy()
        except Exception as err:  # A malformed payload cannot be decoded.
            return f"array '{name}' cannot be decoded: {err}"
        if not np.isfinite(values).all():
            return f"array '{name}' has NaN or infinite values"
    return ""
