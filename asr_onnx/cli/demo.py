"""``asr-onnx demo``: prune a bundled sample model and compare every repair method on bundled data."""

from __future__ import annotations

import click

from asr_onnx.cli.common import run_options


@click.command("demo")
@click.option("--model", default="resnet20_bn", show_default=True,
              help="A sample model: resnet20, resnet50s, vgg_bn, mobilenetv2, with _bn to keep BN nodes.")
@click.option("--sparsity", default=0.9, show_default=True, type=float)
@click.option("--pattern", default="global", show_default=True)
@click.option("--models-dir", help="The folder of sample models and data. Default: the one installed with asr-onnx "
                                   "(resnet20_bn), or sample_models/ in the source tree (all of them).")
@click.option("--eval-size", type=click.IntRange(min=1), help="Evaluate on the first N bundled test images. Default: all 2,000.")
@run_options(batch_size=False, preprocess=False)
def demo_command(model, sparsity, pattern, models_dir, eval_size, run):
    """Prune a sample model, compare none, bn, lw, naive and asr on the bundled eval set, then run `repair`'s
    default (LAMP, the least-squares refit with OBS masks, exact BN recalibration and the guard)."""
    from asr_onnx.pipeline.demo import default_repair, load_demo
    from asr_onnx.pipeline.sweep import Grid, run_sweep

    proto, calib, eval_data = load_demo(model, models_dir, eval_size)
    grid = Grid(sparsities=(sparsity,), patterns=(pattern,))
    click.echo(f"{model}: {pattern} pruning at {sparsity:g}, {len(calib)} calibration images, "
               f"{len(eval_data)} test images")
    result = run_sweep(proto, calib, eval_data, grid, name=model, device=run.device, progress=False, watch=False)
    click.echo(f"{'method':<8} {'top-1':>7} {'agree':>7} {'time':>7}")
    click.echo(f"{'dense':<8} {100 * result.dense['top1']:>6.2f}% {'':>7} {result.dense['eval_s']:>6.2f}s")
    for row in result.rows:
        seconds = row["repair_s"] + (row["measure_s"] if row["method"] != "none" else 0)
        click.echo(f"{row['method']:<8} {100 * row['top1']:>6.2f}% {100 * row['agreement']:>6.1f}% {seconds:>6.2f}s")
    click.echo("time = measurement (shared by the methods) + correction + fold; top-1 on the bundled test subset")
    job, seconds = default_repair(proto, calib, eval_data, sparsity, pattern, device=run.device)
    click.echo(f"{'default':<8} {100 * job.evaluation['top1']:>6.2f}% {100 * job.evaluation['agreement']:>6.1f}% "
               f"{seconds:>6.2f}s")
    click.echo(f"default = `asr-onnx repair`'s: {job.settings['allocation']} allocation, least-squares refit with "
               f"{job.settings['score']} masks, exact BN recalibration, the guard (kept: {job.settings['guard']['kept']}); time = the whole repair")
