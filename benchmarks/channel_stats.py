"""Per-channel damage after one-shot pruning: the statistics behind the paper table.

For each sample model and sparsity it measures, with the tool's own passes, every site's ratio of
pruned to reference variance r_i = v_p,i / v_ref,i (upstream sites renormalised), and prints:

- median r: how much variance a typical channel keeps;
- collapsed: the share of channels with r < 0.01 (the signal is mostly gone);
- spread: the mean over sites of the interquartile range of log10 r within a site, i.e. how unequal
  the damage is inside one layer (the paper's premise: channel-wise damage is heterogeneous);
- asr gives: the median over channels of ASR's log-gain as a share of the full restoration's log-gain
  (lambda = median), i.e. how much of the lost variance ASR gives back in a typical channel.

    python benchmarks/channel_stats.py > benchmarks/channel_stats.md
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def damage(job) -> dict:
    from asr_onnx.correct.gains import asr_gain, full_gain, shrink_lambda
    from asr_onnx.measure.stats import merge_all

    ratios, spreads, shrunk = [], [], []
    for key, ref in job.measurement.references.items():
        pruned = merge_all(job.measurement.pruned[key]).var
        ratio = (pruned + ref.eps) / (ref.var + ref.eps)
        ratios.append(ratio)
        q1, q3 = np.percentile(np.log10(ratio), [25, 75])
        spreads.append(q3 - q1)
        full = np.log(full_gain(ref.var, pruned, ref.eps))
        asr = np.log(asr_gain(ref.var, pruned, ref.eps, shrink_lambda("median", pruned, ref.eps)))
        lost = np.abs(full) > 1e-3  # channels that lost (or gained) variance at all
        shrunk.append(asr[lost] / full[lost])
    ratios, shrunk = np.concatenate(ratios), np.concatenate(shrunk)
    return {"median_r": float(np.median(ratios)), "collapsed": float(np.mean(ratios < 0.01)),
            "spread": float(np.mean(spreads)), "asr_gives": float(np.median(shrunk))}


def main() -> int:
    from asr_onnx.calib import Preprocess, input_specs, load_calib, metadata
    from asr_onnx.model.files import load_model
    from asr_onnx.pipeline.driver import Repair

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet20_bn,resnet20,resnet50s_bn,vgg_bn,mobilenetv2_bn")
    parser.add_argument("--cells", default="global:0.8,global:0.9,global:0.95,2:4:0")
    parser.add_argument("--calib", default=str(ROOT / "sample_models" / "data" / "calib"))
    args = parser.parse_args()
    print("| model | pattern | sparsity | median r | collapsed (r<0.01) | within-site spread (IQR log10 r) "
          "| ASR gives (median share of the log-gain) |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        path = ROOT / "sample_models" / f"{name}.onnx"
        if not path.exists():
            continue
        proto = load_model(path)
        calib = load_calib(args.calib, input_specs(proto), Preprocess.from_metadata(metadata(proto)))
        dense = None
        for cell in args.cells.split(","):
            pattern, _, sparsity = cell.rpartition(":")
            job = Repair(proto, device="cpu", progress=False).prune(float(sparsity), pattern)
            job.measure(calib, dense)
            dense = job.measurement.dense
            d = damage(job)
            shown = "-" if ":" in pattern else sparsity
            print(f"| {name} | {pattern} | {shown} | {d['median_r']:.3f} | {100 * d['collapsed']:.1f}% "
                  f"| {d['spread']:.2f} | {100 * d['asr_gives']:.0f}% |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
