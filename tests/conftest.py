import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from zoo import conv_net, random_inputs  # noqa: E402

from asr_onnx.calib import InputSpec, load_calib  # noqa: E402


@pytest.fixture
def bn_model(tmp_path):
    path = tmp_path / "bn.onnx"
    onnx.save(conv_net(bn=True), path)
    return path


@pytest.fixture
def folded_model(tmp_path):
    path = tmp_path / "folded.onnx"
    onnx.save(conv_net(bn=False), path)
    return path


@pytest.fixture
def calib_dir(tmp_path):
    folder = tmp_path / "calib"
    folder.mkdir()
    np.save(folder / "x.npy", random_inputs(48))
    return folder


@pytest.fixture
def calib_and_eval(tmp_path):
    """64 calibration samples and 40 labelled evaluation samples for conv_net's (N, 3, 8, 8) input."""
    specs = [InputSpec("input", ("N", 3, 8, 8), np.float32)]
    np.save(tmp_path / "calib.npy", random_inputs(64, seed=7))
    x = random_inputs(40, seed=8)
    np.savez(tmp_path / "eval.npz", x=x, y=np.arange(40) % 10)
    return load_calib(tmp_path / "calib.npy", specs), load_calib(tmp_path / "eval.npz", specs)
