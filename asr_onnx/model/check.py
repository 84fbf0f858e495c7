"""The output check: a model passes onnx.checker and loads in onnxruntime (a session, no run)."""

from __future__ import annotations

from pathlib import Path

import onnx

from asr_onnx.errors import AsrError, first_line
from asr_onnx.model.files import is_large, write_external
from asr_onnx.model.session import load_error, make_session


def check_output(model) -> None:
    """Runs onnx.checker and loads the model in onnxruntime (a ModelProto, or a path for large models).

    Raises:
        AsrError: either check fails.
    """
    if isinstance(model, onnx.ModelProto) and is_large(model):
        from asr_onnx.tempdirs import temporary_folder

        with temporary_folder("check") as folder:
            write_external(model, Path(folder) / "model.onnx")
            return check_output(Path(folder) / "model.onnx")
    try:
        onnx.checker.check_model(str(model) if isinstance(model, Path) else model)
    except Exception as e:
        raise AsrError(f"the output model fails onnx.checker: {first_line(e)}") from None
    try:  # loading is the check; optimising the graph for a run that never happens is not
        make_session(model, device="cpu", optimize=False)
    except Exception as e:
        raise load_error(e, "the output model") from None

