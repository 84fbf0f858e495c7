"""The refit's host solves under numpy's BLAS threads: the stage split of one default repair (LAMP, OBS masks,
refit, exact BN) of resnet20_bn at 0.9 on 1,024 training images, with the guard off and on. Run it twice, with
and without ``OMP_NUM_THREADS=1``, on a machine where other jobs hold the cores, and on a quiet one:

    OMP_NUM_THREADS=1 python benchmarks/refit_threads.py obs,magnitude
    python benchmarks/refit_threads.py obs
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from reconstruct_table import data_sets  # noqa: E402


def main() -> None:
    from asr_onnx.model.files import load_model
    from asr_onnx.pipeline.driver import Repair
    from asr_onnx.pipeline.recipe import Recipe

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("scores", nargs="?", default="obs")
    args = parser.parse_args()
    proto = load_model(HERE.parent / "sample_models" / "resnet20_bn.onnx")
    calib, _ = data_sets(proto, argparse.Namespace(calib_size=1024, seed=0, eval="test", eval_size=10))
    for score in args.scores.split(","):
        for guard in ("off", "fallback"):
            job = Repair(proto, device="cpu", batch_size=64, progress=False).prune(0.9, allocation="lamp", score=score)
            job.run(calib, recipe=Recipe(method="bn", reconstruct="ls", guard=guard))
            split = {k: round(v, 2) for k, v in job.timings.items() if k.startswith("reconstruct")}
            print(f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')} score={score} guard={guard} {split}", flush=True)


if __name__ == "__main__":
    main()
