"""The verdict: is the model usable, degraded or broken, measured against the dense model?

One figure decides, the one that matters for what the model does (:meth:`asr_onnx.verify.scoring.Scores.primary`):

- a classifier: top-1 agreement with the dense model. Usable from 95%: at most one decision in twenty
  differs, the tolerance of a typical deployment check. Broken below half-way from chance to full agreement
  (55% for 10 classes, 75% for 2, about 50% for 1,000): its decisions are closer to a coin's than to the
  dense model's.
- a detector: detection F1 against the dense model's detections (:mod:`asr_onnx.verify.detection`). Usable from
  0.9: about one detection in ten missed or spurious. Broken below 0.5: as many wrong as right.
- anything else: the standardised error e (each output channel's RMS error in units of the dense model's
  spread of that channel; 1 - e^2 is about the share of the dense output's variance the model reproduces).
  Its thresholds were read off classifiers, where agreement is known: on 1,000 held-out Fashion-MNIST
  training images, for the 4 sample models at 0.5, 0.7, 0.8, 0.9, 0.95 and 2:4, pruned alone or repaired
  (48 cells, benchmarks/verdict_thresholds.py, benchmarks/results/verdict_thresholds.json), every cell with
  a standardised logit error <= 0.2 agrees 96.8% or more (the next, 0.237, 94.4%), every cell above 0.8
  agrees under 55% (the broken line for 10 classes), and every cell between agrees 56.8% or more.

The figure comes from data the repair did not fit: ``repair --eval`` data when given, else the guard's held-out
calibration samples; only when neither exists is it the calibration data itself, and the reason says so.

The report holds the verdict as its top-level ``verdict`` section (:class:`asr_onnx.report.schema.Verdict`, the
same fields); the summary and the page lead with it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

LABELS = ("usable", "degraded", "broken")
AGREEMENT_USABLE = 0.95
F1_USABLE, F1_BROKEN = 0.9, 0.5
STANDARDISED_USABLE, STANDARDISED_BROKEN = 0.2, 0.8
FEW_DETECTIONS = 5  # a class with fewer dense detections scores F1 by a coin or two: the reason says so
METRIC_NAMES = {"agreement": "top-1 agreement", "detection_f1": "detection F1",
                "standardised_error": "standardised error"}

KEPT_NAMES = {"repair": "repair", "refit": "refit alone", "pruned": "pruned model"}  # the guard's "kept"


@dataclass(frozen=True)
class Verdict:
    """The verdict on one model, as the JSON report's top-level ``verdict`` holds it.

    Attributes:
        label: "usable", "degraded" or "broken".
        metric: "agreement", "detection_f1" or "standardised_error".
        value: the metric's value.
        threshold_usable: usable from this value (agreement, F1: at or above; standardised error: at or below).
        threshold_broken: broken past this value (agreement, F1: below; standardised error: above).
        reason: one sentence: the figure, the data it was measured on, the thresholds.
        suggestion: what to try next, one line, or None when usable.
    """

    label: str
    metric: str
    value: float
    threshold_usable: float
    threshold_broken: float
    reason: str
    suggestion: str | None

    def as_dict(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        """``verdict: <label> - <reason>[; <suggestion>]``, the summary's first line (as the report's
        :meth:`asr_onnx.report.schema.Verdict.line` writes it)."""
        text = f"verdict: {self.label} - {self.reason}"
        return text if self.suggestion is None else f"{text}; {self.suggestion}"


def thresholds(metric: str, classes: int | None = None) -> tuple[float, float]:
    """(usable, broken) for ``metric``; agreement's broken line is half-way between chance (1 / ``classes``) and
    full agreement."""
    if metric == "agreement":
        chance = 1 / classes if classes and classes > 1 else 0.0
        return AGREEMENT_USABLE, chance + (1 - chance) / 2
    if metric == "detection_f1":
        return F1_USABLE, F1_BROKEN
    if metric == "standardised_error":
        return STANDARDISED_USABLE, STANDARDISED_BROKEN
    raise ValueError(f"no thresholds for {metric!r}")


def judge(metric: str, value: float, *, data: str, classes: int | None = None, settings: dict | None = None,
          detector: bool = False) -> Verdict:
    """The verdict on one figure.

    Args:
        metric: "agreement", "detection_f1" or "standardised_error".
        value: its value.
        data: what it was measured on, for the reason ("128 held-out calibration samples").
        classes: the classifier's classes (agreement's chance level). Defaults to None.
        settings: what the repair did (:func:`done`: its "sparsity", "pattern", "reconstruct", "keep_last",
            "exclude"), to tailor the suggestion; None for a model of unknown origin (``eval --reference``).
            Defaults to None.
        detector: the model has a detection head (excluding it is one suggestion). Defaults to False.
    """
    usable, broken = thresholds(metric, classes)
    lower_better = metric == "standardised_error"
    if (value <= usable) if lower_better else (value >= usable):
        label = "usable"
    elif (value > broken) if lower_better else (value < broken):
        label = "broken"
    else:
        label = "degraded"
    sign = ("<=", ">") if lower_better else (">=", "<")
    shown = f"{100 * value:.1f}%" if metric == "agreement" else f"{value:.3g}"
    limits = (f"{100 * usable:.0f}%", f"{100 * broken:.0f}%") if metric == "agreement" else \
        (f"{usable:g}", f"{broken:g}")
    reason = (f"{METRIC_NAMES[metric]} {shown} against the dense model on {data} "
              f"(usable {sign[0]} {limits[0]}, broken {sign[1]} {limits[1]})")
    return Verdict(label, metric, float(value), float(usable), float(broken), reason,
                   None if label == "usable" else suggestion(settings, detector))


def suggestion(settings: dict | None, detector: bool = False) -> str:
    """One line of what to try, the options not already in use first (``settings``: as for :func:`judge`)."""
    if settings is None:
        return ("if it was pruned, try a lower sparsity, --reconstruct ls, --pattern 2:4 or leaving the head dense "
                "(--keep-last)")
    tries = []
    sparsity, pattern = settings.get("sparsity"), str(settings.get("pattern", "global"))
    if settings.get("reconstruct", "none") not in ("ls", "auto"):
        tries.append("--reconstruct ls")
    if isinstance(sparsity, (int, float)) and sparsity > 0.5 and ":" not in pattern:
        tries.append(f"a lower --sparsity ({max(0.5, round(sparsity - 0.2, 2)):g})")
        if pattern in ("global", "uniform"):
            tries.append("--pattern 2:4 (50%, in every group of 4)")
    elif ":" in pattern or pattern == "channels":
        tries.append("a lower --sparsity" if pattern == "channels" else "unstructured pruning at 50%")
    if not settings.get("keep_last") and not settings.get("exclude"):
        tries.append("leaving the detection head dense (--keep-last, or --exclude its layers)" if detector
                     else "leaving the head dense (--keep-last)")
    if not tries:
        return "try a lower sparsity"
    return "try " + (", ".join(tries[:-1]) + " or " + tries[-1] if len(tries) > 1 else tries[0])


def from_result(result: dict, *, data: str, settings: dict | None = None) -> Verdict | None:
    """The verdict on an :func:`asr_onnx.verify.evaluation.agreement` result against a reference (``eval --reference``,
    ``repair --eval``), on its "metric": detection F1 when the dense model detects anything, else agreement,
    else the standardised error; None without a reference's scores."""
    metric = result.get("metric")
    if metric is None:
        return None
    value = {"detection_f1": (result.get("detection") or {}).get("f1"), "agreement": result.get("agreement"),
             "standardised_error": result.get("standardised_error")}[metric]
    if value is None:
        return None
    verdict = judge(metric, value, data=data, classes=result.get("agreement_classes"), settings=settings,
                    detector=bool(result.get("detection")))
    if metric != "detection_f1":
        return verdict
    per_class = result["detection"]["per_class"].values()
    thin = sum(c["tp"] + c["fn"] < FEW_DETECTIONS for c in per_class)
    if not thin:
        return verdict
    # every class weighs alike in the mean: say when some rest on a handful of the dense model's detections
    note = (f"; {thin} of its {len(per_class)} classes rest on fewer than {FEW_DETECTIONS} dense detections each, "
            f"pooled over classes F1 {result['detection']['f1_pooled']:.3g}")
    return replace(verdict, reason=verdict.reason + note)


def done(job) -> dict:
    """What a Repair did, as :func:`suggestion` reads it: its pruning (the record :meth:`Repair.prune` kept) and
    its Recipe's refit."""
    pruning = {key: job.settings.get(key) for key in ("sparsity", "pattern", "exclude", "keep_last")}
    return pruning | {"reconstruct": job.recipe.reconstruct if job.recipe is not None else "none"}


def of_repair(job, calib=None) -> Verdict | None:
    """The verdict on a Repair's output, from the best evidence it has: its :meth:`Repair.evaluate` scores (data
    the user named), else the guard's held-out scores of the model it kept, else ``calib`` scored now (the data
    it was fitted on: the reason says so); None with none of them (``calib`` None: nothing is run). The guard
    scored the float32 repair: after a cast to float16 or INT8, ``calib`` scores the model that is shipped.
    """
    from asr_onnx.verify.evaluation import evaluate

    settings = done(job)
    scored = job.evaluation
    if scored and scored.get("metric"):
        return from_result(scored, data=f"{scored['samples']} samples of {scored['data']}", settings=settings)
    guard = job.settings.get("guard") or {}
    cast = "INT8" if job.settings.get("int8") else "float16" if job.settings.get("fp16") else None
    if guard.get("metric") and not (cast and calib is not None):
        kept = guard[guard["kept"]]  # "repair", "refit" or "pruned": each has its held-out scores
        metric = guard["metric"]
        return judge(metric, kept[metric], data=f"{guard['held_out']} held-out calibration samples ({guard['folds']} "
                     f"folds; the {KEPT_NAMES.get(guard['kept'], guard['kept'])} kept by the guard)",
                     classes=guard.get("agreement_classes"),
                     settings=settings, detector=metric == "detection_f1")
    if calib is None:
        return None
    result = evaluate(job.result, calib, reference=job.dense, device=job.device, progress=False,
                      batch_size=job.batch_size, output_kind=job.output_kind, engine=job.engine)
    if cast and guard.get("metric"):
        why = f"the guard scored the float32 repair, before {cast}"
    elif guard.get("skipped"):
        why = guard["skipped"]
    else:
        why = "the guard is off" if job.settings.get("method") != "none" else "nothing was repaired"
    return from_result(result, data=f"the {len(calib)} calibration samples, not held out ({why})", settings=settings)
