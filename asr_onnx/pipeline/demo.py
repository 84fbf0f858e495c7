"""The bundled demo: the sample models with their calibration and test images, and how to load them.

A wheel carries the ResNet-20 sample (BN kept), its 512 calibration images and 2,000 test images as package
data in ``asr_onnx/samples`` (copied there from the source tree's ``sample_models/``, see pyproject.toml);
they are found through importlib.resources. In the source tree, ``sample_models/`` beside the package has
every sample model.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from asr_onnx.errors import AsrError

SAMPLES = "samples"  # the package-data folder, inside asr_onnx, of an installed wheel
DEFAULT_MODEL = "resnet20_bn"


def sample_folder(folder=None) -> Path:
    """The folder of sample models and data: ``folder`` when given; else the one installed with the package,
    else the source tree's ``sample_models/``.

    Raises:
        AsrError: the folder holds no sample data (``data/eval.npz``).
    """
    package = Path(str(files("asr_onnx")))
    candidates = [Path(folder)] if folder else [package / SAMPLES, package.parent / "sample_models"]
    for candidate in candidates:
        if (candidate / "data" / "eval.npz").is_file():
            return candidate
    raise AsrError("sample models not found: pass --models-dir")


def load_demo(model: str = DEFAULT_MODEL, folder=None, eval_size: int | None = None):
    """A sample model with its bundled calibration and test sets, preprocessed as its metadata says.

    Args:
        model: the sample's name (``resnet20_bn``; in the source tree also resnet20, resnet50s, vgg_bn,
            mobilenetv2, with ``_bn`` for BN kept). Defaults to "resnet20_bn".
        folder: the folder of samples. Defaults to None (see :func:`sample_folder`).
        eval_size: keep the first N test images. Defaults to None (all 2,000).

    Returns:
        (onnx.ModelProto, calibration CalibSet, evaluation CalibSet).

    Raises:
        AsrError: no such sample model, or no sample folder.
    """
    from asr_onnx.calib import load_calib
    from asr_onnx.model.files import load_model

    root = sample_folder(folder)
    path = root / f"{model}.onnx"
    if not path.exists():
        raise AsrError(f"no sample model {model!r} in {root}")
    proto = load_model(path)
    calib = load_calib(root / "data" / "calib", proto)
    eval_data = load_calib(root / "data" / "eval.npz", proto)
    return proto, calib, eval_data.take(eval_size) if eval_size else eval_data


def default_repair(model, calib, eval_data, sparsity: float, pattern: str, device: str = "auto"):
    """`asr-onnx repair`'s default on ``model``: LAMP (for a global pattern), the least-squares refit with OBS masks,
    exact BN recalibration with the head correction, and the guard; scored on ``eval_data``.

    Returns:
        (the finished, evaluated Repair, the repair's seconds without the evaluation).
    """
    import time

    from asr_onnx.pipeline.defaults import resolved_defaults
    from asr_onnx.pipeline.driver import Repair
    from asr_onnx.pipeline.recipe import Recipe

    _, allocation, score, reconstruct = resolved_defaults(pattern, "bn", str(sparsity), None, None, None, True)
    start = time.perf_counter()
    job = Repair(model, device=device, progress=False)
    job.prune(sparsity, pattern, allocation=allocation or "global", score=score)
    job.run(calib, recipe=Recipe(method="bn", reconstruct=reconstruct, guard="fallback"))
    seconds = time.perf_counter() - start
    return job.evaluate(eval_data), seconds
