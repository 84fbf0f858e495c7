"""The INT8 stage's held-out choices: each candidate is calibrated (or corrected) on one half of the
calibration set and scored against the float model on the other half.

The calibration method and, for the CPU, the weight range are picked as ``auto`` picks a correction
(:func:`asr_onnx.verify.paired.pick`: top-1 agreement first, then logit error; MinMax where they tie); the
layers left in float (:func:`choose_float_layers`) and the quantization correction against plain
post-training quantization as the guard decides a repair (each repairs quantization damage and must earn its
place: better past two paired standard errors).
Target cpu scores each model as onnxruntime runs it (its integer kernels on this CPU); target tensorrt with
graph optimisations off (the QDQ arithmetic in float), which is what TensorRT computes up to its kernels'
rounding.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from asr_onnx.quantize.calibrate import CALIBRATIONS, WEIGHT_RANGES, QuantRecipe, quantize

CORRECTION_RULE = ("as the guard decides a repair: the correction is kept when it is better than plain PTQ past two "
                   "paired standard errors (top-1 agreement first, then each sample's squared error), or, within "
                   "noise, when its held-out error is lower")


def _outputs(model, data, *, batch_size: int, device: str, optimize: bool):
    """(samples, outputs in graph order) of each run over ``data``; ``optimize=False`` runs the QDQ
    arithmetic in float."""
    from asr_onnx.calib.specs import fixed_batch, input_specs
    from asr_onnx.model.session import Runner, batches

    fixed = fixed_batch(input_specs(model))
    with Runner(model, device=device, optimize=optimize, on="a held-out batch") as session:
        for _, feed in batches(data, fixed or batch_size, fixed=fixed):
            yield len(next(iter(feed.values()))), list(session.run(None, feed).values())


def score(models: list, reference, data, *, target: str, device: str = "cpu", batch_size: int = 256) -> list[dict]:
    """Each model's per-sample agreement and squared output error against ``reference`` on ``data``
    (:func:`asr_onnx.verify.evaluation.agreement` with ``per_sample``); the reference runs once."""
    from asr_onnx.model.kinds import output_kinds
    from asr_onnx.verify.evaluation import agreement

    kinds = output_kinds(reference)
    cached = list(_outputs(reference, data, batch_size=batch_size, device=device, optimize=True))
    return [agreement(_outputs(m, data, batch_size=batch_size, device=device, optimize=target == "cpu"), kinds,
                      reference=cached, per_sample=True) for m in models]


def pick_scored(names: list[dict], scored: list[dict], default: int = 0) -> tuple[int, list[dict]]:
    """:func:`asr_onnx.verify.paired.pick` over scored candidates (agreement None where top-1 means nothing).

    Returns:
        (the picked candidate's index, every candidate's name with its scores and "tied").
    """
    from asr_onnx.verify.paired import pick
    from asr_onnx.verify.scoring import logit_rel_l2

    no_top1 = scored[0]["matches"] is None
    matches = [np.zeros(len(s["err2"])) if no_top1 else s["matches"] for s in scored]
    rows = [name | {"agreement": None if no_top1 else float(s["matches"].mean()),
                    "logit_rel_l2": logit_rel_l2(s["err2"], s["ref2"])} for name, s in zip(names, scored)]
    picked = pick(rows, matches, [s["err2"] for s in scored], default=default)
    for row in rows:
        row["logit_rel_l2"] = float(f"{row['logit_rel_l2']:.6g}")
    return next(i for i, row in enumerate(rows) if row is picked), rows


def choose_recipe(base, fit, held, *, target: str, calibration: str, batch_size: int, device: str):
    """The recipe that scores best on ``held`` when calibrated on ``fit``.

    For the CPU, full and reduced weights are scored with MinMax first (or the given method), then the
    other methods with the better range.

    Returns:
        (the picked QuantRecipe, its model calibrated on ``fit``, every candidate's scores, the picked one's
        :func:`score` on ``held``).
    """
    methods = CALIBRATIONS if calibration == "auto" else (calibration,)
    first = [QuantRecipe(methods[0], weights, target)
             for weights in (WEIGHT_RANGES if target == "cpu" else ("full",))]
    candidates: list = []
    models: list = []
    scored: list = []

    def add(recipes):
        made = [quantize(base, fit, recipe, batch_size=batch_size, device=device) for recipe in recipes]
        candidates.extend(recipes)
        models.extend(made)
        scored.extend(score(made, base, held, target=target, device=device))

    add(first)
    best, _ = pick_scored([r.as_dict() for r in candidates], scored)
    add([QuantRecipe(method, candidates[best].weights, target) for method in methods[1:]])
    index, rows = pick_scored([r.as_dict() for r in candidates], scored, default=best)
    return candidates[index], models[index], rows, scored[index]


FLOAT_LAYER_COUNTS = (1, 2, 4)  # the candidates: this many layers that add the most error left in float
FLOAT_RULE = ("the layers that add the most output error on the fit half, 1, 2 or 4 of them, left in float with "
              "their input; a candidate is kept when it is better than the one kept so far past two paired "
              "standard errors on the held-out half (top-1 agreement first, then each sample's squared error)")


def choose_float_layers(base, fit, held, recipe: QuantRecipe, plain, plain_scored: dict, *, batch_size: int,
                        device: str):
    """Which layers the quantizer leaves in float: none unless leaving some is better on ``held``.

    The quantized layers are ranked by the output error each adds on ``fit``
    (:func:`asr_onnx.quantize.layers.added_errors`, on ``plain``, the recipe's model calibrated on ``fit``);
    the 1, 2 and 4 that add the most are left in float (with their input:
    :func:`asr_onnx.quantize.layers.float_nodes_for`) in turn, each candidate calibrated on ``fit`` and scored
    on ``held``. A candidate replaces the one kept so far (at first, none in float) only when it is better past
    two paired standard errors (:func:`asr_onnx.verify.paired.paired_sign`), so that a float layer, which runs
    slower, must earn its place.

    Returns:
        (the recipe with its ``float_nodes``, its model calibrated on ``fit``, the report's entry: {"picked":
        the layers left in float, "candidates": each with "layers", "agreement", "logit_rel_l2", "picked"; "rule"}).
    """
    from asr_onnx.quantize.layers import added_errors, float_nodes_for
    from asr_onnx.verify.paired import paired_sign
    from asr_onnx.verify.scoring import logit_rel_l2

    added = added_errors(base, plain, fit, device=device, batch_size=batch_size)
    ranked = [name for name, error in sorted(added.items(), key=lambda item: -item[1]) if error > 0]

    def row(layers, result):
        has_top1 = result["matches"] is not None
        return {"layers": list(layers), "agreement": float(result["matches"].mean()) if has_top1 else None,
                "logit_rel_l2": float(f"{logit_rel_l2(result['err2'], result['ref2']):.6g}")}

    best = (recipe, plain, plain_scored, [])
    rows = [row([], plain_scored)]
    for count in sorted({min(c, len(ranked)) for c in FLOAT_LAYER_COUNTS} - {0}):
        layers = ranked[:count]
        nodes = tuple(dict.fromkeys(n for layer in layers for n in float_nodes_for(base, layer)))
        candidate = replace(recipe, float_nodes=nodes)
        model = quantize(base, fit, candidate, batch_size=batch_size, device=device)
        (result,) = score([model], base, held, target=recipe.target, device=device)
        current = best[2]
        top1_gain = (result["matches"] - current["matches"]) if result["matches"] is not None else np.zeros(1)
        rows.append(row(layers, result))
        if paired_sign(top1_gain, current["err2"] - result["err2"]) > 0:
            best = (candidate, model, result, layers)
    for r in rows:
        r["picked"] = r["layers"] == best[3]
    return best[0], best[1], {"picked": best[3], "candidates": rows, "rule": FLOAT_RULE}


def correction_verdict(scored: list[dict]) -> tuple[str, bool, list[dict]]:
    """Plain PTQ against the corrected model on held-out samples, decided as the guard decides a repair
    against pruning alone (:func:`asr_onnx.verify.paired.paired_sign`): the correction is a repair of the
    quantization damage, kept when it is better past two paired standard errors (agreement first, then
    each sample's squared error), or, within noise, when its held-out error is lower.

    Args:
        scored: :func:`score` of [plain PTQ, corrected].

    Returns:
        (the verdict, whether the correction is kept, each candidate's scores).
    """
    from asr_onnx.verify.paired import paired_sign
    from asr_onnx.verify.scoring import logit_rel_l2

    plain, fixed = scored
    has_top1 = plain["matches"] is not None
    top1_gain = fixed["matches"] - plain["matches"] if has_top1 else np.zeros(1)
    sign = paired_sign(top1_gain, plain["err2"] - fixed["err2"])
    verdict = {1: "correction better", -1: "plain PTQ better", 0: "tie"}[sign]
    keep = sign > 0 or (sign == 0 and fixed["err2"].sum() < plain["err2"].sum())
    rows = [{"correction": name, "agreement": float(s["matches"].mean()) if has_top1 else None,
             "logit_rel_l2": float(f"{logit_rel_l2(s['err2'], s['ref2']):.6g}")}
            for name, s in (("none", plain), ("bn", fixed))]
    return verdict, bool(keep), rows
