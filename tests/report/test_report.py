"""The HTML repair report: rendered for a repaired sample model, opened in a real headless browser."""

import io
import json
import subprocess
import sys

import browser
import numpy as np
import pytest
from paths import ROOT  # noqa: E402

from asr_onnx.cli.main import main
from asr_onnx.report.html import SECTIONS, render

SAMPLES = ROOT / "sample_models"
SAMPLE = SAMPLES / "resnet20_bn.onnx"


@pytest.fixture(scope="module")
def repaired(tmp_path_factory):
    """resnet20_bn at 90% global, bn, with --eval: the page and the JSON report of the same run."""
    folder = tmp_path_factory.mktemp("report")
    argv = ["repair", str(SAMPLE), "--calib", str(SAMPLES / "data" / "calib"), "--calib-size", "256",
            "--eval", str(SAMPLES / "data" / "eval.npz"), "--eval-size", "300", "-o", str(folder / "out.onnx"),
            "-q", "--device", "cpu"]
    assert main([*argv, "--report", str(folder / "r.json")]) == 0
    assert main([*argv, "--overwrite", "--report", str(folder / "r.html")]) == 0
    return folder


def test_repair_writes_the_page_by_extension(repaired):
    page = (repaired / "r.html").read_text()
    report = json.loads((repaired / "r.json").read_text())
    assert page.startswith("<!doctype html>") and "resnet20_bn" in page
    for key in SECTIONS:
        assert f'<section id="{key}">' in page
    for needle in ("src=\"http", "src='http", "href=\"http", "<script", "<link", "@import", "url(http"):
        assert needle not in page  # self-contained: nothing fetched, nothing run
    assert page.count('src="data:image/svg+xml;base64,') == 3  # damage, channels, gains
    scores = report["eval"]
    assert scores["samples"] == 300 and scores["data"].endswith("eval.npz")
    assert 0 <= scores["top1"] <= 1 and 0 <= scores["agreement"] <= 1 and scores["dense_top1"] > 0.8
    assert f"{100 * scores['top1']:.2f}%" in page
    guard = report["settings"]["guard"]  # the CLI's default guard ran
    assert f'<p class="verdict">{guard["verdict"]}: kept {guard["kept"]}</p>' in page


def test_eval_matches_an_independent_evaluation():
    from asr_onnx import Repair, load_calib
    from asr_onnx.calib import Preprocess, input_specs, metadata
    from asr_onnx.model.files import load_model
    from asr_onnx.verify.evaluation import evaluate

    dense = load_model(SAMPLE)
    specs, preprocess = input_specs(dense), Preprocess.from_metadata(metadata(dense))
    calib = load_calib(SAMPLES / "data" / "calib", specs, preprocess).take(128)
    data = load_calib(SAMPLES / "data" / "eval.npz", specs, preprocess).take(200)
    job = Repair(dense, progress=False, device="cpu").prune(0.8).run(calib, "bn").evaluate(data, name="eval")
    got = job.report()["eval"]
    plain = evaluate(job.output, data, reference=dense, device="cpu", progress=False)
    assert got["top1"] == plain["top1"] and got["agreement"] == plain["agreement"]
    assert got["logit_rel_l2"] == pytest.approx(plain["logit_rel_l2"], rel=1e-12)
    assert got["dense_top1"] == evaluate(dense, data, device="cpu", progress=False)["top1"]


def test_repaired_variance_is_the_reference_after_full_restoration():
    from asr_onnx import Repair, load_calib
    from asr_onnx.calib import Preprocess, input_specs, metadata
    from asr_onnx.model.files import load_model

    dense = load_model(SAMPLE)
    specs = input_specs(dense)
    calib = load_calib(SAMPLES / "data" / "calib", specs, Preprocess.from_metadata(metadata(dense))).take(128)
    job = Repair(dense, progress=False, device="cpu").prune(0.9).measure(calib)
    for placement in ("recal", "pre-bn"):
        sites = job.correct("bn", placement=placement).report()["sites"]
        for site in sites:
            pruned, ref, eps = (np.asarray(site[k]) for k in ("pruned_var", "reference_var", "eps"))
            healthy = pruned > 100 * eps
            np.testing.assert_allclose(np.asarray(site["repaired_var"])[healthy], ref[healthy], rtol=0.02)
    for site in job.correct("none").report()["sites"]:
        np.testing.assert_allclose(site["repaired_var"], site["pruned_var"], rtol=1e-5)


def test_page_opens_in_headless_chromium(repaired):
    from PIL import Image

    try:
        seen = browser.open_page(repaired / "r.html")
    except browser.BrowserError as e:
        pytest.skip(f"headless chromium cannot start here: {e}")
    page_url = (repaired / "r.html").resolve().as_uri()
    assert [u for u in seen["requests"] if u != page_url and not u.startswith("data:")] == []
    assert seen["failed"] == [] and seen["errors"] == []
    assert seen["value"] == list(SECTIONS)
    shot = Image.open(io.BytesIO(seen["png"])).convert("L")
    assert shot.width >= 1000 and shot.height > 2000  # the whole page, not a blank viewport
    dark = np.asarray(shot) < 128
    assert 0.01 < dark.mean() < 0.5 and dark[: shot.height // 4].any() and dark[-shot.height // 4:].any()


def test_report_command_renders_a_saved_and_an_old_report(repaired, tmp_path):
    out = tmp_path / "again.html"
    assert main(["report", str(repaired / "r.json"), "-o", str(out)]) == 0
    assert out.read_text().count("<section id=") == len(SECTIONS)
    old = json.loads((repaired / "r.json").read_text())
    for key in ("eval", "sparse_core", "timings_s", "tool", "onnxruntime", "totals"):
        old.pop(key)
    for site in old["sites"]:
        for key in ("repaired_var", "gains", "collapsed"):
            site.pop(key, None)
    page = render(old)
    assert "Not run: pass <code>--eval DATA</code>" in page and "no repaired variances" in page
    assert page.count("<section id=") == len(SECTIONS)
    assert "<section id=" in render({"settings": {}, "layers": [], "sites": []})


def test_guard_and_refit_are_rendered_when_present(repaired):
    report = json.loads((repaired / "r.json").read_text())
    report["settings"]["guard"] = {"mode": "fallback", "held_out": 128, "verdict": "pruning alone better",
                                   "kept": "pruned", "cost_s": 1.5,
                                   "repair": {"agreement": 0.25, "logit_rel_l2": 0.9},
                                   "pruned": {"agreement": 0.5, "logit_rel_l2": 0.7}}
    report["layers"][3]["refit"] = {"rel_err_before": 0.42, "rel_err_after": 0.125}
    page = render(report)
    guard = page[page.index('<section id="guard">'):page.index('<section id="eval">')]
    assert "pruning alone better: kept pruned" in guard and "25.00%" in guard and "50.00%" in guard
    refit = page[page.index('<section id="refit">'):page.index('<section id="guard">')]
    assert "0.42" in refit and "0.125" in refit and "stages.1/branch.0.0" in refit and "Not run" not in refit


def test_reconstruct_auto_is_rendered_with_both_candidates(repaired):
    report = json.loads((repaired / "r.json").read_text())
    none = {"reconstruct": "none", "agreement": 0.5, "logit_rel_l2": 0.75, "tied": False}
    ls = {"reconstruct": "ls", "agreement": 0.625, "logit_rel_l2": 0.5, "tied": True}
    report["settings"]["reconstruct_auto"] = {"picked": ls, "candidates": [none, ls], "folds": 2, "held_out": 256,
                                              "scored_with": "bn", "reason": "rule"}
    page = render(report)
    assert "reconstruct auto scored the refit and no refit on 256 held-out calibration samples" in page
    table = page[page.index("reconstruct auto scored"):]
    table = table[:table.index("</table>")]
    assert "62.5%" in table and "50.0%" in table and table.count("picked") == 1


def test_without_matplotlib_the_page_has_tables_and_says_why(repaired):
    code = ("import sys, json; sys.modules['matplotlib'] = None\n"
            "from asr_onnx.report.html import render\n"
            f"print(render(json.load(open({str(repaired / 'r.json')!r}))))")
    page = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "matplotlib is not installed" in page and "<img" not in page
    channels = page[page.index('<section id="channels">'):page.index('<section id="gains">')]
    assert "<th>ratio</th>" in channels and channels.count("<tr>") > 10 and "No plot: matplotlib" in channels
    sites = json.loads((repaired / "r.json").read_text())["sites"]
    dead = len(next(s for s in sites if s["tensor"] in channels)["collapsed"])
    assert f"{dead} dead channels" in channels


def test_bad_report_input_is_one_line_and_writes_nothing(repaired, tmp_path, capsys):
    out = tmp_path / "p.html"
    (tmp_path / "bad.json").write_text("{not json")
    assert main(["report", str(tmp_path / "missing.json"), "-o", str(out)]) == 1
    assert main(["report", str(tmp_path / "bad.json"), "-o", str(out)]) == 1
    assert main(["report", str(repaired / "r.json"), "-o", str(tmp_path / "p.txt")]) == 2
    assert main(["report", str(repaired / "r.json"), "-o", str(out), "--site", "nowhere"]) == 1
    assert main(["repair", str(SAMPLE), "--calib", str(SAMPLES / "data" / "calib"), "-o", str(tmp_path / "o.onnx"),
                 "--report", str(tmp_path / "r.txt"), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.count("error: ") == 5 and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.json"]
