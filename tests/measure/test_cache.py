"""The statistics cache: hits, misses and invalidation, from the API and the CLI."""

import numpy as np
import onnx
import pytest
from zoo import conv_net, random_inputs

from asr_onnx.cli.main import main
from asr_onnx.errors import AsrError
from asr_onnx.measure.cache import load_stats, save_stats, stats_key
from asr_onnx.pipeline.driver import Repair


def test_stats_cache_hit_miss_and_invalidation(calib_and_eval, tmp_path):
    calib, _ = calib_and_eval
    model = conv_net(bn=True)
    job = Repair(model, device="cpu", batch_size=16, progress=False).prune(0.5).measure(calib)
    path = save_stats(tmp_path / "stats.npz", job.measurement.dense, stats_key(model, calib))
    loaded = load_stats(path, stats_key(model, calib))  # hit
    for key, stats in job.measurement.dense.items():
        np.testing.assert_array_equal(loaded[key].m2, stats.m2)
    again = Repair(model, device="cpu", batch_size=16, progress=False).prune(0.5).measure(calib, loaded)
    assert again.measurement.dense is loaded  # used as given, not measured again
    for key in job.measurement.pruned:
        np.testing.assert_allclose(again.measurement.pruned[key][0].mean, job.measurement.pruned[key][0].mean)
    changed = conv_net(bn=True, seed=1)  # another model: a miss
    with pytest.raises(AsrError, match="another model"):
        load_stats(path, stats_key(changed, calib))
    with pytest.raises(AsrError, match="another model"):
        load_stats(path, stats_key(model, calib.take(32)))  # other data


def test_stats_cli_roundtrip_and_stale_cache(tmp_path, capsys):
    model, calib = tmp_path / "m.onnx", tmp_path / "calib"
    onnx.save(conv_net(bn=False), model)
    calib.mkdir()
    np.save(calib / "x.npy", random_inputs(32))
    stats = tmp_path / "s.npz"
    assert main(["stats", str(model), "--calib", str(calib), "-o", str(stats), "--batch-size", "16", "-q"]) == 0
    out = tmp_path / "o.onnx"
    assert main(["repair", str(model), "--calib", str(calib), "--stats", str(stats), "-o", str(out),
                 "--batch-size", "16", "-q"]) == 0
    onnx.save(conv_net(bn=False, seed=3), model)  # the model changed under the cache
    assert main(["repair", str(model), "--calib", str(calib), "--stats", str(stats), "-o", str(out),
                 "--batch-size", "16", "-q", "--overwrite"]) == 1
    assert "another model" in capsys.readouterr().err
