"""onnxruntime sessions: provider choice, session creation, and the one loop that runs a model over data.

Every stage that runs a model over calibration or evaluation data does it here: a :class:`Runner` holds the
session (onnxruntime's load and run errors become one line; the C heap is trimmed when it closes) and
:func:`batches` walks the data (a fixed-batch model skips the last partial batch, and says so when no batch
is left; progress shows on a TTY). Only ``bench`` (its own timed sessions) and the output check make
sessions elsewhere.
"""

from __future__ import annotations

import contextlib
import io
import re
import sys
import warnings
from pathlib import Path

import numpy as np

from asr_onnx.errors import AsrError, first_line
from asr_onnx.progress import bar

DEVICES = ("auto", "cpu", "cuda")
LOG_SEVERITY = 4  # onnxruntime logs only fatal errors: its warnings and errors (an allocation that failed) would
# surround our one error line, which says the same from the exception
#: onnxruntime's WeightBiasQuantization quantizes a float weight between a DequantizeLinear and a QuantizeLinear
#: (8-bit, one scale per tensor): a QDQ model whose weights a repair holds in float (asr_onnx.model.qdq) would not
#: compute what it stands for. It changes nothing in a float model or a model with quantized weights.
DISABLED_OPTIMIZERS = ["WeightBiasQuantization"]


FLOAT_TYPES = {"tensor(float16)": np.float16, "tensor(float)": np.float32, "tensor(double)": np.float64}


def providers(device: str = "auto") -> list[str]:
    """The execution providers for a device.

    Args:
        device: "auto" (CUDA when onnxruntime offers it, else CPU), "cpu" or "cuda". Defaults to "auto".

    Raises:
        AsrError: "cuda" was asked for and onnxruntime has no CUDAExecutionProvider.
    """
    import onnxruntime as ort

    if device not in DEVICES:
        raise AsrError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    available = ort.get_available_providers()
    has_cuda = "CUDAExecutionProvider" in available
    if device == "cuda" and not has_cuda:
        raise AsrError("--device cuda: this onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)")
    if device == "auto" and not has_cuda and _cuda_device_visible():
        warnings.warn("a CUDA device is visible but onnxruntime has no CUDAExecutionProvider; using the CPU", stacklevel=2)
    if device != "cpu" and has_cuda:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _cuda_device_visible() -> bool:
    import os

    return os.path.exists("/dev/nvidia0")


def make_session(model, device: str = "auto", threads: int = 0, mem_pattern: bool = True, optimize: bool = True,
                 what: str = "the model"):
    """An InferenceSession over a ModelProto, serialized bytes or a path.

    A ModelProto over 2 GB cannot be serialized, so it is written with external data to a temporary
    folder and opened by path (onnxruntime reads the weights while the session is created).

    Args:
        model: onnx.ModelProto, bytes, or a file path.
        device: see :func:`providers`. Defaults to "auto".
        threads: intra-op threads; 0 lets onnxruntime choose. Defaults to 0.
        mem_pattern: onnxruntime's memory pattern. Statistics sessions turn it off: from the second
            batch on it allocates one more block beside the arena, up to 0.9 GB on a 224x224 ResNet-50,
            for no measurable speed. Defaults to True.
        optimize: onnxruntime's graph optimisations; a session that only checks a model turns them
            off, and so does one that runs a QDQ model's arithmetic in float. Defaults to True.
        what: what a load error calls the model. Defaults to "the model".
    """
    import onnx
    import onnxruntime as ort

    from asr_onnx.model.files import is_large, write_external

    ort.set_default_logger_severity(LOG_SEVERITY)  # the process-wide log, which some warnings bypass the session's for
    options = ort.SessionOptions()
    options.log_severity_level = LOG_SEVERITY
    if threads:
        options.intra_op_num_threads = threads
    options.enable_mem_pattern = mem_pattern
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if isinstance(model, onnx.ModelProto) and is_large(model):
        from asr_onnx.tempdirs import temporary_folder

        with temporary_folder("model") as folder:
            write_external(model, Path(folder) / "model.onnx")
            return make_session(Path(folder) / "model.onnx", device, threads, mem_pattern, optimize, what)
    if isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    wanted = providers(device)
    with contextlib.redirect_stdout(io.StringIO()) as printed:  # onnxruntime prints its fallback to the CPU
        try:
            session = ort.InferenceSession(model if isinstance(model, bytes) else str(model), options,
                                           providers=wanted, disabled_optimizers=DISABLED_OPTIMIZERS)
        except Exception as e:  # an unknown op, a bad graph: one line, for every caller
            raise load_error(e, what) from None
    if provider_of(session) == wanted[0] and printed.getvalue():
        with contextlib.suppress(OSError, AttributeError):  # a closed stdout (None) or /dev/full is no session error
            sys.stdout.write(printed.getvalue())
    return check_provider(session, wanted[0], device, fallback_cause(printed.getvalue()))


def load_error(e: Exception, what: str = "the model") -> AsrError:
    """The one-line error for a failure while a session was being made: onnxruntime's own errors say
    that onnxruntime cannot load ``what``; anything else says what really failed."""
    if isinstance(e, AsrError):
        return e
    if type(e).__module__.startswith("onnxruntime"):
        return AsrError(f"onnxruntime cannot load {what}: {first_line(e)}")
    return AsrError(f"cannot start an onnxruntime session for {what}: {type(e).__name__}: {first_line(e)}")


def fallback_cause(printed: str) -> str:
    """The reason in onnxruntime's "EP Error ... Falling back" printout, without its C++ source location."""
    found = re.search(r"EP Error (.*?)(?: when using |\n|$)", printed)
    if not found:
        return ""
    failure = re.search(r"(?:CUDA|CUDNN|CUBLAS) failure \d+: [^;]*", found.group(1))
    return (failure.group(0) if failure else found.group(1)).strip()[:200]


def check_provider(session, wanted: str, device: str = "auto", cause: str = ""):
    """The session, once it is known to run on ``wanted``.

    onnxruntime-gpu lists CUDAExecutionProvider even when the CUDA or cuDNN libraries cannot be loaded
    or no GPU is visible, and then runs on the CPU.

    Args:
        cause: onnxruntime's own reason, when it gave one (see :func:`fallback_cause`). Defaults to "".

    Raises:
        AsrError: ``device`` is "cuda" and the session did not start on CUDA (under "auto": a warning).
    """
    got = provider_of(session)
    if got == wanted:
        return session
    hint = f"({cause})" if cause else ("(are the CUDA and cuDNN libraries that this onnxruntime-gpu was built "
                                       "for on the library path?)")
    message = f"onnxruntime could not start {wanted} and runs on {got} {hint}"
    if device == "cuda":
        raise AsrError(f"--device cuda: {message}")
    warnings.warn(message, stacklevel=2)
    return session


def release_memory() -> None:
    """Hands the C heap's free pages back to the OS after a session is gone (glibc; elsewhere nothing).

    A finished session frees its arena into the heap, where glibc keeps it, and the next session then
    grows the process beyond what either needs alone (about 0.1 GB on a 224x224 ResNet-50). The session is
    gone once :meth:`Runner.close` drops it (no cycle holds it), so no ``gc.collect`` runs here: a full
    collection per closed session cost two thirds of the guard's tests in a pytest process (24.0 s against
    7.9 s), and the default repair's peak memory is the same without it (resnet50s_bn, 4,096 images: 1.52x a
    plain pass against 1.47-1.55x).
    """
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def provider_of(session) -> str:
    return session.get_providers()[0]


def runner(session, io_binding: bool | None = None):
    """A ``run(names, feed)`` for the session.

    On CUDA it uses IO binding: each input is copied to the device once and only the requested
    (small) outputs come back to the host.

    Args:
        session: an InferenceSession.
        io_binding: force IO binding on or off; None uses it on CUDA only. Defaults to None.
    """
    if io_binding is None:
        io_binding = provider_of(session) == "CUDAExecutionProvider"
    if not io_binding:
        return session.run

    def run(names, feed):
        binding = session.io_binding()
        for name, value in feed.items():
            binding.bind_cpu_input(name, value)
        for name in names:
            binding.bind_output(name, "cpu")
        session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()

    return run


class Runner:
    """One onnxruntime session over a model, run with its errors translated; closed (and the C heap trimmed)
    when its ``with`` block ends.

    Args:
        model: onnx.ModelProto, bytes or a path.
        device, threads, mem_pattern, optimize: as for :func:`make_session`. Defaults to "auto", 0, True and True.
        what: what a load error calls the model. Defaults to "the model".
        on: what a run error says failed. Defaults to "a calibration batch".
        io_binding: as for :func:`runner`. Defaults to None (on CUDA only).
        stoppable: run in a worker thread that a signal stops between two nodes
            (:func:`asr_onnx.model.stoppable.run`), for runs long enough to hold a signal back. Defaults to False.
    """

    def __init__(self, model, *, device: str = "auto", threads: int = 0, mem_pattern: bool = True,
                 what: str = "the model", on: str = "a calibration batch", io_binding: bool | None = None,
                 stoppable: bool = False, optimize: bool = True):
        self.session = make_session(model, device, threads, mem_pattern=mem_pattern, optimize=optimize, what=what)
        self.inputs = self.session.get_inputs()
        # float feeds take the float type of the input (float32 data into a --fp16-io model's float16 inputs)
        self._floats = {i.name: FLOAT_TYPES[i.type] for i in self.inputs if i.type in FLOAT_TYPES}
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.provider = provider_of(self.session)
        self.on, self._run = on, runner(self.session, io_binding)
        if stoppable and self._run == self.session.run:
            from asr_onnx.model import stoppable as stop

            session = self.session
            self._run = lambda names, feed: stop.run(session, names, feed)

    def run(self, names: list[str] | None, feed: dict) -> dict:
        """Output name -> value for ``names`` (None: every output) on ``feed``.

        Raises:
            AsrError: onnxruntime failed on the feed (one line).
        """
        names = self.output_names if names is None else names
        feed = {name: value.astype(self._floats[name]) if name in self._floats and isinstance(value, np.ndarray)
                and value.dtype.kind == "f" and value.dtype != self._floats[name] else value
                for name, value in feed.items()}
        try:
            return dict(zip(names, self._run(names, feed)))
        except Exception as e:  # noqa: BLE001 - onnxruntime's own errors: a shape it cannot take, memory
            # (a KeyboardInterrupt from a signal is no Exception: it goes on)
            raise AsrError(f"onnxruntime failed on {self.on}: {first_line(e)}") from None

    def close(self) -> None:
        self.session = self._run = None
        release_memory()

    def __enter__(self) -> "Runner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def batches(data, batch_size: int, *, fixed: int | None = None, desc: str | None = None, progress: bool = False,
            total: int | None = None):
    """The one batch loop: ``(first sample index, feed)`` for each batch of ``data`` that the model can take.

    Args:
        data: anything with ``batches(batch_size)`` and ``len`` (a calib.CalibSet), or an iterable of feeds.
        batch_size: samples per batch.
        fixed: the model's fixed batch: a batch of any other size (the last, partial one) is skipped.
            Defaults to None.
        desc: the progress bar's label; None shows none. Defaults to None.
        progress: show the bar (on a TTY only). Defaults to False.
        total: the batches to expect, for the bar. Defaults to None: len(data) / batch_size.

    Raises:
        AsrError: ``fixed`` and no batch of that size came (checked once the data ran out).
    """
    feeds = data.batches(batch_size) if hasattr(data, "batches") else data
    if total is None and hasattr(data, "__len__"):
        total = -(-len(data) // batch_size) if hasattr(data, "batches") else len(data)
    start, yielded = 0, False
    for feed in bar(feeds, total=total, desc=desc or "", enabled=progress and desc is not None):
        samples = len(next(iter(feed.values())))
        if fixed and samples != fixed:
            continue  # a model with a fixed batch cannot take the last partial batch; the sums do not need it
        yield start, feed
        start, yielded = start + samples, True
    if fixed and not yielded:
        raise AsrError(f"the calibration set has no full batch of {fixed} samples, the model's fixed batch size")
