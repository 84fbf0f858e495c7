"""Issue 33: engines. Shards are cut at batch boundaries and joined in shard order, so a sharded pass gives the
single-process statistics; a repair on a local Ray cluster gives the local model; a worker that dies is replaced
and its shard rerun; without Ray, ``--engine ray`` is one error line naming the extra."""

from __future__ import annotations

import os
import sys

import numpy as np
import onnx
import pytest
from zoo import conv_net

from asr_onnx.calib import load_calib
from asr_onnx.calib.specs import input_specs
from asr_onnx.measure.passes import measure
from asr_onnx.measure.stats import ChannelStats, GramStats, merge_all
from asr_onnx.model.engine import shard_bounds
from asr_onnx.pipeline.driver import Repair


class InProcessShards:
    """A distributed engine without a cluster: every shard run in this process, finishing in reverse order,
    the results handed back in shard order as RayEngine hands them."""

    name, distributed = "in-process", True

    def __init__(self, shards: int):
        self.shards, self.passes, self.calls = shards, [], 0

    def map(self, run, calib, batch_size, desc="pass"):
        bounds = shard_bounds(len(calib), batch_size, self.shards)
        self.calls += 1
        done = {i: run(calib.slice(a, b)) for i, (a, b) in reversed(list(enumerate(bounds)))}
        return [done[i] for i in range(len(bounds))]

    def workers(self, samples=0, provider=""):
        return []


def calib_set(tmp_path, model, count=96, seed=3):
    x = np.random.default_rng(seed).normal(0, 1, (count, 3, 8, 8)).astype(np.float32)
    np.save(tmp_path / "calib.npy", x)
    return load_calib(tmp_path / "calib.npy", input_specs(model))


def test_shards_are_whole_batches_with_the_partial_one_last():
    assert shard_bounds(100, 16, 3) == [(0, 32), (32, 64), (64, 100)]
    assert shard_bounds(100, 16, 50) == [(0, 16), (16, 32), (32, 48), (48, 64), (64, 80), (80, 100)]
    assert shard_bounds(10, 16, 4) == [(0, 10)]  # no full batch: one shard, as one process reads it
    for samples, batch, shards in ((1024, 64, 4), (1000, 64, 3), (7, 2, 2)):
        bounds = shard_bounds(samples, batch, shards)
        assert bounds[0][0] == 0 and bounds[-1][1] == samples
        assert all(a % batch == 0 and b > a for a, b in bounds)
        assert all(b == c for (_, b), (c, _) in zip(bounds, bounds[1:]))


def test_joined_shards_merge_to_the_single_process_sums_exactly():
    """Per-batch ChannelStats joined in shard order are the single-process list, so Chan's merge of them is
    the same float64 numbers; GramStats merged batch by batch in that order likewise."""
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, (100, 5, 4, 4))
    batches = [ChannelStats.of(x[i:i + 16]) for i in range(0, 100, 16)]
    shards = [batches[a // 16:-(-b // 16)] for a, b in shard_bounds(100, 16, 3)]
    joined = [stats for shard in shards for stats in shard]
    whole, sharded = merge_all(batches), merge_all(joined)
    assert sharded.count == whole.count == 100 * 16
    assert np.array_equal(sharded.mean, whole.mean) and np.array_equal(sharded.m2, whole.m2)
    np.testing.assert_allclose(whole.mean, ChannelStats.of(x).mean, rtol=1e-12)

    rows, y = rng.normal(size=(100, 6)), rng.normal(size=(100, 3))
    grams = [GramStats.of(rows[i:i + 16], y[i:i + 16]) for i in range(0, 100, 16)]
    in_order = merge_all(grams)
    joined_grams = merge_all([g for a, b in shard_bounds(100, 16, 3) for g in grams[a // 16:-(-b // 16)]])
    assert np.array_equal(in_order.xtx, joined_grams.xtx) and np.array_equal(in_order.xty, joined_grams.xty)
    np.testing.assert_allclose(in_order.xtx[0], rows.T @ rows, rtol=1e-12)


def test_a_sharded_statistics_pass_is_the_single_process_pass(tmp_path):
    """Real onnxruntime sessions on a zoo graph: the sharded pass's per-batch statistics equal the single
    pass's bit for bit (the same thread count), and so does a whole repair."""
    model = conv_net(seed=1)
    calib = calib_set(tmp_path, model, count=100)
    local, _ = measure(model, calib, batch_size=16, device="cpu", progress=False, threads=1)
    engine = InProcessShards(3)
    sharded, _ = measure(model, calib, batch_size=16, device="cpu", progress=False, threads=1, engine=engine)
    assert engine.calls == 1 and sharded.keys() == local.keys()
    for key in local:
        assert len(sharded[key]) == len(local[key]) == 7
        for a, b in zip(sharded[key], local[key]):
            assert a.count == b.count and np.array_equal(a.mean, b.mean) and np.array_equal(a.m2, b.m2)

    def repaired(engine):
        job = Repair(model, device="cpu", batch_size=16, progress=False, threads=1, engine=engine)
        return job.prune(0.7).run(calib, guard="fallback").output

    engine = InProcessShards(2)
    one, two = repaired(None), repaired(engine)
    assert engine.calls >= 4  # the dense and pruned passes, and the guard's probes and scores
    for a, b in zip(one.graph.initializer, two.graph.initializer):
        assert np.array_equal(onnx.numpy_helper.to_array(a), onnx.numpy_helper.to_array(b)), a.name


def test_a_sharded_detector_evaluation_is_the_single_process_one(tmp_path):
    """Issue 29 on an engine: the shards score by one plan (decided on the whole set's first batch) and their
    per-sample scores and per-batch moments join in order, so every figure a sharded evaluation gives (detection
    counts and F1, the standardised error, the relative errors) is the single-process one, bit for bit; and a
    guard whose evaluations are sharded decides on the same held-out detection F1."""
    from zoo import ssd_detector

    from asr_onnx.verify.evaluation import evaluate

    dense, feeds = ssd_detector(n=70)
    np.save(tmp_path / "x.npy", feeds["input"])
    calib = load_calib(tmp_path / "x.npy", input_specs(dense))
    pruned = Repair(dense, device="cpu", progress=False).prune(0.6).pruned
    options = dict(reference=dense, batch_size=16, device="cpu", progress=False, per_sample=True)
    local = evaluate(pruned, calib, **options)
    engine = InProcessShards(3)
    sharded = evaluate(pruned, calib, engine=engine, **options)
    assert engine.calls == 1 and local["metric"] == "detection_f1" and local["detection"]["reference_detections"] > 0
    assert sharded.keys() == local.keys()
    for key in local:
        if key != "scores":
            assert np.array_equal(sharded[key], local[key]) if isinstance(local[key], np.ndarray) \
                else sharded[key] == local[key], key
    mine, theirs = sharded["scores"], local["scores"]
    assert np.array_equal(mine.counts, theirs.counts) and np.array_equal(mine.std_err2, theirs.std_err2)
    assert sharded["standardised_error"] == local["standardised_error"]

    def guarded(engine):
        job = Repair(dense, device="cpu", batch_size=16, progress=False, threads=1, engine=engine)
        return job.prune(0.6).run(calib, guard="fallback").settings["guard"]

    one, two = guarded(None), guarded(InProcessShards(2))
    assert one["metric"] == "detection_f1"
    assert {k: v for k, v in one.items() if k != "cost_s"} == {k: v for k, v in two.items() if k != "cost_s"}


def test_engine_ray_without_ray_is_one_error_line(tmp_path, monkeypatch, capsys):
    from asr_onnx.cli.main import main

    model = tmp_path / "m.onnx"
    onnx.save(conv_net(), model)
    calib_set(tmp_path, conv_net(), count=16)
    monkeypatch.setitem(sys.modules, "ray", None)  # as if the extra were not installed: import ray fails
    code = main(["repair", str(model), "--calib", str(tmp_path / "calib.npy"), "--engine", "ray", "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1
    assert err[0].startswith("error: ") and "asr-onnx[ray]" in err[0]
    assert not (tmp_path / "m.repaired.onnx").exists()


@pytest.fixture(scope="module")
def ray_engine():
    pytest.importorskip("ray", reason='the ray extra is not installed (pip install "asr-onnx[ray]")')
    from asr_onnx.model.engine import RayEngine

    engine = RayEngine(num_cpus=2, workers=2, device="cpu")
    yield engine
    engine.close()


def max_gap(a: onnx.ModelProto, b: onnx.ModelProto) -> float:
    """The largest difference of two models' weights, over each tensor's largest magnitude."""
    worst = 0.0
    for x, y in zip(a.graph.initializer, b.graph.initializer):
        u, v = onnx.numpy_helper.to_array(x), onnx.numpy_helper.to_array(y)
        worst = max(worst, float(np.abs(u - v).max() / max(np.abs(u).max(), 1e-30)))
    return worst


def test_a_repair_on_a_local_ray_cluster_is_the_local_repair(tmp_path, ray_engine):
    model = conv_net(seed=2)
    calib = calib_set(tmp_path, model, count=96)
    local = Repair(model, device="cpu", batch_size=16, progress=False).prune(0.7).run(calib, guard="fallback")
    job = Repair(model, device="cpu", batch_size=16, progress=False, engine=ray_engine)
    job.prune(0.7).run(calib, guard="fallback")
    assert max_gap(local.output, job.output) <= 1e-5
    report = job.report()
    assert report["engine"] == "ray" and len(report["workers"]) == 2
    assert sum(w["samples"] for w in report["workers"]) == 96
    assert all(w["device"] == "cpu" and w["host"] for w in report["workers"])
    assert {"dense", "pruned", "eval"} <= {p["pass"] for p in report["engine_passes"]}


def _dies_once(marker: str, run):
    """``run``, in a worker that kills itself the first time (mid-pass: its shard is not finished)."""
    def first_time_dies(shard):
        if not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(1)
        return run(shard)
    return first_time_dies


@pytest.mark.slow
def test_a_worker_killed_mid_pass_is_replaced_and_the_pass_unchanged(tmp_path, ray_engine):
    model = conv_net(seed=4)
    calib = calib_set(tmp_path, model, count=64)
    options = dict(batch_size=16, device="cpu", progress=False, threads=1)
    local, _ = measure(model, calib, **options)
    pids = ray_engine.pids()

    def pass_on(shard):
        return measure(model, shard, **options)[0]

    parts = ray_engine.map(_dies_once(str(tmp_path / "died"), pass_on), calib, 16, "dense")
    assert (tmp_path / "died").exists() and ray_engine.pids() != pids  # one actor was restarted
    for key in local:
        joined = [stats for part in parts for stats in part[key]]
        assert len(joined) == len(local[key])
        for a, b in zip(joined, local[key]):
            assert np.array_equal(a.mean, b.mean) and np.array_equal(a.m2, b.m2)
