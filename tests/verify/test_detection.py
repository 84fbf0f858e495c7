"""Detection heads (issue 29): decoding, NMS and matching against a brute-force oracle written here, anchor by
anchor in plain Python, on the zoo's YOLO-style (v8: (N, 4+C, A); v5: (N, A, 5+C) with objectness) and
SSD-style (boxes + Softmax scores with a background) detectors, whose outputs are first checked against the
zoo's numpy forward passes; and a detector whose class scores collapse, scored broken though its raw output
error is tiny."""

import numpy as np
import onnxruntime as ort
import pytest
import zoo

from asr_onnx.calib import input_specs, load_calib
from asr_onnx.errors import AsrError
from asr_onnx.model.kinds import output_kinds, parse_output_kinds
from asr_onnx.pipeline.driver import Repair
from asr_onnx.verify.detection import decode, detection_scores, match_counts
from asr_onnx.verify.evaluation import evaluate
from asr_onnx.verify.scoring import plan_scoring

THRESHOLD, NMS_IOU, MATCH_IOU = 0.25, 0.45, 0.5
BUILDERS = {"yolov8": lambda: zoo.yolo_detector(True), "yolov5": lambda: zoo.yolo_detector(False),
            "ssd": zoo.ssd_detector}
ORACLES = {"yolov8": lambda m, x: [zoo.yolo_detector_oracle(m, x, True)],
           "yolov5": lambda m, x: [zoo.yolo_detector_oracle(m, x, False)],
           "ssd": lambda m, x: list(zoo.ssd_detector_oracle(m, x))}


def _run(model, x):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})


def _set(tmp_path, model, x, name="x"):
    np.save(tmp_path / f"{name}.npy", x)
    return load_calib(tmp_path / f"{name}.npy", input_specs(model))


# ---------------------------------------------------------------------------------------------- the oracle


def _iou(a, b):
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1]) + max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _candidates(layout, outputs, image):
    """Every anchor of one image whose best class scores >= THRESHOLD: (corners, class, score, anchor)."""
    found = []
    if layout == "ssd":
        boxes, probs = outputs
        for a in range(boxes.shape[1]):
            scores = [float(p) for p in probs[image, a, 1:]]  # class 0 is the background
            box = tuple(float(v) for v in boxes[image, a])
            found.append((box, scores, a))
    else:
        (out,) = outputs
        anchors = out.shape[2] if layout == "yolov8" else out.shape[1]
        for a in range(anchors):
            row = [float(v) for v in (out[image, :, a] if layout == "yolov8" else out[image, a, :])]
            cx, cy, w, h = row[:4]
            scores = row[4:] if layout == "yolov8" else [row[4] * c for c in row[5:]]
            found.append(((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), scores, a))
    kept = []
    for box, scores, a in found:
        best = 0
        for c in range(1, len(scores)):
            if scores[c] > scores[best]:
                best = c
        if scores[best] >= THRESHOLD:
            kept.append((box, best, scores[best], a))
    return kept


def _oracle_detections(layout, outputs, image):
    """Greedy NMS, one class at a time: a box survives when it overlaps no kept box of its class by more than
    NMS_IOU. Returns (kept, candidates before NMS)."""
    found = _candidates(layout, outputs, image)
    kept = []
    for cand in sorted(found, key=lambda c: (-c[2], c[3])):
        if all(k[1] != cand[1] or _iou(k[0], cand[0]) <= NMS_IOU for k in kept):
            kept.append(cand)
    return kept, found


def _oracle_counts(reference, candidate, classes):
    """Per class [tp, fp, fn]: the candidate's detections, best first, each take the free reference detection
    of their class they overlap most, when by MATCH_IOU or more."""
    counts = [[0, 0, 0] for _ in range(classes)]
    for cls in range(classes):
        theirs = [r for r in reference if r[1] == cls]
        free = [True] * len(theirs)
        for det in sorted((d for d in candidate if d[1] == cls), key=lambda d: -d[2]):
            best, best_iou = None, -1.0
            for j, ref in enumerate(theirs):
                overlap = _iou(det[0], ref[0])
                if free[j] and overlap > best_iou:
                    best, best_iou = j, overlap
            if best is not None and best_iou >= MATCH_IOU:
                free[best] = False
                counts[cls][0] += 1
            else:
                counts[cls][1] += 1
        counts[cls][2] += sum(free)
    return counts


def _oracle_f1(counts):
    f1 = [2 * tp / (2 * tp + fp + fn) for tp, fp, fn in counts if tp + fp + fn]
    return sum(f1) / len(f1)


# ---------------------------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("layout", list(BUILDERS))
def test_the_zoo_detectors_compute_what_their_numpy_oracles_do(layout):
    """The graphs are what the tests below take them for: boxes in pixels beside class scores in [0, 1]."""
    model, feeds = BUILDERS[layout]()
    outputs = _run(model, feeds["input"])
    for got, want in zip(outputs, ORACLES[layout](model, feeds["input"])):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * max(1.0, np.abs(want).max()))
    for image in range(len(feeds["input"])):
        found = _candidates(layout, outputs, image)
        assert found and all(0 <= score <= 1 for _, _, score, _ in found)
        assert max(max(abs(v) for v in box) for box, *_ in found) > 40  # pixels: at least one grid step


@pytest.mark.parametrize("layout", list(BUILDERS))
def test_heads_are_recognised_and_decoded_as_the_oracle_does(layout):
    model, feeds = BUILDERS[layout]()
    outputs = _run(model, feeds["input"])
    plan = plan_scoring(output_kinds(model), outputs, [0] * len(outputs))
    (head,) = plan.heads
    assert plan.kinds == ["detection"] * len(outputs) and plan.agreement is None
    assert (head.box_format, head.objectness, head.background) == {
        "yolov8": ("cxcywh", False, False), "yolov5": ("cxcywh", True, False), "ssd": ("xyxy", False, True)}[layout]
    suppressed = 0
    for image, (boxes, classes, scores) in enumerate(decode(head, outputs)):
        kept, before = _oracle_detections(layout, outputs, image)
        suppressed += len(before) - len(kept)
        want = sorted((round(s, 9), c, b) for b, c, s, _ in kept)
        got = sorted((round(float(s), 9), int(c), tuple(b)) for b, c, s in zip(boxes, classes, scores))
        assert [(s, c) for s, c, _ in got] == [(s, c) for s, c, _ in want]
        np.testing.assert_allclose([b for *_, b in got], [b for *_, b in want], rtol=1e-12, atol=1e-9)
    assert suppressed > 0  # NMS had work to do: the comparison can fail


@pytest.mark.parametrize("layout", list(BUILDERS))
def test_detection_f1_against_the_dense_model_is_the_oracles(tmp_path, layout):
    dense, feeds = BUILDERS[layout]()
    x = feeds["input"]
    pruned = Repair(dense, device="cpu", progress=False).prune(0.4).pruned
    result = evaluate(pruned, _set(tmp_path, dense, x), reference=dense, device="cpu", progress=False, batch_size=20)
    dense_out, pruned_out = _run(dense, x), _run(pruned, x)
    classes = 3
    counts = np.zeros((classes, 3), np.int64)
    for image in range(len(x)):
        counts += np.array(_oracle_counts(_oracle_detections(layout, dense_out, image)[0],
                                          _oracle_detections(layout, pruned_out, image)[0], classes))
    got = result["detection"]
    assert result["metric"] == "detection_f1" and result["agreement"] is None
    assert {c: [v["tp"], v["fp"], v["fn"]] for c, v in got["per_class"].items()} == \
        {c: row for c, row in enumerate(counts.tolist()) if sum(row)}
    assert 0 < got["f1"] < 1 and got["f1"] == pytest.approx(_oracle_f1(counts.tolist()), abs=1e-12)
    assert got["reference_detections"] == counts[:, [0, 2]].sum()


def test_a_false_class_counts_against_precision_and_a_class_neither_detects_is_skipped():
    box = np.array([[0.0, 0.0, 10.0, 10.0]])
    dense = (box, np.array([0]), np.array([0.9]))
    # the candidate finds the dense model's class-0 box, and calls a box of class 2 that the dense never detects
    candidate = (np.concatenate([box + 1, box + 50]), np.array([0, 2]), np.array([0.8, 0.99]))
    counts = match_counts(dense, candidate, classes=4)
    assert counts.tolist() == [[1, 0, 0], [0, 0, 0], [0, 1, 0], [0, 0, 0]]  # IoU of the shifted box: 81/119
    scores = detection_scores(counts)
    assert scores["classes_scored"] == 2 and scores["f1"] == 0.5 and scores["precision"] == 0.5
    assert scores["recall"] == 1.0  # class 2's recall is undefined: the dense model never detects it
    moved = (box + 3, np.array([0]), np.array([0.8]))  # IoU 49/151 < 0.5: a miss and a false detection
    assert match_counts(dense, moved, classes=1).tolist() == [[0, 1, 1]]


def test_a_repair_whose_class_scores_collapse_is_broken_though_its_raw_error_is_tiny(tmp_path):
    """Only the class branch is pruned: the boxes, in pixels, are untouched and dominate the raw relative
    error, which stays far below 1%; the dense model's detections are mostly lost."""
    dense, feeds = zoo.yolo_detector(n=96)
    calib = _set(tmp_path, dense, feeds["input"])
    job = Repair(dense, device="cpu", progress=False).prune(0.9, exclude=["^(?!cls_)"]).run(calib, "bn",
                                                                                           guard="fallback")
    pruned = [layer.name for layer in job.layers if layer.pruned]
    assert len(pruned) == 2 and all(name.startswith("cls_") for name in pruned)
    fresh = _set(tmp_path, dense, zoo._feed((3, 16, 16), n=96, seed=77), "fresh")
    job.evaluate(fresh, name="fresh")
    scores = job.evaluation
    assert scores["logit_rel_l2"] < 0.01 and scores["metric"] == "detection_f1"
    assert scores["detection"]["f1"] < 0.5
    verdict = job.verdict.as_dict()
    assert verdict["label"] == "broken" and verdict["metric"] == "detection_f1"
    assert verdict["value"] == scores["detection"]["f1"] and verdict["threshold_broken"] == 0.5
    assert verdict["suggestion"] and "--reconstruct ls" in verdict["suggestion"]
    report = job.report()
    assert report["verdict"] == verdict


def test_output_kind_overrides(tmp_path):
    head, feeds = zoo.detector_head()  # a raw conv map (N, 22, 64): negative "scores", not a head
    outputs = _run(head, feeds["input"])
    kinds = output_kinds(head)
    assert plan_scoring(kinds, outputs, [0]).kinds == ["map"]
    named = plan_scoring(kinds, outputs, [0], {kinds[0].name: "detection"})  # the user's word: shape only
    assert named.kinds == ["detection"] and named.heads[0].classes == 18
    yolo, feeds = zoo.yolo_detector()
    outputs = _run(yolo, feeds["input"])
    plain = plan_scoring(output_kinds(yolo), outputs, [0], {"output": "regression"})
    assert plain.kinds == ["regression"] and not plain.heads and plain.channel_axes == [2]
    recogniser, feeds = zoo.time_first_recogniser()
    outputs = _run(recogniser, feeds["input"])
    assert plan_scoring(output_kinds(recogniser), outputs, [1]).kinds == ["classes"]
    with pytest.raises(AsrError, match="neither a YOLO head"):
        plan_scoring(output_kinds(recogniser), outputs, [1], {output_kinds(recogniser)[0].name: "detection"})
    assert parse_output_kinds(["a:b:map", "out:Detection"]) == {"a:b": "map", "out": "detection"}
    for bad, message in (("out", "expected NAME:KIND"), ("out:boxes", "unknown kind"), (":map", "expected")):
        with pytest.raises(AsrError, match=message):
            parse_output_kinds([bad])


VERDICT_KEYS = ["label", "metric", "value", "threshold_usable", "threshold_broken", "reason", "suggestion"]


def test_eval_cli_scores_a_detector_and_gives_a_verdict(tmp_path, capsys):
    import json

    import onnx

    from asr_onnx.cli.main import main

    dense, feeds = zoo.yolo_detector()
    onnx.save(dense, tmp_path / "dense.onnx")
    onnx.save(Repair(dense, device="cpu", progress=False).prune(0.5).pruned, tmp_path / "pruned.onnx")
    np.save(tmp_path / "x.npy", feeds["input"])
    argv = ["eval", str(tmp_path / "pruned.onnx"), "--data", str(tmp_path / "x.npy"), "--reference",
            str(tmp_path / "dense.onnx"), "-q", "--device", "cpu"]
    assert main(argv + ["--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    verdict = result["verdict"]
    assert list(verdict) == VERDICT_KEYS and verdict["metric"] == "detection_f1"
    assert verdict["value"] == result["detection"]["f1"] and verdict["label"] in ("degraded", "broken")
    assert verdict["suggestion"].startswith("if it was pruned") and result["output_kinds"] == {"output": "detection"}
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"verdict: {verdict['label']} - detection F1 ") and "held-out" not in lines[0]
    assert any(line.startswith("detection F1 ") for line in lines)
    assert main(argv + ["--output-kind", "output:map", "--json"]) == 0  # channels after the batch, as the head's
    plain = json.loads(capsys.readouterr().out)
    assert plain["verdict"]["metric"] == "standardised_error" and plain["detection"] is None
    assert plain["verdict"]["value"] == pytest.approx(result["standardised_error"], rel=1e-12)
    assert main(argv + ["--output-kind", "boxes:detection"]) == 1
    assert capsys.readouterr().err.strip() == ("error: --output-kind names 'boxes', not an output of the model; "
                                               "its outputs are 'output'")


def test_repair_cli_reports_the_verdict_first_and_at_the_top_of_the_json(tmp_path, capsys):
    import json

    import onnx

    from asr_onnx.cli.main import main

    dense, feeds = zoo.ssd_detector(n=64)
    onnx.save(dense, tmp_path / "m.onnx")
    np.save(tmp_path / "x.npy", feeds["input"])
    argv = ["repair", str(tmp_path / "m.onnx"), "--calib", str(tmp_path / "x.npy"), "--sparsity", "0.5",
            "-o", str(tmp_path / "o.onnx"), "--report", str(tmp_path / "r.json"), "--device", "cpu"]
    assert main(argv) == 0
    first = capsys.readouterr().out.splitlines()[0]
    report = json.loads((tmp_path / "r.json").read_text())
    verdict, guard = report["verdict"], report["settings"]["guard"]
    assert list(verdict) == VERDICT_KEYS and verdict["metric"] == guard["metric"] == "detection_f1"
    assert verdict["value"] == guard[guard["kept"]]["detection_f1"] and "64 held-out calibration samples" in first
    assert first == f"verdict: {verdict['label']} - {verdict['reason']}" + (
        f"; {verdict['suggestion']}" if verdict["suggestion"] else "")
    assert main(argv + ["--output-kind", "scores:regression", "--output-kind", "boxes:map", "-q"]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["settings"]["guard"]["metric"] == report["verdict"]["metric"] == "standardised_error"
