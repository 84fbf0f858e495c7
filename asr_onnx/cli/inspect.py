"""``asr-onnx inspect``: per-layer weights, sparsity, 2:4 conformance and what follows each layer."""

from __future__ import annotations

import click


@click.command("inspect")
@click.argument("model", type=click.Path(dir_okay=True))
@click.option("--json", "as_json", is_flag=True, help="Print the inspection as JSON instead of a table.")
@click.option("--width", default=160, show_default=True, type=int, help="Line width of the table.")
def inspect_command(model, as_json, width):
    """Show every prunable layer of MODEL: weights, zeros, 2:4 conformance, sparse-tensor-core
    eligibility and the BatchNormalization or affine chain after it, plus the model total."""
    import json

    from asr_onnx.report.inspect import format_inspection, inspect_model

    info = inspect_model(model)
    if as_json:
        click.echo(json.dumps(info, indent=1))
    else:
        click.echo(format_inspection(info, width=width))
