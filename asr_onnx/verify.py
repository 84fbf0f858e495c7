"""Evaluation: top-1 accuracy on labelled data, and label-free agreement with a reference model."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import AsrError

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
NAMED_DATA = {
    "fashion-mnist:test": FASHION_MNIST / "t10k-images-idx3-ubyte.gz",
    "fashion-mnist:train": FASHION_MNIST / "train-images-idx3-ubyte.gz",
}


def resolve_data(path) -> Path:
    """A data path, where ``fashion-mnist:test`` and ``fashion-mnist:train`` name Debian's IDX files.

    Raises:
        AsrError: a named data set is not installed.
    """
    text = str(path)
    if text not in NAMED_DATA:
        return Path(path)
    resolved = NAMED_DATA[text]
    if not resolved.exists():
        raise AsrError(f"{text} needs Debian's Fashion-MNIST files: apt-get install -y dataset-fashion-mnist "
                       f"(expected {resolved})")
    return resolved


def _run(session, feed: dict) -> np.ndarray:
    """The first output, as float64 logits (N, classes)."""
    out = session.run([session.get_outputs()[0].name], feed)[0]
    return out.reshape(out.shape[0], -1).astype(np.float64)


def logit_rel_l2(err2: np.ndarray, ref2: float) -> float:
    """Relative L2 logit error: sqrt(sum of squared errors / sum of the reference's squares)."""
    return float(np.sqrt(np.sum(err2) / max(ref2, 1e-300)))


def evaluate(model, data, *, reference=None, batch_size: int = 256, device: str = "auto", progress: bool = True,
             reference_logits: list | None = None, per_sample: bool = False) -> dict:
    """Top-1 accuracy (when ``data`` has labels) and, with a reference, agreement and logit error.

    Args:
        model: onnx.ModelProto or a path.
        data: a calib.CalibSet (labels optional).
        reference: the dense model (onnx.ModelProto or path), or None.
        batch_size: samples per run. Defaults to 256 (the model's own when its batch is fixed).
        device: "auto", "cpu" or "cuda". Defaults to "auto".
        progress: a progress bar on a TTY. Defaults to True.
        reference_logits: a list to fill with (or, when full, reuse as) the reference's per-batch
            logits, so that a sweep runs the dense model once. Defaults to None.
        per_sample: also return, with a reference, which samples agree ("matches"), each sample's squared
            logit error ("err2") and the reference's squared norm summed ("ref2"), so that folds can be
            pooled. Defaults to False.

    Returns:
        {"samples", "top1"?, "agreement"?, "logit_rel_l2"?, "matches"?, "err2"?, "ref2"?}.
    """
    from .graph import fixed_batch, input_specs
    from .progress import bar
    from .runtime import make_session

    session = make_session(model, device)
    specs = input_specs(model) if not isinstance(model, (str, Path)) else None
    batch_size = (fixed_batch(specs) if specs else None) or batch_size
    ref_session = None
    if reference is not None and not reference_logits:
        ref_session = make_session(reference, device)
    labels = data.labels
    correct = seen = 0
    ref2 = 0.0
    matches, err2 = [], []
    batches = bar(data.batches(batch_size), total=-(-len(data) // batch_size), desc="eval", enabled=progress)
    for i, feed in enumerate(batches):
        logits = _run(session, feed)
        n = len(logits)
        if labels is not None:
            correct += int((logits.argmax(1) == labels[seen : seen + n]).sum())
        if reference is not None or reference_logits:
            if ref_session is not None:
                ref = _run(ref_session, feed)
                if reference_logits is not None:
                    reference_logits.append(ref)
            else:
                ref = reference_logits[i]
            if ref.shape != logits.shape:
                raise AsrError(f"the model's first output gives {logits.shape[1]} values per sample and the "
                               f"reference's {ref.shape[1]}: they cannot be compared")
            matches.append(logits.argmax(1) == ref.argmax(1))
            err2.append(((logits - ref) ** 2).sum(1))
            ref2 += float((ref**2).sum())
        seen += n
    result = {"samples": seen}
    if labels is not None:
        result["top1"] = correct / seen
    if reference is not None or reference_logits:
        matches, err2 = np.concatenate(matches), np.concatenate(err2)
        result["agreement"] = int(matches.sum()) / seen
        result["logit_rel_l2"] = logit_rel_l2(err2, ref2)
        if per_sample:
            result.update(matches=matches, err2=err2, ref2=ref2)
    return result
