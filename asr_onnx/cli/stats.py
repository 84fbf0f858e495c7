"""``asr-onnx stats``: measure and save the dense model's per-channel statistics."""

from __future__ import annotations

import click

from asr_onnx.cli.common import COUNT, NON_NEGATIVE, run_options, say


@click.command("stats")
@click.argument("model", type=click.Path())
@click.option("--calib", "calib_path", required=True, help="Calibration data, as for `repair`.")
@click.option("-o", "--output", required=True, help="The .npz file to write.")
@click.option("--calib-size", default=1024, show_default=True, type=COUNT)
@click.option("--seed", default=0, show_default=True, type=NON_NEGATIVE)
@click.option("-q", "--quiet", is_flag=True)
@run_options()
def stats_command(model, calib_path, output, calib_size, seed, quiet, run):
    """Measure MODEL's dense statistics once, for `repair --stats` and sweeps.

    The file is keyed by the model's bytes, the data and the preprocessing: using it with anything
    else is refused.
    """
    from asr_onnx.measure.cache import save_stats, stats_key
    from asr_onnx.outputs import Plan
    from asr_onnx.pipeline.driver import Repair

    plan = Plan(final=True)
    plan.read_model(model)
    plan.read_data(calib_path, "the --calib data")
    stats_out = plan.write(output, "-o")
    plan.check()
    job = Repair(model, device=run.device, batch_size=run.batch_size, progress=not quiet)
    calib = run.open_data(calib_path, job.dense, limit=calib_size, seed=seed)
    stats = job.measure_dense(calib)
    with plan.staged():  # the commit is the last act
        save_stats(stats_out.staged, stats, stats_key(job.dense, calib))
        if not quiet:
            say(f"wrote statistics of {len(stats)} sites to {output}")
