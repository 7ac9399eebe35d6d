"""Model updates as flat vectors: poisoning checks, robust means, server steps."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord

from hydraai.schedule import warmup_factors

AGGREGATIONS = ("mean", "trimmed-mean", "median")
SERVER_OPTIMIZERS = ("none", "momentum", "nesterov")


@dataclass(frozen=True)
class Layout:
    """Names, shapes and dtypes of a model's arrays, to flatten and rebuild them."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[np.dtype, ...]

    @classmethod
    def of(cls, arrays: ArrayRecord) -> Layout:
        values = [a.numpy() for a in arrays.values()]
        return cls(
            names=tuple(arrays.keys()),
            shapes=tuple(v.shape for v in values),
            dtypes=tuple(v.dtype for v in values),
        )

    def flatten(self, arrays: ArrayRecord) -> np.ndarray:
        """All arrays as one float32 vector, in this layout's order.

        float32 holds the float32 and float16 models HydraAI trains exactly.
        The vector is allocated once and filled in place: a server flattens
        every reply of every round, and per-array float64 copies joined by a
        concatenate cost four times the memory traffic.
        """
        vector = np.empty(sum(int(np.prod(s)) for s in self.shapes), np.float32)
        start = 0
        for name, shape in zip(self.names, self.shapes, strict=True):
            size = int(np.prod(shape))
            vector[start : start + size] = arrays[name].numpy().ravel()
            start += size
        return vector

    def unflatten(self, vector: np.ndarray, dtype: str | None = None) -> ArrayRecord:
        """An ArrayRecord of this layout from a flat vector, in dtype or its own."""
        out, start = {}, 0
        for name, shape, own in zip(self.names, self.shapes, self.dtypes, strict=True):
            size = int(np.prod(shape))
            part = vector[start : start + size].reshape(shape)
            out[name] = Array(np.ascontiguousarray(part.astype(dtype or own)))
            start += size
        return ArrayRecord(out)


@dataclass(frozen=True)
class Defences:
    """Limits an update must respect to be averaged.

    AdamW moves each parameter by at most about one learning rate per step,
    and in practice some parameter by almost exactly that, so the largest
    change in an honest update is close to the sum of the rates of its steps:
    learning_rate times the number of steps, less what the warmup holds back.
    That gives an upper bound (scaled or forged updates) and a lower one (a
    node that claims work it did not do). The direction check follows FLTrust
    (Cao et al., NDSS 2021): an honest update points downhill on text the
    server holds back, so its cosine with the step AdamW would take there
    (the sign of the negative gradient) is clearly positive; a sign-flipped
    update's is as clearly negative, and random noise's is near zero.
    """

    learning_rate: float
    warmup_steps: int = 0
    max_update_factor: float = 3.0
    min_update_factor: float = 0.25
    outlier_factor: float = 3.0
    min_cosine: float = 0.0

    def problem(
        self,
        update: np.ndarray,
        steps: int,
        assigned_steps: int,
        downhill: np.ndarray | None,
    ) -> str:
        """Why one update cannot be averaged, or "" if it can."""
        largest = float(np.abs(update).max()) if update.size else 0.0
        ceiling = self.max_update_factor * self.reach(assigned_steps)
        if largest > ceiling:
            return (
                f"update too large: a parameter moved {largest:.3g}, more than "
                f"{ceiling:.3g} (max-update-factor x the learning rates of "
                "local-steps steps)"
            )
        floor = self.min_update_factor * self.reach(min(steps, assigned_steps))
        if largest < floor:
            return (
                f"free rider: the update moved no parameter more than {largest:.3g}, "
                f"less than {floor:.3g} that {steps} reported steps imply"
            )
        if downhill is not None:
            cosine = cosine_similarity(update, downhill)
            if cosine < self.min_cosine:
                return (
                    f"update does not point downhill on held-out text (cosine "
                    f"{cosine:.3f} with the server's own AdamW step there, minimum "
                    f"{self.min_cosine})"
                )
        return ""

    def reach(self, steps: int) -> float:
        """How far AdamW can move a parameter in `steps` steps: their summed rates."""
        return self.learning_rate * sum(warmup_factors(steps, self.warmup_steps))

    def outliers(self, norms: list[float]) -> list[bool]:
        """Which updates are far longer than the round's median (needs 3 or more)."""
        if len(norms) < 3:
            return [False] * len(norms)
        median = float(np.median(norms))
        return [n > self.outlier_factor * median for n in norms]


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> float:
    denominator = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b) / denominator if denominator > 0 else 0.0


def aggregate(
    updates: list[np.ndarray],
    weights: list[float],
    method: str = "mean",
    trim_fraction: float = 0.2,
) -> np.ndarray:
    """Combine updates: weighted mean, or coordinate-wise trimmed mean or median.

    The robust methods ignore the weights: a weight is a claim, and a robust
    aggregate should not let a claim decide how much one reply counts.
    """
    if method == "mean":
        total = sum(weights)
        return sum(u * (w / total) for u, w in zip(updates, weights, strict=True))
    stacked = np.stack(updates)  # (replies, parameters)
    if method == "median":
        return np.median(stacked, axis=0)
    if method == "trimmed-mean":
        cut = int(trim_fraction * len(updates))
        if cut == 0:
            return stacked.mean(axis=0)
        ordered = np.sort(stacked, axis=0)
        return ordered[cut : len(updates) - cut].mean(axis=0)
    raise ValueError(f"unknown aggregation '{method}'; use one of {AGGREGATIONS}")


class ServerOptimizer:
    """Applies the averaged update to the global model.

    With "none", new = global + blend_rate * average_update, which equals
    (1 - blend_rate) * global + blend_rate * average_model. "momentum" keeps a
    velocity v = momentum * v + update and steps by lr * v; "nesterov" steps
    by lr * (update + momentum * v), as in DiLoCo's outer step (Douillard et
    al., 2023), where lr is learning_rate, or blend_rate when that is 0.
    """

    def __init__(
        self, kind: str = "none", momentum: float = 0.9, learning_rate: float = 0.0
    ) -> None:
        if kind not in SERVER_OPTIMIZERS:
            raise ValueError(f"unknown server optimizer '{kind}'")
        self.kind = kind
        self.momentum = momentum
        self.learning_rate = learning_rate
        self.velocity: np.ndarray | None = None

    def step(
        self, global_vector: np.ndarray, update: np.ndarray, blend_rate: float
    ) -> np.ndarray:
        if self.kind == "none":
            return global_vector + blend_rate * update
        lr = self.learning_rate or blend_rate
        if self.velocity is None:
            self.velocity = np.zeros_like(update)
        self.velocity = self.momentum * self.velocity + update
        if self.kind == "momentum":
            return global_vector + lr * self.velocity
        return global_vector + lr * (update + self.momentum * self.velocity)
