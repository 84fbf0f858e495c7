"""Evaluation: a model's outputs on a data set, and what they score: top-1 accuracy on labelled data;
against a reference model's outputs, label-free top-1 agreement, relative and standardised errors, and a
detector's detection F1 (:mod:`asr_onnx.verify.scoring`, :mod:`asr_onnx.verify.detection`).

:func:`logits` runs a model; :func:`agreement` scores outputs that are given (it runs nothing);
:func:`evaluate` is the two together.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator

from asr_onnx.calib.specs import fixed_batch, input_specs
from asr_onnx.errors import AsrError
from asr_onnx.model.files import load_model
from asr_onnx.model.kinds import PER_SAMPLE, OutputKind, batch_axis, output_kinds
from asr_onnx.model.kinds import per_sample as flat
from asr_onnx.model.session import Runner, batches
from asr_onnx.verify.scoring import Scores, Scoring, compared, plan_scoring

Batch = tuple[int, list]  # (samples fed, every output of that run in graph order)


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
              *, per_sample: bool = False, output_kind: dict | None = None, plan: Scoring | None = None) -> dict:
    """Scores a model's outputs: top-1 on ``labels``; against ``reference``, top-1 agreement, relative and
    standardised errors, and a detector's detection F1.

    Each output's batch axis is found from its declared dims or from the batch fed (see
    :mod:`asr_onnx.model.kinds`), so that a time-first output (T, N, C) counts N samples. Top-1 accuracy and
    agreement are reported only where the first output is (N, classes), or per step where it is per-step
    class scores (N, T, classes), or on the output named ``classes``; otherwise they are None and
    ``agreement_kind`` says why. A detection head (:mod:`asr_onnx.verify.detection`) is decoded and matched to
    the reference's detections. Nothing is run here.

    Args:
        outputs: the model's outputs, batch by batch, as :func:`logits` yields them.
        kinds: the model's output layouts (:func:`asr_onnx.model.kinds.output_kinds`).
        labels: int labels of the samples in order, or None. Defaults to None.
        reference: the reference model's outputs on the same batches, or None. Defaults to None.
        per_sample: also return, with a reference, the per-sample :class:`~asr_onnx.verify.scoring.Scores`
            ("scores", poolable across folds and shards) and, as before it, "matches" (each sample's agreement:
            0/1, or the fraction of steps that agree; None where agreement means nothing), "err2" (each
            sample's squared error summed over every output) and "ref2" (the reference's squared norm summed).
            Defaults to False.
        output_kind: {output name: kind} the user named (``--output-kind``). Defaults to None.
        plan: how the outputs are scored, decided earlier (a sharded evaluation decides it once, on the whole
            set's first batch). Defaults to None: decided here, on the first batch of the reference (of the
            outputs, without one).

    Returns:
        {"samples", "top1"?, and with a reference "agreement_kind", "output_kinds" and
        :meth:`~asr_onnx.verify.scoring.Scores.summary`'s "agreement", "logit_rel_l2", "max_rel_l2",
        "agreement_classes", "standardised_error", "detection" (:func:`asr_onnx.verify.detection.detection_scores`
        and the decoding's settings, or None without a head), "metric" (the score that matters:
        :meth:`~asr_onnx.verify.scoring.Scores.primary`); "scores"?, "matches"?, "err2"?, "ref2"?}:
        "logit_rel_l2" is the relative L2 error of all outputs (the logits, for a classifier), "max_rel_l2" the
        worst sample's, "standardised_error" the RMS error of every output channel in units of the reference's
        spread of that channel (:class:`~asr_onnx.verify.scoring.ChannelErrors`).

    Raises:
        AsrError: the model's and the reference's outputs differ in shape.
    """
    references = iter(reference) if reference is not None else None
    correct = seen = 0
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
        if references is not None:
            parts.append(Scores.of_batch(plan, outs, refs, axes, n))
        seen += n
    result: dict = {"samples": seen}
    if labels is not None:
        result["top1"] = correct / seen if plan is not None and plan.how == PER_SAMPLE else None
    if parts and plan is not None:
        result.update(compared(Scores.pooled(parts), plan.how or plan.why, plan.named(kinds), per_sample))
    return result


def evaluate(model, data, *, reference=None, batch_size: int = 256, device: str = "auto", progress: bool = True,
             reference_logits: list | None = None, per_sample: bool = False, engine=None,
             output_kind: dict | None = None, plan: Scoring | None = None) -> dict:
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
        per_sample, output_kind, plan: see :func:`agreement`. Defaults to False, None and None.
        engine: a distributed engine (:mod:`asr_onnx.model.engine`) scores shards on its workers
            (:mod:`asr_onnx.verify.sharded`; ``reference_logits`` is then not used). Defaults to None (here).

    Returns:
        :func:`agreement`'s scores.
    """
    proto = load_model(model) if isinstance(model, (str, Path)) else model
    batch_size = fixed_batch(input_specs(proto)) or batch_size
    if engine is not None and engine.distributed:
        return _evaluate_sharded(engine, proto, data, reference, batch_size, device, per_sample, output_kind)
    outputs = logits(proto, data, batch_size=batch_size, device=device, progress=progress)
    references: Iterable[Batch] | None = reference_logits or None
    if reference is not None and not reference_logits:
        references = logits(reference, data, batch_size=batch_size, device=device, progress=False)
        if reference_logits is not None:
            references = _kept(references, reference_logits)
    return agreement(outputs, output_kinds(proto), data.labels, references, per_sample=per_sample,
                     output_kind=output_kind, plan=plan)


def first_plan(proto, data, batch_size: int, device: str, output_kind: dict | None, reference=None) -> Scoring:
    """The scoring plan that :func:`agreement` decides on ``data``'s first batch, the reference's outputs (or,
    without one, ``proto``'s) run here."""
    source = reference if reference is not None else proto
    [(n, outs)] = list(logits(source, data.slice(0, min(batch_size, len(data))), batch_size=batch_size,
                              device=device, progress=False))
    kinds = output_kinds(proto)
    return plan_scoring(kinds, outs, [batch_axis(k, out.shape, n) for k, out in zip(kinds, outs)], output_kind)


def _evaluate_sharded(engine, proto, data, reference, batch_size: int, device: str, per_sample: bool,
                      output_kind: dict | None) -> dict:
    """:func:`evaluate` on shards of whole batches on ``engine``'s workers, the scores joined in shard order
    (:func:`asr_onnx.verify.sharded.merge_scores`). The scoring plan is decided once, here, on the first batch
    of the whole set (as a single process decides it), and every shard scores by it."""
    from asr_onnx.verify.sharded import merge_scores

    dense = load_model(reference) if isinstance(reference, (str, Path)) else reference
    plan = first_plan(proto, data, batch_size, device, output_kind, dense)

    def run(shard):
        return evaluate(proto, shard, reference=dense, batch_size=batch_size, device=device, progress=False,
                        per_sample=dense is not None, plan=plan)

    parts = engine.map(run, data, batch_size, "eval")
    return merge_scores(parts, reference=dense is not None, per_sample=per_sample)


def _kept(batches: Iterable[Batch], into: list) -> Iterator[Batch]:
    """The batches, each also appended to ``into`` as it passes."""
    for batch in batches:
        into.append(batch)
        yield batch


def score(model, dense, data, *, name: str | None = None, batch_size: int = 256, device: str = "auto",
          progress: bool = True, engine=None, output_kind: dict | None = None) -> dict:
    """The report's ``eval`` entry: ``model`` scored against ``dense`` on ``data``; the dense model runs once,
    and its outputs also give its own top-1 where ``data`` has labels.

    Args:
        model, dense: onnx.ModelProto.
        data: a calib.CalibSet, labelled or not.
        name: what the report calls the data. Defaults to None ("given").
        batch_size, device, progress, engine, output_kind: as for :func:`evaluate`. Defaults to 256, "auto",
            True, None and None.

    Returns:
        {"data", "samples", "top1", "dense_top1", "agreement", "logit_rel_l2", "standardised_error", "detection"
        (its per-class counts keyed by the class index as text, as JSON keys are), "output_kinds", "metric",
        "agreement_classes"}.
    """
    dense_logits: list = []
    scores = evaluate(model, data, reference=dense, batch_size=batch_size, device=device, progress=progress,
                      reference_logits=dense_logits, engine=engine, output_kind=output_kind)
    dense_top1 = None
    if data.labels is not None and scores.get("top1") is not None:  # the agreement output is (N, classes)
        if dense_logits:
            dense_top1 = agreement(dense_logits, output_kinds(dense), data.labels, output_kind=output_kind)["top1"]
        else:  # scored on a distributed engine: the dense model's top-1 is a pass of its own
            dense_top1 = evaluate(dense, data, batch_size=batch_size, device=device, engine=engine,
                                  output_kind=output_kind)["top1"]
    detection = scores["detection"]
    if detection is not None:
        detection = detection | {"per_class": {str(c): v for c, v in detection["per_class"].items()}}
    return {"data": name or "given", "samples": scores["samples"], "top1": scores.get("top1"),
            "dense_top1": dense_top1, "agreement": scores.get("agreement"), "logit_rel_l2": scores["logit_rel_l2"],
            "standardised_error": scores["standardised_error"], "detection": detection,
            "output_kinds": scores["output_kinds"], "metric": scores["metric"],
            "agreement_classes": scores["agreement_classes"]}
