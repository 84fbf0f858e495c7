"""A real detector, scored on its detections (issue 29): the Ultralytics YOLOv8n (320x320, 18 classes, output
(N, 22, 2100)) inside the nudenet wheel, pruned at 0.5, 0.8, 0.9 and 2:4.

For every cell: the detection F1 against the dense model's detections (score >= 0.25, per-class NMS at IoU
0.45, matched per class at IoU 0.5; asr_onnx.verify.detection) on held-out evaluation images, of pruning
alone, of the default repair (bn) and of the least-squares refit (--reconstruct ls, then bn); for each repair the guard's
held-out detection F1 of the repair and of pruning alone on the calibration images (2 folds), what
``--guard fallback`` ships, and the verdict on what it ships (usable / degraded / broken) from the evaluation
images. The raw relative L2 error and the standardised error of the repair are printed beside, to show what
they miss.

Images (no training data of this model is at hand, and none is downloaded): the photos shipped in
scikit-image's data module (astronaut, coffee, chelsea the cat, a rocket, motorcycles, ...) and matplotlib's
Grace Hopper, as random crops letterboxed to 320x320, and mosaics of 4x4 faces from scikit-image's LFW subset
(the model's face classes are what these photos hold most). Calibration and evaluation: different crops and
different people (LFW faces 0-49 against 50-99).

    pip download --no-deps -d /tmp/wheels nudenet && unzip -o -d /tmp/nudenet /tmp/wheels/nudenet-*.whl
    OMP_NUM_THREADS=1 python benchmarks/detection_real.py --model /tmp/nudenet/nudenet/320n.onnx \\
        [--photos DIR_OF_SKIMAGE_DATA]

The model is never committed (licence); benchmarks/results/detection_yolov8n.json holds the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
SIZE = 320
CELLS = ("0.5", "0.8", "0.9", "2:4")


def data_folder(folder: Path | None) -> Path:
    """``folder``, or the installed scikit-image's data folder."""
    if folder is None:
        import skimage  # a benchmark's dependency only: pip install scikit-image, or pass --photos

        folder = Path(skimage.__file__).parent / "data"
    return folder


def photo_paths(folder: Path) -> list[Path]:
    """The photos of ``folder`` and matplotlib's Grace Hopper."""
    import matplotlib

    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    hopper = Path(matplotlib.__file__).parent / "mpl-data" / "sample_data" / "grace_hopper.jpg"
    return paths + ([hopper] if hopper.exists() else [])


def letterbox(image: Image.Image) -> np.ndarray:
    """RGB, longer side scaled to SIZE, padded black at the right and bottom (as nudenet does): (3, SIZE, SIZE)
    in [0, 1]."""
    image = image.convert("RGB")
    scale = SIZE / max(image.size)
    image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BILINEAR)
    canvas = Image.new("RGB", (SIZE, SIZE))
    canvas.paste(image, (0, 0))
    return np.asarray(canvas, np.float32).transpose(2, 0, 1) / 255


def crops(photos: list[Image.Image], count: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Random crops (40-100% of each side), half of them mirrored, letterboxed."""
    out = []
    for _ in range(count):
        photo = photos[int(rng.integers(len(photos)))]
        w, h = photo.size
        cw, ch = int(w * rng.uniform(0.4, 1.0)), int(h * rng.uniform(0.4, 1.0))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        crop = photo.crop((x, y, x + cw, y + ch))
        out.append(letterbox(crop.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else crop))
    return out


def mosaics(faces: np.ndarray, count: int, rng: np.random.Generator, grid: int = 4) -> list[np.ndarray]:
    """``count`` images of grid x grid faces drawn from ``faces`` (grayscale in [0, 1]), as RGB."""
    tile = SIZE // grid
    out = []
    for _ in range(count):
        canvas = np.zeros((SIZE, SIZE), np.float32)
        for i in range(grid):
            for j in range(grid):
                face = Image.fromarray((faces[int(rng.integers(len(faces)))] * 255).astype(np.uint8))
                canvas[i * tile:(i + 1) * tile, j * tile:(j + 1) * tile] = \
                    np.asarray(face.resize((tile, tile), Image.BILINEAR), np.float32) / 255
        out.append(np.repeat(canvas[None], 3, 0))
    return out


def image_sets(folder: Path | None, calib_size: int, eval_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(calibration, evaluation) arrays (N, 3, SIZE, SIZE): half photo crops, half face mosaics, disjoint."""
    folder = data_folder(folder)
    photos = [Image.open(p).convert("RGB") for p in photo_paths(folder)]
    faces = np.load(folder / "lfw_subset.npy") if (folder / "lfw_subset.npy").exists() else None
    sets = []
    # the LFW subset's first 100 images are faces (its last 100 are not): 50 people each
    for size, offset, half in ((calib_size, 1, slice(0, 50)), (eval_size, 2, slice(50, 100))):
        rng = np.random.default_rng(seed * 10 + offset)
        n_faces = size // 2 if faces is not None else 0
        images = crops(photos, size - n_faces, rng) + (mosaics(faces[half], n_faces, rng) if n_faces else [])
        sets.append(np.stack(images)[rng.permutation(size)])
    return sets[0], sets[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="nudenet's 320n.onnx")
    parser.add_argument("--photos", type=Path, help="scikit-image's data folder. Default: the installed package's.")
    parser.add_argument("--cells", nargs="+", default=list(CELLS))
    parser.add_argument("--repairs", nargs="+", default=["none", "ls"], help="--reconstruct values to run")
    parser.add_argument("--calib-size", type=int, default=128)
    parser.add_argument("--eval-size", type=int, default=128)
    parser.add_argument("--refit-passes", type=int, default=0, help="0: one Gram pass per depth level (exact)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "detection_yolov8n.json")
    args = parser.parse_args()

    from asr_onnx import Repair, evaluate, load_model
    from asr_onnx.calib import input_specs, load_calib
    from asr_onnx.verify import judge

    dense = load_model(args.model)
    calib_x, eval_x = image_sets(args.photos, args.calib_size, args.eval_size, args.seed)
    folder = Path(tempfile.mkdtemp(prefix="detection_real_"))
    np.save(folder / "calib.npy", calib_x)
    np.save(folder / "eval.npy", eval_x)
    specs = input_specs(dense)
    calib, held = load_calib(folder / "calib.npy", specs), load_calib(folder / "eval.npy", specs)
    dense_outputs: list = []  # the dense model's evaluation outputs, run once

    def scored(model) -> dict:
        return evaluate(model, held, reference=dense, device="cpu", progress=False, batch_size=32,
                        reference_logits=dense_outputs)

    base = scored(dense)
    print(f"evaluation: {len(held)} images, the dense model's {base['detection']['reference_detections']} detections"
          f" in {base['detection']['classes_scored']} classes; calibration: {len(calib)} images", flush=True)
    rows = []
    for cell in args.cells:
        pattern, sparsity = ("2:4", 0.0) if cell == "2:4" else ("global", float(cell))
        pruned = Repair(dense, device="cpu", progress=False, threads=args.threads).prune(sparsity, pattern).pruned
        alone = scored(pruned)
        row = {"cell": cell, "pruned": {"f1": alone["detection"]["f1"], "f1_pooled": alone["detection"]["f1_pooled"],
                                        "detections": alone["detection"]["detections"],
                                        "logit_rel_l2": alone["logit_rel_l2"],
                                        "standardised_error": alone["standardised_error"],
                                        "per_class": alone["detection"]["per_class"]}}
        for reconstruct in args.repairs:
            start = time.perf_counter()
            job = Repair(dense, device="cpu", progress=False, threads=args.threads).prune(sparsity, pattern)
            # warn: the repair stays the output, and the entry says what fallback (the CLI's default) would ship
            job.run(calib, "bn", reconstruct=reconstruct, refit_passes=args.refit_passes, guard="warn",
                    seed=args.seed)
            seconds = time.perf_counter() - start
            guard = job.settings["guard"]
            repaired = scored(job.output)
            ships = "pruned" if guard["repair_loses"] else "repair"
            shipped = alone if ships == "pruned" else repaired
            verdict = judge("detection_f1", shipped["detection"]["f1"], data=f"{len(held)} evaluation images",
                            settings=job.settings, detector=True)
            held_out = guard["pruned" if ships == "pruned" else "repair"]["detection_f1"]
            row[reconstruct] = {
                "f1": repaired["detection"]["f1"], "f1_pooled": repaired["detection"]["f1_pooled"],
                "per_class": repaired["detection"]["per_class"], "precision": repaired["detection"]["precision"],
                "recall": repaired["detection"]["recall"], "detections": repaired["detection"]["detections"],
                "logit_rel_l2": repaired["logit_rel_l2"], "standardised_error": repaired["standardised_error"],
                "guard": {"verdict": guard["verdict"], "ships": ships, "repair_f1": guard["repair"]["detection_f1"],
                          "pruned_f1": guard["pruned"]["detection_f1"], "held_out": guard["held_out"],
                          "repair_rel_l2": guard["repair"]["logit_rel_l2"],
                          "pruned_rel_l2": guard["pruned"]["logit_rel_l2"]},
                "shipped_f1": shipped["detection"]["f1"], "verdict": verdict.as_dict(),
                "verdict_held_out": judge("detection_f1", held_out, data="held-out calibration images",
                                          settings=job.settings, detector=True).label,
                "seconds": round(seconds, 1)}
            print(json.dumps({"cell": cell, "reconstruct": reconstruct} | row[reconstruct]), flush=True)
        rows.append(row)
        args.out.write_text(json.dumps(_result(args, base, rows), indent=1) + "\n")  # kept as the cells finish
    print_table(rows, args.repairs)


def _result(args, base: dict, rows: list) -> dict:
    return {"model": "nudenet 3.4.2 320n.onnx (Ultralytics YOLOv8n, 320x320, 18 classes, output (N, 22, 2100))",
            "calib": args.calib_size, "eval": args.eval_size, "seed": args.seed, "threads": args.threads,
            "refit_passes": args.refit_passes, "dense_detections": base["detection"]["reference_detections"],
            "dense_classes": base["detection"]["classes_scored"],
            "dense_per_class": {c: v["tp"] for c, v in base["detection"]["per_class"].items()},
            "omp_threads": os.environ.get("OMP_NUM_THREADS"),
            "rows": rows}


def print_table(rows: list, repairs: list) -> None:
    def f1(v):
        return "-" if v is None else f"{v:.3f}"

    head = f"{'cell':>5} {'pruned F1':>9}"
    for r in repairs:
        head += (f" | {r + ' F1':>8} {'pooled':>6} {'relL2':>6} {'stdErr':>6} {'held-out r/p':>12} {'ships':>6} "
                 f"{'verdict':>8}")
    print(head)
    for row in rows:
        line = f"{row['cell']:>5} {f1(row['pruned']['f1']):>9}"
        for r in repairs:
            c = row[r]
            g = c["guard"]
            line += (f" | {f1(c['f1']):>8} {f1(c.get('f1_pooled')):>6} {c['logit_rel_l2']:>6.3f} "
                     f"{c['standardised_error']:>6.3f} "
                     f"{f1(g['repair_f1']) + '/' + f1(g['pruned_f1']):>12} {g['ships']:>6} {c['verdict']['label']:>8}")
        print(line)


if __name__ == "__main__":
    main()
