"""Per-channel statistics on the host: count, mean and centred sum of squares in float64, Chan's merge."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class ChannelStats:
    """Count, mean and centred sum of squares per channel, in float64.

    Attributes:
        count: elements per channel.
        mean: per-channel mean.
        m2: per-channel sum of squared deviations from the mean.
    """

    count: float
    mean: np.ndarray
    m2: np.ndarray

    @property
    def var(self) -> np.ndarray:
        """Unbiased variance, the convention of BatchNormalization's running variance."""
        return self.m2 / max(self.count - 1.0, 1.0)

    def merge(self, other: "ChannelStats") -> "ChannelStats":
        """Chan et al.'s parallel merge of two disjoint sets."""
        count = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / count)
        m2 = self.m2 + other.m2 + delta**2 * (self.count * other.count / count)
        return ChannelStats(count, mean, m2)

    @classmethod
    def of(cls, x: np.ndarray, axis: int = 1) -> "ChannelStats":
        """Exact statistics of a full activation (a reference for tests and small data)."""
        moved = np.moveaxis(np.asarray(x, dtype=np.float64), axis, -1)
        flat = moved.reshape(-1, moved.shape[-1])
        mean = flat.mean(axis=0)
        return cls(float(flat.shape[0]), mean, ((flat - mean) ** 2).sum(axis=0))


def merge_all(batches: list[ChannelStats]) -> ChannelStats:
    total = batches[0]
    for batch in batches[1:]:
        total = total.merge(batch)
    return total


def ema(batches: list[ChannelStats], prior_mean, prior_var, momentum: float):
    """PyTorch's running-statistics update over the batches, starting from the prior.

    Returns:
        (mean, var, prior_weight): the running mean and unbiased variance, and the weight
        (1 - momentum) ** len(batches) that the prior keeps.
    """
    mean, var = np.asarray(prior_mean, np.float64), np.asarray(prior_var, np.float64)
    for batch in batches:
        mean = (1 - momentum) * mean + momentum * batch.mean
        var = (1 - momentum) * var + momentum * batch.var
    return mean, var, (1 - momentum) ** len(batches)
