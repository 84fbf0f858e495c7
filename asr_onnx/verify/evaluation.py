"""Evaluation: a model's outputs on a data set, and what they score: top-1 accuracy on labelled data,
label-free agreement and relative error against a reference model's outputs.

:func:`logits` runs a model; :func:`agreement` scores outputs that are given (it runs nothing);
:func:`evaluate` is the two together.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from asr_onnx.calib.specs import fixed_batch, input_specs
from asr_onnx.errors import AsrError
from asr_onnx.model.files import load_model
from asr_onnx.model.kinds import PER_SAMPLE, OutputKind, agreement_kind, batch_axis, output_kinds, top1_matches
from asr_onnx.model.kinds import per_sample as flat
from asr_onnx.model.session import Runner, batches

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
    batch_size = fixed_batch(input_specs(proto)) or batch_size
    with Runner(proto, device=device, on="a batch") as session:
        for _, feed in batches(data, batch_size, desc="eval", progress=progress):
            yield len(next(iter(feed.values()))), list(session.run(None, feed).values())


def agreement(outputs: Iterable[Batch], kinds: list[OutputKind], labels=None, reference: Iterable[Batch] | None = None,
              *, per_sample: bool = False) -> dict:
    """Scores a model's outputs: top-1 on ``labels``, and agreement and relative error against ``reference``.

    Each output's batch axis is found from its declared dims or from the batch fed (see
    :mod:`asr_onnx.model.kinds`), so that a time-first output (T, N, C) counts N samples. Top-1 accuracy and
    agreement are reported only where the first output is (N, classes), or per step where it is per-step
    class scores (N, T, classes); otherwise they are None and ``agreement_kind`` says why. Nothing is run here.

    Args:
        outputs: the model's outputs, batch by batch, as :func:`logits` yields them.
        kinds: the model's output layouts (:func:`asr_onnx.model.kinds.output_kinds`).
        labels: int labels of the samples in order, or None. Defaults to None.
        reference: the reference model's outputs on the same batches, or None. Defaults to None.
        per_sample: also return, with a reference, each sample's agreement ("matches": 0/1, or the fraction
            of steps that agree; None where agreement means nothing), each sample's squared error summed
            over every output ("err2") and the reference's squared norm summed ("ref2"), so that folds can
            be pooled. Defaults to False.

    Returns:
        {"samples", "top1"?, "agreement"?, "agreement_kind"?, "logit_rel_l2"?, "max_rel_l2"?, "matches"?,
        "err2"?, "ref2"?}: "logit_rel_l2" is the relative L2 error of all outputs (the logits, for a
        classifier), "max_rel_l2" the worst sample's.

    Raises:
        AsrError: the model's and the reference's outputs differ in shape.
    """
    compare = reference is not None
    references = iter(reference) if compare else None
    correct = seen = 0
    how, why = None, ""
    matches, err2, ref2_each = [], [], []
    for i, (n, outs) in enumerate(outputs):
        axes = [batch_axis(k, out.shape, n) for k, out in zip(kinds, outs)]
        if i == 0:
            how, why = agreement_kind(kinds[0], outs[0].shape, axes[0])
        if labels is not None and how == PER_SAMPLE:
            correct += int((flat(outs[0], axes[0]).argmax(1) == labels[seen : seen + n]).sum())
        if compare:
            _, refs = next(references)
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


def evaluate(model, data, *, reference=None, batch_size: int = 256, device: str = "auto", progress: bool = True,
             reference_logits: list | None = None, per_sample: bool = False, engine=None) -> dict:
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
        per_sample: see :func:`agreement`. Defaults to False.
        engine: a distributed engine (:mod:`asr_onnx.model.engine`) scores shards on its workers
            (:mod:`asr_onnx.verify.sharded`; ``reference_logits`` is then not used). Defaults to None (here).

    Returns:
        :func:`agreement`'s scores.
    """
    proto = load_model(model) if isinstance(model, (str, Path)) else model
    batch_size = fixed_batch(input_specs(proto)) or batch_size
    if engine is not None and engine.distributed:
        return _evaluate_sharded(engine, proto, data, reference, batch_size, device, per_sample)
    outputs = logits(proto, data, batch_size=batch_size, device=device, progress=progress)
    references = reference_logits or None
    if reference is not None and not reference_logits:
        references = logits(reference, data, batch_size=batch_size, device=device, progress=False)
        if reference_logits is not None:
            references = _kept(references, reference_logits)
    return agreement(outputs, output_kinds(proto), data.labels, references, per_sample=per_sample)


def _evaluate_sharded(engine, proto, data, reference, batch_size: int, device: str, per_sample: bool) -> dict:
    """:func:`evaluate` on shards of whole batches on ``engine``'s workers, the scores joined in shard order
    (:func:`asr_onnx.verify.sharded.merge_scores`)."""
    from asr_onnx.verify.sharded import merge_scores

    dense = load_model(reference) if isinstance(reference, (str, Path)) else reference

    def run(shard):
        return evaluate(proto, shard, reference=dense, batch_size=batch_size, device=device, progress=False,
                        per_sample=dense is not None)

    parts = engine.map(run, data, batch_size, "eval")
    return merge_scores(parts, reference=dense is not None, per_sample=per_sample, rel_l2=logit_rel_l2)


def _kept(batches: Iterable[Batch], into: list) -> Iterator[Batch]:
    """The batches, each also appended to ``into`` as it passes."""
    for batch in batches:
        into.append(batch)
        yield batch


def score(model, dense, data, *, name: str | None = None, batch_size: int = 256, device: str = "auto",
          progress: bool = True, engine=None) -> dict:
    """The report's ``eval`` entry: ``model`` scored against ``dense`` on ``data``; the dense model runs once,
    and its outputs also give its own top-1 where ``data`` has labels.

    Args:
        model, dense: onnx.ModelProto.
        data: a calib.CalibSet, labelled or not.
        name: what the report calls the data. Defaults to None ("given").
        batch_size, device, progress, engine: as for :func:`evaluate`. Defaults to 256, "auto", True and None.
    """
    dense_logits: list = []
    scores = evaluate(model, data, reference=dense, batch_size=batch_size, device=device, progress=progress,
                      reference_logits=dense_logits, engine=engine)
    dense_top1 = None
    if data.labels is not None and scores.get("top1") is not None:  # the first output is (N, classes)
        if dense_logits:
            dense_top1 = agreement(dense_logits, output_kinds(dense), data.labels)["top1"]
        else:  # scored on a distributed engine: the dense model's top-1 is a pass of its own
            dense_top1 = evaluate(dense, data, batch_size=batch_size, device=device, engine=engine)["top1"]
    return {"data": name or "given", "samples": scores["samples"], "top1": scores.get("top1"),
            "dense_top1": dense_top1, "agreement": scores.get("agreement"), "logit_rel_l2": scores["logit_rel_l2"]}
