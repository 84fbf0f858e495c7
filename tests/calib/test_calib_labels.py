"""Class numbers of class folders: numeric order, the model's class count, --labels files, and the warning
when a score on labelled data is near chance (issue 29: ``0/90/180/270`` scored 25% with no warning)."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from calib_files import GRAY, pixels, save_png
from zoo import conv_net

from asr_onnx.calib import load_calib
from asr_onnx.calib.labels import NUMERIC, SORTED, VALUES, ClassMap, ClassNaming, chance_warning, read_labels
from asr_onnx.cli.main import main
from asr_onnx.errors import AsrError

ROTATIONS = ["0", "90", "180", "270"]


@pytest.mark.parametrize("names, model_classes, expected, rule", [
    (ROTATIONS, 4, {"0": 0, "90": 1, "180": 2, "270": 3}, NUMERIC),  # 270 is no class of a 4-class model
    (ROTATIONS, None, {"0": 0, "90": 1, "180": 2, "270": 3}, NUMERIC),
    (["2", "7"], 10, {"2": 2, "7": 7}, VALUES),  # a subset of a 10-class model's classes keeps its numbers
    ([str(i) for i in range(1, 11)], 10, {str(i): i - 1 for i in range(1, 11)}, NUMERIC),  # numbered from 1
    (["dog", "cat", "10"], 10, {"10": 0, "cat": 1, "dog": 2}, SORTED),
])
def test_class_folder_numbering(names, model_classes, expected, rule):
    class_map = ClassNaming(model_classes).classes(names)
    assert class_map.index_of == expected and class_map.rule == rule


def test_describe_lists_the_mapping_in_class_order_and_cuts_long_ones():
    assert ClassNaming().classes(ROTATIONS).describe() == f"0->0, 90->1, 180->2, 270->3 ({NUMERIC})"
    many = ClassMap({f"c{i:02d}": i for i in range(20)}, SORTED).describe()
    assert many.startswith("c00->0, c01->1") and "c11->11, ... (8 more)" in many


@pytest.mark.parametrize("name, text, expected", [
    ("labels.txt", "cat\ndog\n", {"cat": 0, "dog": 1}),
    ("synset_words.txt", "n01440764 tench, Tinca tinca\nn01443537 goldfish\n",
     {"n01440764 tench, Tinca tinca": 0, "n01440764": 0, "n01443537 goldfish": 1, "n01443537": 1}),
    ("labels.json", '["cat", "dog"]', {"cat": 0, "dog": 1}),
    ("labels.json", '{"cat": 1, "dog": 0}', {"cat": 1, "dog": 0}),
    ("labels.json", '{"0": "cat", "1": "dog"}', {"cat": 0, "dog": 1}),
    ("imagenet_class_index.json", '{"0": ["n01440764", "tench"]}', {"n01440764": 0, "tench": 0}),
    ("labels", '["270", "0"]', {"270": 0, "0": 1}),  # JSON recognised without its suffix
])
def test_read_labels_forms(tmp_path, name, text, expected):
    (tmp_path / name).write_text(text)
    assert read_labels(tmp_path / name) == expected


@pytest.mark.parametrize("text, message", [
    ("", "is empty"),
    ("cat\n\ndog\n", "line 2 is empty"),
    ("[\"cat\", ", "not valid JSON"),
    ('{"cat": 0, "dog": "x"}', "must be a JSON list"),
    ('{"cat": -1}', "negative class number"),
    ('["cat", "cat"]', "'cat' two class numbers, 0 and 1"),
    ('[1, 2]', "1 is not a class name"),
    ('{}', "must be a JSON list"),
])
def test_read_labels_bad_files(tmp_path, text, message):
    (tmp_path / "labels.txt").write_text(text)  # JSON is told by its first character
    with pytest.raises(AsrError, match=message):
        read_labels(tmp_path / "labels.txt")


def test_read_labels_missing_file(tmp_path):
    with pytest.raises(AsrError, match="cannot read the labels file"):
        read_labels(tmp_path / "none.txt")


def test_a_labels_file_numbers_the_folders_and_must_name_them_all(tmp_path):
    for name in ("cat", "dog", "eel"):
        save_png(tmp_path / "data" / name / "a.png", pixels(0, (6, 5)))
    (tmp_path / "labels.txt").write_text("dog\ncat\neel\n")
    calib = load_calib(tmp_path / "data", GRAY, labels=tmp_path / "labels.txt")
    np.testing.assert_array_equal(calib.labels, [1, 0, 2])
    assert calib.classes.rule == f"from {tmp_path / 'labels.txt'}"
    (tmp_path / "short.txt").write_text("dog\ncat\n")
    with pytest.raises(AsrError, match="class folder.s. eel not in the labels file"):
        load_calib(tmp_path / "data", GRAY, labels=tmp_path / "short.txt")


def test_a_labels_file_for_data_without_class_folders_is_refused(tmp_path):
    (tmp_path / "labels.txt").write_text("a\nb\n")
    np.savez(tmp_path / "set.npz", x=np.zeros((2, 1, 6, 5), np.float32), y=np.array([0, 1]))
    with pytest.raises(AsrError, match="numbers class folders, but .* has labels stored in its files"):
        load_calib(tmp_path / "set.npz", GRAY, labels=tmp_path / "labels.txt")
    save_png(tmp_path / "flat" / "a.png", pixels(0, (6, 5)))
    with pytest.raises(AsrError, match="has no class subfolders"):
        load_calib(tmp_path / "flat", GRAY, labels=tmp_path / "labels.txt")


@pytest.mark.parametrize("top1, labels, classes, warned, why", [
    (0.25, [0, 1, 2, 3] * 10, None, True, "near chance (25.0%"),  # four balanced classes, model at chance
    (0.9, [0, 1, 2, 3] * 10, None, False, ""),
    (0.40, list(range(1000)) * 2, None, False, ""),  # far above 0.1% chance on 1,000 classes
    (0.0015, list(range(1000)) * 2, None, True, "near chance"),
    (0.95, [0, 1, 2, 90] * 10, 4, True, "10 of 40 labels are not classes of the model (0..3)"),
    (None, [0, 1], None, False, ""),
])
def test_chance_warning(top1, labels, classes, warned, why):
    class_map = ClassNaming().classes(ROTATIONS)
    warning = chance_warning(top1, np.array(labels), class_map, classes)
    assert (warning is not None) == warned
    if warned:
        assert why in warning and "label mapping may be wrong" in warning
        assert "0->0, 90->1, 180->2, 270->3" in warning and "--labels FILE" in warning


def rotation_folders(tmp_path, per_class=3):
    """A 4-class model and solid-colour images filed under 0/90/180/270 by the class the model gives them
    (up to ``per_class`` each): the model scores 100% exactly when folder k is class k of the numeric order."""
    model = conv_net(classes=4, seed=5)
    model_path = tmp_path / "rot.onnx"
    onnx.save(model, model_path)
    colours = np.random.default_rng(0).integers(0, 256, (200, 1, 1, 3)).astype(np.uint8)
    images = np.broadcast_to(colours, (200, 8, 8, 3))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    predicted = session.run(None, {"input": images.astype(np.float32).transpose(0, 3, 1, 2) / 255})[0].argmax(1)
    kept = [i for label in range(4) for i in np.flatnonzero(predicted == label)[:per_class]]
    assert len(kept) == 4 * per_class  # every class is there, so a wrong mapping shows
    for i in kept:
        save_png(tmp_path / "data" / ROTATIONS[predicted[i]] / f"{i}.png", np.ascontiguousarray(images[i]))
    return model_path, tmp_path / "data"


def test_eval_of_rotation_folders_scores_numeric_order_and_warns_on_a_wrong_mapping(tmp_path, capsys):
    model, data = rotation_folders(tmp_path)
    assert main(["eval", str(model), "--data", str(data), "-q", "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["top1"] == 1.0 and captured.err == ""
    (tmp_path / "wrong.txt").write_text("270\n180\n90\n0\n")
    assert main(["eval", str(model), "--data", str(data), "-q", "--labels", str(tmp_path / "wrong.txt")]) == 0
    captured = capsys.readouterr()
    assert "top-1 " in captured.out
    (warning,) = captured.err.strip().splitlines()
    assert warning.startswith("warning: the model scores top-1") and "label mapping may be wrong" in warning
    assert f"270->0, 180->1, 90->2, 0->3 (from {tmp_path / 'wrong.txt'})" in warning


def test_repair_eval_takes_labels_and_warns_on_the_dense_models_score(tmp_path, capsys):
    model, data = rotation_folders(tmp_path)
    (tmp_path / "wrong.txt").write_text("270\n180\n90\n0\n")
    argv = ["repair", str(model), "--sparsity", "0", "--method", "none", "-o", str(tmp_path / "out.onnx"),
            "--eval", str(data), "-q"]
    assert main(argv) == 0 and capsys.readouterr().err == ""
    assert main([*argv, "--labels", str(tmp_path / "wrong.txt")]) == 0
    (warning,) = capsys.readouterr().err.strip().splitlines()
    assert warning.startswith("warning: the dense model scores top-1") and "270->0" in warning
    assert main([*argv[:-3], "--labels", str(tmp_path / "wrong.txt")]) == 2
    assert "--labels" in capsys.readouterr().err
