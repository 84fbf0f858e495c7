"""Evaluation: top-1 accuracy on labelled data, and label-free agreement with a reference model."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import AsrError
from .output_kinds import PER_SAMPLE


def _run(session, feed: dict) -> list[np.ndarray]:
    """Every output of one run, in graph order."""
    return session.run(None, feed)


def logit_rel_l2(err2: np.ndarray, ref2: float) -> float:
    """Relative L2 logit error: sqrt(sum of squared errors / sum of the reference's squares)."""
    return float(np.sqrt(np.sum(err2) / max(ref2, 1e-300)))


def evaluate(model, data, *, reference=None, batch_size: int = 256, device: str = "auto", progress: bool = True,
             reference_logits: list | None = None, per_sample: bool = False) -> dict:
    """Top-1 accuracy (when ``data`` has labels) and, with a reference, agreement and relative error.

    Each output's batch axis is found from its declared dims or from the batch fed (see
    :mod:`asr_onnx.output_kinds`), so that a time-first output (T, N, C) counts N samples. Top-1 accuracy and
    agreement are reported only where the first output is (N, classes), or per step where it is per-step
    class scores (N, T, classes); otherwise they are None and ``agreement_kind`` says why.

    Args:
        model: onnx.ModelProto or a path.
        data: a calib.CalibSet (labels optional).
        reference: the dense model (onnx.ModelProto or path), or None.
        batch_size: samples per run. Defaults to 256 (the model's own when its batch is fixed).
        device: "auto", "cpu" or "cuda". Defaults to "auto".
        progress: a progress bar on a TTY. Defaults to True.
        reference_logits: a list to fill with (or, when full, reuse as) the reference's per-batch
            outputs, so that a sweep runs the dense model once. Defaults to None.
        per_sample: also return, with a reference, each sample's agreement ("matches": 0/1, or the fraction
            of steps that agree; None where agreement means nothing), each sample's squared error summed
            over every output ("err2") and the reference's squared norm summed ("ref2"), so that folds can
            be pooled. Defaults to False.

    Returns:
        {"samples", "top1"?, "agreement"?, "agreement_kind"?, "logit_rel_l2"?, "max_rel_l2"?, "matches"?,
        "err2"?, "ref2"?}: "logit_rel_l2" is the relative L2 error of all outputs (the logits, for a
        classifier), "max_rel_l2" the worst sample's.
    """
    from .calib.specs import fixed_batch, input_specs
    from .modelio import load_model
    from .output_kinds import agreement_kind, batch_axis, output_kinds, top1_matches
    from .output_kinds import per_sample as flat
    from .progress import bar
    from .runtime import make_session

    proto = load_model(model) if isinstance(model, (str, Path)) else model
    session = make_session(proto, device)
    kinds = output_kinds(proto)
    batch_size = fixed_batch(input_specs(proto)) or batch_size
    ref_session = None
    if reference is not None and not reference_logits:
        ref_session = make_session(reference, device)
    compare = reference is not None or bool(reference_logits)
    labels = data.labels
    correct = seen = 0
    how, why = None, ""
    matches, err2, ref2_each = [], [], []
    batches = bar(data.batches(batch_size), total=-(-len(data) // batch_size), desc="eval", enabled=progress)
    for i, feed in enumerate(batches):
        n = len(next(iter(feed.values())))
        outs = _run(session, feed)
        axes = [batch_axis(k, out.shape, n) for k, out in zip(kinds, outs)]
        if i == 0:
            how, why = agreement_kind(kinds[0], outs[0].shape, axes[0])
        if labels is not None and how == PER_SAMPLE:
            correct += int((flat(outs[0], axes[0]).argmax(1) == labels[seen : seen + n]).sum())
        if compare:
            if ref_session is not None:
                refs = _run(ref_session, feed)
                if reference_logits is not None:
                    reference_logits.append(refs)
            else:
                refs = reference_logits[i]
            if [r.shape for r in refs] != [out.shape for out in outs]:
                raise AsrError(f"the model's outputs have shapes {[list(out.shape) for out in outs]} and the "
                               f"reference's {[list(r.shape) for r in refs]}: they cannot be compared")
            floats = [j for j, out in enumerate(outs) if np.issubdtype(out.dtype, np.floating)]
            err2.append(sum(((flat(outs[j], axes[j]) - flat(refs[j], axes[j])) ** 2).sum(1) for j in floats))
            ref2_each.append(sum((flat(refs[j], axes[j]) ** 2).sum(1) for j in floats))
            if how is not None:
                matches.append(top1_matches(outs[0], refs[0], axes[0], how))
        seen += n
    result = {"samples": seen}
    if labels is not None:
        result["top1"] = correct / seen if how == PER_SAMPLE else None
    if compare:
        err2, ref2_each = np.concatenate(err2), np.concatenate(ref2_each)
        matches = np.concatenate(matches) if how is not None else None
        result.update(agreement=None if matches is None else float(matches.mean()),
                      agreement_kind=how or why, logit_rel_l2=logit_rel_l2(err2, float(ref2_each.sum())),
                      max_rel_l2=float(np.sqrt((err2 / np.maximum(ref2_each, 1e-300)).max())))
        if per_sample:
            result.update(matches=matches, err2=err2, ref2=float(ref2_each.sum()))
    return result
