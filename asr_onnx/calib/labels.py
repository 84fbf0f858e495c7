"""Class labels from folder names: which folder is which class, an explicit mapping read from a
``--labels`` file, and a check that a score on labelled data is above chance.

A model's classes are numbered 0..C-1; a folder of class subfolders only has names. Names that are not
all integers are numbered in sorted order (torchvision's ImageFolder rule). Integer names are sorted as
numbers (``0/90/180/270`` are classes 0, 1, 2, 3, never 0, 180, 270, 90), and a name is its own class
number only where that number is a class of the model (every name below its static class count C), so
that a folder holding only classes ``2`` and ``7`` of a 10-class model still scores them as 2 and 7.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from asr_onnx.errors import AsrError

SORTED = "folder names in sorted order"
NUMERIC = "integer folder names in numeric order"
VALUES = "integer folder names are the class numbers"
SHOWN = 12  # mapping entries printed in a warning


@dataclass(frozen=True)
class ClassMap:
    """Which class number each class folder's name stands for.

    Attributes:
        index_of: folder name -> class number.
        rule: how the numbers were assigned (SORTED, NUMERIC, VALUES, or the --labels file).
    """

    index_of: dict
    rule: str

    def describe(self) -> str:
        """``0->0, 90->1, ...`` in class order (the first SHOWN entries), then the rule."""
        pairs = sorted(self.index_of.items(), key=lambda item: (item[1], item[0]))
        shown = ", ".join(f"{name}->{index}" for name, index in pairs[:SHOWN])
        more = f", ... ({len(pairs) - SHOWN} more)" if len(pairs) > SHOWN else ""
        return f"{shown}{more} ({self.rule})"


@dataclass(frozen=True)
class ClassNaming:
    """What decides the class numbers of class folders.

    Attributes:
        model_classes: the model's class count (the static C of an (N, C) first output), or None when it
            is not known.
        explicit: name -> class number from :func:`read_labels`, or None.
        labels_file: the file ``explicit`` came from, for messages.
    """

    model_classes: int | None = None
    explicit: dict | None = None
    labels_file: str | None = None

    def classes(self, names) -> ClassMap:
        """The class number of every class folder name in ``names``.

        Raises:
            AsrError: a folder name that the labels file does not list.
        """
        names = sorted(set(names))
        if self.explicit is not None:
            missing = [name for name in names if name not in self.explicit]
            if missing:
                listing = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
                raise AsrError(f"class folder(s) {listing} not in the labels file {self.labels_file}")
            return ClassMap({name: self.explicit[name] for name in names}, f"from {self.labels_file}")
        if names and all(re.fullmatch(r"\d+", name) for name in names):
            values = {name: int(name) for name in names}
            if self.model_classes is not None and max(values.values()) < self.model_classes:
                return ClassMap(values, VALUES)
            ordered = sorted(names, key=lambda name: (int(name), name))
            return ClassMap({name: index for index, name in enumerate(ordered)}, NUMERIC)
        return ClassMap({name: index for index, name in enumerate(names)}, SORTED)

    @classmethod
    def for_model(cls, model, labels_file=None) -> "ClassNaming":
        """The naming for an onnx.ModelProto (or None: no model known) and an optional labels file."""
        explicit = read_labels(labels_file) if labels_file is not None else None
        return cls(model_class_count(model) if model is not None else None, explicit,
                   None if labels_file is None else str(labels_file))


def read_labels(path) -> dict:
    """Class names -> class numbers from a labels file.

    Accepted forms: plain text, one class name per line, line i (from 0) naming class i (a line such as
    ``n01440764 tench, Tinca tinca`` also names its first word, so ImageNet's synset_words.txt fits wnid
    folders); a JSON list of names (position = class number); a JSON object of name -> number, or of
    number -> name (``{"0": "cat"}``). Wherever a name stands, a list of names gives the class several
    names (ImageNet's class index ``{"0": ["n01440764", "tench"]}``).

    Raises:
        AsrError: the file cannot be read, is empty, is not one of these forms, or gives one name two numbers.
    """
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise AsrError(f"cannot read the labels file {path}: {exc}") from None
    stripped = text.strip()
    if not stripped:
        raise AsrError(f"the labels file {path} is empty")
    if path.suffix.lower() == ".json" or stripped[0] in "[{":
        try:
            entries = _json_entries(json.loads(stripped), path)
        except json.JSONDecodeError as exc:
            raise AsrError(f"the labels file {path} is not valid JSON: {exc}") from None
    else:
        entries = _text_entries(text.rstrip("\n").split("\n"), path)
    index_of: dict = {}
    for index, names in entries:
        for name in names:
            if index_of.get(name, index) != index:
                raise AsrError(f"the labels file {path} gives {name!r} two class numbers, {index_of[name]} and {index}")
            index_of[name] = index
    return index_of


def _text_entries(lines: list[str], path: Path) -> list[tuple[int, list[str]]]:
    entries = []
    for number, line in enumerate(lines):
        name = line.strip()
        if not name:
            raise AsrError(f"the labels file {path}: line {number + 1} is empty (line i names class i)")
        words = name.split()
        entries.append((number, [name] if len(words) == 1 else [name, words[0]]))
    return entries


def _json_entries(value, path: Path) -> list[tuple[int, list[str]]]:
    if isinstance(value, list):
        return [(index, _names(item, path)) for index, item in enumerate(value)]
    if isinstance(value, dict) and value:
        if all(isinstance(v, int) and not isinstance(v, bool) for v in value.values()):
            if any(v < 0 for v in value.values()):
                raise AsrError(f"the labels file {path} has a negative class number")
            return [(v, [k]) for k, v in value.items()]
        if all(re.fullmatch(r"\d+", k) for k in value):
            return [(int(k), _names(v, path)) for k, v in value.items()]
    raise AsrError(f"the labels file {path} must be a JSON list of class names, or an object of name -> number "
                   "or number -> name")


def _names(item, path: Path) -> list[str]:
    items = item if isinstance(item, list) else [item]
    if not items or not all(isinstance(name, str) and name for name in items):
        raise AsrError(f"the labels file {path}: {item!r} is not a class name")
    return items


def model_class_count(model) -> int | None:
    """The static class count C of an onnx.ModelProto whose first output is (N, C); None otherwise."""
    if not model.graph.output:
        return None
    dims = model.graph.output[0].type.tensor_type.shape.dim
    if len(dims) != 2 or not dims[1].HasField("dim_value") or dims[1].dim_value < 2:
        return None
    return int(dims[1].dim_value)


def chance_warning(top1: float | None, labels, class_map: ClassMap | None, model_classes: int | None = None,
                   who: str = "the model") -> str | None:
    """A warning that the label mapping may be wrong, when a top-1 accuracy is near chance; else None.

    Chance is the share of the most frequent label (what always guessing it scores). Near chance means under
    both 1.5 times chance and chance plus 3 binomial standard errors: a model at 25% on four balanced
    classes is flagged, one at 40% on 1,000 of them is not. Labels beyond the model's classes are named
    whatever the score.

    Args:
        top1: the accuracy, or None (nothing to judge).
        labels: the int labels scored.
        class_map: how folder names became labels, or None (labels read from a file).
        model_classes: the model's class count, or None. Defaults to None.
        who: what scored ``top1``, for the message. Defaults to "the model".
    """
    if top1 is None or labels is None or len(labels) == 0:
        return None
    labels = np.asarray(labels)
    chance = float(np.bincount(labels - labels.min()).max() / len(labels))
    beyond = int(np.sum(labels >= model_classes)) if model_classes else 0
    near = top1 < max(1.5 * chance, chance + 3 * math.sqrt(chance * (1 - chance) / len(labels)))
    if not (near or beyond):
        return None
    if beyond:
        why = f"{beyond} of {len(labels)} labels are not classes of the model (0..{model_classes - 1})"
    else:
        why = (f"{who} scores top-1 {100 * top1:.1f}%, near chance ({100 * chance:.1f}%, the most frequent "
               "label's share)")
    mapping = (f"labels from folder names: {class_map.describe()}" if class_map is not None
               else "labels as stored in the data")
    return f"{why}: the label mapping may be wrong; {mapping}; pass --labels FILE to give it"
