"""``asr-onnx verify``: compare a repaired model's outputs with the dense reference's; exit 1 when they disagree."""

from __future__ import annotations

import click

from asr_onnx.cli.common import COUNT, NON_NEGATIVE, run_options, tolerance


@click.command("verify")
@click.argument("model", type=click.Path(dir_okay=True))
@click.option("--reference", required=True, type=click.Path(dir_okay=True), help="The reference (dense) model.")
@click.option("--data", "data_path", required=True, help="Input data: image folder, .npy/.npz, or IDX files.")
@click.option("--atol", default=1e-5, show_default=True, type=float, callback=tolerance, help="Absolute tolerance.")
@click.option("--rtol", default=1e-5, show_default=True, type=float, callback=tolerance,
              help="Relative tolerance (of the reference).")
@click.option("--check-error-stat", default="elemwise", show_default=True,
              type=click.Choice(["elemwise", "mean", "median", "max"]),
              help="elemwise: every element within atol or rtol; mean/median/max: that statistic of the "
                   "absolute error within atol or of the relative error within rtol (Polygraphy's rule).")
@click.option("--limit", type=COUNT, help="Compare on this many samples (a seeded subset). Default: all.")
@click.option("--seed", default=0, show_default=True, type=NON_NEGATIVE, help="Seed of the --limit subset.")
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as JSON.")
@run_options(batch_size=64)
def verify_command(model, reference, data_path, atol, rtol, check_error_stat, limit, seed, as_json, run):
    """Compare MODEL's outputs with --reference's on --data, with Polygraphy-style tolerances.

    Exits 0 when every output is within tolerance and 1 when any is not, so it can gate a pipeline.
    """
    import json

    from asr_onnx.errors import AsrError
    from asr_onnx.model.files import load_model
    from asr_onnx.verify.compare import compare_models, format_comparison

    candidate, dense = load_model(model), load_model(reference)
    data = run.open_data(data_path, dense, limit=limit, seed=seed)
    result = compare_models(candidate, dense, data, atol=atol, rtol=rtol, check_error_stat=check_error_stat,
                            batch_size=run.batch_size, device=run.device, seed=seed)
    result.update(model=str(model), reference=str(reference))
    if as_json:
        click.echo(json.dumps(result, indent=1))
    else:
        click.echo(format_comparison(result))
    if not result["passed"]:
        # main() turns this into one line on stderr and exit status 1
        raise AsrError("verify FAILED: " + "; ".join(f"output {r['name']}: {r['reason']}"
                                                      for r in result["outputs"] if not r["passed"]))
