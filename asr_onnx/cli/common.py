"""Options shared by several subcommands (one group for how a model runs and its data is read), and their
translation into API objects."""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, field

import click

from asr_onnx.model.session import DEVICES

COUNT = click.IntRange(min=1)  # sizes: --batch-size, --calib-size, --limit (0 never means "all")
NON_NEGATIVE = click.IntRange(min=0)  # --seed, --threads


def tolerance(ctx, param, value):
    """A click callback: a tolerance is a number >= 0 (NaN would pass any comparison, so a gate with it
    could never fail)."""
    if value is not None and (math.isnan(value) or value < 0):
        raise click.BadParameter(f"must be a number >= 0, got {value}")
    return value


def regexes(ctx, param, values):
    """A click callback: every value compiles as a regular expression, before any work.

    ``re.compile`` raises more than ``re.error``: OverflowError for a repeat count past sys.maxsize
    (``a{99999999999}``), RecursionError for deep nesting, MemoryError for a huge one.
    """
    for value in values:
        try:
            re.compile(value)
        except (re.error, OverflowError, RecursionError, MemoryError, ValueError) as e:
            raise click.BadParameter(f"{value!r} is not a regular expression: {e}") from None
    return values


def _floats(text):
    return None if text is None else tuple(float(v) for v in str(text).split(","))


def _size(text):
    if text is None:
        return None
    parts = str(text).lower().replace("x", ",").split(",")
    return (int(parts[0]), int(parts[-1]))


HOOK_HELP = ("A module:function (or file.py:function) that makes one sample, called as fn(image, spec): image is "
             "the decoded file (a PIL.Image in its own mode), spec the model input (asr_onnx.calib.InputSpec: "
             ".name, .shape, .dtype); it returns the sample without its batch axis, e.g. (3, H, W) float32. It "
             "replaces every other preprocessing option.")


def preprocess_options(command):
    """--size, --resize, --resize-mode, --pad-value, --mean, --std, --scale, --channel-order, --layout,
    --preprocess, --strict."""
    options = [
        click.option("--size", help="Image size H,W fed to the model. Default: the model's input shape."),
        click.option("--resize", type=int, help="Resize the shorter side to this, then centre-crop to --size."),
        click.option("--resize-mode", type=click.Choice(["crop", "stretch", "letterbox"]),
                     help="How images of another size meet --size: crop (default: --resize, then a centre crop), "
                          "stretch (a plain resize, aspect not kept) or letterbox (aspect kept, centred, the "
                          "border filled with --pad-value: a YOLO export's preprocessing)."),
        click.option("--pad-value", type=float, help="The letterbox border in pixel units, 0..255. Default 114, "
                                                     "as Ultralytics pads."),
        click.option("--mean", help="Per-channel mean after scaling, e.g. 0.485,0.456,0.406. Default 0."),
        click.option("--std", help="Per-channel std after scaling. Default 1."),
        click.option("--scale", type=float, help="Pixel multiplier applied first. Default 1/255."),
        click.option("--channel-order", type=click.Choice(["rgb", "bgr"]), help="Default rgb."),
        click.option("--layout", type=click.Choice(["nchw", "nhwc"]), help="Default: inferred from the input shape."),
        click.option("--preprocess", "hook", help=HOOK_HELP),
        click.option("--strict", is_flag=True, help="Refuse corrupt images instead of skipping them."),
    ]
    return functools.reduce(lambda f, option: option(f), reversed(options), command)


def make_preprocess(model, size=None, resize=None, mean=None, std=None, scale=None, channel_order=None,
                    layout=None, hook=None, resize_mode=None, pad_value=None):
    """A calib.Preprocess from the model's metadata defaults and the command-line overrides."""
    from asr_onnx.calib import Preprocess

    try:
        overrides = dict(size=_size(size), mean=_floats(mean), std=_floats(std))
    except ValueError as e:
        raise click.BadParameter(f"not a list of numbers: {e}") from None
    preprocess = Preprocess.for_model(model, resize=resize, scale=scale, channel_order=channel_order, layout=layout,
                                      hook=hook, resize_mode=resize_mode, pad_value=pad_value, **overrides)
    if pad_value is not None and preprocess.resize_mode != "letterbox":
        raise click.BadParameter("it fills a letterbox's border; pass --resize-mode letterbox", param_hint="--pad-value")
    return preprocess


PREPROCESS_KEYS = ("size", "resize", "mean", "std", "scale", "channel_order", "layout", "hook", "resize_mode",
                   "pad_value")
CALIB_BATCH_HELP = "Calibration samples per run. Default: 64, or the calibration set's size when smaller."


@dataclass(frozen=True)
class RunOptions:
    """How a command runs models and reads data: what the :func:`run_options` group parsed.

    Attributes:
        device: --device. Defaults to "auto".
        batch_size: --batch-size; None where the command has none or it was not given. Defaults to None.
        threads: --threads; 0 lets onnxruntime choose. Defaults to 0.
        preprocess: the preprocessing options as given on the command line (None where not given), by
            :class:`asr_onnx.calib.Preprocess` field. Defaults to none.
        strict: --strict. Defaults to False.
        engine: --engine, "local" or "ray". Defaults to "local".
        ray_address: --ray-address. Defaults to None (RAY_ADDRESS, else a local cluster).
    """

    device: str = "auto"
    batch_size: int | None = None
    threads: int = 0
    preprocess: dict = field(default_factory=dict)
    strict: bool = False
    engine: str = "local"
    ray_address: str | None = None

    def make_engine(self):
        """The engine of --engine and --ray-address (:func:`asr_onnx.model.engine.make_engine`)."""
        from asr_onnx.model.engine import make_engine

        return make_engine(self.engine, address=self.ray_address, device=self.device)

    def open_data(self, path, model, limit: int | None = None, seed: int = 0, labels=None):
        """Loads a calibration or evaluation set for ``model``: its metadata preprocessing, overridden by the
        command line; a seeded subset of ``limit`` samples when given; class folders numbered by the
        ``labels`` file when given."""
        from asr_onnx.calib import load_calib

        data = load_calib(path, model, make_preprocess(model, **self.preprocess), strict=self.strict,
                          labels=labels)
        return data.take(limit, seed) if limit else data


def run_options(*, device: str = "auto", batch_size: int | bool | None = None, batch_help: str | None = None,
                threads: bool = False, preprocess: bool = True, engine: bool = False):
    """The options shared by every command that runs a model, as one group: --device, --batch-size, --threads
    and the preprocessing options. The command gets them as one :class:`RunOptions` argument, ``run``.

    Args:
        device: the --device default. Defaults to "auto".
        batch_size: the --batch-size default; None (default) for the calibration default (64, or the set's
            size when smaller), False for no --batch-size.
        batch_help: the --batch-size help. Defaults to None (none, or the calibration default's).
        threads: add --threads. Defaults to False.
        preprocess: add the preprocessing options (see :func:`preprocess_options`). Defaults to True.
        engine: add --engine and --ray-address. Defaults to False.
    """
    options = [click.option("--device", default=device, show_default=True, type=click.Choice(DEVICES))]
    if batch_size is None:
        options.append(click.option("--batch-size", type=COUNT, help=batch_help or CALIB_BATCH_HELP))
    elif batch_size is not False:
        options.append(click.option("--batch-size", default=batch_size, show_default=True, type=COUNT,
                                    help=batch_help))
    if threads:
        options.append(click.option("--threads", default=0, show_default=True, type=NON_NEGATIVE,
                                    help="onnxruntime intra-op threads; 0 lets onnxruntime choose."))
    if engine:
        from asr_onnx.model.engine import ENGINES, EXTRA

        options += [click.option("--engine", default="local", show_default=True, type=click.Choice(ENGINES),
                                 help=f"Where the calibration and evaluation passes run: this process, or shards "
                                      f"over a Ray cluster (needs pip install \"{EXTRA}\")."),
                    click.option("--ray-address", help="With --engine ray, the cluster to join. Default: "
                                                       "RAY_ADDRESS, else a local cluster started here.")]

    def decorate(command):
        @functools.wraps(command)
        def with_run(*args, **kwargs):
            run = RunOptions(device=kwargs.pop("device"), batch_size=kwargs.pop("batch_size", None),
                             threads=kwargs.pop("threads", 0), strict=kwargs.pop("strict", False),
                             engine=kwargs.pop("engine", "local"), ray_address=kwargs.pop("ray_address", None),
                             preprocess={key: kwargs.pop(key) for key in PREPROCESS_KEYS if key in kwargs})
            return command(*args, run=run, **kwargs)

        inner = preprocess_options(with_run) if preprocess else with_run  # listed after the group in --help
        return functools.reduce(lambda f, option: option(f), reversed(options), inner)

    return decorate


LABELS_HELP = ("Class numbers of the data's class folders: a text file, line i naming class i, or a JSON list "
               "or object (name -> number). Default: sorted names; integer names in numeric order.")


def say(text: str) -> None:
    """Prints progress or a summary on stdout. A closed stdout, a broken pipe or a full disk (/dev/full)
    never fails a command that did its work: the text is dropped, and so is all later stdout."""
    import os
    import sys

    try:
        click.echo(text)
    except OSError:
        try:  # later writes (and the flush at exit) go nowhere instead of failing again
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        except (OSError, ValueError, AttributeError):
            pass


def parse_list(text: str, kind=str) -> list:
    try:
        return [kind(v.strip()) for v in str(text).split(",") if v.strip()]
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


def check_report_path(report_path) -> None:
    """Refuses a ``--report`` path of a kind that cannot be written (by its extension), before any work."""
    from asr_onnx.errors import AsrError
    from asr_onnx.report.build import report_format

    if report_path:
        try:
            report_format(report_path)
        except AsrError as e:
            raise click.BadParameter(str(e), param_hint="--report") from None


def plan_model_outputs(plan, inputs: list, output, report_path, *, overwrite: bool) -> tuple:
    """Registers a command's output model (with the ``.data`` file a model with external data keeps beside it)
    and its report, then checks every path of ``plan``; ``inputs``: the input model's files, which ``-o`` may
    replace only with ``overwrite``. Returns (the model's Output, the report's Output or None)."""
    model_out = plan.write(output, "-o", siblings=(f"{output.name}.data",), replaces=inputs if overwrite else ())
    report_out = plan.write(report_path, "--report") if report_path else None
    plan.check()
    return model_out, report_out
