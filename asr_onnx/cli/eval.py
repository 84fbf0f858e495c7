"""``asr-onnx eval``: top-1 accuracy, and agreement with a reference model."""

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
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@run_options(batch_size=256, engine=True)
def eval_command(model, data_path, reference, labels_path, limit, as_json, quiet, run):
    """Evaluate MODEL on labelled or unlabelled data."""
    from asr_onnx.calib.labels import chance_warning, model_class_count
    from asr_onnx.errors import AsrError
    from asr_onnx.model.files import load_model
    from asr_onnx.verify.evaluation import evaluate

    proto = load_model(model)
    ref = load_model(reference) if reference else None
    data = run.open_data(data_path, proto, limit=limit, labels=labels_path)
    if data.labels is None and ref is None:
        raise AsrError(f"{data_path} has no labels; pass --reference to measure agreement instead")
    engine = run.make_engine()
    try:
        result = evaluate(proto, data, reference=ref, batch_size=run.batch_size, device=run.device,
                          progress=not quiet, engine=engine)
    finally:
        engine.close()
    warning = chance_warning(result.get("top1"), data.labels, data.classes, model_class_count(proto))
    if warning:
        click.echo(f"warning: {warning}", err=True)
    if as_json:
        click.echo(json.dumps(result))
        return
    parts = [f"samples {result['samples']}"]
    if result.get("top1") is not None:
        parts.append(f"top-1 {100 * result['top1']:.2f}%")
    if ref is not None:
        if result["agreement"] is not None:
            parts.append(f"agreement {100 * result['agreement']:.2f}% {result['agreement_kind']}")
        parts.append(f"rel-L2 {result['logit_rel_l2']:.4f} (worst sample {result['max_rel_l2']:.4f})")
    click.echo("  ".join(parts))
    if ref is not None and result["agreement"] is None:
        click.echo(f"no agreement: {result['agreement_kind']}")
    elif labels_unused(result):
        click.echo("no top-1 accuracy: the output is not (N, classes)")


def labels_unused(result: dict) -> bool:
    return "top1" in result and result["top1"] is None
