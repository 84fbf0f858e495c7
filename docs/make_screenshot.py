"""Makes docs/report.png, the README's picture of the HTML report, by the path the browser test takes.

    python docs/make_screenshot.py

Repairs the sample ResNet-20 (BN kept) at 90% global sparsity with the bundled calibration images,
scores it on the bundled test images (--eval), writes the page, opens it in headless Chromium
(tests/browser.py) and keeps the top of the page, scaled to 800 pixels wide.
"""

from __future__ import annotations

import io
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import browser
from PIL import Image

from asr_onnx.cli.main import main


def make(out: Path = ROOT / "docs" / "report.png", height: int = 1840, width: int = 800) -> Path:
    os.chdir(ROOT)  # so that the page names the model as a reader's checkout would
    samples = Path("sample_models")
    with tempfile.TemporaryDirectory() as folder:
        page = Path(folder) / "resnet20_bn.html"
        code = main(["repair", str(samples / "resnet20_bn.onnx"), "--calib", str(samples / "data" / "calib"),
                     "--eval", str(samples / "data" / "eval.npz"), "-o", str(Path(folder) / "out.onnx"),
                     "--report", str(page), "--device", "cpu", "-q"])
        if code:
            raise SystemExit(code)
        seen = browser.open_page(page)
    if seen["failed"] or seen["errors"]:
        raise SystemExit(f"the page did not load cleanly: {seen['failed'] or seen['errors']}")
    shot = Image.open(io.BytesIO(seen["png"])).convert("RGB")
    shot = shot.crop((0, 0, shot.width, min(height, shot.height)))
    shot = shot.resize((width, round(shot.height * width / shot.width)), Image.LANCZOS)
    shot.quantize(colors=256, method=Image.Quantize.FASTOCTREE).save(out, optimize=True)
    return out


if __name__ == "__main__":
    print(make())
