"""Real third-party ONNX graphs: pruning alone against the default repair, with the guard's verdict.

Each model is named on the command line as KIND=PATH (nothing is downloaded; see RESULTS.md for where
the models come from). KIND picks the synthetic input: the natural-image data these models were trained
on is not at hand, so inputs are rendered with Pillow (text lines, captchas, pages of text, scenes of
shapes); calibration and evaluation images are drawn with different seeds.

    python benchmarks/real_graphs.py rec=ch_PP-OCRv4_rec_infer.onnx yolov8=320n.onnx --json out.json

``bytes`` is Magika's tf2onnx byte classifier (int32 (N, 2048) tokens), fed the head and tail bytes of files
already on this machine (:func:`file_bytes`; calibration and evaluation files disjoint).

``fmnist`` is a Keras NHWC classifier made by benchmarks/make_keras_resnet.py (tf2onnx, or Keras 3 on the
torch backend), fed real Fashion-MNIST images: calibration from the 5,000 training images it was not trained
on, evaluation from the test set (scored only, never used to choose anything).

For every model and cell (0.5 and 0.8 global, 2:4) it prints the relative L2 error of all outputs against
dense on the evaluation images (and top-1 agreement where the output is (N, classes) or per-step class
scores), for pruning alone and for the default repair (bn), the repair's time against one plain pass of
the dense model over the calibration set, and the guard's held-out verdict, whether ``--guard fallback``
would ship pruning alone, and its cost.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
CHARS = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHJKLMNPQRSTUVWXYZ"
# kind -> (height, width, channels, normalisation, calibration samples, evaluation samples)
KINDS = {
    "cls": (48, 192, 3, "half", 64, 64),  # PP-OCR text direction classifier
    "rec": (48, 320, 3, "half", 32, 32),  # PP-OCRv4 recogniser (SVTR, CTC, per-step softmax)
    "det": (320, 320, 3, "imagenet", 16, 16),  # PP-OCRv4 text detector (DB probability map)
    "yolov8": (320, 320, 3, "unit", 16, 16),  # YOLOv8n detector (dynamic batch)
    "yolox": (416, 416, 3, "raw", 8, 8),  # YOLOX-style detector, fixed batch 1
    "captcha": (64, 160, 1, "unit", 16, 16),  # CNN+LSTM captcha reader, fixed batch 1, (T, 1, C) logits
    "fmnist": (28, 28, 1, "nhwc", 256, 1000),  # a Keras NHWC classifier (benchmarks/make_keras_resnet.py)
    "bytes": (1, 2048, 1, "bytes", 64, 64),  # Magika: int32 bytes of a file's head and tail, tf2onnx
}
BYTE_DIRS = ("/usr/lib/python3*", "/usr/share", "/usr/bin")  # files of many types already on this machine
CELLS = (("global", 0.5), ("global", 0.8), ("2:4", 0.0))


def _font(size):
    return ImageFont.truetype(FONT, size) if Path(FONT).exists() else ImageFont.load_default()


def render(kind: str, rng: np.random.Generator) -> Image.Image:
    """One synthetic image for ``kind``."""
    h, w, c, *_ = KINDS[kind]
    back = tuple(int(v) for v in rng.integers(150, 256, 3))
    img = Image.new("RGB", (w, h), back)
    draw = ImageDraw.Draw(img)
    ink = lambda: tuple(int(v) for v in rng.integers(0, 100, 3))  # noqa: E731
    text = lambda n: "".join(rng.choice(list(CHARS), n))  # noqa: E731
    if kind in ("cls", "rec", "captcha"):
        size = int(h * rng.uniform(0.5, 0.75))
        draw.text((int(rng.integers(2, 12)), int((h - size) * rng.uniform(0.2, 0.8))), text(int(rng.integers(4, 12))),
                  fill=ink(), font=_font(size))
        if kind == "cls" and rng.random() < 0.5:
            img = img.rotate(180)
    elif kind == "det":
        for row in range(int(rng.integers(3, 9))):
            size = int(rng.integers(14, 30))
            draw.text((int(rng.integers(0, w // 3)), 10 + row * 38), text(int(rng.integers(5, 14))), fill=ink(),
                      font=_font(size))
    else:
        for _ in range(int(rng.integers(3, 9))):
            x0, y0 = int(rng.integers(0, w - 40)), int(rng.integers(0, h - 40))
            x1, y1 = x0 + int(rng.integers(20, w // 2)), y0 + int(rng.integers(20, h // 2))
            shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
            shape((x0, y0, x1, y1), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return img.convert("L") if c == 1 else img


def file_bytes(n: int, seed: int, beg: int = 1024, end: int = 1024, pad: int = 256) -> np.ndarray:
    """``n`` files' bytes as Magika's standard_v3 models take them: (n, beg + end) int32, the first ``beg``
    bytes after leading whitespace (padded after with ``pad``) and the last ``end`` bytes before trailing
    whitespace (padded before). Files come from BYTE_DIRS: calibration takes the even-numbered files of the
    sorted list, evaluation the odd ones, so the two sets never share a file; ``seed`` picks which."""
    import glob

    paths = sorted({f for d in BYTE_DIRS for g in glob.glob(d) for f in glob.glob(f"{g}/**/*", recursive=True)
                    if Path(f).is_file() and not Path(f).is_symlink() and Path(f).stat().st_size >= 8})
    pool = paths[seed % 2::2]
    rows = []
    for f in np.random.default_rng(seed).choice(pool, n, replace=False):
        data = Path(f).read_bytes()
        head, tail = list(data[:4096].lstrip()[:beg]), list(data[-4096:].rstrip()[-end:]) if end else []
        rows.append(head + [pad] * (beg - len(head)) + [pad] * (end - len(tail)) + tail)
    return np.array(rows, np.int32)


def images(kind: str, n: int, seed: int) -> np.ndarray:
    """``n`` images as float32 NCHW, normalised as the model expects (``fmnist``: real Fashion-MNIST images,
    NHWC in [0, 1]; calibration from the last 5,000 training images, which make_keras_resnet.py does not
    train on, evaluation from the test set)."""
    _, _, c, norm, *_ = KINDS[kind]
    if norm == "bytes":
        return file_bytes(n, seed)
    if norm == "nhwc":
        from asr_onnx.calib.idx import read_idx
        from asr_onnx.calib.named import FASHION_MNIST

        name = "train-images-idx3-ubyte.gz" if seed == 1 else "t10k-images-idx3-ubyte.gz"
        pool = read_idx(FASHION_MNIST / name)[-5000:] if seed == 1 else read_idx(FASHION_MNIST / name)
        pick = np.random.default_rng(seed).choice(len(pool), n, replace=False)
        return (pool[pick].astype(np.float32) / 255)[..., None]
    rng = np.random.default_rng(seed)
    x = np.stack([np.asarray(render(kind, rng), np.float32).reshape(*KINDS[kind][:2], c) for _ in range(n)])
    x = x.transpose(0, 3, 1, 2)
    if norm == "half":
        return ((x / 255 - 0.5) / 0.5).astype(np.float32)
    if norm == "imagenet":
        mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
        return ((x / 255 - mean[:, None, None]) / std[:, None, None]).astype(np.float32)
    return (x / 255 if norm == "unit" else x).astype(np.float32)


def parse_cells(text: str) -> list[tuple[str, float]]:
    """"global:0.8,2:4:0" -> [("global", 0.8), ("2:4", 0.0)]: pattern and sparsity, comma-separated."""
    return [(cell.rpartition(":")[0], float(cell.rpartition(":")[2])) for cell in text.split(",")]


def parse_spec(spec: str) -> tuple[str, str, str]:
    """"KIND=PATH[@COUNTS]" -> (KIND, PATH, COUNTS or "")."""
    kind, _, rest = spec.partition("=")
    path, _, counts = rest.partition("@")
    return kind, path, counts


def plain_pass(path, calib) -> float:
    """Seconds for one plain pass of the dense model over the calibration set."""
    from asr_onnx.calib import fixed_batch, input_specs
    from asr_onnx.model.files import load_model
    from asr_onnx.model.session import make_session

    model = load_model(path)
    session = make_session(model, "cpu")
    batch = fixed_batch(input_specs(model)) or 64
    start = time.perf_counter()
    for feed in calib.batches(batch):
        session.run(None, feed)
    return time.perf_counter() - start


def run_model(kind: str, path: str, folder: Path, sizes) -> list[dict]:
    from asr_onnx.calib import input_specs, load_calib
    from asr_onnx.model.files import load_model
    from asr_onnx.pipeline.driver import Repair
    from asr_onnx.verify.evaluation import evaluate

    dense = load_model(path)
    specs = input_specs(dense)
    n_calib, n_eval = sizes or KINDS[kind][4:]
    sets = {}
    for name, n, seed in (("calib", n_calib, 1), ("eval", n_eval, 2)):
        np.save(folder / f"{kind}_{name}.npy", images(kind, n, seed))
        sets[name] = load_calib(folder / f"{kind}_{name}.npy", specs)
    plain_s = plain_pass(path, sets["calib"])
    rows = []
    for pattern, sparsity in CELLS:
        job = Repair(dense, device="cpu", progress=False).prune(sparsity, pattern)
        job.source = Path(path)
        start = time.perf_counter()
        job.run(sets["calib"], "bn")
        repair_s = time.perf_counter() - start
        scores = {name: evaluate(model, sets["eval"], reference=dense, device="cpu", progress=False)
                  for name, model in (("pruned", job.pruned), ("repair", job.output))}
        guard = job.guard(sets["calib"], "warn").settings["guard"]
        row = {"model": kind, "path": Path(path).name, "pattern": pattern if pattern != "global" else f"{sparsity:g}",
               "calib": n_calib, "eval": n_eval, "plain_s": round(plain_s, 3), "repair_s": round(repair_s, 2),
               "x_plain": round(repair_s / plain_s, 1), "agreement_kind": scores["repair"]["agreement_kind"],
               **{f"{k}_err": round(v["logit_rel_l2"], 4) for k, v in scores.items()},
               **{f"{k}_agree": None if v["agreement"] is None else round(v["agreement"], 4)
                  for k, v in scores.items()},
               "guard_verdict": guard["verdict"], "guard_falls_back": guard["repair_loses"],
               "guard_repair_err": round(guard["repair"]["logit_rel_l2"], 4),
               "guard_pruned_err": round(guard["pruned"]["logit_rel_l2"], 4), "guard_s": guard["cost_s"]}
        worse_err = row["repair_err"] > row["pruned_err"]
        better_agree = row["repair_agree"] is not None and row["repair_agree"] > row["pruned_agree"]
        row["repair_loses"] = "yes" if worse_err and not better_agree else "mixed" if worse_err else "no"
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    """The RESULTS.md table: one line per model and cell."""
    def agree(value):
        return "-" if value is None else f"{100 * value:.1f}%"

    lines = ["| graph | cell | pruned err (agree) | repair err (agree) | repair / plain pass | guard (held out) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        loses = {"yes": " **repair loses**", "mixed": " (worse error, better agreement)"}.get(r["repair_loses"], "")
        lines.append(f"| {r['model']} | {r['pattern']} | {r['pruned_err']:.3f} ({agree(r['pruned_agree'])}) | "
                     f"{r['repair_err']:.3f} ({agree(r['repair_agree'])}){loses} | {r['repair_s']:.1f} s / "
                     f"{r['plain_s']:.2f} s = {r['x_plain']:g}x | {r['guard_verdict']}"
                     f"{', falls back' if r['guard_falls_back'] else ''}: {r['guard_repair_err']:.3f}"
                     f" vs {r['guard_pruned_err']:.3f}, {r['guard_s']:.1f} s |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("models", nargs="+", help=f"KIND[.NAME]=PATH[@CALIB,EVAL], KIND one of {', '.join(KINDS)}"
                                                  " (.NAME tells two models of one kind apart in the table); "
                                                  "CALIB,EVAL: sample counts (default: per kind)")
    parser.add_argument("--json", default="real_graphs.json", help="where to write the rows")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.models:
            label, _, rest = spec.partition("=")
            path, _, counts = rest.partition("@")
            if label.partition(".")[0] not in KINDS or not path:
                parser.error(f"not KIND[.NAME]=PATH[@CALIB,EVAL]: {spec}")
            sizes = tuple(int(v) for v in counts.split(",")) if counts else None
            rows += [dict(row, model=label) for row in run_model(label.partition(".")[0], path, Path(tmp), sizes)]
    Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    print(markdown(rows))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
