"""``asr-onnx verify``: compare a repaired model's outputs with the dense reference's; exit 1 when they disagree."""

from __future__ import annotations

import click

from asr_onnx.cli.common import COUNT, NON_NEGATIVE, run_options, tolerance

TOLERANCE_RATIONALE = ("Default 1e-5, Polygraphy's: the float32 rounding of one function computed in another order "
                       "stays within it (onnxruntime's fused against unfused graphs of the sample models: at "
                       "most 7e-6), so the default passes a re-export or a folded BN and fails any pruned model.")


@click.command("verify")
@click.argument("model", type=click.Path(dir_okay=True))
@click.option("--reference", required=True, type=click.Path(dir_okay=True), help="The reference (dense) model.")
@click.option("--data", "data_path", required=True, help="Input data: image folder, .npy/.npz, or IDX files.")
@click.option("--atol", type=float, callback=tolerance, help="Absolute tolerance. " + TOLERANCE_RATIONALE)
@click.option("--rtol", type=float, callback=tolerance,
              help="Relative tolerance (of the reference). Default 1e-5, as --atol.")
@click.option("--check-error-stat", type=click.Choice(["elemwise", "mean", "median", "max"]),
              help="elemwise (default): every element within atol or rtol; mean/median/max: that statistic of "
                   "the absolute error within atol or of the relative error within rtol (Polygraphy's rule).")
@click.option("--min-agreement", type=click.FloatRange(0, 1), metavar="A", callback=tolerance,
              help="Gate on top-1 agreement with the reference: at least this share (0..1, e.g. 0.99) of the "
                   "samples' top-1 classes must be the reference's, on every output that has one. Alone, it "
                   "decides and the tolerances are informative (the gate for a pruned model); with --atol, "
                   "--rtol or --check-error-stat, both must pass.")
@click.option("--limit", type=COUNT, help="Compare on this many samples (a seeded subset). Default: all.")
@click.option("--seed", default=0, show_default=True, type=NON_NEGATIVE, help="Seed of the --limit subset.")
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as JSON.")
@run_options(batch_size=64)
def verify_command(model, reference, data_path, atol, rtol, check_error_stat, min_agreement, limit, seed, as_json,
                   run):
    """Compare MODEL's outputs with --reference's on --data: Polygraphy-style tolerances, or top-1
    agreement with --min-agreement.

    Exits 0 when every output passes the gate and 1 when any does not, so it can gate a pipeline. Without
    --min-agreement the tolerances gate (default atol = rtol = 1e-5, elemwise: equivalence up to float32
    rounding, which a pruned model never has); with it alone, top-1 agreement gates.
    """
    import json

    from asr_onnx.errors import AsrError
    from asr_onnx.model.files import load_model
    from asr_onnx.verify.compare import DEFAULT_TOLERANCE, compare_models, default_tolerance_note, format_comparison

    tolerances_given = not (atol is None and rtol is None and check_error_stat is None)
    candidate, dense = load_model(model), load_model(reference)
    data = run.open_data(data_path, dense, limit=limit, seed=seed)
    result = compare_models(candidate, dense, data, atol=DEFAULT_TOLERANCE if atol is None else atol,
                            rtol=DEFAULT_TOLERANCE if rtol is None else rtol,
                            check_error_stat=check_error_stat or "elemwise", batch_size=run.batch_size,
                            device=run.device, seed=seed, min_agreement=min_agreement,
                            tolerance_gate=tolerances_given or min_agreement is None)
    result["settings"]["default_tolerances"] = not tolerances_given
    result.update(model=str(model), reference=str(reference))
    if as_json:
        click.echo(json.dumps(result, indent=1))
    else:
        click.echo(format_comparison(result))
    if not result["passed"]:
        # main() turns this into one line on stderr and exit status 1
        note = default_tolerance_note(result)
        raise AsrError("verify FAILED: " + "; ".join(f"output {r['name']}: {r['reason']}"
                                                      for r in result["outputs"] if not r["passed"])
                       + (f" ({note})" if note else ""))
