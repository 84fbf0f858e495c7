"""The check before a channel-pruned model is written: it runs in onnxruntime on a few calibration samples and
gives outputs of the input model's names, dtypes and shapes, finite wherever the input model's are (issue 25).

Shrinking is also checked against the masked model it came from: both run on the same samples and must agree,
since the repair's scores (guard, evaluation) were taken on the masked model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from asr_onnx.errors import AsrError, first_line

SAMPLES = 4  # calibration samples per check: enough to run every shape path, cheap on any model
AGREE_REL = 1e-3  # relative L2 between the shrunk and the masked model's outputs (float32 rounding: ~1e-6)


def sample_feeds(dense, data=None, samples: int = SAMPLES, *, required: bool = True) -> dict | None:
    """The first ``samples`` calibration samples (the model's own batch when it fixes one) as session feeds.

    Without data, seeded random inputs stand in where every dimension but the batch is static.

    Args:
        dense: the input onnx.ModelProto.
        data: a calibration set (anything with ``batches``), or None.
        samples: how many. Defaults to SAMPLES.
        required: raise when no feeds can be made; False returns None. Defaults to True.

    Raises:
        AsrError: with ``required``, no data and an input with a dynamic dimension other than the batch.
    """
    from asr_onnx.calib.specs import fixed_batch, input_specs, is_static

    specs = input_specs(dense)
    batch = fixed_batch(specs) or samples
    if data is not None:
        return next(iter(data.batches(batch)))
    feeds = {}
    rng = np.random.default_rng(0)
    for spec in specs:
        dims = [batch if axis == 0 and not is_static(d) else d for axis, d in enumerate(spec.shape)]
        if not all(is_static(d) for d in dims):
            if not required:
                return None
            raise AsrError(f"a channel-pruned model is run on calibration samples before it is written, and the "
                           f"input {spec.name} {spec.describe()} has dynamic dimensions: give calibration data "
                           "(--calib)")
        kind = spec.dtype.kind
        feeds[spec.name] = (rng.standard_normal(dims) if kind == "f" else np.zeros(dims)).astype(spec.dtype)
    return feeds


def written_check(channel_plan, dense, data, *, device: str = "cpu", half_io: bool = False) -> Callable:
    """The check a model is saved under: :func:`save_check` when ``channel_plan`` removes channels, else
    onnx.checker and a load (:func:`asr_onnx.model.check.check_output`)."""
    from asr_onnx.model.check import check_output

    if channel_plan is None or not channel_plan.keep:
        return check_output
    return save_check(dense, data, device=device, half_io=half_io)


def save_check(dense, data, *, device: str = "cpu", half_io: bool = False) -> Callable[[Path], None]:
    """The check that :func:`asr_onnx.model.files.save_model` runs on a staged channel-pruned model: onnx.checker
    and a load (:func:`asr_onnx.model.check.check_output`), then :func:`check_written` on a few samples of
    ``data`` (see :func:`sample_feeds`, which raises at once when there are none to be had)."""
    from asr_onnx.model.check import check_output

    feeds = sample_feeds(dense, data)

    def check(staged: Path) -> None:
        check_output(staged)
        check_written(dense, staged, feeds, device=device, half_io=half_io)

    return check


def _run(model, feeds: dict, what: str, device: str) -> list:
    """(name, array) of every output; one ``error:`` line when the model cannot be loaded or run. Float feeds
    take the float type of the model's input (a float16 model input under ``--fp16-io``: the Runner casts)."""
    from asr_onnx.model.session import Runner

    try:
        session = Runner(model, device=device, what=what, on="calibration samples")
    except AsrError as e:
        raise AsrError(f"{what} cannot be loaded in onnxruntime: {first_line(e)}") from None
    with session:
        try:
            return list(session.run(None, feeds).items())
        except AsrError as e:
            cause = first_line(e).removeprefix("onnxruntime failed on calibration samples: ")
            raise AsrError(f"{what} fails to run in onnxruntime on calibration samples: {cause}") from None


def check_written(dense, model, feeds: dict, *, device: str = "cpu", half_io: bool = False) -> None:
    """Refuses a channel-pruned model whose outputs differ in name, dtype or shape from the input model's on
    ``feeds``, that fails to run, or whose outputs are not finite where the input model's are.

    Args:
        dense: the input model (a ModelProto or a path).
        model: the model about to be written (a ModelProto or the staged path).
        feeds: from :func:`sample_feeds`.
        device: where both run. Defaults to "cpu".
        half_io: float16 outputs stand for float32 ones (``--fp16-io``). Defaults to False.

    Raises:
        AsrError: one line, saying what differs; nothing is to be written.
    """
    expected = _run(dense, feeds, "the input model", device)
    got = _run(model, feeds, "the channel-pruned model", device)
    if [n for n, _ in got] != [n for n, _ in expected]:
        raise AsrError(f"the channel-pruned model's outputs {[n for n, _ in got]} are not the input model's "
                       f"{[n for n, _ in expected]}; nothing was written")
    for (name, want), (_, have) in zip(expected, got):
        dtype = np.dtype(np.float16) if half_io and want.dtype.kind == "f" else want.dtype
        if have.dtype != dtype and have.dtype != want.dtype:
            raise AsrError(f"the channel-pruned model's output {name} is {have.dtype}, the input model's "
                           f"{want.dtype}; nothing was written")
        if have.shape != want.shape:
            raise AsrError(f"the channel-pruned model's output {name} has shape {have.shape} on {_count(feeds)} "
                           f"calibration samples, the input model's {want.shape}; nothing was written")
        if want.dtype.kind == "f" and not np.isfinite(have[np.isfinite(want)]).all():
            raise AsrError(f"the channel-pruned model's output {name} is not finite where the input model's is; "
                           "nothing was written")


def check_shrunk(masked, shrunk, feeds: dict, *, device: str = "cpu") -> None:
    """Refuses a shrunk model that does not compute what its masked model computes on ``feeds``.

    Raises:
        AsrError: an output differs by more than AGREE_REL (relative L2), or fails to run.
    """
    expected = _run(masked, feeds, "the masked model", device)
    got = _run(shrunk, feeds, "the channel-pruned model", device)
    for (name, want), (_, have) in zip(expected, got):
        if have.shape != want.shape:
            raise AsrError(f"channel surgery changed the shape of output {name} from {want.shape} to {have.shape}")
        if want.dtype.kind != "f":
            same = np.array_equal(have, want)
        else:
            a, b = np.asarray(want, np.float64), np.asarray(have, np.float64)
            finite = np.isfinite(a)
            same = np.array_equal(finite, np.isfinite(b)) and bool(
                np.linalg.norm(a[finite] - b[finite]) <= AGREE_REL * np.linalg.norm(a[finite]) + 1e-6 * finite.sum()**.5)
        if not same:
            raise AsrError(f"channel surgery changed what the model computes (output {name} differs from the "
                           "masked model's on calibration samples); nothing was written")


def _count(feeds: dict) -> int:
    return len(next(iter(feeds.values()))) if feeds else 0
