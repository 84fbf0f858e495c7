"""The calibration set: a lazily read, seeded, splittable stream of model-ready batches."""

from __future__ import annotations

import hashlib
import inspect
import os
from pathlib import Path
from typing import Iterator

import numpy as np

from asr_onnx.calib.discovery import file_source, folder_source
from asr_onnx.calib.labels import ClassMap, ClassNaming
from asr_onnx.calib.named import resolve_data
from asr_onnx.calib.sources import Source, hash_file
from asr_onnx.calib.specs import InputSpec, Preprocess, input_specs
from asr_onnx.errors import AsrError


class CalibSet:
    """A calibration/eval set over a folder or file: lazily loaded, streamed in batches.

    Attributes:
        specs: The model inputs each batch feeds.
    """

    def __init__(self, source: Source, specs: list[InputSpec], preprocess: Preprocess, indices: np.ndarray):
        self._source = source
        self.specs = list(specs)
        self.preprocess = preprocess
        self._indices = np.asarray(indices, np.int64)

    def __len__(self) -> int:
        return len(self._indices)

    def __repr__(self) -> str:
        return f"CalibSet({len(self)} samples from {self._source.root})"

    @property
    def labels(self) -> np.ndarray | None:
        """int64 (N,) labels of the selected samples, or None when the source has none."""
        if self._source.labels is None:
            return None
        return self._source.labels[self._indices]

    @property
    def classes(self) -> ClassMap | None:
        """How class folder names became the labels, or None (no class folders: labels, if any, were read
        from the data files)."""
        return self._source.classes

    def batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        """Yield ``{input_name: array (b, ...)}`` in the model's dtype, in the set's order (source order
        unless the set is :meth:`shuffled`).

        Args:
            batch_size: Samples per batch (>= 1); the last batch may be smaller.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise AsrError(f"batch size must be a positive integer, got {batch_size!r}")
        for start in range(0, len(self._indices), batch_size):
            chunk = self._indices[start : start + batch_size]
            if np.all(chunk[1:] > chunk[:-1]):
                yield self._source.read(chunk)
                continue
            order = np.argsort(chunk, kind="stable")  # sources read sorted indices
            arrays = self._source.read(chunk[order])
            restore = np.empty_like(order)
            restore[order] = np.arange(len(order))
            yield {name: array[restore] for name, array in arrays.items()}

    def slice(self, start: int, stop: int) -> "CalibSet":
        """Samples ``start`` to ``stop`` of the set, in the set's order (a shard of a sharded pass)."""
        return CalibSet(self._source, self.specs, self.preprocess, self._indices[start:stop])

    def take(self, n: int, seed: int = 0) -> "CalibSet":
        """The first ``n`` of a seeded permutation (all if n >= len), kept in source order.

        Args:
            n: How many samples to keep (>= 0).
            seed: Permutation seed; default 0.
        """
        if n < 0:
            raise AsrError(f"cannot take {n} samples")
        chosen = self._permuted(seed)[:n]
        return self._subset(chosen)

    def split(self, fraction: float, seed: int = 0) -> tuple["CalibSet", "CalibSet"]:
        """Split into disjoint (fit, held-out) sets, each in source order.

        Args:
            fraction: Share of samples for the fit set, 0..1 (rounded to whole samples).
            seed: Permutation seed; default 0.
        """
        if not 0.0 <= fraction <= 1.0:
            raise AsrError(f"split fraction must be between 0 and 1, got {fraction}")
        permuted = self._permuted(seed)
        fit_count = int(round(fraction * len(permuted)))
        return self._subset(permuted[:fit_count]), self._subset(permuted[fit_count:])

    def folds(self, k: int, seed: int = 0) -> list[tuple["CalibSet", "CalibSet"]]:
        """k disjoint held-out parts of a seeded permutation, each with the rest as its fit set.

        Args:
            k: Number of folds (2 <= k <= len).
            seed: Permutation seed; default 0.
        """
        if not 2 <= k <= len(self._indices):
            raise AsrError(f"cannot make {k} folds of {len(self._indices)} samples")
        parts = np.array_split(self._permuted(seed), k)
        return [
            (self._subset(np.concatenate(parts[:i] + parts[i + 1 :])), self._subset(part))
            for i, part in enumerate(parts)
        ]

    def take_across_folds(self, n: int, k: int, seed: int = 0) -> "CalibSet":
        """``n`` samples drawn evenly from the ``k`` held-out parts of :meth:`folds` (same ``k`` and seed), each
        part's share a seeded draw from it, kept in source order: every fit set of those folds holds its share.

        Args:
            n: How many samples to keep (>= 0; all if n >= len).
            k: Number of folds (2 <= k <= len).
            seed: The folds' seed; default 0.
        """
        if n < 0 or not 2 <= k <= len(self._indices):
            raise AsrError(f"cannot take {n} samples across {k} folds of {len(self._indices)}")
        parts = np.array_split(self._permuted(seed), k)
        shares = [len(share) for share in np.array_split(np.arange(min(n, len(self._indices))), k)]
        return self._subset(np.concatenate([part[:share] for part, share in zip(parts, shares)]))

    def within(self, other: "CalibSet") -> "CalibSet":
        """The samples of this set that ``other`` (a set over the same source) holds too, in source order.

        Args:
            other: Another subset of the same source, such as a held-out part of :meth:`folds`.
        """
        if other._source is not self._source:
            raise AsrError("the two sets are not subsets of one source")
        return self._subset(self._indices[np.isin(self._indices, other._indices)])

    def shuffled(self, seed: int = 0) -> "CalibSet":
        """The same samples in a seeded random order, so that every batch mixes the classes.

        A folder of class subfolders is read class by class; statistics of a one-class batch are
        biased, and the renormalisation of a pruned pass uses batch statistics. The labels follow the
        new order.

        Args:
            seed: Permutation seed; default 0.
        """
        return CalibSet(self._source, self.specs, self.preprocess, self._permuted(seed))

    def fingerprint(self) -> str:
        """sha256 hex over source file names+contents, selected indices, preprocessing and input specs."""
        hasher = hashlib.sha256(self._source.digest())
        hasher.update(self._indices.astype("<i8").tobytes())
        hasher.update(self.preprocess.key().encode())
        hasher.update(repr([(spec.name, spec.shape, spec.dtype.str) for spec in self.specs]).encode())
        hook_file = _hook_source_file(self._source)
        if hook_file is not None:
            hash_file(hasher, hook_file, hook_file.parent)  # edits to the hook change the data
        return hasher.hexdigest()

    def _permuted(self, seed: int) -> np.ndarray:
        return self._indices[np.random.default_rng(seed).permutation(len(self._indices))]

    def _subset(self, indices: np.ndarray) -> "CalibSet":
        return CalibSet(self._source, self.specs, self.preprocess, np.sort(indices))


def _hook_source_file(source: Source) -> Path | None:
    hook = getattr(getattr(source, "plan", None), "hook", None)
    if hook is None:
        return None
    try:
        return Path(inspect.getsourcefile(hook))
    except (TypeError, OSError):
        return None  # builtins and C functions have no source file


def load_calib(path, model, preprocess: Preprocess | None = None, strict: bool = False,
               labels=None) -> CalibSet:
    """Open a calibration source and validate it against the model inputs.

    Args:
        path: Folder (images, .npy/.npz, or IDX files), a single file of those kinds, or a named set
            (``fashion-mnist:train``, ``fashion-mnist:test``: see :mod:`asr_onnx.calib.named`).
        model: The model, an onnx.ModelProto (its inputs, and its ``asr_onnx.preprocess`` metadata), or
            its input specs (a list of InputSpec).
        preprocess: Image preprocessing. Defaults to None: ``Preprocess.for_model(model)`` for a model,
            ``Preprocess()`` for specs. Arrays ignore it.
        strict: Refuse corrupt images instead of skipping them with a warning; default False.
        labels: A labels file naming the class folders' class numbers (see :func:`asr_onnx.calib.labels.read_labels`);
            None (default) numbers them by the rule of :mod:`asr_onnx.calib.labels`.

    Raises:
        AsrError: Any problem with the path, its files or their fit to the model, or a labels file for
            data without class folders.
    """
    if isinstance(model, (list, tuple)):
        specs = list(model)
        preprocess = Preprocess() if preprocess is None else preprocess
        naming = ClassNaming.for_model(None, labels)
    else:
        specs = input_specs(model)
        preprocess = Preprocess.for_model(model) if preprocess is None else preprocess
        naming = ClassNaming.for_model(model, labels)
    if not specs:
        raise AsrError("model has no inputs")
    path = resolve_data(path).expanduser()
    if not path.exists():
        raise AsrError(f"calibration path {path} does not exist")
    if not os.access(path, os.R_OK) or (path.is_dir() and not os.access(path, os.X_OK)):
        raise AsrError(f"cannot read calibration path {path}: permission denied")
    if path.is_dir():
        source = folder_source(path, specs, preprocess, strict, naming)
    else:
        source = file_source(path, specs, preprocess, strict)
    if source.count == 0:
        raise AsrError(f"no samples in {path}")
    if labels is not None and source.classes is None:
        has = "labels stored in its files" if source.labels is not None else "no class subfolders"
        raise AsrError(f"--labels {labels} numbers class folders, but {path} has {has}")
    return CalibSet(source, specs, preprocess, np.arange(source.count))
