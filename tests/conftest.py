import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from models import conv_net, random_inputs  # noqa: E402


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
