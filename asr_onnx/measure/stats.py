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


@dataclass
class GramStats:
    """Sums over the rows of a layer's input patches X and its target Y, in float64, per group.

    Attributes:
        count: rows (samples times output positions).
        xtx: XᵀX, (groups, patch length, patch length).
        xty: XᵀY, (groups, patch length, output channels per group).
        yy: ΣY² per output channel, (output channels,).
    """

    count: float
    xtx: np.ndarray
    xty: np.ndarray
    yy: np.ndarray

    def merge(self, other: "GramStats") -> "GramStats":
        """The sums over two disjoint sets of rows (plain sums: the least-squares problem needs no centring)."""
        return GramStats(self.count + other.count, self.xtx + other.xtx, self.xty + other.xty, self.yy + other.yy)

    @classmethod
    def of(cls, x: np.ndarray, y: np.ndarray, groups: int = 1) -> "GramStats":
        """Exact sums of patches ``x`` (rows, groups * length) and targets ``y`` (rows, channels), for tests."""
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        xg = x.reshape(len(x), groups, -1).transpose(1, 0, 2)
        yg = y.reshape(len(y), groups, -1).transpose(1, 0, 2)
        return cls(float(len(x)), xg.transpose(0, 2, 1) @ xg, xg.transpose(0, 2, 1) @ yg, (y**2).sum(axis=0))
