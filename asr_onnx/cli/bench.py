"""``asr-onnx bench``: measured onnxruntime latency and throughput, against a dense reference."""

from __future__ import annotations

import json

import click

from .common import COUNT, NON_NEGATIVE, run_options


@click.command("bench")
@click.argument("model", type=click.Path())
@click.option("--reference", type=click.Path(), help="The dense model, timed alternately with MODEL in the same run.")
@click.option("--float", "float_path", type=click.Path(),
              help="A second reference: the float model an int8 MODEL was quantized from, timed alternately too.")
@click.option("--runs", default=30, show_default=True, type=COUNT, help="Timed runs per model.")
@click.option("--warmup", default=5, show_default=True, type=NON_NEGATIVE, help="Untimed runs per model first.")
@click.option("--seed", default=0, show_default=True, type=NON_NEGATIVE, help="Seed of the random input batch.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@run_options(device="cpu", batch_size=1, batch_help="Samples per run.", threads=True, preprocess=False)
def bench_command(model, reference, float_path, runs, warmup, seed, as_json, run):
    """Time MODEL in onnxruntime on a random batch: median latency, interquartile range and throughput,
    alternating with the --reference model (and the --float one) and giving the speed-ups; says what each
    model computes in and which runtime it is for; prints the trtexec command line when TensorRT is installed."""
    from asr_onnx.timing import bench, format_bench

    result = bench(model, reference, float_model=float_path, batch_size=run.batch_size, threads=run.threads,
                   device=run.device, runs=runs, warmup=warmup, seed=seed)
    click.echo(json.dumps(result) if as_json else format_bench(result))
