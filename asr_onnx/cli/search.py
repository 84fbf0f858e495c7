"""``asr-onnx search``: the sparsest repaired model that keeps a target agreement with the dense model."""

from __future__ import annotations

from pathlib import Path

import click

from asr_onnx.cli.common import check_report_path, plan_model_outputs, run_options, say, tolerance
from asr_onnx.cli.repair import repair_command

# the options of `repair` that a search passes through to every probe and to the final repair, declared once
# there (help, type, default); --sparsity and --flops-target are what a search varies
REPAIR_OPTIONS = ("pattern", "allocation", "score", "reconstruct", "refit_samples", "max_gram_mb", "method",
                  "placement", "recal_mode", "reference", "lambda_rule", "exclude", "keep_first", "keep_last",
                  "calib_size", "seed", "no_head", "sequential", "fold_bn", "guard_mode", "report_path", "eval_path",
                  "eval_size", "overwrite", "quiet")


def repair_options(names):
    """Adds the named options of `repair`, in that order, as `repair` declares them."""
    by_name = {param.name: param for param in repair_command.params}

    def decorate(command):
        for name in reversed(names):  # click lists the options added last first
            click.decorators._param_memo(command, by_name[name])
        return command

    return decorate


@click.command("search")
@click.argument("model", type=click.Path(dir_okay=True))
@click.option("--calib", "calib_path", required=True, help="Calibration data, as for `repair`.")
@click.option("-o", "--output", required=True, help="The chosen model.")
@click.option("--min-agreement", type=float, callback=tolerance,
              help="The lowest top-1 agreement with the dense model on held-out calibration samples, e.g. 0.97.")
@click.option("--max-error", type=float, callback=tolerance,
              help="The highest relative L2 error of all outputs against dense on held-out calibration samples "
                   "(for outputs without classes; with --min-agreement, both must hold).")
@click.option("--resolution", default=0.025, show_default=True, type=click.FloatRange(0, 0.5, min_open=True),
              help="The grid step of the sparsity (of the kept FLOPs under --pattern channels).")
@click.option("--bench-batch", default=32, show_default=True, type=click.IntRange(min=0),
              help="Batch of each probe's latency bench against dense (0: no bench).")
@click.option("--bench-runs", default=10, show_default=True, type=click.IntRange(min=0),
              help="Alternating timed runs per model in each probe's bench (0: no bench).")
@repair_options(REPAIR_OPTIONS)
@run_options(threads=True)
def search_command(model, calib_path, output, min_agreement, max_error, resolution, bench_batch, bench_runs,
                   pattern, allocation, score, reconstruct, refit_samples, max_gram_mb, method, placement, recal_mode,
                   reference, lambda_rule, exclude, keep_first, keep_last, calib_size, seed, no_head, sequential,
                   fold_bn, guard_mode, report_path, eval_path, eval_size, overwrite, quiet, run):
    """Find the highest sparsity of MODEL whose repair keeps a target agreement on held-out calibration
    samples, and write that model, repaired on all of them, with the trade-off table."""
    from asr_onnx.cli.repair import parse_recal
    from asr_onnx.model.files import load_model
    from asr_onnx.outputs import Plan
    from asr_onnx.pipeline.defaults import resolved_defaults
    from asr_onnx.pipeline.sparsity_search import Target, search
    from asr_onnx.report.build import write_report

    recal, momentum = parse_recal(recal_mode)
    _, allocation, score, reconstruct = resolved_defaults(pattern, method, None, allocation, score, reconstruct,
                                                          has_data=True)
    if min_agreement is None and max_error is None:
        raise click.UsageError("give a target: --min-agreement A (classifiers) or --max-error E")
    Target(min_agreement, max_error).check()  # a target even the dense model misses: one line, no work
    check_report_path(report_path)
    output = Path(output)
    plan = Plan(final=True)  # the commit is the command's last act: a signal after it is ignored
    inputs = plan.read_model(model)
    plan.read_data(calib_path, "the --calib data")
    if eval_path:
        plan.read_data(eval_path, "the --eval data")
    model_out, report_out = plan_model_outputs(plan, inputs, output, report_path, overwrite=overwrite)
    # read here for the data's preprocessing, and again by the search's Repair, which keeps its path (a model
    # with external data is written with external data, as `repair` writes it)
    calib = run.open_data(calib_path, load_model(model), limit=calib_size, seed=seed)

    def show(table, probe):
        if not quiet:
            if len(table.probes) == 1:
                say(table.header())
                say("  " + table.column_names())
            say("  " + table.line(probe))

    # a target no probe meets raises TargetMissed, an AsrError: one line, and nothing is written
    job, table = search(model, calib, min_agreement=min_agreement, max_error=max_error, resolution=resolution,
                        pattern=pattern, exclude=exclude, keep_first=keep_first, keep_last=keep_last,
                        allocation=allocation or "global", score=score, guard=guard_mode if method != "none" else "off",
                        seed=seed, bench_batch=bench_batch, bench_runs=bench_runs, batch_size=run.batch_size,
                        device=run.device, progress=not quiet, threads=run.threads, on_probe=show,
                        method=method, placement=placement, recal=recal, momentum=momentum,
                        lambda_rule=lambda_rule, correct_head=not no_head, sequential=sequential,
                        fold_bn_nodes=fold_bn, reference=reference, reconstruct=reconstruct,
                        max_gram_mb=max_gram_mb, refit_samples=refit_samples)
    if eval_path:
        job.evaluate(run.open_data(eval_path, job.dense, limit=eval_size, seed=seed), name=eval_path)
    with plan.staged():
        job.save(model_out.staged)
        if report_out:
            report = job.report()
            report["search"] = table.to_json()
            write_report(report, report_out.staged)
    if not quiet:
        say("trade-off, densest first:")
        say("\n".join(table.format().splitlines()[1:]))
        if job.evaluation:
            from asr_onnx.report.build import eval_line

            say(eval_line(job.evaluation))
        say(f"wrote {output}")
