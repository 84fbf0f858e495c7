"""Alternating allocation (issue 13), composed through the public API: prune with LAMP, refit, then move
kept weights towards the layers whose refit left the largest relative output error, prune again from the
dense weights with those per-layer counts (the same global count), and refit and correct again.

Each layer's kept count k becomes k (e / geometric mean of e) ** beta, rescaled to the same total and held
within [1, the layer's size], where e is its err_after. Evaluation as in reconstruct_table.py (held-out
training images by default); rows go to benchmarks/results/reconstruct_tries.json as allocation "lamp+alt".

    python benchmarks/alternate_allocation.py --models resnet50s --beta 0.5
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
from reconstruct_table import ROOT, data_sets


def reallocate(kept: np.ndarray, sizes: np.ndarray, errors: np.ndarray, beta: float) -> np.ndarray:
    """Integer kept counts, summing to ``kept.sum()``, each in [1, size], moved towards large ``errors``."""
    weight = kept * (errors / np.exp(np.mean(np.log(np.maximum(errors, 1e-12))))) ** beta
    total, new = int(kept.sum()), np.zeros_like(kept)
    free = np.ones(kept.size, bool)
    for _ in range(kept.size):  # clip at the bounds, then share the rest among the free layers
        share = (total - new[~free].sum()) * weight / weight[free].sum()
        new = np.where(free, np.clip(np.floor(share), 1, sizes), new).astype(np.int64)
        hit = free & ((share >= sizes) | (share <= 1))
        if not hit.any():
            break
        free &= ~hit
    rest = total - int(new.sum())  # the rounding remainder, one weight each to the largest shares
    order = np.argsort(-(np.where(free, weight, -np.inf)))
    for i in order[: abs(rest)]:
        new[i] += int(np.sign(rest))
    return new


def masked(pruned, dense, kept_counts, chosen):
    """``pruned`` with each chosen layer pruned again from its dense weight, its ``kept_counts`` largest |w| kept."""
    from asr_onnx.model.graph import find_layers, to_graph, to_model
    from asr_onnx.prune.masks import uniform_mask

    graph = to_graph(pruned)
    layers, dense_layers = find_layers(graph), find_layers(to_graph(dense))
    for i, kept in zip(chosen, kept_counts):
        values = dense_layers[i].weight.values
        drop = values.size - int(kept)
        layers[i].weight.values = np.where(uniform_mask(values, drop / values.size), values, 0).astype(values.dtype)
    return to_model(graph, pruned)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="mobilenetv2_bn,resnet50s,resnet20")
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--eval", choices=("test", "heldout"), default="heldout")
    parser.add_argument("--eval-size", type=int, default=2000)
    parser.add_argument("--calib-size", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "reconstruct_tries.json"))
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    from asr_onnx.model.files import load_model
    from asr_onnx.model.graph import find_layers, to_graph
    from asr_onnx.pipeline.driver import Repair
    from asr_onnx.verify.evaluation import evaluate

    out = Path(args.out)
    rows = json.loads(out.read_text())["rows"] if out.exists() else []
    for name in args.models.split(","):
        proto = load_model(ROOT / "sample_models" / f"{name}.onnx")
        calib, eval_data = data_sets(proto, args)
        dense = evaluate(proto, eval_data, device="cpu", progress=False)["top1"]
        start = time.perf_counter()
        first = Repair(proto, device="cpu", batch_size=64, progress=False, threads=args.threads)
        first.prune(args.sparsity, allocation="lamp").run(calib, "bn", reconstruct="ls")
        chosen = [i for i, (row, refit) in enumerate(zip(first.layers, first.refits)) if row.pruned and "err_after" in refit]
        sizes = np.array([int(np.prod(first.layers[i].shape)) for i in chosen])
        kept = np.array([round((1 - first.layers[i].sparsity) * s) for i, s in zip(chosen, sizes)])
        errors = np.array([first.refits[i]["err_after"] for i in chosen])
        new = reallocate(kept, sizes, errors, args.beta)
        second = Repair(proto, device="cpu", batch_size=64, progress=False, threads=args.threads)
        second.prune(args.sparsity, allocation="lamp")  # the settings and the layers not chosen, as before
        second.pruned = masked(second.pruned, proto, new, chosen)
        zeros = [int(np.count_nonzero(layer.weight.values == 0)) for layer in find_layers(to_graph(second.pruned))]
        assert sum(zeros) == sum(round(r.sparsity * np.prod(r.shape)) for r in second.layers), "the count moved"
        second.run(calib, "bn", reconstruct="ls")
        seconds = time.perf_counter() - start
        result = evaluate(second.output, eval_data, reference=proto, device="cpu", progress=False)
        first_top1 = evaluate(first.output, eval_data, reference=proto, device="cpu", progress=False)["top1"]
        row = dict(model=name, dense=dense, eval=args.eval, samples=len(eval_data), cell=str(args.sparsity),
                   allocation="lamp+alt", reconstruct="ls", score="magnitude", passes=0, rounds=1,
                   beta=args.beta, top1=result["top1"], agreement=result["agreement"], seconds=round(seconds, 1),
                   first_top1=first_top1, kept_before=kept.tolist(), kept_after=new.tolist(),
                   refit_err_after=[round(float(e), 4) for e in errors],
                   second_err_after=[round(second.refits[i]["err_after"], 4) for i in chosen])
        print(f"{name}: dense {dense:.4f}; lamp+ls {first_top1:.4f}; alternated (beta {args.beta}) {row['top1']:.4f} "
              f"({row['seconds']} s for both)", flush=True)
        rows = [r for r in rows if (r["model"], r["cell"], r["allocation"], r.get("beta")) !=
                (name, row["cell"], "lamp+alt", args.beta)] + [row]
        out.write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
