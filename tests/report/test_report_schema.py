"""Issues 25 and 26: the typed report. A saved JSON report is input: each malformed one is one ``error:`` line,
exit 1, no traceback and nothing written; a well-formed one, old or new, reads back key for key."""

import copy
import json
import os

import numpy as np
import pytest

from asr_onnx.cli.main import main
from asr_onnx.errors import AsrError
from asr_onnx.report.schema import (
    MAX_CONTAINERS,
    MAX_JSON_BYTES,
    MAX_SITE_CHANNELS,
    Report,
    Site,
    Verdict,
    from_dict,
    read_json,
    to_dict,
    write_json,
)


def site(i: int, channels: int = 4, *, variances: bool = True, damage: float = 0.5) -> dict:
    entry = {"tensor": f"/block{i}/conv/Conv_output_0", "layer": f"/block{i}/conv/Conv", "norm": "bn",
             "written": "bn", "channels": channels, "eps": 1e-5, "reference": "dense calibration statistics",
             "pruned_upstream": True}
    if variances:
        reference = [1.0 + c for c in range(channels)]
        pruned = [damage * v for v in reference]
        pruned[0] = 0.0  # one collapsed channel
        entry.update(reference_var=reference, pruned_var=pruned, reference_mean=[0.0] * channels,
                     pruned_mean=[0.1] * channels, dense_var=reference, dense_mean=[0.0] * channels,
                     **{"lambda": None}, gain={"min": 0.9, "median": 1.0, "max": 1.5},
                     gains=[1.5] + [1.0] * (channels - 1), collapsed=[0], repaired_var=reference)
    return entry


def layer(i: int) -> dict:
    return {"name": f"/block{i}/conv/Conv", "weight": f"block{i}.weight", "op": "Conv", "shape": [4, 4, 3, 3],
            "pruned": i != 1, "reason": None if i != 1 else "excluded by --exclude", "sparsity": 0.9 if i != 1 else 0.0,
            "allocation": "global", "score": "magnitude",
            "refit": {"err_before": 0.42, "err_after": 0.125, "cond": 12.5, "gram_size": 36} if i != 2
            else {"skipped": "ConvTranspose is not refitted"}}


def sample_report(sites: int = 3) -> dict:
    """A report with every section the tool writes (and a verdict), each with plausible values."""
    candidate = {"method": "bn", "placement": "recal", "lambda_rule": "median", "agreement": 0.9375,
                 "logit_rel_l2": 0.3, "tied": True}
    refit_none = {"reconstruct": "none", "agreement": 0.5, "logit_rel_l2": 0.75, "tied": False}
    refit_ls = {"reconstruct": "ls", "agreement": 0.625, "logit_rel_l2": 0.5, "tied": True}
    return {
        "tool": {"name": "asr-onnx", "version": "0.1.0"},
        "onnxruntime": {"version": "1.32.0", "provider": "CPUExecutionProvider"},
        "input": "models/resnet.onnx",
        "verdict": {"label": "degraded", "metric": "held-out agreement", "value": 0.82, "threshold_usable": 0.95,
                    "threshold_broken": 0.5, "reason": "held-out agreement 0.82 < 0.95",
                    "suggestion": "try --reconstruct ls"},
        "settings": {
            "sparsity": 0.9, "pattern": "global", "exclude": ["head"], "keep_first": False, "keep_last": False,
            "allocation": "global", "score": "magnitude", "reconstruct": "auto", "max_gram_mb": 256.0,
            "refit_passes": 0, "refit_samples": 0,
            "reconstruct_auto": {"picked": refit_ls, "candidates": [refit_none, refit_ls], "folds": 2,
                                 "held_out": 128, "scored_with": "bn", "reason": "lowest held-out error"},
            "calib_size": 128, "batch_size": 64, "sequential": False, "symbolic_batch": False, "reference": "calib",
            "method": "auto", "placement": "recal", "recal": "exact", "momentum": 0.1, "lambda_rule": "median",
            "correct_head": True,
            "auto": {"picked": candidate, "candidates": [candidate, dict(candidate, method="lw", tied=False)],
                     "folds": 4, "held_out": 128, "reason": "lowest held-out logit error among the tied"},
            "fold_bn": False, "refit_rounds": 1,
            "guard": {"mode": "fallback", "held_out": 128, "folds": 2,
                      "repair": {"agreement": 0.25, "logit_rel_l2": 0.9},
                      "pruned": {"agreement": 0.5, "logit_rel_l2": 0.7}, "repair_refitted": True,
                      "verdict": "pruning alone better", "repair_loses": True, "kept": "pruned", "cost_s": 1.5,
                      "rule": "held out by 2-fold cross-fitting"},
            "fp16": True, "fp16_io": False, "fp16_rel_l2": {"logits": 0.001}, "int8": True, "int8_target": "cpu",
            "resize_mode": "letterbox",  # a setting this schema does not know: kept, shown as text
        },
        "totals": {"prunable_weights": 576 * sites, "sparsity": 0.6},
        "layers": [layer(i) for i in range(sites)],
        "sites": [site(i, damage=0.5 / (i + 1)) for i in range(sites)] + [site(sites, variances=False)],
        "sparse_core": [{"name": f"/block{i}/conv/Conv", "op": "Conv", "weight": f"block{i}.weight",
                         "shape": [4, 4, 3, 3], "params": 144, "zeros": 130, "sparsity": 0.9, "shared": False,
                         "nm_24": "no", "axis_24": 1, "eligible": True, "eligibility": "maybe",
                         "reasons": ["fewer than 256 channels"],
                         "norm": {"kind": "BatchNormalization", "node": f"/block{i}/bn", "ops": ["BatchNormalization"],
                                  "constant_params": True}, "precision": "int8"} for i in range(sites)],
        "timings_s": {"prune": 0.02, "measure_dense": 0.25, "guard": 1.5},
        "eval": {"data": "eval.npz", "samples": 300, "top1": 0.9, "dense_top1": 0.95, "agreement": 0.92,
                 "logit_rel_l2": 0.31},
        "channels": {"groups": [{"kind": "conv", "channels": 16, "removed": 8, "whole": False, "reason": None},
                                {"kind": "residual", "channels": 32, "removed": 0, "whole": True,
                                 "reason": "reaches a graph output"}],
                     "score": "magnitude", "params": [1000, 600], "macs": [50000, 30000]},
        "quantization": quantization(sites),
    }


def quantization(sites: int = 3) -> dict:
    """An ``--int8`` entry: the held-out candidates, the correction, the output errors and per layer the weight
    scales, 2:4 on the codes and the output error before and after the correction."""
    return {
        "format": "QDQ", "target": "cpu", "runtime": "onnxruntime on the CPU (QDQ: integer kernels)",
        "weights": {"type": "int8", "scales": "per output channel", "symmetric": True, "range": 63},
        "activations": {"type": "uint8", "scales": "per tensor", "symmetric": False},
        "calibration": {"picked": {"calibration": "Percentile", "weights": "reduced"}, "fit": 64, "held_out": 64,
                        "candidates": [{"calibration": "MinMax", "weights": "full", "agreement": 0.9375,
                                        "logit_rel_l2": 0.145, "tied": False},
                                       {"calibration": "Percentile", "weights": "reduced", "agreement": 1.0,
                                        "logit_rel_l2": 0.0157, "tied": True}]},
        "float_layers": {"picked": ["/block2/conv/Conv"], "rule": "kept past two paired standard errors",
                         "candidates": [{"layers": [], "agreement": 0.96875, "logit_rel_l2": 0.0157, "picked": False},
                                        {"layers": ["/block2/conv/Conv"], "agreement": 1.0, "logit_rel_l2": 0.009,
                                         "picked": True}]},
        "correction": {"picked": "bn", "candidates": [{"correction": "none", "agreement": 1.0, "logit_rel_l2": 0.0157},
                                                      {"correction": "bn", "agreement": 1.0, "logit_rel_l2": 0.012}],
                       "verdict": "correction better", "rule": "as the guard decides a repair",
                       "sites": {f"/block{i}/conv/Conv_output_0": {
                           "layer": f"/block{i}/conv/Conv", "channels": 4, "gain": {"min": 0.98, "median": 1.0,
                                                                                    "max": 1.02},
                           "mean_shift": 0.05, "var_ratio": 1.01} for i in range(sites)}},
        "output": {"samples": 128, "ptq": {"agreement": 0.9921875, "logit_rel_l2": 0.0157},
                   "corrected": {"agreement": 0.99609375, "logit_rel_l2": 0.012}},
        "layers": [{"name": f"/block{i}/conv/Conv", "op": "Conv", "weight": f"block{i}.weight", "quantized": True,
                    "zeros": 130, "float_nm_24": "yes", "zeros_kept": True, "scale": {"min": 0.001, "max": 0.25},
                    "nm_24": "yes", "rel_l2_ptq": 0.0213, "rel_l2_corrected": 0.0158} for i in range(sites)],
    }


def requantized_input() -> dict:
    """A QDQ input's entry: its weights quantized again after the repair, channel by channel."""
    return {"format": "QDQ", "input": "quantized", "unchanged": False,
            "tensors": [{"layer": "conv2", "weight": "conv2.w", "channels": 8, "kept": 5, "rescaled": 1, "rounded": 1,
                         "new_scale": 1}]}


def test_a_report_round_trips_key_for_key(tmp_path):
    report = sample_report()
    typed = from_dict(report)
    assert isinstance(typed, Report) and isinstance(typed.sites[0], Site) and isinstance(typed.verdict, Verdict)
    assert typed.settings.guard.held_out == 128 and typed.layers[0].refit.err_after == 0.125
    assert typed.sites[0].pruned_var.dtype == np.float64 and not typed.sites[0].pruned_var.flags.writeable
    assert typed.settings.extra == {"resize_mode": "letterbox"}
    assert to_dict(typed) == report
    write_json(typed, tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text()) == report
    assert list(json.loads((tmp_path / "r.json").read_text())["settings"]) == list(report["settings"])  # order
    assert to_dict(read_json(tmp_path / "r.json")) == report


def test_the_quantization_section_is_typed_and_round_trips(tmp_path):
    from asr_onnx.report.schema import Quantization

    typed = from_dict(sample_report())
    q = typed.quantization
    assert isinstance(q, Quantization) and q.weights.range == 63 and q.calibration.picked.calibration == "Percentile"
    assert q.layers[0].scale.max == 0.25 and q.layers[2].rel_l2_corrected == 0.0158 and q.output.ptq.agreement < 1
    assert q.correction.sites["/block1/conv/Conv_output_0"].gain.median == 1.0
    assert q.float_layers.picked == ("/block2/conv/Conv",) and q.float_layers.candidates[1].picked is True
    assert typed.sparse_core[0].precision == "int8" and typed.settings.int8_target == "cpu"
    report = sample_report()
    report["quantization"] = requantized_input()
    typed = from_dict(report)
    assert typed.quantization.tensors[0].new_scale == 1 and to_dict(typed) == report
    write_json(typed, tmp_path / "q.json")
    assert to_dict(read_json(tmp_path / "q.json")) == report


def test_an_old_report_without_most_keys_still_loads(tmp_path):
    old = {"settings": {"pattern": "global"}, "layers": [], "sites": [{"tensor": "a", "lambda_": 0.5,
                                                                        "reference_var": [1, 2], "pruned_var": [0, 1]}]}
    typed = from_dict(old)
    assert typed.sites[0].lambda_ == 0.5 and typed.sites[0].channels is None and typed.eval is None
    assert to_dict(typed)["sites"][0]["lambda"] == 0.5  # the name write_json has always used


@pytest.mark.parametrize("payload", [[], "report", 3, None])
def test_what_is_not_an_object_is_not_a_report(payload):
    with pytest.raises(AsrError, match="not an asr-onnx report"):
        from_dict(payload)
    with pytest.raises(AsrError, match="not an asr-onnx report"):
        from_dict({"tool": {"name": "asr-onnx"}})


def _walk(report, path: str):
    """The container of ``path``'s last key (dots, and [i] for list items) and that key."""
    *parents, last = path.split(".")
    node = report
    for key in parents:
        node = node[int(key[1:-1])] if key.startswith("[") else node[key]
    return node, int(last[1:-1]) if last.startswith("[") else last


def _set(path: str, value):
    """A mutation of a sample report: sets the value at ``path``."""
    def mutate(report):
        node, key = _walk(report, path)
        node[key] = value
        return report
    return mutate


def _drop(path: str):
    def mutate(report):
        node, key = _walk(report, path)
        del node[key]
        return report
    return mutate


XSS = '<script>alert(1)</script>"><img src=x onerror=alert(1)>'

# (id, mutation of the sample report or the raw text of the file, what the one error line says)
MALFORMED = [
    # settings
    ("settings-list", _set("settings", []), "report field settings: a list is not an object"),
    ("settings-sparsity-str", _set("settings.sparsity", "0.9"), "settings.sparsity: a string '0.9' is not a number"),
    ("settings-sparsity-range", _set("settings.sparsity", 1.5), "settings.sparsity: 1.5 is outside [0, 1]"),
    ("settings-exclude-str", _set("settings.exclude", "head"), "settings.exclude: a string 'head' is not a list"),
    ("settings-keep-first", _set("settings.keep_first", "yes"), "settings.keep_first: a string 'yes' is not true"),
    ("guard-held-out-xss", _set("settings.guard.held_out", XSS), "settings.guard.held_out: a string"),
    ("guard-agreement", _set("settings.guard.repair.agreement", 2), "settings.guard.repair.agreement: 2 is outside"),
    ("auto-held-out-xss", _set("settings.auto.held_out", XSS), "settings.auto.held_out: a string"),
    ("auto-folds-xss", _set("settings.auto.folds", XSS), "settings.auto.folds: a string"),
    ("auto-candidates", _set("settings.auto.candidates", {}), "settings.auto.candidates: an object is not a list"),
    ("refit-auto-held-out-xss", _set("settings.reconstruct_auto.held_out", XSS),
     "settings.reconstruct_auto.held_out: a string"),
    ("refit-auto-folds-xss", _set("settings.reconstruct_auto.folds", XSS), "settings.reconstruct_auto.folds: a string"),
    # layers, and their refit
    ("layers-object", _set("layers", {}), "report field layers: an object is not a list"),
    ("layer-str", _set("layers.[0]", "conv"), "layers[0]: a string 'conv' is not an object"),
    ("layer-name-int", _set("layers.[0].name", 7), "layers[0].name: 7 is not a string"),
    ("layer-shape", _set("layers.[0].shape", [3, "x"]), "layers[0].shape[1]: a string 'x' is not an integer"),
    ("layer-sparsity", _set("layers.[0].sparsity", -0.1), "layers[0].sparsity: -0.1 is outside [0, 1]"),
    ("layer-pruned", _set("layers.[0].pruned", "false"), "layers[0].pruned: a string 'false' is not true or false"),
    ("layer-no-name", _drop("layers.[0].name"), "layers[0].name: is missing"),
    ("refit-list", _set("layers.[0].refit", []), "layers[0].refit: a list is not an object"),
    ("refit-err-str", _set("layers.[0].refit.err_after", "0.5"), "layers[0].refit.err_after: a string"),
    ("refit-err-nan", _set("layers.[0].refit.err_before", float("nan")), "layers[0].refit.err_before: nan is not"),
    # sites, gains, collapsed, eps
    ("sites-str", _set("sites", "none"), "report field sites: a string 'none' is not a list"),
    ("channels-xss", _set("sites.[3].channels", XSS), "sites[3].channels: a string"),
    ("channels-1e12", _set("sites.[0].channels", 1e12), "sites[0].channels: 1000000000000.0 is not an integer"),
    ("channels-int-1e12", _set("sites.[0].channels", 10 ** 12), "sites[0].channels: 1000000000000 is outside"),
    ("channels-5M", _set("sites.[0].channels", 5_000_000), "sites[0].channels: 5000000 is outside"),
    ("channels-negative", _set("sites.[0].channels", -1), "sites[0].channels: -1 is outside"),
    ("var-str", _set("sites.[0].pruned_var.[1]", "a"), "sites[0].pruned_var[1]: a string 'a' is not a number"),
    ("var-bool", _set("sites.[0].reference_var.[2]", True), "sites[0].reference_var[2]: true is not a number"),
    ("var-length", _set("sites.[0].pruned_var", [1.0, 2.0]), "sites[0].pruned_var: 2 values for 4 channels"),
    ("var-1e308", _set("sites.[0].pruned_var.[0]", 1e308), "sites[0].pruned_var[0]: 1e+308 is not a finite number"),
    ("gains-str", _set("sites.[0].gains", "1.0"), "sites[0].gains: a string '1.0' is not a list"),
    ("gain-min-str", _set("sites.[0].gain.min", "a"), "sites[0].gain.min: a string 'a' is not a number"),
    ("collapsed-out", _set("sites.[0].collapsed", [99]), "sites[0].collapsed: channel 99 of a site of 4 channels"),
    ("collapsed-negative", _set("sites.[0].collapsed", [-1]), "sites[0].collapsed[0]: -1 is not a finite number"),
    ("collapsed-float", _set("sites.[0].collapsed", [0.5]), "sites[0].collapsed[0]: 0.5 is not an integer"),
    ("eps-inf", _set("sites.[0].eps", float("inf")), "sites[0].eps: inf is not a finite number"),
    ("eps-1e308", _set("sites.[0].eps", 1e308), "sites[0].eps: 1e+308 is outside [0, 1e+100]"),
    ("eps-negative", _set("sites.[0].eps", -1e-5), "sites[0].eps: -1e-05 is outside"),
    ("eps-str", _set("sites.[0].eps", "1e-5"), "sites[0].eps: a string '1e-5' is not a number"),
    # totals, timings, eval, tool, input, verdict
    ("totals-negative", _set("totals.prunable_weights", -5), "totals.prunable_weights: -5 is outside"),
    ("totals-sparsity-str", _set("totals.sparsity", "90%"), "totals.sparsity: a string '90%' is not a number"),
    ("timings-list", _set("timings_s", [1, 2]), "report field timings_s: a list is not an object"),
    ("timing-str", _set("timings_s.prune", "fast"), "timings_s.prune: a string 'fast' is not a number"),
    ("timing-negative", _set("timings_s.prune", -1), "timings_s.prune: -1 is outside"),
    ("eval-samples-xss", _set("eval.samples", XSS), "eval.samples: a string"),
    ("eval-top1", _set("eval.top1", 1.5), "eval.top1: 1.5 is outside [0, 1]"),
    ("eval-number", _set("eval", 3), "report field eval: 3 is not an object"),
    ("tool-str", _set("tool", "asr-onnx"), "report field tool: a string 'asr-onnx' is not an object"),
    ("tool-version-int", _set("tool.version", 1), "tool.version: 1 is not a string"),
    ("input-list", _set("input", ["a"]), "report field input: a list is not a string"),
    ("input-too-long", _set("input", "m" * 70_000), "input: a string of 70,000 characters"),
    ("provider-object", _set("onnxruntime.provider", {}), "onnxruntime.provider: an object is not a string"),
    ("verdict-label", _set("verdict.label", "fine"), "verdict.label: a string 'fine' is not one of usable, degraded"),
    ("verdict-value-str", _set("verdict.value", "0.8"), "verdict.value: a string '0.8' is not a number"),
    ("verdict-no-reason", _drop("verdict.reason"), "verdict.reason: is missing"),
    # quantization (--int8, or a QDQ input quantized again)
    ("quantization-list", _set("quantization", []), "report field quantization: a list is not an object"),
    ("quantization-range-str", _set("quantization.weights.range", "127"),
     "quantization.weights.range: a string '127' is not an integer"),
    ("quantization-scale-negative", _set("quantization.layers.[1].scale.min", -0.5),
     "quantization.layers[1].scale.min: -0.5 is outside"),
    ("quantization-error-nan", _set("quantization.layers.[0].rel_l2_ptq", float("nan")),
     "quantization.layers[0].rel_l2_ptq: nan is not a finite number"),
    ("quantization-layer-xss", _set("quantization.layers.[0].quantized", XSS), "quantization.layers[0].quantized"),
    ("quantization-no-layer-name", _drop("quantization.layers.[2].name"), "quantization.layers[2].name: is missing"),
    ("quantization-candidate-agreement", _set("quantization.calibration.candidates.[1].agreement", 1.5),
     "quantization.calibration.candidates[1].agreement: 1.5 is outside [0, 1]"),
    ("quantization-float-layers", _set("quantization.float_layers.picked", "/block2/conv/Conv"),
     "quantization.float_layers.picked: a string '/block2/conv/Conv' is not a list"),
    ("quantization-output-samples", _set("quantization.output.samples", -3), "quantization.output.samples: -3"),
    ("quantization-site-gain", _set("quantization.correction.sites./block0/conv/Conv_output_0.gain.max", "x"),
     "quantization.correction.sites.'/block0/conv/Conv_output_0'.gain.max: a string 'x' is not a number"),
    ("quantization-tensors-count", _set("quantization.tensors", requantized_input()["tensors"] + [
        {"layer": "fc", "channels": 5, "kept": 5, "rescaled": 1}]), "quantization.tensors[1]: 6 channels counted of 5"),
    ("unknown-key-deep", _set("settings.later", json.loads("[" * 40 + "]" * 40)), "settings.later"),
    ("unknown-key-nan", _set("extra_section", {"x": float("inf")}), "extra_section.x: inf is not a finite number"),
    # the file itself
    ("nesting-1100", '{"settings": {}, "layers": ' + "[" * 1100 + "]" * 1100 + "}", "nests too deeply"),
    ("int-4301-digits", '{"settings": {}, "sites": [{"tensor": "a", "channels": ' + "9" * 4301 + "}]}",
     "sites[0].channels: an integer of 4,301 digits is out of range"),
    ("top-level-list", "[1, 2]", "not an asr-onnx report: a list"),
    ("no-section", '{"tool": {"name": "asr-onnx"}}', "not an asr-onnx report (no settings, layers or sites)"),
    ("not-json", "{not json", "is not a JSON report: Expecting property name"),
    ("not-utf8", b'{"input": "\xff"}', "not UTF-8 text"),
]


@pytest.mark.parametrize("mutate, message", [case[1:] for case in MALFORMED], ids=[case[0] for case in MALFORMED])
def test_a_malformed_report_is_one_error_line_and_writes_nothing(mutate, message, tmp_path, capsys):
    path, page = tmp_path / "r.json", tmp_path / "r.html"
    if isinstance(mutate, bytes):
        path.write_bytes(mutate)
    elif isinstance(mutate, str):
        path.write_text(mutate)
    else:
        path.write_text(json.dumps(mutate(copy.deepcopy(sample_report()))))
    before = path.read_bytes()
    assert main(["report", str(path), "-o", str(page)]) == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err, err
    assert message in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"] and path.read_bytes() == before


def test_the_malformed_table_covers_every_section():
    ids = " ".join(case[0] for case in MALFORMED)
    for word in ("settings", "layer", "sites", "totals", "timing", "eval", "tool", "input", "gain", "collapsed",
                 "eps", "refit", "nesting", "4301", "negative", "verdict", "quantization"):
        assert word in ids, word
    assert len(MALFORMED) >= 39


@pytest.mark.parametrize("name, message", [("/block3/conv/Conv", "has no per-channel variances"),
                                           ("nowhere", "no site named 'nowhere'")])
def test_site_naming_a_site_without_variances_or_none_is_one_line(name, message, tmp_path, capsys):
    (tmp_path / "r.json").write_text(json.dumps(sample_report()))
    assert main(["report", str(tmp_path / "r.json"), "-o", str(tmp_path / "r.html"), "--site", name]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def _cli(args, timeout=60):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "asr_onnx.cli.main", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("kind", ["/dev/zero", "fifo", "folder"])
def test_what_is_not_a_regular_file_is_refused_before_it_is_read(kind, tmp_path):
    """/dev/zero would be read until memory runs out, a FIFO would block: both are refused unread."""
    source = {"/dev/zero": "/dev/zero", "fifo": str(tmp_path / "r.json"), "folder": str(tmp_path)}[kind]
    if kind == "fifo":
        os.mkfifo(source)
    result = _cli(["report", source, "-o", str(tmp_path / "p.html")])
    # the CLI's plan refuses it first (outputs.Plan.read); read_json itself refuses it too (the API's path)
    assert result.returncode == 1 and result.stderr.startswith("error: ") and "not a regular file" in result.stderr
    assert result.stderr.count("\n") == 1 and not (tmp_path / "p.html").exists()


def test_a_file_past_the_size_cap_or_with_too_many_containers_is_refused_unparsed(tmp_path, capsys):
    big = tmp_path / "big.json"
    with open(big, "wb") as handle:
        handle.truncate(MAX_JSON_BYTES + 1)  # sparse: nothing is written to disk
    assert main(["report", str(big), "-o", str(tmp_path / "p.html")]) == 1
    assert "a JSON report is at most 128 MiB" in capsys.readouterr().err
    many = tmp_path / "many.json"
    many.write_text('{"settings": {}, "x": [' + ",".join(["{}"] * (MAX_CONTAINERS + 1)) + "]}")
    assert main(["report", str(many), "-o", str(tmp_path / "p.html")]) == 1
    assert f"JSON arrays and objects (at most {MAX_CONTAINERS:,})" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.json", "many.json"]


def test_a_site_past_the_channel_cap_is_refused_with_its_field(tmp_path):
    wide = {"settings": {}, "sites": [{"tensor": "t", "pruned_var": [0] * (MAX_SITE_CHANNELS + 1)}]}
    with pytest.raises(AsrError, match=r"sites\[0\].pruned_var: a list of 1,048,577 values"):
        from_dict(wide)


def test_a_live_report_is_checked_before_it_is_written(tmp_path):
    """A number that JSON cannot hold never reaches a file: the writer validates what build_report made."""
    report = sample_report()
    report["eval"]["logit_rel_l2"] = float("nan")
    with pytest.raises(AsrError, match="eval.logit_rel_l2: nan is not a finite number"):
        write_json(report, tmp_path / "r.json")
    assert list(tmp_path.iterdir()) == []
