"""``asr-onnx repair``: prune and repair one model."""

from __future__ import annotations

import math
from pathlib import Path

import click

from asr_onnx.cli.common import (
    COUNT,
    LABELS_HELP,
    NON_NEGATIVE,
    check_report_path,
    plan_model_outputs,
    regexes,
    run_options,
    say,
)
from asr_onnx.measure.norms import DEFAULT_REFERENCE, REFERENCES


def _megabytes(value: float) -> float:
    """A size bound is a finite number >= 0 (NaN would pass every comparison, a negative one no layer, and
    neither NaN nor inf is a number in the JSON report)."""
    if not math.isfinite(value) or value < 0:
        raise click.BadParameter(f"must be a finite number of MB >= 0, got {value}")
    return value


def default_output(model: str) -> Path:
    path = Path(model)
    return path.with_name(f"{path.stem}.repaired.onnx")


@click.command("repair")
@click.argument("model", type=click.Path(dir_okay=True))
@click.option("--calib", "calib_path", required=False, help="Calibration data: image folder, .npy/.npz, or IDX files.")
@click.option("-o", "--output", help="Output model. Default: MODEL.repaired.onnx beside the input.")
@click.option("--sparsity",
              help="Fraction of prunable weights set to zero (--pattern channels: of each group's channels removed, "
                   "each kept count rounded to the nearest multiple of 8). Default: 0.9; 0.3 for --pattern channels.")
@click.option("--pattern", default="global", show_default=True,
              help="global, uniform, N:M (e.g. 2:4) or channels (remove whole output channels and shrink the graph).")
@click.option("--flops-target", type=float,
              help="With --pattern channels: the fraction of multiply-accumulates to keep, instead of --sparsity.")
@click.option("--allocation", type=click.Choice(["global", "lamp", "uniform", "error"]),
              help="How the sparsity is split between layers: one |w| threshold, LAMP scores, per layer, or "
                   "error: the levels of least summed network-output error, measured per layer and level on "
                   "256 calibration samples (OBC/SPDY; needs --calib, one pass per layer and level). "
                   "Default: lamp for --pattern global (N:M and channels fix each layer's own).")
@click.option("--score", type=click.Choice(["magnitude", "wanda", "rownorm", "obs", "bn-scale", "greedy"]),
              help="How weights are ranked: |w|, Wanda's |w| times its input channel's norm (needs --calib), "
                   "rownorm, |w| over its output channel's weight norm (blind to a folded BN's gamma/sigma), or "
                   "obs, the refit's own error of dropping each weight (OBS, chosen in the refit: needs "
                   "--reconstruct ls); "
                   "channels: the L1 of their filters, |gamma| of their BN, or greedy (ThiNet, needs --calib). "
                   "Default: obs with the refit (magnitude without it); greedy for --pattern channels with --calib.")
@click.option("--reconstruct", type=click.Choice(["none", "ls", "auto"]),
              help="ls: refit the kept weights of each layer by least squares on the calibration set; auto: "
                   "refit only when that is better on held-out calibration data (2 folds); none: the statistics "
                   "alone. Default: ls, or none with --method none (pruning alone).")
@click.option("--refit-samples", default=0, show_default=True, type=click.IntRange(min=0),
              help="With --reconstruct ls or auto, refit on a seeded N of the calibration samples (0: all); "
                   "the refit's cost falls in proportion, recalibration still uses them all.")
@click.option("--max-gram-mb", default=256.0, show_default=True, type=float, callback=lambda ctx, param, value: _megabytes(value),
              help="With --reconstruct ls or auto, skip a layer whose Gram matrices would exceed this.")
@click.option("--frontier-mb", default=0.0, show_default=True, type=click.FloatRange(min=0),
              help="With --reconstruct ls or auto, MB of the refit's activations held in memory between its passes; "
                   "the rest waits in a temporary folder (0: all of it, the least memory; 1024 saved about 9% of "
                   "the time at 7x the memory on 4,096 small images).")
@click.option("--refit-target", default=None, type=click.Choice(["layer", "block"]),
              help="With --reconstruct ls, what each layer is refitted towards: its dense output, or, for the last "
                   "layer of a residual branch, the dense block output. Default: block from --sparsity 0.95 on "
                   "(unstructured) in a network that keeps its BatchNorms, layer otherwise.")
@click.option("--method", default="bn", show_default=True,
              type=click.Choice(["none", "bn", "lw", "naive", "asr", "auto"]),
              help="How lost variance is given back; auto picks on held-out calibration data.")
@click.option("--placement", default="recal", show_default=True, type=click.Choice(["recal", "pre-bn"]),
              help="recal: the gain is the variance part of recalibration; pre-bn: the literal order.")
@click.option("--recal", "recal_mode", default="exact", show_default=True,
              help="exact, or momentum[=M] (PyTorch's running average, M defaults to 0.1).")
@click.option("--reference", default=DEFAULT_REFERENCE, show_default=True, type=click.Choice(REFERENCES),
              help="What a BN's correction restores: calib, the dense model's statistics on the calibration "
                   "data; running, the BN's running statistics (REFLOW).")
@click.option("--lambda-rule", default="median", show_default=True, help="ASR's lambda: median, mean or a number.")
@click.option("--exclude", multiple=True, callback=regexes, help="Regex of node or weight names to leave dense (repeatable).")
@click.option("--keep-first", is_flag=True, help="Leave the first prunable layer dense.")
@click.option("--keep-last", is_flag=True, help="Leave the last prunable layer dense.")
@click.option("--calib-size", default=1024, show_default=True, type=COUNT, help="Calibration samples to use.")
@click.option("--seed", default=0, show_default=True, type=NON_NEGATIVE, help="Seed of the calibration subset and of its batch order.")
@click.option("--no-head", is_flag=True,
              help="Leave the classifier head (a BN-free layer feeding a graph output) uncorrected, as REFLOW does.")
@click.option("--sequential", is_flag=True,
              help="Exact layer-by-layer recalibration: one calibration pass per depth of sites (slower).")
@click.option("--fold-bn", is_flag=True, help="Fold every BatchNormalization into its Conv after recalibration.")
@click.option("--guard", "guard_mode", default="fallback", show_default=True,
              type=click.Choice(["fallback", "warn", "off"]),
              help="Score the repair and pruning alone on held-out calibration samples; fallback keeps the "
                   "pruned model when it is better, warn only says so.")
@click.option("--fp16", is_flag=True, help="Cast weights and arithmetic to float16; float I/O stays float32. "
              "Checked against float32 on the calibration data first.")
@click.option("--fp16-io", is_flag=True, help="With --fp16 (implied), make float inputs and outputs float16 too.")
@click.option("--int8", is_flag=True,
              help="Quantize the output to INT8 (QDQ, onnxruntime's static quantizer): per-channel symmetric int8 "
                   "weights, so pruned weights stay 0; activations calibrated on --calib; the calibration method "
                   "and a correction of the quantization damage chosen on held-out calibration data.")
@click.option("--int8-target", type=click.Choice(["cpu", "tensorrt"]),
              help="With --int8: cpu (default: onnxruntime's integer kernels, uint8 activations, the weight range "
                   "this CPU needs) or tensorrt (symmetric int8 activations, as TensorRT requires).")
@click.option("--stats", "stats_path", type=click.Path(), help="Dense statistics saved by `asr-onnx stats`.")
@click.option("--report", "report_path",
              help="Write the report here: JSON for .json, a self-contained page for .html.")
@click.option("--eval", "eval_path", help="Score the output against the dense model on this data (top-1 with labels).")
@click.option("--eval-size", type=COUNT, help="With --eval, a seeded subset of this size. Default: all.")
@click.option("--labels", "labels_path", type=click.Path(), help="With --eval: " + LABELS_HELP)
@click.option("--output-kind", "output_kind", multiple=True, metavar="NAME:KIND",
              help="Score output NAME as classes, detection, map or regression instead of as recognised "
                   "(repeatable); the guard, auto and the verdict use it.")
@click.option("--overwrite", is_flag=True, help="Allow the output to replace the input model.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars and no summary.")
@run_options(threads=True, engine=True)
def repair_command(model, calib_path, output, sparsity, pattern, flops_target, allocation, score, reconstruct,
                   refit_samples, max_gram_mb, frontier_mb, refit_target, method, placement, recal_mode, reference, lambda_rule, exclude, keep_first, keep_last, calib_size,
                   seed, no_head, sequential, fold_bn, guard_mode, fp16, fp16_io, int8, int8_target,
                   stats_path, report_path, eval_path, eval_size, labels_path, output_kind, overwrite, quiet, run):
    """Prune MODEL and repair it with calibration data."""
    from asr_onnx.calib.labels import chance_warning, model_class_count
    from asr_onnx.errors import AsrError
    from asr_onnx.measure.cache import load_stats, stats_key
    from asr_onnx.model.kinds import check_output_kinds, parse_output_kinds
    from asr_onnx.outputs import Plan
    from asr_onnx.pipeline.defaults import resolved_defaults
    from asr_onnx.pipeline.driver import Repair
    from asr_onnx.pipeline.guard import warning_line
    from asr_onnx.pipeline.recipe import Recipe
    from asr_onnx.prune.channels import SCORES as CHANNEL_SCORES
    from asr_onnx.prune.masks import SCORES as WEIGHT_SCORES
    from asr_onnx.prune.masks import Pattern, check_sparsity, emptied_warning
    from asr_onnx.report.build import summary, write_report
    from asr_onnx.report.schema import from_dict

    recal, momentum = parse_recal(recal_mode)
    sparsity, allocation, score, reconstruct = resolved_defaults(pattern, method, sparsity, allocation, score,
                                                                 reconstruct, has_data=bool(calib_path))
    kinds = parse_output_kinds(output_kind)
    check_report_path(report_path)
    if int8 and (fp16 or fp16_io):
        raise click.UsageError("--int8 and --fp16 exclude each other: the output is int8 (QDQ) or float16, not both")
    if int8_target and not int8:
        raise click.UsageError("--int8-target needs --int8")
    if labels_path and not eval_path:
        raise click.BadParameter("it numbers the classes of the --eval data; pass --eval", param_hint="--labels")
    output = Path(output) if output else default_output(model)
    plan = Plan(final=True)  # every path read and written, checked for overlap before any work
    inputs = plan.read_model(model)
    plan.read(stats_path, "the --stats file")
    plan.read(labels_path, "the --labels file")
    needs = [option for option, used in ((f"--method {method}", method != "none"), ("--fp16", fp16 or fp16_io),
                                         ("--int8", int8),
                                         (f"--reconstruct {reconstruct}", reconstruct != "none"),
                                         ("--allocation error", allocation == "error"),
                                         (f"--score {score}", score in ("wanda", "greedy", "obs"))) if used]
    channels = str(pattern).strip().lower() == "channels"  # its output is run on calibration samples first
    if (needs or channels) and calib_path:  # --fp16 checks its output on the calibration data
        plan.read_data(calib_path, "the --calib data")
    if eval_path:
        plan.read_data(eval_path, "the --eval data")
    model_out, report_out = plan_model_outputs(plan, inputs, output, report_path, overwrite=overwrite)
    engine = run.make_engine()
    click.get_current_context().call_on_close(engine.close)  # the actors, and a local cluster started here
    job = Repair(model, device=run.device, batch_size=run.batch_size, progress=not quiet, threads=run.threads,
                 engine=engine, output_kind=kinds)
    check_output_kinds(job.dense, kinds)
    if int8 and job.qdq is not None:
        raise AsrError("--int8: the model is quantized already (QDQ weights); its repair keeps them int8 without --int8")
    check_sparsity(sparsity)  # a bad pattern or score fails before any data is read
    if allocation not in ("global", None) and (channels or Pattern.parse(pattern).kind == "nm"):
        raise click.BadParameter(f"it splits an unstructured sparsity between layers; --pattern {pattern} fixes each "
                                 "layer's own", param_hint=f"--allocation {allocation}")
    if not channels:
        Pattern.parse(pattern)
    if score not in (CHANNEL_SCORES if channels else WEIGHT_SCORES):
        raise click.BadParameter(f"--score {score} does not apply to --pattern {pattern}", param_hint="--score")
    if score == "obs" and reconstruct != "ls":
        raise click.BadParameter(f"it chooses the masks in the least-squares refit; --reconstruct {reconstruct} "
                                 "does not refit by least squares", param_hint="--score obs")
    if flops_target is not None and not channels:
        raise click.BadParameter("--flops-target needs --pattern channels", param_hint="--flops-target")
    calib = dense_stats = None
    half = fp16 or fp16_io
    if needs and not calib_path:  # a float16 output is checked against float32 on calibration data
        raise AsrError(f"--calib is required for {needs[0]}")
    if calib_path and (needs or channels):
        calib = run.open_data(calib_path, job.dense, limit=calib_size, seed=seed)
    if method != "none":
        dense_stats = load_stats(stats_path, stats_key(job.dense, calib)) if stats_path else None
    job.prune(sparsity, pattern, exclude, keep_first, keep_last, allocation or "global", score, calib, flops_target)
    if warning := emptied_warning(job.layers):
        click.echo(warning, err=True)
    recipe = Recipe(method=method, placement=placement, recal=recal, momentum=momentum, lambda_rule=lambda_rule,
                    correct_head=not no_head, sequential=sequential, fold_bn=fold_bn, seed=seed, reference=reference,
                    reconstruct=reconstruct, max_gram_mb=max_gram_mb, refit_samples=refit_samples,
                    frontier_mb=frontier_mb, refit_target=refit_target, guard=guard_mode if method != "none" else "off")
    job.run(calib, recipe=recipe, dense_stats=dense_stats)
    if channels and job.channel_report is not None and not any(g["removed"] for g in job.channel_report["groups"]):
        asked = f"--sparsity {sparsity}" if flops_target is None else f"--flops-target {flops_target}"
        click.echo(f"warning: --pattern channels removed no channel at {asked}: no group can shrink (each group's "
                   "reason is in the summary and the report), so the output is no smaller", err=True)
    elif channels and (speedup := job.time_channels(threads=run.threads or 1)) is not None and speedup < 1.0:
        click.echo(f"warning: the channel-pruned model ran at {speedup:.2f}x the dense model's speed here (batch "
                   f"{job.channel_report['speedup_batch']}, onnxruntime CPU): removing these channels did not make it "
                   "faster; time it with `asr-onnx bench` on the target, or remove more (--flops-target)", err=True)
    warning = warning_line(job.settings.get("guard", {}))
    if warning:
        click.echo(warning, err=True)
    if half:
        job.to_fp16(keep_io=not fp16_io, calib=calib)
    if int8:
        job.to_int8(calib, target=int8_target or "cpu", seed=seed)
    if eval_path:
        eval_data = run.open_data(eval_path, job.dense, limit=eval_size, seed=seed, labels=labels_path)
        job.evaluate(eval_data, name=eval_path)
        warning = chance_warning(job.evaluation["dense_top1"], eval_data.labels, eval_data.classes,
                                 model_class_count(job.dense), who="the dense model")
        if warning:
            click.echo(f"warning: {warning}", err=True)
    # neither --eval nor the guard scored the model shipped (the guard scores the float32 repair): the calibration data
    if (job.verdict is None or half or int8) and not eval_path and calib is not None:
        job.judge(calib)
    with plan.staged():  # every output is staged, then all are renamed into place together, as the last act
        job.save(model_out.staged)
        report = from_dict(job.report())  # typed and validated once, for the report and the summary
        if report_out:
            write_report(report, report_out.staged)
        if not quiet:
            say(summary(report, report_path))
            say(f"wrote {output}")


def parse_recal(text: str) -> tuple[str, float]:
    """``exact`` or ``momentum[=M]`` -> (mode, momentum)."""
    mode, _, value = str(text).partition("=")
    if mode not in ("exact", "momentum") or (value and mode == "exact"):
        raise click.BadParameter(f"--recal must be exact or momentum[=M], got {text!r}")
    try:
        momentum = float(value) if value else 0.1
    except ValueError:
        raise click.BadParameter(f"--recal momentum must be a number, got {value!r}") from None
    if not 0 < momentum <= 1:
        raise click.BadParameter(f"--recal momentum must be in (0, 1], got {momentum}")
    return mode, momentum
