"""How a model's outputs are scored against a reference's: the plan (each output's kind, the output whose top-1
agreement counts, the detection heads), and the per-sample :class:`Scores` that pool over batches, folds and
shards.

Each output has one of :data:`asr_onnx.model.kinds.KINDS` (:func:`plan_scoring`): ``classes`` (top-1 agreement,
on the first output), ``detection`` (a head recognised by :mod:`asr_onnx.verify.detection`: scored by detection
F1), ``map`` (channels on the axis after the batch, as NCHW) or ``regression`` (channels on the last axis). The
user can name any output's kind (``--output-kind NAME:KIND``). Every float output is also compared channel by
channel, each channel standardised by the reference's spread of it (:class:`ChannelErrors`): a relative L2
error over a detector's raw output is all box coordinates (pixels) and does not see its class scores (0-1).

Every per-sample figure is kept per sample, and each batch's reference moments per batch, so that scores
joined in sample order (batches, then shards: :mod:`asr_onnx.verify.sharded`) are the single-process ones bit
for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from asr_onnx.errors import AsrError
from asr_onnx.model.kinds import PER_SAMPLE, PER_STEP, OutputKind, agreement_kind, top1_matches
from asr_onnx.model.kinds import per_sample as flat

SCORE_METRICS = ("agreement", "detection_f1", "standardised_error")  # what a model's held-out score can be
VARIANCE_FLOOR = 1e-2  # of an output's median channel variance: the least spread a channel is measured against


def logit_rel_l2(err2: np.ndarray, ref2: float) -> float:
    """Relative L2 logit error: sqrt(sum of squared errors / sum of the reference's squares)."""
    return float(np.sqrt(np.sum(err2) / max(ref2, 1e-300)))


# ------------------------------------------------------------------------------------------- the plan


@dataclass
class Scoring:
    """How a model's outputs are scored, decided on the reference's first batch (:func:`plan_scoring`).

    Attributes:
        kinds: per output, one of KINDS, or None for an output that is not scored (not float, or a scalar).
        agreement: the output whose top-1 agreement is scored, or None.
        how: PER_SAMPLE or PER_STEP for that output, or None.
        why: why there is no agreement, or what it is.
        heads: the detection heads (:class:`asr_onnx.verify.detection.Head`).
        channel_axes: per output, the axis whose entries are standardised separately (None: the output is one
            channel, or not scored).
    """

    kinds: list
    agreement: int | None
    how: str | None
    why: str
    heads: list
    channel_axes: list

    def named(self, kinds: list[OutputKind]) -> dict[str, str | None]:
        """{output name: its kind}, for the report."""
        return {k.name: kind for k, kind in zip(kinds, self.kinds)}


def plan_scoring(kinds: list[OutputKind], arrays: list, axes: list[int], given: dict[str, str] | None = None) -> Scoring:
    """Each output's kind, the agreement output and the detection heads, from one run of the reference.

    Args:
        kinds: the model's declared output layouts.
        arrays: one run's outputs (the reference's: the dense model's values decide what a head is).
        axes: each output's batch axis.
        given: {output name: kind} the user named (``--output-kind``); the rest are recognised. Defaults to None.

    Raises:
        AsrError: an output named ``classes`` that is not (N, classes) or (N, T, classes), or one named
            ``detection`` that no head layout fits.
    """
    from asr_onnx.verify.detection import find_heads

    given = given or {}
    named = {i: given[k.name] for i, k in enumerate(kinds) if k.name in given}
    softmax = {i for i, k in enumerate(kinds) if k.class_scores}
    heads = find_heads(arrays, axes, named={i for i, kind in named.items() if kind == "detection"}, softmax=softmax,
                       excluded={i for i, kind in named.items() if kind != "detection"})
    in_head = {i: head for head in heads for i in head.outputs}
    lost = [i for i, kind in named.items() if kind == "detection" and i not in in_head]
    if lost:
        raise AsrError(f"--output-kind {kinds[lost[0]].name}:detection: its shape {list(np.shape(arrays[lost[0]]))} "
                       "is neither a YOLO head (N, 4+C, A) or (N, A, 4+C) nor half of an SSD pair "
                       "(N, A, 4) + (N, A, C)")
    agreement, how, why = _agreement_output(kinds, arrays, axes, named, in_head)
    labels: list[str | None] = []
    channel_axes: list[int | None] = []
    for i, (kind, array) in enumerate(zip(kinds, arrays)):
        shape = np.shape(array)
        label: str | None = ("detection" if i in in_head
                             else named.get(i) or _recognised(kind, shape, axes[i], i == agreement))
        if not np.issubdtype(np.asarray(array).dtype, np.floating) or not shape:
            label = None
        labels.append(label)
        channel_axes.append(_channel_axis(label, shape, axes[i], in_head.get(i)))
    return Scoring(labels, agreement, how, why, heads, channel_axes)


def _agreement_output(kinds, arrays, axes, named: dict, in_head: dict) -> tuple[int | None, str | None, str]:
    """(the output whose top-1 agreement is scored, PER_SAMPLE or PER_STEP, why), or None for both and why not."""
    chosen = [i for i, kind in named.items() if kind == "classes"]
    if chosen:
        first = min(chosen)
        rank = np.ndim(arrays[first])
        if rank not in (2, 3):
            raise AsrError(f"--output-kind {kinds[first].name}:classes: the output {list(np.shape(arrays[first]))} is "
                           "neither (N, classes) nor per-step (N, T, classes)")
        return first, PER_SAMPLE if rank == 2 else PER_STEP, "the output was named classes"
    if 0 in in_head:
        return None, None, "a detection head: scored by detection F1 against the dense model"
    if 0 in named:
        return None, None, f"the output was named {named[0]}"
    how, why = agreement_kind(kinds[0], np.shape(arrays[0]), axes[0])
    return (0 if how else None), how, why


def _recognised(kind: OutputKind, shape: tuple, axis: int, scored: bool) -> str:
    if scored or (len(shape) == 2 and shape[1 - axis] > 1) or (len(shape) == 3 and kind.class_scores):
        return "classes"
    return "map" if len(shape) >= 3 else "regression"


def _channel_axis(label: str | None, shape: tuple, axis: int, head) -> int | None:
    """The axis of an output's channels: a head's features, a class or regression output's last axis, a map's
    first axis after the batch; None for a single channel."""
    if label is None or len(shape) < 2:
        return None
    if head is not None:
        return 1 if head.channels_first and head.scores is None else 2
    if label in ("classes", "regression"):
        return len(shape) - 1 if axis != len(shape) - 1 else None
    return next(i for i in range(len(shape)) if i != axis)


# ------------------------------------------------------------------------------------------- the scores


Moments = tuple[np.ndarray, np.ndarray, np.ndarray]  # per channel: (count, mean, summed squared deviations)


@dataclass
class ChannelErrors:
    """Each sample's mean squared error per output channel, and the reference's moments of each channel per
    batch, so that every channel counts alike whatever its scale (a detector's box coordinates in pixels, its
    class scores in [0, 1]). Parts pool (:meth:`pooled`) before the spread is taken, the batches' moments merged
    in sample order whoever joins them.

    Attributes:
        err2: (N, K) mean squared error of each sample on each channel (over its positions).
        moments: per batch in sample order, the reference's (count, mean, m2) of each channel, each (K,).
        outputs: (K,) the output each channel belongs to.
    """

    err2: np.ndarray
    moments: tuple
    outputs: np.ndarray

    @classmethod
    def of(cls, arrays: list, n: int) -> "ChannelErrors":
        """One batch of ``n`` samples: ``arrays`` holds (output index, candidate, reference, batch axis, channel
        axis or None) per scored output."""
        err2, count, mean, m2, outputs = [np.zeros((n, 0))], [], [], [], []
        for index, out, ref, axis, channel in arrays:
            a, b = _by_channel(out, axis, channel), _by_channel(ref, axis, channel)
            err2.append(((a - b) ** 2).mean(2))
            values = np.moveaxis(b, 1, 0).reshape(b.shape[1], -1)
            count.append(np.full(b.shape[1], values.shape[1], np.float64))
            mean.append(values.mean(1))
            m2.append(((values - values.mean(1, keepdims=True)) ** 2).sum(1))
            outputs.append(np.full(b.shape[1], index))
        if not outputs:
            return cls(err2[0], (), np.zeros(0, np.int64))
        return cls(np.concatenate(err2, axis=1), ((np.concatenate(count), np.concatenate(mean), np.concatenate(m2)),),
                   np.concatenate(outputs))

    @classmethod
    def pooled(cls, parts: list["ChannelErrors"]) -> "ChannelErrors":
        """Parts over disjoint samples (batches, folds, shards), in sample order, as one."""
        return cls(np.concatenate([p.err2 for p in parts]), tuple(m for p in parts for m in p.moments),
                   parts[0].outputs)

    def merged(self) -> Moments:
        """The reference's moments of each channel over every batch (Chan's pairwise form, in batch order)."""
        if not self.moments:
            return np.zeros(0), np.zeros(0), np.zeros(0)
        count, mean, m2 = self.moments[0]
        for part_count, part_mean, part_m2 in self.moments[1:]:
            total = count + part_count
            delta = part_mean - mean
            mean, m2 = (mean + delta * part_count / np.maximum(total, 1),
                        m2 + part_m2 + delta**2 * count * part_count / np.maximum(total, 1))
            count = total
        return count, mean, m2

    def variances(self) -> np.ndarray:
        """Each channel's reference variance, floored at VARIANCE_FLOOR of its output's median channel variance
        (a constant channel, such as a padded slot, would otherwise turn any change into a huge error)."""
        count, _, m2 = self.merged()
        var = m2 / np.maximum(count, 1)
        floor = np.zeros_like(var)
        for index in np.unique(self.outputs):
            mine = self.outputs == index
            floor[mine] = VARIANCE_FLOOR * np.median(var[mine])
        return np.maximum(var, np.maximum(floor, 1e-30))

    def per_sample(self) -> np.ndarray:
        """Each sample's squared error averaged over every channel, each in units of its variance: (N,)."""
        if not self.err2.shape[1]:
            return np.zeros(len(self.err2))
        return (self.err2 / self.variances()).mean(1)


def _by_channel(array: np.ndarray, axis: int, channel: int | None) -> np.ndarray:
    """(N, channels, positions) float64, batch first; one channel when ``channel`` is None."""
    array = np.asarray(array, np.float64)
    if channel is None:
        moved = np.moveaxis(array, axis, 0)
        return moved.reshape(len(moved), 1, -1)
    moved = np.moveaxis(array, [axis, channel], [0, 1])
    return moved.reshape(moved.shape[0], moved.shape[1], -1)


@dataclass
class Scores:
    """One model's per-sample scores against a reference, poolable across batches, folds and shards.

    Attributes:
        matches: each sample's top-1 agreement (0/1, or the fraction of steps), or None where it means nothing.
        err2: each sample's squared error over every float output.
        ref2: each sample's reference squared norm.
        channels: the per-channel errors (standardised error).
        counts: (N, classes, 3) detection true positives, false positives, false negatives, or None.
        classes: the agreement output's classes (chance agreement is 1 / classes), or None.
    """

    matches: np.ndarray | None
    err2: np.ndarray
    ref2: np.ndarray
    channels: ChannelErrors
    counts: np.ndarray | None
    classes: int | None

    @classmethod
    def of_batch(cls, plan: Scoring, outs: list, refs: list, axes: list[int], n: int) -> "Scores":
        """One batch's per-sample scores of ``outs`` against ``refs``."""
        from asr_onnx.verify.detection import decode, match_counts

        floats = [j for j, out in enumerate(outs) if np.issubdtype(out.dtype, np.floating)]
        err2 = sum(((flat(outs[j], axes[j]) - flat(refs[j], axes[j])) ** 2).sum(1) for j in floats)
        ref2 = sum((flat(refs[j], axes[j]) ** 2).sum(1) for j in floats)
        matches, classes = None, None
        if plan.how is not None and plan.agreement is not None:
            j = plan.agreement
            matches = top1_matches(outs[j], refs[j], axes[j], plan.how)
            classes = int(np.shape(refs[j])[-1])
        channels = ChannelErrors.of([(j, outs[j], refs[j], axes[j], plan.channel_axes[j]) for j in floats
                                     if plan.kinds[j] is not None], n)
        counts = None
        if plan.heads:
            per_head = []
            for head in plan.heads:
                theirs, mine = decode(head, refs), decode(head, outs)
                per_head.append(np.stack([match_counts(r, c, head.classes) for r, c in zip(theirs, mine)]))
            counts = np.concatenate(per_head, axis=1)
        return cls(matches, np.broadcast_to(np.asarray(err2, np.float64), (n,)).copy(),
                   np.broadcast_to(np.asarray(ref2, np.float64), (n,)).copy(), channels, counts, classes)

    @classmethod
    def pooled(cls, parts: list["Scores"]) -> "Scores":
        """Parts over disjoint samples, in sample order, as one."""
        def joined(key):
            values = [getattr(p, key) for p in parts]
            return None if any(v is None for v in values) else np.concatenate(values)

        return cls(joined("matches"), joined("err2"), joined("ref2"),
                   ChannelErrors.pooled([p.channels for p in parts]), joined("counts"), parts[0].classes)

    @property
    def agreement(self) -> float | None:
        return None if self.matches is None else float(self.matches.mean())

    @property
    def logit_rel_l2(self) -> float:
        return logit_rel_l2(self.err2, float(self.ref2.sum()))

    @property
    def max_rel_l2(self) -> float:
        """The worst sample's relative error."""
        return float(np.sqrt((self.err2 / np.maximum(self.ref2, 1e-300)).max()))

    @property
    def std_err2(self) -> np.ndarray:
        """Each sample's standardised squared error."""
        return self.channels.per_sample()

    @property
    def standardised_error(self) -> float:
        """RMS error per channel, in units of the reference's spread of that channel."""
        return float(np.sqrt(self.std_err2.mean())) if len(self.err2) else 0.0

    @property
    def detection(self) -> dict | None:
        """The detection scores (pooled per class) and the decoding's settings, or None without a head."""
        from asr_onnx.verify.detection import MATCH_IOU, NMS_IOU, SCORE_THRESHOLD, detection_scores

        if self.counts is None:
            return None
        return detection_scores(self.counts.sum(0)) | {"score_threshold": SCORE_THRESHOLD, "nms_iou": NMS_IOU,
                                                        "match_iou": MATCH_IOU}

    @property
    def detection_f1(self) -> float | None:
        detection = self.detection
        return None if detection is None else detection["f1"]

    def primary(self) -> tuple[str, np.ndarray, float]:
        """The score that matters for this model, higher better: (metric, per-sample values, pooled value).

        A detector: detection F1 (per sample, each image's F1 over its classes; pooled, the mean over classes),
        when the reference detects anything (else nothing is there to find, and the next applies). A classifier:
        top-1 agreement. Anything else: the standardised error, negated (higher is better here).
        """
        from asr_onnx.verify.detection import image_f1

        if self.counts is not None and self.counts[:, :, [0, 2]].sum() > 0:  # the reference detects something
            return "detection_f1", image_f1(self.counts), float(self.detection_f1 or 0.0)
        if self.matches is not None:
            return "agreement", self.matches.astype(np.float64), float(self.matches.mean())
        return "standardised_error", -self.std_err2, -self.standardised_error

    def summary(self) -> dict:
        """The figures :func:`asr_onnx.verify.evaluation.agreement` returns against a reference: "agreement",
        "logit_rel_l2", "max_rel_l2", "agreement_classes", "standardised_error", "detection", "metric"."""
        return {"agreement": self.agreement, "logit_rel_l2": self.logit_rel_l2, "max_rel_l2": self.max_rel_l2,
                "agreement_classes": self.classes, "standardised_error": self.standardised_error,
                "detection": self.detection, "metric": self.primary()[0]}

    def entry(self) -> dict:
        """A model's held-out scores for the report (the guard's, ``auto``'s candidates'): "agreement" (None where
        top-1 means nothing), "logit_rel_l2", "standardised_error" and "detection_f1" (None but for a detector
        whose dense model detects anything)."""
        metric, _, value = self.primary()
        return {"agreement": self.agreement, "logit_rel_l2": self.logit_rel_l2,
                "standardised_error": self.standardised_error,
                "detection_f1": value if metric == "detection_f1" else None}


def compared(scores: Scores, agreement_kind: str, output_kinds: dict, per_sample: bool) -> dict:
    """What :func:`asr_onnx.verify.evaluation.agreement` returns against a reference, from the pooled ``scores``
    (a single process's, or its shards' joined in order: the same figures either way)."""
    result = {"agreement_kind": agreement_kind, "output_kinds": output_kinds} | scores.summary()
    if per_sample:
        result.update(scores=scores, matches=scores.matches, err2=scores.err2, ref2=float(scores.ref2.sum()))
    return result
