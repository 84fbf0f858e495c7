"""onnxruntime sessions: provider choice and session creation."""

from __future__ import annotations

import contextlib
import io
import re
import sys
import tempfile
import warnings
from pathlib import Path

from .errors import AsrError

DEVICES = ("auto", "cpu", "cuda")
LOG_SEVERITY = 3  # onnxruntime logs errors only: its warnings would precede our one error line
#: onnxruntime's WeightBiasQuantization quantizes a float weight between a DequantizeLinear and a QuantizeLinear
#: (8-bit, one scale per tensor): a QDQ model whose weights a repair holds in float (asr_onnx.quantize_correct)
#: would not compute what it stands for. It changes nothing in a float model or a model with quantized weights.
DISABLED_OPTIMIZERS = ["WeightBiasQuantization"]


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


def make_session(model, device: str = "auto", threads: int = 0, mem_pattern: bool = True, optimize: bool = True):
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
            off. Defaults to True.
    """
    import onnx
    import onnxruntime as ort

    from .modelio import is_large, write_external

    ort.set_default_logger_severity(LOG_SEVERITY)  # the process-wide log, which some warnings bypass the session's for
    options = ort.SessionOptions()
    options.log_severity_level = LOG_SEVERITY
    if threads:
        options.intra_op_num_threads = threads
    options.enable_mem_pattern = mem_pattern
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if isinstance(model, onnx.ModelProto) and is_large(model):
        with tempfile.TemporaryDirectory(prefix="asr-onnx.") as folder:
            write_external(model, Path(folder) / "model.onnx")
            return make_session(Path(folder) / "model.onnx", device, threads, mem_pattern, optimize)
    if isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    wanted = providers(device)
    with contextlib.redirect_stdout(io.StringIO()) as printed:  # onnxruntime prints its fallback to the CPU
        try:
            session = ort.InferenceSession(model if isinstance(model, bytes) else str(model), options,
                                           providers=wanted, disabled_optimizers=DISABLED_OPTIMIZERS)
        except Exception as e:  # an unknown op, a bad graph: one line, for every caller
            raise load_error(e) from None
    if provider_of(session) == wanted[0] and printed.getvalue():
        with contextlib.suppress(OSError, AttributeError):  # a closed stdout (None) or /dev/full is no session error
            sys.stdout.write(printed.getvalue())
    return check_provider(session, wanted[0], device, fallback_cause(printed.getvalue()))


def load_error(e: Exception, what: str = "the model") -> AsrError:
    """The one-line error for a failure while a session was being made: onnxruntime's own errors say
    that onnxruntime cannot load ``what``; anything else says what really failed."""
    from .errors import first_line

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
    grows the process beyond what either needs alone (about 0.1 GB on a 224x224 ResNet-50).
    """
    import ctypes
    import gc

    gc.collect()
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
