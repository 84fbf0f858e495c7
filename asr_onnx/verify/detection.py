"""Detection heads: recognising them, decoding their boxes, and scoring a model's detections against the
dense model's as pseudo-labels.

A relative L2 error over a detector's raw output is dominated by the box coordinates (pixels, 0-320) and
does not see the class scores (0-1) collapse, so a detector is scored on what it is for: its detections
after decoding (score >= :data:`SCORE_THRESHOLD`, per-class NMS at :data:`NMS_IOU`), matched per class at
IoU >= :data:`MATCH_IOU` to the dense model's on the same image, as precision, recall and F1 per class.

Recognised layouts (batch first):

- YOLO, one tensor: (N, 4+C, A), channels first, as Ultralytics YOLOv8+ exports it (no objectness), or
  (N, A, 5+C), anchors first, as YOLOv5/v7 export it (objectness in column 4, each class score is
  objectness x class probability). Boxes are cx, cy, w, h unless every dense box reads as x1 <= x2, y1 <= y2.
- SSD, a pair: boxes (N, A, 4) beside scores (N, A, C) with the same A. Scores from a Softmax have a
  background class 0 (the SSD convention), sigmoid scores have none. Boxes are x1, y1, x2, y2 when every
  dense box reads so, else cx, cy, w, h.

Without an override, an output is taken for a head only when the dense model's values fit: the class
scores within [0, 1] and the boxes' extents non-negative (a CTC recogniser's raw (N, T, C) logits do not).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import numpy as np

SCORE_THRESHOLD = 0.25  # Ultralytics' and most detectors' default confidence for a kept detection
NMS_IOU = 0.45  # a lower-scored box of the same class overlapping a kept one by more than this is dropped
MATCH_IOU = 0.5  # PASCAL VOC's (and COCO's loosest) IoU for a detection to count as found
_SCORE_SLACK = 1e-4  # float32 rounding of a sigmoid's [0, 1]


@dataclass(frozen=True)
class Head:
    """One detection head among a model's outputs.

    Attributes:
        boxes: index of the output holding the boxes (for YOLO, the whole tensor).
        scores: index of the output holding the class scores (an SSD pair), or None (YOLO: one tensor).
        channels_first: YOLO's (N, 4+C, A) rather than (N, A, 4+C); False for an SSD pair.
        box_format: "cxcywh" or "xyxy".
        objectness: column 4 is an objectness that multiplies every class score (YOLOv5/v7).
        background: class 0 of the scores is the background (a Softmax SSD); it is never a detection.
        classes: how many object classes it detects (the background not counted).
    """

    boxes: int
    scores: int | None
    channels_first: bool
    box_format: str
    objectness: bool
    background: bool
    classes: int

    @property
    def outputs(self) -> tuple[int, ...]:
        return (self.boxes,) if self.scores is None else (self.boxes, self.scores)


Detections = tuple[np.ndarray, np.ndarray, np.ndarray]  # (boxes (k, 4) x1 y1 x2 y2, classes (k,), scores (k,))


# ------------------------------------------------------------------------------------------- recognition


def find_heads(arrays: list, axes: list[int], named: Collection[int] = (), softmax: Collection[int] = (),
               excluded: Collection[int] = ()) -> list[Head]:
    """The detection heads among a model's outputs, from their shapes and the dense model's values.

    Args:
        arrays: one run's outputs of the dense model, in graph order.
        axes: each output's batch axis.
        named: outputs the user called detections (``--output-kind NAME:detection``): only their shape is
            checked, not their values. Defaults to none.
        softmax: outputs computed by a Softmax over their last axis (a scores tensor with a background).
        excluded: outputs the user gave another kind: never part of a head. Defaults to none.

    Returns:
        the heads, in graph order of their box outputs.
    """
    rank3 = [i for i, a in enumerate(arrays) if i not in excluded and np.ndim(a) == 3 and axes[i] == 0
             and np.issubdtype(np.asarray(a).dtype, np.floating)]
    heads: list[Head] = []
    used: set[int] = set()
    for i in rank3:  # an SSD pair first: its scores tensor alone would also read as a one-tensor head
        a = arrays[i]
        if a.shape[2] != 4 or i in used:
            continue
        for j in rank3:
            b = arrays[j]
            if j == i or j in used or b.shape[1] != a.shape[1] or b.shape[2] < 1:
                continue
            trusted = i in named and j in named
            box_format = _box_format(a.reshape(-1, 4)) or ("xyxy" if trusted else None)
            if box_format and (trusted or _scores_in_unit(b)):
                heads.append(Head(i, j, False, box_format, False, j in softmax and b.shape[2] > 1,
                                  b.shape[2] - (j in softmax and b.shape[2] > 1)))
                used.update((i, j))
                break
    for i in rank3:
        if i in used:
            continue
        head = _one_tensor(arrays[i], i, i in named, i in softmax)
        if head is not None:
            heads.append(head)
            used.add(i)
    return sorted(heads, key=lambda h: h.boxes)


def _one_tensor(array: np.ndarray, index: int, named: bool, softmax: bool) -> Head | None:
    """A YOLO head (N, 4+C, A) or (N, A, 4+C) in one tensor, or None when the shape or the values do not fit."""
    if softmax and not named:  # a Softmax over the last axis: per-step class scores, not a YOLO head
        return None
    _, p, q = array.shape
    channels_first = q > p  # anchors outnumber the 4 box values and the classes
    features, anchors = (p, q) if channels_first else (q, p)
    objectness = not channels_first and features >= 6  # YOLOv5/v7's (N, A, 5+C); YOLOv8+ has none
    if features < 5 or anchors <= features:
        return None
    rows = np.moveaxis(array, 1, 2) if channels_first else array  # (N, A, features)
    rows = rows.reshape(-1, features)
    box_format = _box_format(rows[:, :4])
    if not named and (box_format is None or not _scores_in_unit(rows[:, 4:])):
        return None
    return Head(index, None, channels_first, box_format or "cxcywh", objectness, False,
                features - 4 - objectness)


def _box_format(boxes: np.ndarray) -> str | None:
    """How the dense model's boxes read: "xyxy" when every far corner lies past the near one, else "cxcywh"
    when every extent is non-negative, else None (not boxes).

    Where both readings fit, corners win: for centre-size boxes it would take every box's size to exceed its
    centre's coordinate, which boxes spread over an image (an anchor grid) never do.
    """
    boxes = np.asarray(boxes, np.float64)
    if not len(boxes) or not np.isfinite(boxes).all():
        return None
    if (boxes[:, 2] >= boxes[:, 0]).all() and (boxes[:, 3] >= boxes[:, 1]).all():
        return "xyxy"
    return "cxcywh" if (boxes[:, 2:] >= 0).all() else None


def _scores_in_unit(scores: np.ndarray) -> bool:
    scores = np.asarray(scores)
    return bool(scores.size and np.isfinite(scores).all() and scores.min() >= -_SCORE_SLACK
                and scores.max() <= 1 + _SCORE_SLACK)


# ------------------------------------------------------------------------------------------- decoding


def decode(head: Head, outputs: list, *, threshold: float = SCORE_THRESHOLD, iou: float = NMS_IOU) -> list[Detections]:
    """Each image's detections: one per anchor whose best class scores >= ``threshold``, after per-class NMS.

    Args:
        head: the head.
        outputs: one run's outputs in graph order (batch first).
        threshold: the least score of a detection. Defaults to SCORE_THRESHOLD (0.25).
        iou: NMS's IoU: a box overlapping a higher-scored one of its class by more than this is dropped.
            Defaults to NMS_IOU (0.45).

    Returns:
        per image, (boxes (k, 4) as x1 y1 x2 y2, classes (k,), scores (k,)), highest score first.
    """
    boxes, scores = _rows(head, outputs)
    found = []
    for image_boxes, image_scores in zip(boxes, scores):
        classes = image_scores.argmax(1)
        best = image_scores[np.arange(len(classes)), classes]
        kept = np.flatnonzero(best >= threshold)
        corners = to_corners(image_boxes[kept], head.box_format)
        order = nms_per_class(corners, classes[kept], best[kept], iou)
        found.append((corners[order], classes[kept][order], best[kept][order]))
    return found


def _rows(head: Head, outputs: list) -> tuple[np.ndarray, np.ndarray]:
    """(boxes (N, A, 4), object-class scores (N, A, C)) as float64, whatever the layout."""
    if head.scores is not None:
        boxes = np.asarray(outputs[head.boxes], np.float64)
        scores = np.asarray(outputs[head.scores], np.float64)
        return boxes, scores[:, :, 1:] if head.background else scores
    rows = np.asarray(outputs[head.boxes], np.float64)
    rows = np.moveaxis(rows, 1, 2) if head.channels_first else rows
    scores = rows[:, :, 5:] * rows[:, :, 4:5] if head.objectness else rows[:, :, 4:]
    return rows[:, :, :4], scores


def to_corners(boxes: np.ndarray, box_format: str) -> np.ndarray:
    """Boxes as x1 y1 x2 y2 from ``box_format`` ("cxcywh" or "xyxy")."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    if box_format == "xyxy":
        return boxes.copy()
    half = boxes[:, 2:] / 2
    return np.concatenate([boxes[:, :2] - half, boxes[:, :2] + half], axis=1)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box of ``a`` (k, 4) with every box of ``b`` (m, 4), both x1 y1 x2 y2: (k, m)."""
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    low = np.maximum(a[:, None, :2], b[None, :, :2])
    high = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(high - low, 0, None).prod(-1)
    area_a = np.clip(a[:, 2:] - a[:, :2], 0, None).prod(-1)
    area_b = np.clip(b[:, 2:] - b[:, :2], 0, None).prod(-1)
    union = area_a[:, None] + area_b[None, :] - inter
    return inter / np.maximum(union, 1e-12)  # two empty boxes overlap by nothing


def nms_per_class(boxes: np.ndarray, classes: np.ndarray, scores: np.ndarray, iou: float = NMS_IOU) -> np.ndarray:
    """Greedy NMS within each class: the indices kept, highest score first (ties in index order)."""
    kept: list[int] = []
    for cls in np.unique(classes):
        order = np.flatnonzero(classes == cls)
        order = order[np.argsort(-scores[order], kind="stable")]
        while order.size:
            kept.append(int(order[0]))
            order = order[1:][box_iou(boxes[order[0]], boxes[order[1:]])[0] <= iou]
    survivors = np.asarray(kept, np.int64)
    return survivors[np.argsort(-scores[survivors], kind="stable")]


# ------------------------------------------------------------------------------------------- matching


def match_counts(reference: Detections, candidate: Detections, classes: int, iou: float = MATCH_IOU) -> np.ndarray:
    """One image's true positives, false positives and false negatives per class: (classes, 3).

    Within a class, the candidate's detections, highest score first, each take the unmatched reference
    detection they overlap most, if by IoU >= ``iou`` (true positive); a candidate detection left over is a
    false positive, a reference one a false negative.
    """
    counts = np.zeros((classes, 3), np.int64)
    ref_boxes, ref_classes, _ = reference
    boxes, found, scores = candidate
    for cls in np.union1d(ref_classes, found).astype(np.int64):
        mine = np.flatnonzero(found == cls)
        mine = mine[np.argsort(-scores[mine], kind="stable")]
        theirs = np.flatnonzero(ref_classes == cls)
        overlaps = box_iou(boxes[mine], ref_boxes[theirs]) if len(mine) and len(theirs) else np.zeros((len(mine), 0))
        free = np.ones(len(theirs), bool)
        hits = 0
        for row in overlaps:
            masked = np.where(free, row, -1.0)
            if masked.size and masked.max() >= iou:
                free[masked.argmax()] = False
                hits += 1
        counts[cls] += (hits, len(mine) - hits, len(theirs) - hits)
    return counts


def detection_scores(counts: np.ndarray) -> dict:
    """Precision, recall and F1 per class from pooled counts (classes, 3), and their means.

    A class neither model detects is skipped. F1 = 2 TP / (2 TP + FP + FN) for every other class (a false
    detection of a class the reference never detects gives that class F1 0). A class's precision is defined
    where the candidate detects it, its recall where the reference does; each mean is over those classes.

    Returns:
        {"f1", "precision", "recall" (means, None when no class counts), "f1_pooled" (every class's counts
        summed: a frequent class weighs more; context, not the score), "classes_scored", "reference_detections",
        "detections", "per_class": {class: {"tp", "fp", "fn", "precision", "recall", "f1"}}}.
    """
    counts = np.asarray(counts, np.int64).reshape(-1, 3)
    per_class = {}
    for cls, (tp, fp, fn) in enumerate(counts.tolist()):
        if tp + fp + fn == 0:
            continue
        per_class[cls] = {"tp": tp, "fp": fp, "fn": fn, "precision": tp / (tp + fp) if tp + fp else None,
                          "recall": tp / (tp + fn) if tp + fn else None, "f1": 2 * tp / (2 * tp + fp + fn)}

    def mean(key):
        values = [c[key] for c in per_class.values() if c[key] is not None]
        return float(np.mean(values)) if values else None

    tp, fp, fn = (int(v) for v in counts.sum(0))
    return {"f1": mean("f1"), "precision": mean("precision"), "recall": mean("recall"),
            "f1_pooled": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None, "classes_scored": len(per_class),
            "reference_detections": tp + fn, "detections": tp + fp, "per_class": per_class}


def image_f1(counts: np.ndarray) -> np.ndarray:
    """Each image's F1 over all its classes, from (N, classes, 3) counts: 1 where neither model detects
    anything (the two agree). A per-image figure for paired comparisons; the score itself is per class."""
    tp, fp, fn = (np.asarray(counts, np.float64).sum(1)[:, k] for k in range(3))
    total = 2 * tp + fp + fn
    return np.where(total > 0, 2 * tp / np.maximum(total, 1), 1.0)
