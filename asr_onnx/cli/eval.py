"""``asr-onnx eval``: top-1 accuracy; against a reference model, agreement, errors, detection F1 and the verdict."""

from __future__ import annotations

import json

import click

from asr_onnx.cli.common import COUNT, LABELS_HELP, run_options


@click.command("eval")
@click.argument("model", type=click.Path())
@click.option("--data", "data_path", required=True,
              help="Image folder (class subfolders), .npz with x/y, IDX files, or fashion-mnist:test.")
@click.option("--reference", type=click.Path(), help="A reference (dense) model for label-free agreement.")
@click.option("--labels", "labels_path", type=click.Path(), help=LABELS_HELP)
@click.option("--limit", type=COUNT, help="Evaluate only the first N samples of a seeded subset.")
@click.option("--output-kind", "output_kind", multiple=True, metavar="NAME:KIND",
              help="Score output NAME as classes, detection, map or regression instead of as recognised "
                   "(repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@run_options(batch_size=256, engine=True)
def eval_command(model, data_path, reference, labels_path, limit, output_kind, as_json, quiet, run):
    """Evaluate MODEL on labelled or unlabelled data; with --reference, also say whether it is usable."""
    from asr_onnx.calib.labels import chance_warning, model_class_count
    from asr_onnx.errors import AsrError
    from asr_onnx.model.files import load_model
    from asr_onnx.model.kinds import check_output_kinds, parse_output_kinds
    from asr_onnx.verify.evaluation import evaluate
    from asr_onnx.verify.verdict import from_result

    kinds = parse_output_kinds(output_kind)
    proto = load_model(model)
    check_output_kinds(proto, kinds)
    ref = load_model(reference) if reference else None
    data = run.open_data(data_path, proto, limit=limit, labels=labels_path)
    if data.labels is None and ref is None:
        raise AsrError(f"{data_path} has no labels; pass --reference to measure agreement instead")
    engine = run.make_engine()
    try:
        result = evaluate(proto, data, reference=ref, batch_size=run.batch_size, device=run.device,
                          progress=not quiet, engine=engine, output_kind=kinds)
    finally:
        engine.close()
    verdict = from_result(result, data=f"{result['samples']} samples of {data_path}") if ref is not None else None
    if verdict is not None:
        result["verdict"] = verdict.as_dict()
    warning = chance_warning(result.get("top1"), data.labels, data.classes, model_class_count(proto))
    if warning:
        click.echo(f"warning: {warning}", err=True)
    if as_json:
        click.echo(json.dumps(result))
        return
    if verdict is not None:
        click.echo(verdict.line())
    parts = [f"samples {result['samples']}"]
    if result.get("top1") is not None:
        parts.append(f"top-1 {100 * result['top1']:.2f}%")
    if ref is not None:
        if result["agreement"] is not None:
            parts.append(f"agreement {100 * result['agreement']:.2f}% {result['agreement_kind']}")
        parts.append(f"rel-L2 {result['logit_rel_l2']:.4f} (worst sample {result['max_rel_l2']:.4f})")
        parts.append(f"standardised error {result['standardised_error']:.4f}")
    click.echo("  ".join(parts))
    if result.get("detection"):
        click.echo(detection_line(result["detection"]))
    if ref is not None and result["agreement"] is None:
        click.echo(f"no agreement: {result['agreement_kind']}")
    elif labels_unused(result):
        click.echo("no top-1 accuracy: the output is not (N, classes)")


def labels_unused(result: dict) -> bool:
    return "top1" in result and result["top1"] is None


def detection_line(scores: dict) -> str:
    """``detection F1 f (precision p, recall r) over k classes at IoU i, pooled F1 g; the reference's d
    detections, this model's m (...)``: the means are over classes, each class alike; the pooled F1 sums every
    class's counts."""
    def num(v):
        return "-" if v is None else f"{v:.3f}"

    return (f"detection F1 {num(scores['f1'])} (precision {num(scores['precision'])}, recall {num(scores['recall'])}) "
            f"over {scores['classes_scored']} classes at IoU {scores['match_iou']:g}, pooled F1 "
            f"{num(scores.get('f1_pooled'))}; the reference's {scores['reference_detections']} detections, this "
            f"model's {scores['detections']} (score >= {scores['score_threshold']:g}, NMS at IoU {scores['nms_iou']:g})")
