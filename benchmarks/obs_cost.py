"""What OBS masks add to one layer's refit solve, on the host (issue 28): seconds of ``refit_rows`` with the pruned
mask kept against the mask chosen again by OBS, for the 3x3 convs of a ResNet (C in and out channels, patch 9C),
at 90% LAMP-like sparsity and under 2:4. Random Gram sums of correlated patches; medians of ``--runs``.

    python benchmarks/obs_cost.py --channels 64,128,256 --runs 3
    python benchmarks/obs_cost.py --channels 512 --runs 1 --patterns 0.9
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def gram(channels: int, seed: int = 0):
    from asr_onnx.measure.stats import GramStats

    rng = np.random.default_rng(seed)
    d = 9 * channels
    mix = rng.normal(size=(d, d)) / np.sqrt(d)
    x = rng.normal(size=(4 * d, d)) @ mix
    w = rng.normal(size=(channels, d))
    return w, GramStats.of(x, x @ w.T)


def main() -> None:
    from asr_onnx.refit.obs import MaskRule
    from asr_onnx.refit.reconstruct import refit_rows

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--channels", default="64,128,256,512")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--patterns", default="0.9,2:4")
    args = parser.parse_args()
    print("| channels | patch | pattern | kept mask s | OBS mask s | ratio |\n|---|---|---|---|---|---|")
    for channels in map(int, args.channels.split(",")):
        w, sums = gram(channels)
        magnitude = np.abs(w) > np.quantile(np.abs(w), 0.9)
        nm = np.abs(w.reshape(channels, channels // 4, 4, 9))
        two_four = (nm >= np.sort(nm, axis=2)[:, :, 2:3]).reshape(channels, -1)
        for name, keep, rule in (("0.9", magnitude, MaskRule()), ("2:4", two_four, MaskRule((2, 4), 9))):
            if name not in args.patterns.split(","):
                continue
            times = {}
            for label, used in (("kept", None), ("obs", rule)):
                runs = []
                for _ in range(args.runs):
                    start = time.perf_counter()
                    refit_rows(w, keep, sums, with_cond=False, rule=used)
                    runs.append(time.perf_counter() - start)
                times[label] = statistics.median(runs)
            print(f"| {channels} | {9 * channels} | {name} | {times['kept']:.2f} | {times['obs']:.2f} | "
                  f"{times['obs'] / times['kept']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
