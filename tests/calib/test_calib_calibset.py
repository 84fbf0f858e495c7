"""Tests for asr_onnx.calib.calibset: batches, subsets, shuffling and fingerprints of a CalibSet."""

import os

import numpy as np
import pytest
from calib_files import GRAY, SPEC3, all_batches, labelled_npz, npy, npz, pixels, save_png
from paths import SAMPLES

from asr_onnx.calib import CalibSet, Preprocess, load_calib
from asr_onnx.errors import AsrError
from asr_onnx.pipeline.driver import Repair


def test_batches_cover_all_samples_in_order_with_short_last_batch(tmp_path):
    calib = load_calib(labelled_npz(tmp_path, 7), SPEC3)

    batches = list(calib.batches(3))

    assert [len(batch["x"]) for batch in batches] == [3, 3, 1]
    np.testing.assert_array_equal(np.concatenate([b["x"][:, 0] for b in batches]), np.arange(7))


def test_image_batches_in_order(tmp_path):
    raws = [pixels(40 + i, (6, 5)) for i in range(5)]
    for i, raw in enumerate(raws):
        save_png(tmp_path / f"{i}.png", raw)

    batches = list(load_calib(tmp_path, GRAY, Preprocess(scale=1.0)).batches(2))

    assert [len(batch["input"]) for batch in batches] == [2, 2, 1]
    np.testing.assert_array_equal(np.concatenate([b["input"] for b in batches])[:, 0], np.stack(raws))


def test_batches_span_files(tmp_path):
    for i in range(3):
        npy(tmp_path / f"{i}.npy", np.full((2, 3), i, np.float32))

    batches = list(load_calib(tmp_path, SPEC3).batches(4))

    np.testing.assert_array_equal(batches[0]["x"][:, 0], [0, 0, 1, 1])
    np.testing.assert_array_equal(batches[1]["x"][:, 0], [2, 2])


def test_batch_size_must_be_positive(tmp_path):
    calib = load_calib(labelled_npz(tmp_path), SPEC3)

    with pytest.raises(AsrError, match=r"batch size must be a positive integer"):
        next(calib.batches(0))


def test_take_is_deterministic_and_in_source_order(tmp_path):
    calib = load_calib(labelled_npz(tmp_path), SPEC3)

    first, again, other = calib.take(4, seed=1), calib.take(4, seed=1), calib.take(4, seed=2)

    assert len(first) == 4
    np.testing.assert_array_equal(first.labels, again.labels)
    assert not np.array_equal(first.labels, other.labels)
    assert list(first.labels) == sorted(first.labels)
    np.testing.assert_array_equal(all_batches(first)["x"][:, 0], first.labels)  # data follows labels
    assert len(calib.take(50)) == 10


def test_take_of_a_take_stays_inside_it(tmp_path):
    calib = load_calib(labelled_npz(tmp_path), SPEC3)

    inner = calib.take(6, seed=3)
    inner_inner = inner.take(3, seed=4)

    assert set(inner_inner.labels) <= set(inner.labels)
    assert len(inner_inner) == 3


def test_split_is_disjoint_complete_and_deterministic(tmp_path):
    calib = load_calib(labelled_npz(tmp_path), SPEC3)

    fit, held = calib.split(0.7, seed=5)
    fit_again, _ = calib.split(0.7, seed=5)

    assert (len(fit), len(held)) == (7, 3)
    assert set(fit.labels).isdisjoint(held.labels)
    assert set(fit.labels) | set(held.labels) == set(range(10))
    np.testing.assert_array_equal(fit.labels, fit_again.labels)
    assert fit.fingerprint() != held.fingerprint()


def test_split_fraction_must_be_in_range(tmp_path):
    calib = load_calib(labelled_npz(tmp_path), SPEC3)

    with pytest.raises(AsrError, match=r"split fraction must be between 0 and 1"):
        calib.split(1.5)


def test_fingerprint_stable_and_sensitive_to_bytes(tmp_path):
    npy(tmp_path / "a.npy", np.zeros((2, 3), np.float32))
    npy(tmp_path / "b.npy", np.ones((2, 3), np.float32))
    first = load_calib(tmp_path, SPEC3).fingerprint()

    assert load_calib(tmp_path, SPEC3).fingerprint() == first
    assert len(first) == 64 and int(first, 16) >= 0
    npy(tmp_path / "b.npy", np.full((2, 3), 2, np.float32))
    assert load_calib(tmp_path, SPEC3).fingerprint() != first


def test_fingerprint_sensitive_to_file_names(tmp_path):
    npy(tmp_path / "a.npy", np.zeros((2, 3), np.float32))
    first = load_calib(tmp_path, SPEC3).fingerprint()

    (tmp_path / "a.npy").rename(tmp_path / "c.npy")

    assert load_calib(tmp_path, SPEC3).fingerprint() != first


def test_fingerprint_sensitive_to_preprocessing_and_selection(tmp_path):
    save_png(tmp_path / "a.png", pixels(50, (6, 5)))
    save_png(tmp_path / "b.png", pixels(51, (6, 5)))
    plain = load_calib(tmp_path, GRAY)

    normalised = load_calib(tmp_path, GRAY, Preprocess(mean=(0.5,)))

    assert normalised.fingerprint() != plain.fingerprint()
    assert plain.take(1).fingerprint() != plain.fingerprint()
    assert plain.take(2).fingerprint() == plain.fingerprint()


def test_fingerprint_of_image_bytes(tmp_path):
    save_png(tmp_path / "a.png", pixels(52, (6, 5)))
    first = load_calib(tmp_path, GRAY).fingerprint()

    save_png(tmp_path / "a.png", pixels(53, (6, 5)))

    assert load_calib(tmp_path, GRAY).fingerprint() != first


def test_calib_set_is_returned(tmp_path):
    calib = load_calib(labelled_npz(tmp_path), SPEC3)

    assert isinstance(calib, CalibSet)
    assert calib.specs == SPEC3


def test_shuffled_batches_mix_the_classes_and_keep_the_labels(tmp_path):
    x = np.repeat(np.arange(4, dtype=np.float32), 8)[:, None] * np.ones(3, np.float32)  # class-sorted
    calib = load_calib(npz(tmp_path / "set.npz", x=x, y=np.repeat(np.arange(4), 8)), SPEC3)
    mixed = calib.shuffled(seed=3)

    batches = list(mixed.batches(8))

    assert all(len(np.unique(b["x"][:, 0])) > 1 for b in batches)  # in source order each holds one class
    np.testing.assert_array_equal(np.concatenate([b["x"][:, 0] for b in batches]), mixed.labels)
    assert sorted(mixed.labels) == sorted(calib.labels)
    np.testing.assert_array_equal(next(calib.shuffled(seed=3).batches(8))["x"], batches[0]["x"])


@pytest.mark.slow  # a repair of the sample model twice; test_shuffled_batches_mix... checks the mechanism
def test_a_class_sorted_folder_repairs_like_its_shuffled_twin(tmp_path):
    """The bundled calibration folder is read class by class; its images in a random flat order give the
    same repair (before batches were mixed: logit error 0.94 against dense with the sorted folder,
    0.58 with one batch of the whole set)."""
    import shutil
    from pathlib import Path

    from asr_onnx.calib import input_specs, metadata
    from asr_onnx.model.files import load_model
    from asr_onnx.verify.evaluation import evaluate

    root = str(SAMPLES)
    model = load_model(os.path.join(root, "resnet20_bn.onnx"))
    specs, pre = input_specs(model), Preprocess.from_metadata(metadata(model))
    files = sorted(Path(root, "data", "calib").rglob("*.png"))
    for i, index in enumerate(np.random.default_rng(5).permutation(len(files))):
        shutil.copy(files[index], tmp_path / f"{i:04d}.png")
    held_out = load_calib(os.path.join(root, "data", "eval.npz"), specs, pre).take(300)

    outputs = [Repair(model, progress=False).prune(0.9).run(load_calib(path, specs, pre), "bn").output
               for path in (os.path.join(root, "data", "calib"), tmp_path)]
    against_dense = [evaluate(out, held_out, reference=model, progress=False)["logit_rel_l2"] for out in outputs]
    between = evaluate(outputs[0], held_out, reference=outputs[1], progress=False)

    assert abs(against_dense[0] - against_dense[1]) < 0.05 and max(against_dense) < 0.7
    assert between["agreement"] > 0.97 and between["logit_rel_l2"] < 0.05


def test_folds_hold_out_every_sample_exactly_once(calib_and_eval):
    calib, _ = calib_and_eval
    parts = calib.folds(4, seed=1)
    held = np.concatenate([h._indices for _, h in parts])
    assert sorted(held.tolist()) == sorted(calib._indices.tolist())
    for fit, h in parts:
        assert not set(fit._indices.tolist()) & set(h._indices.tolist())
        assert len(fit) + len(h) == len(calib)
    with pytest.raises(AsrError):
        calib.folds(len(calib) + 1)


def test_a_draw_across_folds_takes_an_even_share_of_every_held_out_part(calib_and_eval):
    calib, _ = calib_and_eval
    subset = calib.take_across_folds(7, 2, seed=3)
    held = [h for _, h in calib.folds(2, seed=3)]
    shares = sorted(len(subset.within(h)) for h in held)
    assert len(subset) == 7 and shares == [3, 4]  # a plain take(7, 3) would draw from the first part only
    assert sorted(len(calib.take(7, 3).within(h)) for h in held) == [0, 7]
    assert set(subset._indices.tolist()) <= set(calib._indices.tolist())
    assert np.array_equal(subset._indices, calib.take_across_folds(7, 2, seed=3)._indices)  # seeded
    assert len(calib.take_across_folds(10**6, 2)) == len(calib)
    with pytest.raises(AsrError):
        calib.take_across_folds(3, 1)
