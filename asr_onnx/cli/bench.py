"""``asr-onnx bench``: measured onnxruntime latency and throughput, against a dense reference."""

from __future__ import annotations

import json
import re

import click

from asr_onnx.cli.common import COUNT, NON_NEGATIVE, run_options

# one --input-shapes entry as a word of its own: name:[1,3,320,320] or name:1x3x320x320
_SHAPE_WORD = re.compile(r".+:(\[[\d,\s]*\]|\d+(x\d+)*)(,.+:(\[[\d,\s]*\]|\d+(x\d+)*))*", re.IGNORECASE)


@click.command("bench", context_settings={"allow_extra_args": True})
@click.argument("model", type=click.Path())
@click.option("--reference", type=click.Path(), help="The dense model, timed alternately with MODEL in the same run.")
@click.option("--float", "float_path", type=click.Path(),
              help="A second reference: the float model an int8 MODEL was quantized from, timed alternately too.")
@click.option("--input-shapes", "input_shapes", multiple=True, metavar="NAME:[D,...]",
              help="The shape to feed an input whose axes are not all fixed (a detector's (N, 3, H, W)), "
                   "batch first, as Polygraphy writes it: images:[1,3,640,640]; several inputs separated by "
                   "spaces or commas (a:[1,3,8,8] b:[1,8]), or the option repeated; trtexec's a:1x3x8x8 "
                   "also reads.")
@click.option("--runs", default=30, show_default=True, type=COUNT, help="Timed runs per model.")
@click.option("--warmup", default=5, show_default=True, type=NON_NEGATIVE, help="Untimed runs per model first.")
@click.option("--seed", default=0, show_default=True, type=NON_NEGATIVE, help="Seed of the random input batch.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@run_options(device="cpu", batch_size=None, batch_help="Samples per run. Default: the batch of --input-shapes, "
             "else 1.", threads=True, preprocess=False)
@click.pass_context
def bench_command(ctx, model, reference, float_path, input_shapes, runs, warmup, seed, as_json, run):
    """Time MODEL in onnxruntime on a random batch: median latency, interquartile range and throughput,
    alternating with the --reference model (and the --float one) and giving the speed-ups; says what each
    model computes in and which runtime it is for; prints the trtexec command line when TensorRT is installed."""
    from asr_onnx.errors import AsrError
    from asr_onnx.verify.timing import bench, format_bench, parse_input_shapes

    model, shape_words = model_and_shape_words(model, ctx.args, bool(input_shapes))
    try:
        shapes = parse_input_shapes([*input_shapes, *shape_words])
    except AsrError as e:
        raise click.BadParameter(str(e), param_hint="--input-shapes") from None
    result = bench(model, reference, float_model=float_path, batch_size=run.batch_size, threads=run.threads,
                   device=run.device, runs=runs, warmup=warmup, seed=seed, input_shapes=shapes)
    click.echo(json.dumps(result) if as_json else format_bench(result))


def model_and_shape_words(model: str, extra: list[str], shapes_given: bool) -> tuple[str, list[str]]:
    """MODEL, and the words after ``--input-shapes`` that the parser took for arguments: Polygraphy's
    ``--input-shapes a:[1,3,8,8] b:[1,8]`` gives one option several words. Whichever word is not a shape is
    the model (``bench --input-shapes a:[..] b:[..] model.onnx`` reads too).

    Raises:
        click.UsageError: words beyond MODEL that are not shapes, or shapes without --input-shapes.
    """
    words = [model, *extra]
    shapes = [word for word in words if _SHAPE_WORD.fullmatch(word)] if shapes_given else []
    others = [word for word in words if word not in shapes]
    if not others:
        raise click.UsageError("missing argument MODEL")
    if len(others) > 1:
        raise click.UsageError(f"unexpected argument(s): {' '.join(others[1:])}")
    return others[0], shapes
