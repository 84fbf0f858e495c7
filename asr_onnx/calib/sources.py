"""Data sources: image files, IDX images and .npy/.npz arrays, each read by sample index."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np

from asr_onnx.calib.checks import sample_count
from asr_onnx.calib.idx import read_idx
from asr_onnx.calib.images import ImagePlan, check_image_size, stack_images
from asr_onnx.calib.labels import ClassMap
from asr_onnx.calib.specs import InputSpec
from asr_onnx.errors import AsrError

if TYPE_CHECKING:  # Pillow is imported where images are decoded: array data never needs it
    from PIL import Image

_HASH_CHUNK = 1 << 20


class Source:
    """Samples addressed by index 0..count-1; subclasses read them in batches."""

    count: int
    labels: np.ndarray | None
    root: Path
    files: list[Path]
    classes: ClassMap | None = None  # how class folder names became labels; None for labels read from files
    _digest: bytes | None = None

    def read(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """Model-ready arrays for sorted ``indices``."""
        raise NotImplementedError

    def digest(self) -> bytes:
        """sha256 over relative file names and contents, cached."""
        if self._digest is None:
            hasher = hashlib.sha256()
            for path in self.files:
                hash_file(hasher, path, self.root)
            self._digest = hasher.digest()
        return self._digest


def hash_file(hasher, path: Path, root: Path):
    # Length-prefixed name and size keep file boundaries unambiguous.
    name = path.relative_to(root).as_posix().encode()
    hasher.update(len(name).to_bytes(8, "little") + name)
    hasher.update(path.stat().st_size.to_bytes(8, "little"))
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            hasher.update(chunk)


class ImageFiles(Source):
    """Image files decoded on demand."""

    def __init__(self, root: Path, paths: list[Path], labels: np.ndarray | None, plan: ImagePlan,
                 classes: ClassMap | None = None):
        self.root, self.files, self.labels, self.plan = root, paths, labels, plan
        self.classes = classes
        self.count = len(paths)

    def read(self, indices):
        return stack_images(self._decoded(indices), self.plan)

    def _decoded(self, indices) -> Iterator[tuple[Image.Image, str]]:
        from PIL import Image

        # Yield inside ``with`` so each file closes once its sample is built.
        for index in indices:
            path = self.files[index]
            try:
                image = Image.open(path)
                image.load()
            except Exception as exc:  # verify() passed, so a failure here is still the file's fault
                raise AsrError(f"cannot decode image {path}: {exc}") from None
            with image:
                yield image, str(path)


class IdxImages(Source):
    """IDX uint8 images (N, H, W), preprocessed like image files."""

    def __init__(self, images_path: Path, labels_path: Path | None, plan: ImagePlan):
        self.root = images_path.parent
        self.files = [images_path] + ([labels_path] if labels_path else [])
        self.plan = plan
        self.pixels = _idx_pixels(images_path)
        if self.pixels.ndim != 3 or self.pixels.dtype != np.uint8:
            found = f"{self.pixels.dtype} {self.pixels.shape}"
            raise AsrError(f"{images_path}: IDX images must be uint8 (N, H, W), got {found}")
        self.count = len(self.pixels)
        self.labels = _read_idx_labels(labels_path, self.count) if labels_path else None
        if self.count:
            check_image_size(f"0 of {images_path.name}", self.pixels.shape[2], self.pixels.shape[1], plan)

    def __reduce__(self):
        # a shard sent to another process (a Ray worker) carries the file's path, not its pixels: the worker
        # reads them itself, once (see _idx_pixels)
        return IdxImages, (self.files[0], self.files[1] if len(self.files) > 1 else None, self.plan)

    def read(self, indices):
        from PIL import Image

        name = self.files[0].name
        images = ((Image.fromarray(self.pixels[index]), f"{index} of {name}") for index in indices)
        return stack_images(images, self.plan)


_PIXELS: dict = {}  # the last IDX image file read: (path, size, mtime) -> pixels


def _idx_pixels(path: Path) -> np.ndarray:
    """The pixels of an IDX image file, read once per process while the file is unchanged (a worker is sent
    the file's path with every shard)."""
    try:
        stat = path.stat()
    except OSError:
        return read_idx(path)  # its one-line error
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _PIXELS:
        _PIXELS.clear()
        _PIXELS[key] = read_idx(path)
    return _PIXELS[key]


def _read_idx_labels(path: Path, count: int) -> np.ndarray:
    labels = read_idx(path)
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise AsrError(f"{path}: IDX labels must be integers (N,), got {labels.dtype} {labels.shape}")
    if len(labels) != count:
        raise AsrError(f"{path}: {len(labels)} labels for {count} images")
    return labels.astype(np.int64)


@dataclass
class _ArrayFile:
    path: Path
    keys: dict[str, str | None]  # input name -> npz key (None for .npy)
    count: int
    single: dict[str, bool]  # input name -> file holds one sample without batch axis


class ArrayFiles(Source):
    """.npy (memory-mapped) and .npz files holding model-ready arrays."""

    def __init__(self, root: Path, paths: list[Path], specs: list[InputSpec]):
        self.root, self.files, self.specs = root, paths, specs
        self.entries, label_parts = [], []
        for path in paths:
            entry, file_labels = _scan_array_file(path, specs)
            self.entries.append(entry)
            label_parts.append(file_labels)
        self.count = sum(entry.count for entry in self.entries)
        self.labels = _join_labels(root, label_parts)
        self.starts = np.cumsum([0] + [entry.count for entry in self.entries])
        self._cached: tuple[int, dict[str, np.ndarray]] | None = None

    def read(self, indices):
        file_of_index = np.searchsorted(self.starts, indices, side="right") - 1
        parts = {spec.name: [] for spec in self.specs}
        for file_index in np.unique(file_of_index):
            local = indices[file_of_index == file_index] - self.starts[file_index]
            # a run of consecutive samples is a slice: a view of the memory map, no copy
            run = len(local) and local[-1] - local[0] + 1 == len(local)
            for name, array in self._arrays(int(file_index)).items():
                parts[name].append(array[local[0] : local[-1] + 1] if run else array[local])
        return {
            spec.name: np.ascontiguousarray(
                parts[spec.name][0] if len(parts[spec.name]) == 1 else np.concatenate(parts[spec.name]),
                dtype=spec.dtype,
            )
            for spec in self.specs
        }

    def _arrays(self, file_index: int) -> dict[str, np.ndarray]:
        # One file cached: indices arrive sorted, so each file is opened once per pass.
        if self._cached is None or self._cached[0] != file_index:
            entry = self.entries[file_index]
            arrays = _open_arrays(entry.path, entry.keys)
            for name, single in entry.single.items():
                if single:
                    arrays[name] = arrays[name][np.newaxis]
            self._cached = (file_index, arrays)
        return self._cached[1]


def _open_arrays(path: Path, keys: dict[str, str | None]) -> dict[str, np.ndarray]:
    try:
        if path.suffix.lower() == ".npy":
            return {name: np.load(path, mmap_mode="r") for name in keys}
        with np.load(path) as archive:
            return {name: archive[key] for name, key in keys.items()}
    except AsrError:
        raise
    except Exception as exc:  # numpy raises ValueError/OSError/zipfile errors for bad files
        raise AsrError(f"cannot read array file {path}: {exc}") from None


def _scan_array_file(path: Path, specs: list[InputSpec]) -> tuple[_ArrayFile, np.ndarray | None]:
    if path.suffix.lower() == ".npy":
        if len(specs) != 1:
            raise AsrError(f"{path}: .npy files need a single-input model; use .npz keyed by input name")
        keys, label_key = {specs[0].name: None}, None
    else:
        keys, label_key = _npz_keys(path, specs)
    counts, single = {}, {}
    for spec in specs:
        array = _open_arrays(path, {spec.name: keys[spec.name]})[spec.name]
        origin = str(path) if len(specs) == 1 else f"{path} '{spec.name}'"
        counts[spec.name], single[spec.name] = sample_count(origin, array, spec)
        del array  # one input's data in memory at a time
    if len(set(counts.values())) > 1:
        listing = ", ".join(f"{name}: {count}" for name, count in counts.items())
        raise AsrError(f"{path}: inputs have different sample counts ({listing})")
    count = next(iter(counts.values()))
    labels = _npz_labels(path, label_key, count, all(single.values())) if label_key else None
    return _ArrayFile(path, keys, count, single), labels


def _npz_names(path: Path) -> list[str]:
    try:
        with np.load(path) as archive:
            return list(archive.files)
    except Exception as exc:  # not a zip, truncated, ...
        raise AsrError(f"cannot read array file {path}: {exc}") from None


def _npz_keys(path: Path, specs: list[InputSpec]) -> tuple[dict[str, str], str | None]:
    names = _npz_names(path)
    label_key = "y" if "y" in names else None
    has = ", ".join(names) or "nothing"
    if len(specs) > 1:
        for spec in specs:
            if spec.name not in names:
                raise AsrError(f"{path} lacks model input '{spec.name}' (has: {has})")
        return {spec.name: spec.name for spec in specs}, label_key
    spec = specs[0]
    inputs = [name for name in names if name != "y"]
    for candidate in ("x", spec.name):
        if candidate in names:
            return {spec.name: candidate}, label_key
    if len(inputs) == 1:
        return {spec.name: inputs[0]}, label_key
    raise AsrError(f"{path}: cannot tell which array is the input; name it 'x' or '{spec.name}' (has: {has})")


def _npz_labels(path: Path, key: str, count: int, single: bool) -> np.ndarray:
    labels = _open_arrays(path, {"y": key})["y"]
    if labels.dtype.kind not in "iu":
        raise AsrError(f"{path}: labels 'y' must be integers, got {labels.dtype}")
    if single and labels.ndim == 0:
        labels = labels.reshape(1)
    if labels.shape != (count,):
        raise AsrError(f"{path}: labels 'y' have shape {labels.shape} but the file has {count} sample(s)")
    return labels.astype(np.int64)


def _join_labels(root: Path, parts: list[np.ndarray | None]) -> np.ndarray | None:
    present = [part is not None for part in parts]
    if not any(present):
        return None
    if not all(present):
        raise AsrError(f"{root}: some .npz files have labels 'y' and some do not")
    return np.concatenate(parts)
