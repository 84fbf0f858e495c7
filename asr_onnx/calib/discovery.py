"""Finding the data in a folder or file, with labels and corrupt-file checks."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np

from asr_onnx.calib.images import ImagePlan, check_image_size, plan_images
from asr_onnx.calib.labels import ClassMap, ClassNaming
from asr_onnx.calib.sources import ArrayFiles, IdxImages, ImageFiles, Source
from asr_onnx.calib.specs import Preprocess
from asr_onnx.errors import AsrError
from asr_onnx.filekinds import check_input

_IDX_ANY = re.compile(r"idx\d-ubyte(\.gz)?$")
_IDX_IMAGES = re.compile(r"images[-.]idx3-ubyte(\.gz)?$")
ARRAY_SUFFIXES = frozenset({".npy", ".npz"})
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"})


def _is_hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _list_files(folder: Path) -> list[Path]:
    try:
        paths = [path for path in folder.rglob("*") if path.is_file() and not _is_hidden(path, folder)]
    except OSError as exc:
        raise AsrError(f"cannot read {folder}: {exc}") from None
    return sorted(paths)


def idx_labels_path(images_path: Path) -> Path | None:
    base = re.sub(r"images([-.])idx3-ubyte(\.gz)?$", r"labels\1idx1-ubyte", images_path.name)
    for name in (base, base + ".gz"):
        candidate = images_path.with_name(name)
        check_input(candidate, "the IDX labels")  # a FIFO there would not be passed over in silence
        if candidate.is_file():
            return candidate
    return None


def _scan_images(folder: Path, paths: list[Path], plan: ImagePlan, strict: bool) -> list[Path]:
    """Keep images that pass ``verify()`` and match the size; warn about (or refuse) corrupt ones."""
    from PIL import Image

    good = []
    for path in paths:
        try:
            with Image.open(path) as image:
                width, height = image.size
                image.verify()
        except Exception as exc:  # Pillow plugins raise assorted types for bad data
            if strict:
                raise AsrError(f"corrupt image {path}: {exc}") from None
            warnings.warn(f"skipping corrupt image {path}: {exc}", stacklevel=3)
            continue
        check_image_size(str(path), width, height, plan)
        good.append(path)
    if not good:
        raise AsrError(f"no readable images in {folder} ({len(paths)} corrupt)")
    return good


def _class_labels(folder: Path, paths: list[Path], all_paths: list[Path],
                  naming: ClassNaming) -> tuple[np.ndarray | None, ClassMap | None]:
    """Labels from first-level subfolders and how their names were numbered (see :mod:`.labels`), or
    (None, None) when any image sits at the root."""
    if any(len(path.relative_to(folder).parts) < 2 for path in all_paths):
        return None, None
    class_map = naming.classes(path.relative_to(folder).parts[0] for path in all_paths)
    index_of = class_map.index_of
    return np.array([index_of[path.relative_to(folder).parts[0]] for path in paths], np.int64), class_map


def folder_source(folder: Path, specs, preprocess: Preprocess, strict: bool,
                  naming: ClassNaming | None = None) -> Source:
    paths = _list_files(folder)
    images = [path for path in paths if path.suffix.lower() in IMAGE_SUFFIXES]
    arrays = [path for path in paths if path.suffix.lower() in ARRAY_SUFFIXES]
    idx_images = [path for path in paths if _IDX_IMAGES.search(path.name)]
    candidates = (("images", images), (".npy/.npz files", arrays), ("IDX files", idx_images))
    kinds = [name for name, found in candidates if found]
    if len(kinds) > 1:
        raise AsrError(f"{folder} mixes {' and '.join(kinds)}; keep one kind per folder")
    if idx_images:
        if len(idx_images) > 1:
            listing = ", ".join(path.name for path in idx_images)
            raise AsrError(f"{folder} has several IDX image files ({listing}); pass the path of one")
        return _idx_source(idx_images[0], specs, preprocess)
    if arrays:
        return ArrayFiles(folder, arrays, specs)
    if not images:
        found = f" (found {len(paths)} other file(s), e.g. {paths[0].name})" if paths else ""
        raise AsrError(f"no images or .npy/.npz files in {folder}{found}")
    plan = plan_images(specs, preprocess)
    good = _scan_images(folder, images, plan, strict)
    labels, class_map = _class_labels(folder, good, images, naming or ClassNaming())
    return ImageFiles(folder, good, labels, plan, class_map)


def _idx_source(images_path: Path, specs, preprocess: Preprocess) -> IdxImages:
    plan = plan_images(specs, preprocess)
    return IdxImages(images_path, idx_labels_path(images_path), plan)


def file_source(path: Path, specs, preprocess: Preprocess, strict: bool) -> Source:
    check_input(path, "data")  # a FIFO named x.npy would block, a device never end
    suffix = path.suffix.lower()
    if suffix in ARRAY_SUFFIXES:
        return ArrayFiles(path.parent, [path], specs)
    if _IDX_ANY.search(path.name) and "label" in path.name:
        raise AsrError(f"{path} is an IDX labels file; pass the images file (labels are found beside it)")
    if _IDX_IMAGES.search(path.name) or _IDX_ANY.search(path.name):
        return _idx_source(path, specs, preprocess)
    if suffix in IMAGE_SUFFIXES:
        plan = plan_images(specs, preprocess)
        return ImageFiles(path.parent, _scan_images(path.parent, [path], plan, strict), None, plan)
    raise AsrError(f"{path}: unsupported file type; expected a folder, an image, .npy/.npz or an IDX images file")
