"""What was tried around the OBS masks (issue 28), on held-out training images only (never the test set).

Every run prunes a sample model with LAMP's budget, chooses the masks by OBS in the least-squares refit, recalibrates
BN exactly with the head correction (the CLI's default, without the guard), and scores top-1 on 2,000 training
images disjoint from the 1,024 calibration images (``reconstruct_table.data_sets``). One JSON line per run:

* ``block``: the OBS mask's block of columns (each block drops its share of the layer's count, as in SparseGPT).
  The rows with ``"spread": "ahead"`` in results/obs_tries.json were run at commit 0491f17, whose
  ``asr_onnx.refit.obs.SPREAD = "ahead"`` let each block drop those of its weights among the cheapest of all
  the columns not taken yet; it lost and is gone;
* ``depthwise``: MobileNetV2's depthwise convs left dense, the same total count of zeros taken from the others;
* ``equal-error``: per-layer sparsities from each layer's OBS + refit error curve on the dense network's inputs,
  chosen so that every layer has the same relative output error under the global budget (instead of LAMP's).

    python benchmarks/obs_tries.py block resnet50s_bn:0.95,mobilenetv2:0.9 --blocks 4,8,16
    python benchmarks/obs_tries.py depthwise mobilenetv2_bn:0.9
    python benchmarks/obs_tries.py equal-error resnet50s_bn:0.9
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from reconstruct_table import data_sets  # noqa: E402

LEVELS = np.array([0, .3, .5, .6, .7, .8, .85, .9, .93, .95, .97, .98, .99])


def repaired(proto, calib, held, sparsity: float, masks=None, block: int | None = None) -> float:
    """Held-out top-1 of the default repair; ``masks``: the pruned weights per layer to start from instead;
    ``block``: the OBS mask's block of columns instead of the default."""
    from dataclasses import replace

    from asr_onnx.model.graph import find_layers, to_graph, to_model
    from asr_onnx.pipeline.driver import Repair
    from asr_onnx.verify.evaluation import evaluate

    job = Repair(proto, device="cpu", batch_size=64, progress=False).prune(sparsity, allocation="lamp", score="obs")
    if block is not None:
        job.mask_rules = [rule and replace(rule, block=block) for rule in job.mask_rules]
    if masks is not None:
        graph = to_graph(proto)
        for layer, keep in zip(find_layers(graph), masks):
            layer.weight.values = np.where(keep, layer.weight.values, 0).astype(layer.weight.values.dtype)
        job.pruned = job.pruned_alone = to_model(graph, proto)
    job.run(calib, "bn", reconstruct="ls")
    return evaluate(job.output, held, reference=proto, device="cpu", progress=False)["top1"]


def block(proto, calib, held, sparsity, args) -> list[dict]:
    rows = []
    for size in map(int, args.blocks.split(",")):
        rows.append({"block": size, "spread": "uniform", "top1": repaired(proto, calib, held, sparsity, block=size)})
    return rows


def depthwise(proto, calib, held, sparsity, args) -> list[dict]:
    from asr_onnx.model.graph import find_layers, to_graph
    from asr_onnx.prune.masks import lamp_masks

    layers = find_layers(to_graph(proto))
    total = sum(layer.weight.values.size for layer in layers)
    rest = [layer for layer in layers if not layer.depthwise]
    share = sum(layer.weight.values.size for layer in rest) / total
    if sparsity / share >= 1:
        return [{"depthwise_share": round(1 - share, 4), "top1": None, "why": "the others cannot hold the count"}]
    kept = iter(lamp_masks([layer.weight.values for layer in rest], sparsity / share))
    masks = [np.ones(layer.weight.shape, bool) if layer.depthwise else next(kept) for layer in layers]
    return [{"depthwise_share": round(1 - share, 4), "others_sparsity": round(sparsity / share, 4),
             "top1": repaired(proto, calib, held, sparsity, masks)}]


def equal_error(proto, calib, held, sparsity, args) -> list[dict]:
    from asr_onnx.model.graph import find_layers, to_graph
    from asr_onnx.prune.masks import uniform_mask
    from asr_onnx.refit.gram import accumulate, weight_rows
    from asr_onnx.refit.obs import MaskRule
    from asr_onnx.refit.reconstruct import refit_rows

    layers = find_layers(to_graph(proto))
    grams, _ = accumulate(proto, proto, list(range(len(layers))), calib, batch_size=64, device="cpu")
    curves = []
    for layer, gram in zip(layers, grams):
        rows = weight_rows(layer, layer.weight.values).astype(np.float64)
        errors = [refit_rows(rows, weight_rows(layer, uniform_mask(layer.weight.values, s)), gram, rule=MaskRule(),
                             with_cond=False)[1]["err_after"] ** 2 for s in LEVELS]
        curves.append(np.maximum.accumulate(errors))
    sizes = np.array([layer.weight.values.size for layer in layers], float)

    def at(tau: float) -> np.ndarray:  # per layer, the largest sparsity whose relative error stays under tau
        return np.array([np.interp(tau, e, LEVELS) if tau < e[-1] else LEVELS[-1] for e in curves])

    low, high = 0.0, max(e[-1] for e in curves)
    for _ in range(100):
        tau = (low + high) / 2
        if at(tau) @ sizes < sparsity * sizes.sum():
            low = tau
        else:
            high = tau
    chosen = at(high)
    masks = [uniform_mask(layer.weight.values, s) for layer, s in zip(layers, chosen)]
    return [{"per_layer": np.round(chosen, 3).tolist(), "top1": repaired(proto, calib, held, sparsity, masks)}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("try_", choices=("block", "depthwise", "equal-error"), metavar="TRY")
    parser.add_argument("cells", help="MODEL:SPARSITY, comma-separated")
    parser.add_argument("--blocks", default="8")
    args = parser.parse_args()
    run = {"block": block, "depthwise": depthwise, "equal-error": equal_error}[args.try_]
    from asr_onnx.model.files import load_model

    split = argparse.Namespace(calib_size=1024, seed=0, eval="heldout", eval_size=2000)
    for cell in args.cells.split(","):
        name, sparsity = cell.split(":")
        proto = load_model(HERE.parent / "sample_models" / f"{name}.onnx")
        calib, held = data_sets(proto, split)
        for row in run(proto, calib, held, float(sparsity), args):
            print(json.dumps({"try": args.try_, "model": name, "cell": sparsity, **row}), flush=True)


if __name__ == "__main__":
    main()
