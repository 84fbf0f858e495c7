"""Options shared by several subcommands, and their translation into API objects."""

from __future__ import annotations

import functools
import math
import re

import click

COUNT = click.IntRange(min=1)  # sizes: --batch-size, --calib-size, --limit (0 never means "all")
NON_NEGATIVE = click.IntRange(min=0)  # --seed, --threads


def tolerance(ctx, param, value):
    """A click callback: a tolerance is a number >= 0 (NaN would pass any comparison, so a gate with it
    could never fail)."""
    if value is not None and (math.isnan(value) or value < 0):
        raise click.BadParameter(f"must be a number >= 0, got {value}")
    return value


def regexes(ctx, param, values):
    """A click callback: every value compiles as a regular expression."""
    for value in values:
        try:
            re.compile(value)
        except re.error as e:
            raise click.BadParameter(f"{value!r} is not a regular expression: {e}") from None
    return values


def _floats(text):
    return None if text is None else tuple(float(v) for v in str(text).split(","))


def _size(text):
    if text is None:
        return None
    parts = str(text).lower().replace("x", ",").split(",")
    return (int(parts[0]), int(parts[-1]))


def preprocess_options(command):
    """--size, --resize, --mean, --std, --scale, --channel-order, --layout, --preprocess, --strict."""
    options = [
        click.option("--size", help="Image size H,W fed to the model. Default: the model's input shape."),
        click.option("--resize", type=int, help="Resize the shorter side to this, then centre-crop to --size."),
        click.option("--mean", help="Per-channel mean after scaling, e.g. 0.485,0.456,0.406. Default 0."),
        click.option("--std", help="Per-channel std after scaling. Default 1."),
        click.option("--scale", type=float, help="Pixel multiplier applied first. Default 1/255."),
        click.option("--channel-order", type=click.Choice(["rgb", "bgr"]), help="Default rgb."),
        click.option("--layout", type=click.Choice(["nchw", "nhwc"]), help="Default: inferred from the input shape."),
        click.option("--preprocess", "hook", help="A module:function (or file.py:function) that makes one sample."),
        click.option("--strict", is_flag=True, help="Refuse corrupt images instead of skipping them."),
    ]
    return functools.reduce(lambda f, option: option(f), reversed(options), command)


def make_preprocess(model, size=None, resize=None, mean=None, std=None, scale=None, channel_order=None,
                    layout=None, hook=None):
    """A calib.Preprocess from the model's metadata defaults and the command-line overrides."""
    from asr_onnx.calib import Preprocess

    try:
        overrides = dict(size=_size(size), mean=_floats(mean), std=_floats(std))
    except ValueError as e:
        raise click.BadParameter(f"not a list of numbers: {e}") from None
    return Preprocess.for_model(model, resize=resize, scale=scale, channel_order=channel_order, layout=layout,
                                hook=hook, **overrides)


def open_data(path, model, options: dict, limit: int | None = None, seed: int = 0):
    """Loads a calibration or evaluation set for ``model`` with the preprocess options in ``options``."""
    from asr_onnx.calib import load_calib

    keys = ("size", "resize", "mean", "std", "scale", "channel_order", "layout", "hook")
    preprocess = make_preprocess(model, **{k: options.get(k) for k in keys})
    data = load_calib(path, model, preprocess, strict=options.get("strict", False))
    return data.take(limit, seed) if limit else data


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
