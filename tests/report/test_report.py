"""The HTML repair report: rendered for a repaired sample model, opened in a real headless browser."""

import base64
import copy
import io
import json
import re
import subprocess
import sys
from html import escape
from html.parser import HTMLParser

import browser
import numpy as np
import pytest
from paths import ROOT  # noqa: E402
from test_report_schema import XSS, sample_report

from asr_onnx.cli.main import main
from asr_onnx.report.build import summary
from asr_onnx.report.html import SECTIONS, render

SAMPLES = ROOT / "sample_models"
SAMPLE = SAMPLES / "resnet20_bn.onnx"


@pytest.fixture(scope="module")
def repaired(tmp_path_factory):
    """resnet20_bn at 0.9, the statistics-only repair (no refit: the page's refit rows have their own test) and
    --eval: the page and the JSON report of the same run."""
    folder = tmp_path_factory.mktemp("report")
    argv = ["repair", str(SAMPLE), "--calib", str(SAMPLES / "data" / "calib"), "--calib-size", "256",
            "--reconstruct", "none",
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


def test_page_opens_in_headless_chromium(repaired, tmp_path):
    from PIL import Image

    try:
        seen = browser.open_page(repaired / "r.html")
    except browser.BrowserError as e:
        pytest.skip(f"headless chromium cannot start here: {e}")
    page_url = (repaired / "r.html").resolve().as_uri()
    assert [u for u in seen["requests"] if u != page_url and not u.startswith("data:")] == []
    assert seen["failed"] == [] and seen["errors"] == []
    assert seen["value"] == list(SECTIONS)
    assert seen["active"] == [] and seen["dialogs"] == []  # no <script>, no on* attribute, no javascript: URL
    poisoned, page = payload_report()[0], tmp_path / "xss.html"
    (tmp_path / "xss.json").write_text(json.dumps(poisoned))
    assert main(["report", str(tmp_path / "xss.json"), "-o", str(page)]) == 0
    attacked = browser.open_page(page)
    assert attacked["active"] == [] and attacked["dialogs"] == [] and attacked["errors"] == []
    assert [u for u in attacked["requests"] if u != page.resolve().as_uri() and not u.startswith("data:")] == []
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
    report["layers"][3]["refit"] = {"err_before": 0.42, "err_after": 0.125}
    page = render(report)
    guard = page[page.index('<section id="guard">'):page.index('<section id="eval">')]
    assert "pruning alone better: kept pruned" in guard and "25.00%" in guard and "50.00%" in guard
    refit = page[page.index('<section id="refit">'):page.index('<section id="guard">')]
    assert "0.42" in refit and "0.125" in refit and report["layers"][3]["name"] in refit and "Not run" not in refit


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
    assert (f"{dead} dead channels" in channels) if dead else ("dead channels" not in channels)


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


def test_the_page_shows_the_refit_errors_the_refit_wrote():
    """Issue 25, low: the refit writes err_before/err_after and the page read rel_err_*: every row showed "-"."""
    import zoo

    from asr_onnx import Repair

    dense, feeds = zoo.odd_convs()
    job = Repair(dense, device="cpu", batch_size=8, progress=False).prune(0.6).run(zoo.DictSet(feeds), "none",
                                                                                 reconstruct="ls")
    report = job.report()
    page = render(report, plots=False)
    refit = page[page.index('<section id="refit">'):page.index('<section id="guard">')]
    done = [layer for layer in report["layers"] if "err_after" in layer["refit"]]
    assert done and "Not run" not in refit
    for layer in done:
        row = refit[refit.index(f'<td class="name">{escape(layer["name"])}</td>'):]
        row = row[:row.index("</tr>")]
        cells = re.findall(r'<td class="n">([^<]*)</td>', row)
        assert cells == [f"{layer['refit']['err_before']:.3g}", f"{layer['refit']['err_after']:.3g}"]


def untyped(node, where="") -> list[str]:
    """The keys of a typed report (or section) that its schema does not know, each by its path."""
    from asr_onnx.report.schema import _Base

    if isinstance(node, _Base):
        found = [f"{where}.{key}" for key in node.extra]
        for name in node.__dataclass_fields__:
            found += untyped(getattr(node, name), f"{where}.{name}")
        return found
    if isinstance(node, tuple):
        return [f for i, item in enumerate(node) for f in untyped(item, f"{where}[{i}]")]
    if isinstance(node, dict):
        return [f for key, item in node.items() for f in untyped(item, f"{where}.{key}")]
    return []


def test_every_key_of_a_live_report_is_typed(repaired):
    """The typed report knows every key a repair writes (an unknown one would be carried, untyped)."""
    from asr_onnx.report.schema import from_dict, to_dict

    saved = json.loads((repaired / "r.json").read_text())
    typed = from_dict(saved)
    assert to_dict(typed) == saved
    assert untyped(typed) == []
    assert typed.verdict is not None and typed.verdict.metric == "agreement"  # judged on the --eval data
    assert typed.eval.metric == "agreement" and typed.eval.detection is None and typed.eval.standardised_error > 0


def test_a_detector_report_types_its_detection_fields_and_round_trips(tmp_path, capsys):
    """Issue 29: a detector's report (the guard's held-out detection F1 and standardised errors, the --eval
    detection counts per class, each output's kind, the verdict) is typed key for key, written and read back
    unchanged; the summary and the page show the detection F1."""
    import onnx
    import zoo

    from asr_onnx.report.schema import ClassCounts, from_dict, read_json, to_dict, write_json

    dense, feeds = zoo.ssd_detector(n=64)
    onnx.save(dense, tmp_path / "m.onnx")
    np.save(tmp_path / "x.npy", feeds["input"])
    np.save(tmp_path / "e.npy", zoo._feed((3, 16, 16), n=32, seed=5))
    argv = ["repair", str(tmp_path / "m.onnx"), "--calib", str(tmp_path / "x.npy"), "--sparsity", "0.5",
            "--eval", str(tmp_path / "e.npy"), "-o", str(tmp_path / "o.onnx"), "--device", "cpu"]
    assert main(argv + ["--report", str(tmp_path / "r.json")]) == 0
    said = capsys.readouterr().out
    saved = json.loads((tmp_path / "r.json").read_text())
    typed = from_dict(saved)
    assert to_dict(typed) == saved and untyped(typed) == []
    guard, scores = typed.settings.guard, typed.eval
    assert guard.metric == "detection_f1" and guard.repair.detection_f1 is not None
    assert guard.repair.standardised_error > 0 and guard.pruned.detection_f1 is not None
    found = scores.detection
    assert scores.metric == "detection_f1" and scores.output_kinds == {"boxes": "detection", "scores": "detection"}
    assert all(isinstance(c, ClassCounts) for c in found.per_class.values()) and found.per_class
    assert found.reference_detections == sum(c.tp + c.fn for c in found.per_class.values())
    assert 0 <= found.f1 <= 1 and 0 <= found.f1_pooled <= 1 and typed.verdict.value == found.f1
    write_json(typed, tmp_path / "again.json")
    assert to_dict(read_json(tmp_path / "again.json")) == saved
    assert f"detection F1 {found.f1:.3f} (pooled {found.f1_pooled:.3f})" in said
    assert said.splitlines()[0] == typed.verdict.line()
    page = render(typed, plots=False)
    assert "<td>detection F1 pooled</td>" in page and "detection F1</th>" in page
    broken = copy.deepcopy(saved)
    broken["eval"]["detection"]["per_class"]["0"]["tp"] = -1
    (tmp_path / "bad.json").write_text(json.dumps(broken))
    assert main(["report", str(tmp_path / "bad.json"), "-o", str(tmp_path / "bad.html")]) == 1
    assert "eval.detection.per_class" in capsys.readouterr().err and not (tmp_path / "bad.html").exists()


# ---------------------------------------------------------------- issue 25: no active content, whatever the JSON

PAGE_TAGS = {"html", "head", "meta", "title", "style", "body", "main", "h1", "h2", "p", "nav", "a", "section", "div",
             "b", "span", "table", "tr", "th", "td", "img", "code"}
PAGE_ATTRIBUTES = {"lang", "charset", "class", "id", "href", "title", "alt", "src", "style"}


def payload(i: int) -> str:
    return f"{XSS}'><svg onload=alert({i})>javascript:alert({i})$^$<!--{i}"


def payload_report():
    """The sample report with a numbered payload in every string a report holds (a verdict's label, which
    must be one of three words, aside), in the keys of timings_s and fp16_rel_l2, and in an unknown setting.

    Returns:
        (the report, path -> the number of its payload).
    """
    report, numbers = sample_report(), {}

    def poison(node, where):
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, value in list(items):
            path = f"{where}.{key}" if isinstance(node, dict) else f"{where}[{key}]"
            if isinstance(value, str) and path != ".verdict.label":
                numbers[path] = len(numbers)
                node[key] = payload(numbers[path])
            elif isinstance(value, (dict, list)):
                poison(value, path)

    poison(report, "")
    for section in ("timings_s", "settings.fp16_rel_l2"):
        parent = report
        for key in section.split("."):
            parent = parent[key]
        for key in list(parent):
            numbers[f".{section}:{key}"] = len(numbers)
            parent[payload(numbers[f".{section}:{key}"])] = parent.pop(key)
    numbers[".settings:key"] = len(numbers)
    report["settings"][payload(numbers[".settings:key"])] = "value"
    return report, numbers


class Page(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags, self.attributes, self.text, self.comments = [], [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attributes += [(tag, name, value or "") for name, value in attrs]

    handle_startendtag = handle_starttag

    def handle_data(self, data):
        self.text.append(data)

    def handle_comment(self, data):
        self.comments.append(data)


# the strings the page shows (a site's tensor in a title attribute), each must be there as text
SHOWN = [".input", ".tool.version", ".onnxruntime.version", ".onnxruntime.provider", ".verdict.metric",
         ".verdict.reason", ".verdict.suggestion", ".settings.pattern", ".settings.exclude[0]",
         ".settings.reconstruct", ".settings.reference", ".settings.method", ".settings.lambda_rule",
         ".settings.resize_mode", ".settings:key", ".settings.reconstruct_auto.scored_with",
         ".settings.reconstruct_auto.candidates[0].reconstruct", ".settings.auto.reason",
         ".settings.auto.candidates[1].method", ".settings.auto.candidates[1].placement",
         ".settings.auto.candidates[1].lambda_rule", ".settings.guard.mode", ".settings.guard.verdict",
         ".settings.guard.kept", ".layers[0].name", ".layers[0].op", ".layers[1].reason", ".layers[2].refit.skipped",
         ".sites[0].tensor", ".sites[1].layer", ".sites[0].norm", ".sites[2].written", ".sites[3].tensor",
         ".eval.data", ".timings_s:prune", ".quantization.runtime", ".quantization.activations.type",
         ".quantization.calibration.picked.calibration", ".quantization.calibration.candidates[0].weights",
         ".quantization.correction.picked", ".quantization.correction.verdict",
         ".quantization.correction.candidates[1].correction", ".quantization.layers[0].name",
         ".quantization.layers[1].nm_24", ".quantization.float_layers.picked[0]",
         ".quantization.float_layers.candidates[1].layers[0]"]


def test_a_script_payload_in_every_string_stays_text(tmp_path):
    """Issue 25, high: a saved JSON report's strings reach the page only as escaped text: every element and
    attribute of the page is in an allowlist, no on* attribute, no javascript: URL, whatever the JSON holds."""
    report, numbers = payload_report()
    (tmp_path / "r.json").write_text(json.dumps(report))
    for extra in ([], ["--site", payload(numbers[".sites[1].layer"])]):
        assert main(["report", str(tmp_path / "r.json"), "-o", str(tmp_path / "r.html"), *extra]) == 0
        raw = (tmp_path / "r.html").read_text()
        (tmp_path / "r.html").unlink()
        page = Page()
        page.feed(raw)
        page.close()
        assert set(page.tags) <= PAGE_TAGS, set(page.tags) - PAGE_TAGS
        assert {name for _, name, _ in page.attributes} <= PAGE_ATTRIBUTES
        assert page.comments == []  # "<!--" in a payload opens no comment
        for tag, name, value in page.attributes:
            if name == "href":
                assert re.fullmatch(r"#[a-z_]+", value)
            elif name == "src":
                assert tag == "img" and re.fullmatch(r"data:image/svg\+xml;base64,[A-Za-z0-9+/=]+", value)
            elif name == "style":
                assert re.fullmatch(r"width:\d+(\.\d+)?%", value)
            elif name in ("class", "id", "lang", "charset"):
                assert re.fullmatch(r"[a-z0-9_ -]+", value), (name, value)
        style = raw[raw.index("<style>"):raw.index("</style>")]
        assert "alert" not in style and raw.count("<style>") == 1
        shown = "".join(page.text) + "".join(value for _, name, value in page.attributes if name in ("title", "alt"))
        missing = [path for path in SHOWN if payload(numbers[path]) not in shown]
        assert missing == []


def test_a_dollar_in_a_model_or_node_name_is_plain_text(tmp_path):
    """Issue 25, medium: matplotlib's mathtext parsed "$...$" in a label, and "$^$" crashed the page."""
    pytest.importorskip("matplotlib")
    report = sample_report()
    report["input"] = "models/m$^$x.onnx"
    for entry in report["sites"] + report["layers"]:
        for key in ("layer", "name"):
            if key in entry:
                entry[key] = entry[key].replace("/conv/", "/co$^$nv/")
    (tmp_path / "r.json").write_text(json.dumps(report))
    assert main(["report", str(tmp_path / "r.json"), "-o", str(tmp_path / "r.html")]) == 0
    page = (tmp_path / "r.html").read_text()
    assert page.count('src="data:image/svg+xml;base64,') == 3 and "m$^$x" in page


# ---------------------------------------------------------------- issue 29: the summary and the page's size


def test_the_summary_cuts_no_line():
    report = sample_report()
    long = "/" + "a_rather_long_scope_name/" * 7 + "Conv"
    report["layers"][1]["name"] = long  # the dense layer
    report["sites"][0]["layer"] = long
    report["timings_s"] = {f"stage_number_{i}": i + 0.25 for i in range(30)}
    text = summary(report)
    assert len(long) > 150 and f"  dense: {long} (" in text
    assert any(line.startswith(long + " ") for line in text.splitlines())
    for key, seconds in report["timings_s"].items():
        assert f"{key} {seconds:.2f}s" in text


def test_the_summary_mentions_the_report_only_when_one_is_written():
    report = sample_report(sites=30)
    report["sparse_core"] = [dict(row, name=f"/l{i}", eligible=False, eligibility="no", reasons=["depthwise"])
                             for i, row in enumerate(report["sparse_core"])]
    text = summary(report)
    assert "JSON report" not in text and "--report r.json or r.html lists them all" in text
    assert sum(line.startswith("  not eligible: ") for line in text.splitlines()) == 30  # listed, nowhere else
    assert "the JSON report out/r.json lists them all" in summary(report, "out/r.json")
    assert "the page out/r.html lists them all" in summary(report, "out/r.html")
    assert "more not eligible (see the JSON report)" in summary(report, "out/r.json")


def test_layers_are_named_alike_in_the_summary_inspect_and_the_page(repaired, capsys):
    report = json.loads((repaired / "r.json").read_text())
    page, text = (repaired / "r.html").read_text(), summary(report)
    assert main(["inspect", str(SAMPLE)]) == 0
    inspected = [line.split()[0] for line in capsys.readouterr().out.splitlines()[2:] if line.strip()]
    for layer in report["layers"]:
        assert f'<td class="name">{escape(layer["name"])}</td>' in page and layer["name"] in inspected
    lines = text.splitlines()
    for site in report["sites"]:
        assert any(line.startswith(site["layer"] + " ") for line in lines), site["layer"]
        assert f'title="{escape(site["tensor"])}">{escape(site["layer"])}</span>' in page


def test_the_verdict_leads_the_summary_and_the_page():
    report = sample_report()
    assert summary(report).splitlines()[0] == \
        "verdict: degraded - held-out agreement 0.82 < 0.95; try --reconstruct ls"
    page = render(report, plots=False)
    top = page[page.index("<main>") + len("<main>"):]
    assert top.startswith('<div class="banner degraded"><b>verdict: degraded</b> - held-out agreement 0.82 &lt; 0.95'
                          ' - <b>try --reconstruct ls</b>')
    report["verdict"].update(label="broken", reason=XSS, suggestion=None)
    top = render(report, plots=False)
    top = top[top.index("<main>") + len("<main>"):]
    assert top.startswith(f'<div class="banner broken"><b>verdict: broken</b> - {escape(XSS)}<div')
    del report["verdict"]
    assert "banner" not in render(report, plots=False).split("</style>")[1]
    assert summary(report).startswith("asr-onnx 0.1.0")


def _images(section: str) -> list[str]:
    return [base64.b64decode(data).decode() for data in re.findall(r'src="data:image/svg\+xml;base64,([^"]+)"',
                                                                    section)]


def test_the_damage_plot_of_many_sites_shows_the_worst():
    pytest.importorskip("matplotlib")
    report = sample_report(sites=50)
    page = render(report)
    damage = page[page.index('<section id="damage">'):page.index('<section id="channels">')]
    gains = page[page.index('<section id="gains">'):page.index('<section id="refit">')]
    (damage_svg,), (gains_svg,) = _images(damage), _images(gains)
    assert damage_svg.count('id="xtick_') == 32 and gains_svg.count('id="xtick_') == 32
    assert "The plot shows the 32 most damaged of 50 sites" in damage
    small = _images(render(sample_report(sites=10)))[0]
    assert small.count('id="xtick_') == 10


def test_a_page_of_thousands_of_sites_is_bounded():
    report = sample_report(sites=2000)
    page = render(report, plots=False)
    damage = page[page.index('<section id="damage">'):page.index('<section id="channels">')]
    sparsity = page[page.index('<section id="sparsity">'):page.index('<section id="groups">')]
    assert damage.count("<tr>") == 401 and "400 of 2,001 sites shown (the most damaged, in graph order)" in damage
    assert sparsity.count("<tr") == 401 and "400 of 2,000 layers shown" in sparsity
    worst = report["sites"][1999]["layer"]  # the damage falls with the index: the last sites are the worst
    assert worst in damage and report["sites"][0]["layer"] not in damage


@pytest.mark.parametrize(("pattern", "where"), [("global", "no stock runtime"), ("2:4", "TensorRT's sparse tensor cores"),
                                                ("channels", "every runtime")])
def test_the_summary_says_which_runtime_the_pattern_makes_faster(pattern, where):
    """Issue 27: zeros make no dense kernel faster; nobody should wait for a speed-up the pattern cannot give."""
    from zoo import ArraySet, conv_net, random_inputs

    from asr_onnx.pipeline.driver import Repair
    from asr_onnx.report.build import summary

    calib = ArraySet(random_inputs(16))
    job = Repair(conv_net(bn=True), device="cpu", batch_size=16, progress=False)
    job.prune(0.5, pattern, calib=calib).run(calib, "none")
    lines = [line for line in summary(job.report()).splitlines() if line.startswith("faster on: ")]
    assert len(lines) == 1 and lines[0].startswith(f"faster on: {where}")
    if pattern == "channels":  # a plan that removes nothing makes nothing faster, and says so
        job = Repair(conv_net(bn=True), device="cpu", batch_size=16, progress=False)
        job.prune(0.01, pattern, calib=calib).run(calib, "none")
        lines = [line for line in summary(job.report()).splitlines() if line.startswith("faster on: ")]
        assert lines == ["faster on: no runtime: no channel was removed (each group's reason is in the channels lines)"]


def test_layernorm_sites_are_reported_like_the_others(tmp_path):
    """Issue 30: a LayerNorm site is in the typed report (norm and written "layernorm", its statistics and gains),
    in the summary's site rows and on the page, named by its output tensor (it has no layer)."""
    import zoo

    from asr_onnx.pipeline.driver import repair
    from asr_onnx.report.build import write_json
    from asr_onnx.report.schema import from_dict, to_dict

    model, feeds = zoo.linear_layernorm()
    job = repair(model, zoo.DictSet(feeds), sparsity=0.6, batch_size=48, device="cpu", progress=False)
    report = json.loads(write_json(job.report(), tmp_path / "r.json").read_text())
    site = next(s for s in report["sites"] if s["norm"] == "layernorm")
    assert site["written"] == "layernorm" and site["layer"] is None and site["channels"] == 8
    assert len(site["gains"]) == len(site["dense_var"]) == len(site["pruned_var"]) == 8 and site["pruned_upstream"]
    assert report["settings"]["layernorm"] is True
    typed = from_dict(report)
    assert to_dict(typed) == report and untyped(typed) == []
    assert [site["tensor"], "layernorm"] in [line.split()[:2] for line in summary(report).splitlines()]
    assert f'title="{escape(site["tensor"])}">{escape(site["tensor"])}</span>' in render(report, plots=False)


def test_a_channel_report_page_lists_every_group_with_why_it_stays_whole():
    """Issue 30: the page showed a channel-pruned model as "0.0% sparsity" with no word on its groups; it now gives
    what was removed, the parameters and MACs kept, and every group with the reason a whole one stays whole (the
    reason, which names graph nodes, is escaped)."""
    import zoo

    from asr_onnx.pipeline.driver import Repair
    from asr_onnx.report.schema import from_dict

    model, feeds = zoo.TRANSFORMERS["mha_heads"]()
    job = Repair(model, device="cpu", batch_size=24, progress=False).prune(0.5, "channels")
    report = job.run(zoo.DictSet(feeds), "none").report()
    entry = report["channels"]
    removed = sum(g["removed"] for g in entry["groups"])
    whole = [g for g in entry["groups"] if g["whole"]]
    assert removed > 0 and whole
    whole[0]["reason"] = "<script>alert(1)</script> " + whole[0]["reason"]
    page = render(from_dict(report))
    groups = page[page.index('<section id="groups">'):page.index('<section id="damage">')]
    assert groups.count("<tr>") == len(entry["groups"]) + 1
    assert escape(whole[0]["reason"]) in groups and "<script>" not in page
    total = sum(g["channels"] for g in entry["groups"])
    assert f"<b>{removed:,} / {total:,}</b><span>channels removed</span>" in page
    assert f"{removed:,} of {total:,} channels removed, method none" in page and "sparsity reached" not in page
