"""Comparing a model's outputs with a reference model's, with Polygraphy's tolerance semantics.

For each output, with ``a`` the candidate and ``b`` the reference (Polygraphy's second runner):

- ``absdiff = |a - b|`` and ``reldiff = absdiff / |b|``, where zeros of ``b`` are replaced by
  2.220446049250313e-16 (float64 machine epsilon), as Polygraphy does;
- ``elemwise``: an element fails when it exceeds *both* tolerances
  (``(absdiff > atol or NaN) and (reldiff > rtol or NaN)``); the output passes when none fails;
- ``max``/``mean``/``median``: the output fails when that statistic of ``absdiff`` exceeds ``atol``
  *and* that statistic of ``reldiff`` exceeds ``rtol`` (NaN counts as exceeding).

Polygraphy compares one inference at a time; here the statistics are over the whole data set,
every batch concatenated. Defaults are Polygraphy's: atol = rtol = 1e-5, elemwise. They answer "do the two
models compute the same function?": the float32 rounding of one computation done in another order stays
within them (onnxruntime's fused against unfused graphs of the eight sample models, 256 Fashion-MNIST test
images: at most 7.2e-6 absolute, relative L2 2e-7, no element beyond both), so they pass a re-export or a
folded BN, and fail any change to the weights, which every pruned model is.

Beside them, an agreement gate (``min_agreement``): the share of samples (or steps) whose top-1 class is the
reference's, for outputs where an argmax means something. Where it is the only gate, the tolerances are
reported but decide nothing: that is the gate for a pruned model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from asr_onnx.calib.specs import fixed_batch, input_specs
from asr_onnx.errors import AsrError
from asr_onnx.model.kinds import PER_SAMPLE, agreement_kind, batch_axis, output_kinds, per_sample, top1_matches

EPSILON = 2.220446049250313e-16
ERROR_STATS = ("elemwise", "mean", "median", "max")
DEFAULT_TOLERANCE = 1e-5  # Polygraphy's atol and rtol


@dataclass
class OutputComparison:
    """One output's agreement and error statistics."""

    name: str
    shape: list
    passed: bool
    reason: str
    max_absdiff: float
    mean_absdiff: float
    median_absdiff: float
    max_reldiff: float
    mean_reldiff: float
    median_reldiff: float
    mismatches: int
    elements: int
    top1_agreement: float | None = None
    accuracy: dict = field(default_factory=dict)
    batch_axis: int = 0
    agreement_kind: str = ""
    rel_l2: float | None = None
    max_sample_rel_l2: float | None = None
    within_tolerance: bool | None = None  # the tolerances' verdict, whether or not they gate
    agreement_passed: bool | None = None  # the agreement gate's, where it applies

    def as_dict(self) -> dict:
        return asdict(self)


def _stat(values: np.ndarray, stat: str) -> float:
    if values.size == 0:
        return 0.0
    if np.isnan(values).any():
        return float("nan")
    return float({"max": np.max, "mean": np.mean, "median": np.median}[stat](values))


def _fails(value: float, tol: float) -> bool:
    return bool(np.isnan(value) or value > tol)


def compare_arrays(name: str, candidate: np.ndarray, reference: np.ndarray, *, atol: float = 1e-5,
                   rtol: float = 1e-5, check_error_stat: str = "elemwise", labels=None, batch_axis: int = 0,
                   how: str | None = "auto") -> OutputComparison:
    """Compares one output of the candidate with the reference's.

    Args:
        name: the output's name, for the report.
        candidate, reference: arrays of the same shape (all batches, concatenated).
        atol, rtol: Polygraphy's absolute and relative tolerances. Default 1e-5 each.
        check_error_stat: elemwise, mean, median or max. Default elemwise.
        labels: optional int labels (N,), for the accuracy of (N, classes) outputs.
        batch_axis: the axis that holds the samples. Defaults to 0.
        how: where top-1 agreement means something: output_kinds.PER_SAMPLE, output_kinds.PER_STEP, or None (only
            the relative error); "auto" (the default) takes a 2-D (N, classes) output for PER_SAMPLE.

    Raises:
        AsrError: different shapes, negative tolerances or an unknown statistic.
    """
    if check_error_stat not in ERROR_STATS:
        raise AsrError(f"unknown error statistic {check_error_stat!r}; choose one of {', '.join(ERROR_STATS)}")
    if atol < 0 or rtol < 0:
        raise AsrError(f"tolerances must be >= 0, got atol={atol}, rtol={rtol}")
    a, b = np.asarray(candidate), np.asarray(reference)
    if a.shape != b.shape:
        raise AsrError(f"output {name!r}: shape {list(a.shape)} differs from the reference's {list(b.shape)}")
    if a.dtype == bool and b.dtype == bool:
        absdiff = np.logical_xor(a, b).astype(np.float64)
        b64 = b.astype(np.float64)
    else:
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        absdiff = np.abs(a64 - b64)
    denominator = np.abs(np.where(b64 == 0, EPSILON, b64))
    with np.errstate(divide="ignore", invalid="ignore"):
        reldiff = absdiff / denominator
    stats = {f"{s}_{k}": _stat(v, s) for s in ("max", "mean", "median") for k, v in (("absdiff", absdiff),
                                                                                     ("reldiff", reldiff))}
    bad = (np.greater(absdiff, atol) | np.isnan(absdiff)) & (np.greater(reldiff, rtol) | np.isnan(reldiff))
    mismatches = int(np.count_nonzero(bad))
    if check_error_stat == "elemwise":
        passed = mismatches == 0
        reason = (f"{mismatches} of {bad.size} elements exceed both atol={atol:g} and rtol={rtol:g}"
                  f" (max abs {stats['max_absdiff']:.3g}, max rel {stats['max_reldiff']:.3g})")
    else:
        abs_value, rel_value = stats[f"{check_error_stat}_absdiff"], stats[f"{check_error_stat}_reldiff"]
        passed = not (_fails(abs_value, atol) and _fails(rel_value, rtol))
        reason = (f"{check_error_stat} abs error {abs_value:.3g} {'>' if _fails(abs_value, atol) else '<='} "
                  f"atol {atol:g} and {check_error_stat} rel error {rel_value:.3g} "
                  f"{'>' if _fails(rel_value, rtol) else '<='} rtol {rtol:g}")
    if passed and check_error_stat == "elemwise":
        reason = f"every element within atol={atol:g} or rtol={rtol:g}"
    result = OutputComparison(name, list(a.shape), passed, reason, mismatches=mismatches, elements=int(bad.size),
                              **stats)
    if how == "auto":
        how = PER_SAMPLE if a.ndim == 2 and a.shape[1 - batch_axis] > 1 else None
        result.agreement_kind = how or "not (N, classes): only the relative error is reported"
    else:
        result.agreement_kind = how or "not (N, classes) nor per-step class scores: only the relative error"
    result.batch_axis = batch_axis
    if a.dtype != bool and a.size:
        err2 = ((per_sample(a, batch_axis) - per_sample(b, batch_axis)) ** 2).sum(1)
        ref2 = (per_sample(b, batch_axis) ** 2).sum(1)
        result.rel_l2 = float(np.sqrt(err2.sum() / max(ref2.sum(), 1e-300)))
        result.max_sample_rel_l2 = float(np.sqrt((err2 / np.maximum(ref2, 1e-300)).max()))
    if how is not None and a.dtype != bool and a.shape[batch_axis]:
        result.top1_agreement = float(top1_matches(a, b, batch_axis, how).mean())
        if labels is not None and how == PER_SAMPLE and len(labels) == a.shape[batch_axis]:
            labels = np.asarray(labels)
            top_a, top_b = per_sample(a, batch_axis).argmax(1), per_sample(b, batch_axis).argmax(1)
            result.accuracy = {"candidate": float(np.mean(top_a == labels)),
                               "reference": float(np.mean(top_b == labels))}
    return result


def run_both(candidate, reference, data, *, batch_size: int = 64, device: str = "auto",
             limit: int | None = None) -> tuple[dict, dict]:
    """Runs both models over ``data`` (anything with ``batches(batch_size)``); outputs concatenated by name.

    Raises:
        AsrError: the models' inputs differ, or their outputs cannot be matched by name or position.
    """
    from asr_onnx.model.session import Runner, batches

    with Runner(candidate, device=device, on="a batch") as sa, Runner(reference, device=device, on="a batch") as sb:
        return _run_both(sa, sb, reference, batches(data, batch_size), limit)


def _run_both(sa, sb, reference, feeds, limit: int | None):
    ins_a, ins_b = [i.name for i in sa.inputs], [i.name for i in sb.inputs]
    if sorted(ins_a) != sorted(ins_b):
        raise AsrError(f"the models have different inputs: {ins_a} and {ins_b}")
    names_a, names_b = sa.output_names, sb.output_names
    if sorted(names_a) == sorted(names_b):
        pairs = [(n, n) for n in names_a]
    elif len(names_a) == len(names_b):
        pairs = list(zip(names_a, names_b))
    else:
        raise AsrError(f"the models have different outputs: {names_a} and {names_b}")
    specs_a, specs_b = {i.name: i for i in sa.inputs}, {i.name: i for i in sb.inputs}
    from asr_onnx.model.files import load_model

    kinds = {k.name: k for k in output_kinds(reference if not isinstance(reference, (str, Path)) else
                                             load_model(reference))}
    axes: dict = {}
    got_a = {n: [] for n, _ in pairs}
    got_b = {n: [] for n, _ in pairs}
    seen = 0
    for _, batch in feeds:
        if limit is not None and seen >= limit:
            break
        if limit is not None:
            batch = {k: v[: limit - seen] for k, v in batch.items()}
        feeds_a = {k: _as_input(v, specs_a[k]) for k, v in batch.items() if k in specs_a}
        feeds_b = {k: _as_input(v, specs_b[k]) for k, v in batch.items() if k in specs_b}
        out_a, out_b = sa.run(None, feeds_a), sb.run(None, feeds_b)
        fed = len(next(iter(batch.values())))
        for na, nb in pairs:
            if out_a[na].shape != out_b[nb].shape:
                raise AsrError(f"output {na} has shape {list(out_a[na].shape)} and the reference's {nb} "
                               f"{list(out_b[nb].shape)}: they cannot be compared")
            got_a[na].append(out_a[na])
            got_b[na].append(out_b[nb])
            if na not in axes:
                axes[na] = batch_axis(kinds[nb], out_b[nb].shape, fed) if out_b[nb].ndim else None
        seen += fed
    if seen == 0:
        raise AsrError("no samples to compare")
    layout = {na: (axes[na], kinds[nb]) for na, nb in pairs}
    joined_a = {n: _join(v, axes[n]) for n, v in got_a.items()}
    return joined_a, {n: _join(v, axes[n]) for n, v in got_b.items()}, layout


def _join(arrays: list, axis: int | None) -> np.ndarray:
    """Batches joined along their batch axis (a scalar output: stacked)."""
    return np.stack(arrays) if axis is None else np.concatenate(arrays, axis=axis)


def _as_input(array, spec):
    """Feeds a float32 batch to a float16 input (a model converted with fp16 I/O)."""
    if spec.type == "tensor(float16)" and array.dtype != np.float16:
        return array.astype(np.float16)
    if spec.type == "tensor(float)" and array.dtype == np.float16:
        return array.astype(np.float32)
    return array


def compare_models(candidate, reference, data, *, atol: float = DEFAULT_TOLERANCE, rtol: float = DEFAULT_TOLERANCE,
                   check_error_stat: str = "elemwise", batch_size: int = 64, device: str = "auto",
                   limit: int | None = None, seed: int = 0, min_agreement: float | None = None,
                   tolerance_gate: bool = True) -> dict:
    """Runs both models on ``data`` and compares every output.

    A reference that fixes its batch runs only whole batches of it: ``data`` (a calib.CalibSet) is cut to
    the seeded subset (``seed``, default 0) of the largest multiple of that batch, fed in that batch.

    Args:
        min_agreement: the least top-1 agreement with the reference (0..1) that each output with a top-1
            agreement must reach, or None (no agreement gate). Defaults to None.
        tolerance_gate: whether the tolerances decide; False reports them only (an agreement gate alone).
            Defaults to True.

    Returns:
        {"passed", "samples", "settings", "outputs": [OutputComparison.as_dict(), ...]}; an output's
        "passed" is the verdict of the gates in force, "within_tolerance" the tolerances' own.

    Raises:
        AsrError: a tolerance is NaN or negative (it would pass any two models), ``min_agreement`` is outside
            0..1, no gate is in force, an agreement gate where no output has a top-1 agreement, the models'
            inputs or outputs differ, or the data holds fewer samples than the reference's fixed batch.
    """
    from asr_onnx.model.files import load_model

    for name, value in (("atol", atol), ("rtol", rtol)):
        if not value >= 0:  # NaN fails this too
            raise AsrError(f"{name} must be a number >= 0, got {value}")
    if min_agreement is not None and not 0 <= min_agreement <= 1:
        raise AsrError(f"the minimum agreement must be between 0 and 1, got {min_agreement}")
    if min_agreement is None and not tolerance_gate:
        raise AsrError("nothing decides: give a minimum agreement or let the tolerances gate")
    reference = load_model(reference) if isinstance(reference, (str, Path)) else reference
    data, batch_size = whole_batches(data, fixed_batch(input_specs(reference)), batch_size, seed)
    out_a, out_b, layout = run_both(candidate, reference, data, batch_size=batch_size, device=device, limit=limit)
    labels = getattr(data, "labels", None)
    axis0, _ = layout[next(iter(out_a))]
    samples = out_a[next(iter(out_a))].shape[axis0 or 0]
    if labels is not None:
        labels = np.asarray(labels)[:samples]
    results = []
    for name in out_a:
        axis, kind = layout[name]
        axis = 0 if axis is None else axis
        how = agreement_kind(kind, out_b[name].shape, axis)[0] if out_b[name].ndim else None
        results.append(compare_arrays(name, out_a[name], out_b[name], atol=atol, rtol=rtol,
                                      check_error_stat=check_error_stat, labels=labels, batch_axis=axis, how=how))
    if min_agreement is not None and all(r.top1_agreement is None for r in results):
        raise AsrError("no output has a top-1 agreement (none is class scores: "
                       f"{results[0].agreement_kind}), so --min-agreement cannot gate; give --atol/--rtol")
    for r in results:
        apply_gates(r, min_agreement, tolerance_gate)
    return {
        "passed": all(r.passed for r in results),
        "samples": samples,
        "settings": {"atol": atol, "rtol": rtol, "check_error_stat": check_error_stat, "min_agreement": min_agreement,
                     "tolerance_gate": tolerance_gate},
        "outputs": [r.as_dict() for r in results],
    }


def apply_gates(result: OutputComparison, min_agreement: float | None, tolerance_gate: bool) -> None:
    """Sets ``result.passed`` (and its reason) to the verdict of the gates in force; ``within_tolerance`` keeps
    the tolerances' own."""
    result.within_tolerance = result.passed
    reasons = [result.reason] if tolerance_gate and not result.passed else []
    agreed = ""
    if min_agreement is not None and result.top1_agreement is not None:
        result.agreement_passed = result.top1_agreement >= min_agreement
        agreed = (f"top-1 agreement {100 * result.top1_agreement:.2f}% "
                  f"{'>=' if result.agreement_passed else '<'} {100 * min_agreement:.2f}%")
        if not result.agreement_passed:
            reasons.append(agreed)
    result.passed = not reasons
    if reasons:
        result.reason = "; ".join(reasons)
    elif agreed:
        result.reason = agreed + (f" and {result.reason}" if tolerance_gate else "")


def whole_batches(data, fixed: int | None, batch_size: int, seed: int = 0):
    """``(data, batch_size)`` for a model that fixes its batch at ``fixed`` (None: as given): the seeded
    subset of ``data`` of the largest multiple of ``fixed`` samples, and ``fixed``.

    Raises:
        AsrError: ``data`` has fewer samples than ``fixed``.
    """
    if not fixed:
        return data, batch_size
    usable = len(data) // fixed * fixed
    if usable == 0:
        raise AsrError(f"the data has {len(data)} samples, fewer than the model's fixed batch size {fixed}")
    return (data.take(usable, seed) if usable < len(data) else data), fixed


def default_tolerance_note(result: dict) -> str | None:
    """Why Polygraphy's default tolerances failed a model, when they did and were not asked for, and what to
    gate on instead; None otherwise."""
    s = result["settings"]
    failed = [r for r in result["outputs"] if r["within_tolerance"] is False]
    if not (s.get("default_tolerances") and s["tolerance_gate"] and failed):
        return None
    agreements = [r["top1_agreement"] for r in result["outputs"] if r["top1_agreement"] is not None]
    found = f"its top-1 agreement is {100 * min(agreements):.2f}%; " if agreements else ""
    gate = "gate it with --min-agreement (e.g. 0.99)" if agreements else "give --atol/--rtol for it"
    return (f"the default tolerances (atol = rtol = {DEFAULT_TOLERANCE:g}, elemwise) pass only a model that "
            f"computes the same function up to float32 rounding; a pruned model does not, by design: {found}{gate}")


def format_comparison(result: dict) -> str:
    """The human-readable report: one block per output, then PASSED or FAILED and why."""
    s = result["settings"]
    gates = ([] if not s.get("tolerance_gate", True) else ["tolerances"]) + (
        [f"top-1 agreement >= {100 * s['min_agreement']:.2f}%"] if s.get("min_agreement") is not None else [])
    tolerance_role = "" if s.get("tolerance_gate", True) else " (informative)"
    lines = [f"compared {result['samples']} samples: atol {s['atol']:g}, rtol {s['rtol']:g}, "
             f"checking {s['check_error_stat']} error{tolerance_role}; gate: {' and '.join(gates)}"]
    for r in result["outputs"]:
        status = "PASSED" if r["passed"] else "FAILED"
        if not s.get("tolerance_gate", True) and r.get("within_tolerance") is not None:
            status += f" ({'within' if r['within_tolerance'] else 'outside'} the tolerances, which do not gate)"
        lines.append(f"output {r['name']} {r['shape']}: {status}")
        lines.append(f"  abs error max {r['max_absdiff']:.4g} mean {r['mean_absdiff']:.4g} "
                     f"median {r['median_absdiff']:.4g}")
        lines.append(f"  rel error max {r['max_reldiff']:.4g} mean {r['mean_reldiff']:.4g} "
                     f"median {r['median_reldiff']:.4g}")
        lines.append(f"  elements exceeding both tolerances: {r['mismatches']} of {r['elements']}")
        if r["rel_l2"] is not None:
            lines.append(f"  relative L2 error {r['rel_l2']:.4g} (worst sample {r['max_sample_rel_l2']:.4g})")
        if r["top1_agreement"] is None:
            lines.append(f"  no top-1 agreement: {r['agreement_kind']}")
        else:
            line = f"  top-1 agreement {r['top1_agreement']:.4f} {r['agreement_kind']}"
            if r["accuracy"]:
                line += (f"; accuracy {r['accuracy']['candidate']:.4f} (reference "
                         f"{r['accuracy']['reference']:.4f})")
            lines.append(line)
    failed = [r for r in result["outputs"] if not r["passed"]]
    if failed:
        lines.append(f"FAILED: {len(failed)} of {len(result['outputs'])} output(s) fail the gate")
        note = default_tolerance_note(result)
        if note:
            lines.append(f"  {note}")
    else:
        lines.append(f"PASSED: {len(result['outputs'])} output(s) pass the gate")
    return "\n".join(lines)
