"""Evaluation: a model's outputs on a data set, and what they score: top-1 accuracy on labelled data;
against a reference model's outputs, label-free top-1 agreement, relative and standardised errors, and a
detector's detection F1 (:mod:`asr_onnx.detection`).

:func:`logits` runs a model; :func:`agreement` scores outputs that are given (it runs nothing);
:func:`evaluate` is the two together.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from .calib.specs import fixed_batch, input_specs
from .errors import AsrError
from .modelio import load_model
from .output_kinds import PER_SAMPLE, OutputKind, Scoring, batch_axis, output_kinds, plan_scoring, top1_matches
from .output_kinds import per_sample as flat
from .progress import bar
from .runtime import make_session

Batch = tuple[int, list]  # (samples fed, every output of that run in graph order)


def logit_rel_l2(err2: np.ndarray, ref2: float) -> float:
    """Relative L2 logit error: sqrt(sum of squared errors / sum of the reference's squares)."""
    return float(np.sqrt(np.sum(err2) / max(ref2, 1e-300)))


def logits(model, data, *, batch_size: int = 256, device: str = "auto", progress: bool = True) -> Iterator[Batch]:
    """Every output of ``model`` on ``data``, one run at a time (a generator: one batch is held at a time).

    Args:
        model: onnx.ModelProto or a path.
        data: a calib.CalibSet.
        batch_size: samples per run. Defaults to 256 (the model's own when its batch is fixed).
        device: "auto", "cpu" or "cuda". Defaults to "auto".
        progress: a progress bar on a TTY. Defaults to True.

    Yields:
        (samples fed, the run's outputs in graph order).
    """
    proto = load_model(model) if isinstance(model, (str, Path)) else model
    session = make_session(proto, device)
    batch_size = fixed_batch(input_specs(proto)) or batch_size
    for feed in bar(data.batches(batch_size), total=-(-len(data) // batch_size), desc="eval", enabled=progress):
        yield len(next(iter(feed.values()))), session.run(None, feed)


def agreement(outputs: Iterable[Batch], kinds: list[OutputKind], labels=None, reference: Iterable[Batch] | None = None,
              *, per_sample: bool = False, output_kind: dict | None = None) -> dict:
    """Scores a model's outputs: top-1 on ``labels``; against ``reference``, top-1 agreement, relative and
    standardised errors, and a detector's detection F1.

    Each output's batch axis is found from its declared dims or from the batch fed (see
    :mod:`asr_onnx.output_kinds`), so that a time-first output (T, N, C) counts N samples. Top-1 accuracy and
    agreement are reported only where the first output is (N, classes), or per step where it is per-step
    class scores (N, T, classes), or on the output named ``classes``; otherwise they are None and
    ``agreement_kind`` says why. A detection head (:mod:`asr_onnx.detection`) is decoded and matched to the
    reference's detections. Nothing is run here.

    Args:
        outputs: the model's outputs, batch by batch, as :func:`logits` yields them.
        kinds: the model's output layouts (:func:`asr_onnx.output_kinds.output_kinds`).
        labels: int labels of the samples in order, or None. Defaults to None.
        reference: the reference model's outputs on the same batches, or None. Defaults to None.
        per_sample: also return, with a reference, the per-sample :class:`Scores` ("scores", poolable across
            folds) and, as before it, "matches" (each sample's agreement: 0/1, or the fraction of steps that
            agree; None where agreement means nothing), "err2" (each sample's squared error summed over every
            output) and "ref2" (the reference's squared norm summed). Defaults to False.
        output_kind: {output name: kind} the user named (``--output-kind``). Defaults to None.

    Returns:
        {"samples", "top1"?, and with a reference "agreement", "agreement_kind", "agreement_classes",
        "logit_rel_l2", "max_rel_l2", "standardised_error", "output_kinds", "metric" (the score that matters:
        :meth:`Scores.primary`), "detection" (:func:`asr_onnx.detection.detection_scores` and the
        decoding's settings, or None without a head), "scores"?, "matches"?, "err2"?, "ref2"?}: "logit_rel_l2"
        is the relative L2 error of all outputs (the logits, for a classifier), "max_rel_l2" the worst
        sample's, "standardised_error" the RMS error of every output channel in units of the reference's
        spread of that channel (:class:`ChannelErrors`).

    Raises:
        AsrError: the model's and the reference's outputs differ in shape.
    """
    compare = reference is not None
    references = iter(reference) if reference is not None else None
    correct = seen = 0
    plan: Scoring | None = None
    parts: list[Scores] = []
    for n, outs in outputs:
        axes = [batch_axis(k, out.shape, n) for k, out in zip(kinds, outs)]
        refs: list = outs
        if references is not None:
            _, refs = next(references)
            if [r.shape for r in refs] != [out.shape for out in outs]:
                raise AsrError(f"the model's outputs have shapes {[list(out.shape) for out in outs]} and the "
                               f"reference's {[list(r.shape) for r in refs]}: they cannot be compared")
        if plan is None:
            plan = plan_scoring(kinds, refs, axes, output_kind)  # the reference's values decide what a head is
        if labels is not None and plan.how == PER_SAMPLE and plan.agreement is not None:
            j = plan.agreement
            correct += int((flat(outs[j], axes[j]).argmax(1) == labels[seen : seen + n]).sum())
        if compare:
            parts.append(_batch_scores(plan, outs, refs, axes, n))
        seen += n
    result: dict = {"samples": seen}
    if labels is not None:
        result["top1"] = correct / seen if plan is not None and plan.how == PER_SAMPLE else None
    if compare and parts and plan is not None:
        scores = Scores.pooled(parts)
        result.update(agreement=scores.agreement, agreement_kind=plan.how or plan.why,
                      logit_rel_l2=scores.logit_rel_l2,
                      max_rel_l2=float(np.sqrt((scores.err2 / np.maximum(scores.ref2, 1e-300)).max())),
                      agreement_classes=scores.classes, standardised_error=scores.standardised_error,
                      output_kinds=plan.named(kinds), detection=scores.detection, metric=scores.primary()[0])
        if per_sample:
            result.update(scores=scores, matches=scores.matches, err2=scores.err2, ref2=float(scores.ref2.sum()))
    return result


def _batch_scores(plan: Scoring, outs: list, refs: list, axes: list[int], n: int) -> "Scores":
    """One batch's per-sample scores of ``outs`` against ``refs``."""
    from .detection import decode, match_counts

    floats = [j for j, out in enumerate(outs) if np.issubdtype(out.dtype, np.floating)]
    err2 = sum(((flat(outs[j], axes[j]) - flat(refs[j], axes[j])) ** 2).sum(1) for j in floats)
    ref2 = sum((flat(refs[j], axes[j]) ** 2).sum(1) for j in floats)
    matches, classes = None, None
    if plan.how is not None and plan.agreement is not None:
        j = plan.agreement
        matches = top1_matches(outs[j], refs[j], axes[j], plan.how)
        classes = int(np.shape(refs[j])[-1])
    channels = ChannelErrors.of([(j, outs[j], refs[j], axes[j], plan.channel_axes[j]) for j in floats
                                 if plan.kinds[j] is not None])
    counts = None
    if plan.heads:
        per_head = []
        for head in plan.heads:
            theirs, mine = decode(head, refs), decode(head, outs)
            per_head.append(np.stack([match_counts(r, c, head.classes) for r, c in zip(theirs, mine)]))
        counts = np.concatenate(per_head, axis=1)
    return Scores(matches, np.broadcast_to(np.asarray(err2, np.float64), (n,)).copy(),
                  np.broadcast_to(np.asarray(ref2, np.float64), (n,)).copy(), channels, counts, classes)


SCORE_METRICS = ("agreement", "detection_f1", "standardised_error")  # what a model's held-out score can be


@dataclass
class ChannelErrors:
    """Each sample's mean squared error per output channel, and the reference's spread of each channel, so
    that every channel counts alike whatever its scale (a detector's box coordinates in pixels, its class
    scores in [0, 1]). Folds pool (:meth:`pooled`) before the spread is taken.

    Attributes:
        err2: (N, K) mean squared error of each sample on each channel (over its positions).
        count, mean, m2: (K,) the reference's values per channel: how many, their mean, their summed squared
            deviations (Chan's pooled form).
        outputs: (K,) the output each channel belongs to.
    """

    err2: np.ndarray
    count: np.ndarray
    mean: np.ndarray
    m2: np.ndarray
    outputs: np.ndarray

    @classmethod
    def of(cls, arrays: list) -> "ChannelErrors":
        """One batch: ``arrays`` holds (output index, candidate, reference, batch axis, channel axis or None)."""
        err2, count, mean, m2, outputs = [], [], [], [], []
        n = None
        for index, out, ref, axis, channel in arrays:
            a, b = _by_channel(out, axis, channel), _by_channel(ref, axis, channel)
            n = len(b)
            err2.append(((a - b) ** 2).mean(2))
            values = np.moveaxis(b, 1, 0).reshape(b.shape[1], -1)
            count.append(np.full(b.shape[1], values.shape[1], np.float64))
            mean.append(values.mean(1))
            m2.append(((values - values.mean(1, keepdims=True)) ** 2).sum(1))
            outputs.append(np.full(b.shape[1], index))
        if n is None:
            return cls(np.zeros((0, 0)), np.zeros(0), np.zeros(0), np.zeros(0), np.zeros(0, np.int64))
        return cls(np.concatenate(err2, axis=1), np.concatenate(count), np.concatenate(mean), np.concatenate(m2),
                   np.concatenate(outputs))

    @classmethod
    def pooled(cls, parts: list["ChannelErrors"]) -> "ChannelErrors":
        """Parts over disjoint samples (batches, folds) as one: errors stacked, moments merged."""
        count, mean, m2 = parts[0].count, parts[0].mean, parts[0].m2
        for part in parts[1:]:
            total = count + part.count
            delta = part.mean - mean
            mean, m2 = mean + delta * part.count / np.maximum(total, 1), \
                m2 + part.m2 + delta**2 * count * part.count / np.maximum(total, 1)
            count = total
        return cls(np.concatenate([p.err2 for p in parts]), count, mean, m2, parts[0].outputs)

    def variances(self) -> np.ndarray:
        """Each channel's reference variance, floored at VARIANCE_FLOOR of its output's median channel variance
        (a constant channel, such as a padded slot, would otherwise turn any change into a huge error)."""
        var = self.m2 / np.maximum(self.count, 1)
        floor = np.zeros_like(var)
        for index in np.unique(self.outputs):
            mine = self.outputs == index
            floor[mine] = VARIANCE_FLOOR * np.median(var[mine])
        return np.maximum(var, np.maximum(floor, 1e-30))

    def per_sample(self) -> np.ndarray:
        """Each sample's squared error averaged over every channel, each in units of its variance: (N,)."""
        if not self.err2.size:
            return np.zeros(len(self.err2))
        return (self.err2 / self.variances()).mean(1)


VARIANCE_FLOOR = 1e-2  # of an output's median channel variance: the least spread a channel is measured against


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
    """One model's per-sample scores against a reference, poolable across batches and folds.

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
    def pooled(cls, parts: list["Scores"]) -> "Scores":
        """Parts over disjoint samples as one."""
        def joined(key):
            values = [getattr(p, key) for p in parts]
            return None if any(v is None for v in values) else np.concatenate(values)

        return cls(joined("matches"), joined("err2"), joined("ref2"), ChannelErrors.pooled([p.channels for p in parts]),
                   joined("counts"), parts[0].classes)

    @property
    def agreement(self) -> float | None:
        return None if self.matches is None else float(self.matches.mean())

    @property
    def logit_rel_l2(self) -> float:
        return logit_rel_l2(self.err2, float(self.ref2.sum()))

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
        from .detection import MATCH_IOU, NMS_IOU, SCORE_THRESHOLD, detection_scores

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
        from .detection import image_f1

        if self.counts is not None and self.counts[:, :, [0, 2]].sum() > 0:  # the reference detects something
            return "detection_f1", image_f1(self.counts), float(self.detection_f1 or 0.0)
        if self.matches is not None:
            return "agreement", self.matches.astype(np.float64), float(self.matches.mean())
        return "standardised_error", -self.std_err2, -self.standardised_error


def evaluate(model, data, *, reference=None, batch_size: int = 256, device: str = "auto", progress: bool = True,
             reference_logits: list | None = None, per_sample: bool = False, output_kind: dict | None = None) -> dict:
    """Runs ``model`` (and ``reference``) on ``data`` and scores the outputs: :func:`agreement` of :func:`logits`.

    Args:
        model: onnx.ModelProto or a path.
        data: a calib.CalibSet (labels optional).
        reference: the dense model (onnx.ModelProto or path), or None.
        batch_size: samples per run. Defaults to 256 (the model's own when its batch is fixed).
        device: "auto", "cpu" or "cuda". Defaults to "auto".
        progress: a progress bar on a TTY. Defaults to True.
        reference_logits: a list to fill with (or, when full, reuse as) the reference's per-batch
            outputs, so that a sweep runs the dense model once. Defaults to None.
        per_sample, output_kind: see :func:`agreement`. Defaults to False and None.

    Returns:
        :func:`agreement`'s scores.
    """
    proto = load_model(model) if isinstance(model, (str, Path)) else model
    batch_size = fixed_batch(input_specs(proto)) or batch_size
    outputs = logits(proto, data, batch_size=batch_size, device=device, progress=progress)
    references: Iterable[Batch] | None = reference_logits or None
    if reference is not None and not reference_logits:
        references = logits(reference, data, batch_size=batch_size, device=device, progress=False)
        if reference_logits is not None:
            references = _kept(references, reference_logits)
    return agreement(outputs, output_kinds(proto), data.labels, references, per_sample=per_sample,
                     output_kind=output_kind)


def _kept(batches: Iterable[Batch], into: list) -> Iterator[Batch]:
    """The batches, each also appended to ``into`` as it passes."""
    for batch in batches:
        into.append(batch)
        yield batch
