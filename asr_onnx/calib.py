"""Calibration and evaluation data: image folders, .npy/.npz arrays and IDX files.

``load_calib`` validates a source once, up front, and returns a ``CalibSet``
that streams model-ready batches without holding the whole set in memory.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib
import importlib.util
import inspect
import json
import os
import re
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np

from asr_onnx.errors import AsrError

if TYPE_CHECKING:  # Pillow is imported where images are decoded: array data never needs it
    from PIL import Image

IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
)
ARRAY_SUFFIXES = frozenset({".npy", ".npz"})
METADATA_KEY = "asr_onnx.preprocess"

_IDX_IMAGES = re.compile(r"images[-.]idx3-ubyte(\.gz)?$")
_IDX_ANY = re.compile(r"idx\d-ubyte(\.gz)?$")
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_HASH_CHUNK = 1 << 20
_FINITE_CHUNK_ROWS = 256


# --------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class InputSpec:
    """One model input.

    Attributes:
        name: Input name in the graph.
        shape: Dims; an int is static, None or a str is dynamic.
        dtype: Numpy dtype the model expects.
    """

    name: str
    shape: tuple
    dtype: np.dtype

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(self.shape))
        object.__setattr__(self, "dtype", np.dtype(self.dtype))

    def describe(self) -> str:
        """Shape as text, e.g. ``(N, 1, 28, 28)``; dynamic dims print as their name, N or ?."""
        dims = [_dim_text(dim, axis) for axis, dim in enumerate(self.shape)]
        return "(" + ", ".join(dims) + ")"


def _dim_text(dim, axis: int) -> str:
    if isinstance(dim, int):
        return str(dim)
    if isinstance(dim, str) and dim:
        return dim
    return "N" if axis == 0 else "?"


def _is_static(dim) -> bool:
    return isinstance(dim, (int, np.integer)) and dim >= 0


@dataclass(frozen=True)
class Preprocess:
    """How images (and IDX pixels) become model input; arrays are fed as they are.

    Attributes:
        size: (H, W) target; None (default) takes the model input's static H, W.
        resize: Resize the shorter side to this, then centre-crop to ``size``; None (default) = no resize.
        mean: Per model channel (BGR order when ``channel_order="bgr"``), subtracted after scaling;
            None (default) = 0.
        std: Per model channel divisor; None (default) = 1.
        scale: Pixel multiplier applied first; default 1/255.
        channel_order: "rgb" (default) or "bgr".
        layout: "nchw", "nhwc" or None (default) to infer from the input shape.
        hook: "module:function" or "path/file.py:function" called as ``fn(pil_image, spec)`` returning
            one sample without batch axis; replaces all other preprocessing. Default None.
    """

    size: tuple[int, int] | None = None
    resize: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    scale: float = 1 / 255
    channel_order: str = "rgb"
    layout: str | None = None
    hook: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "size", _as_size(self.size))
        object.__setattr__(self, "resize", _as_positive_int("resize", self.resize))
        object.__setattr__(self, "mean", _as_floats("mean", self.mean))
        object.__setattr__(self, "std", _as_floats("std", self.std))
        object.__setattr__(self, "scale", _as_finite_float("scale", self.scale))
        object.__setattr__(self, "channel_order", _as_choice("channel_order", self.channel_order, ("rgb", "bgr")))
        if self.layout is not None:
            object.__setattr__(self, "layout", _as_choice("layout", self.layout, ("nchw", "nhwc")))
        if self.std is not None and 0.0 in self.std:
            raise AsrError(f"preprocessing std {self.std} contains 0")
        if self.hook is not None and not isinstance(self.hook, str):
            raise AsrError(f"preprocessing hook must be 'module:function', got {self.hook!r}")

    def key(self) -> str:
        """Stable JSON text of all fields, for cache keys."""
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_metadata(cls, props: dict[str, str], **overrides) -> "Preprocess":
        """Build from model metadata key ``asr_onnx.preprocess`` (JSON of any fields).

        Args:
            props: Model metadata_props as a dict; the key is optional.
            **overrides: Field values that win over the metadata when not None.

        Raises:
            AsrError: Invalid JSON, unknown field names or invalid values.
        """
        known = {field.name for field in fields(cls)}
        values = _metadata_fields(props, known)
        for name, value in overrides.items():
            if name not in known:
                raise AsrError(f"unknown preprocessing option {name!r}")
            if value is not None:
                values[name] = value
        return cls(**values)


def _metadata_fields(props: dict[str, str], known: set[str]) -> dict:
    text = (props or {}).get(METADATA_KEY)
    if text is None:
        return {}
    try:
        values = json.loads(text)
    except json.JSONDecodeError as exc:
        raise AsrError(f"model metadata {METADATA_KEY} is not valid JSON: {exc}") from None
    if not isinstance(values, dict):
        raise AsrError(f"model metadata {METADATA_KEY} must be a JSON object, got {text!r}")
    unknown = sorted(set(values) - known)
    if unknown:
        raise AsrError(f"model metadata {METADATA_KEY} has unknown fields: {', '.join(unknown)}")
    return values


def _as_size(size) -> tuple[int, int] | None:
    if size is None:
        return None
    if isinstance(size, (int, np.integer)):
        size = (size, size)
    try:
        height, width = (int(dim) for dim in size)
    except (TypeError, ValueError):
        raise AsrError(f"preprocessing size must be (H, W), got {size!r}") from None
    if height <= 0 or width <= 0:
        raise AsrError(f"preprocessing size must be positive, got {size!r}")
    return (height, width)


def _as_positive_int(name: str, value) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise AsrError(f"preprocessing {name} must be a positive integer, got {value!r}")
    return int(value)


def _as_floats(name: str, values) -> tuple[float, ...] | None:
    if values is None:
        return None
    if isinstance(values, (int, float)):
        values = (values,)
    try:
        floats = tuple(float(value) for value in values)
    except (TypeError, ValueError):
        raise AsrError(f"preprocessing {name} must be numbers, got {values!r}") from None
    if not floats or not all(np.isfinite(floats)):
        raise AsrError(f"preprocessing {name} must be finite numbers, got {values!r}")
    return floats


def _as_finite_float(name: str, value) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise AsrError(f"preprocessing {name} must be a number, got {value!r}") from None
    if not np.isfinite(number):
        raise AsrError(f"preprocessing {name} must be finite, got {value!r}")
    return number


def _as_choice(name: str, value, choices: tuple[str, ...]) -> str:
    text = str(value).lower()
    if text not in choices:
        raise AsrError(f"preprocessing {name} must be one of {', '.join(choices)}, got {value!r}")
    return text


# --------------------------------------------------------------------------- IDX


def read_idx(path) -> np.ndarray:
    """Read an IDX file (MNIST format), gzip-compressed or plain.

    Args:
        path: File path; gzip is detected from the content, not the name.

    Returns:
        The array in native byte order.

    Raises:
        AsrError: Unreadable file, bad magic number or truncated data.
    """
    path = Path(path)
    data = _read_maybe_gzip(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise AsrError(f"{path} is not an IDX file (bad magic number)")
    dtype, ndim = _IDX_DTYPES[data[2]], data[3]
    header_end = 4 + 4 * ndim
    if len(data) < header_end:
        raise AsrError(f"{path}: IDX header is truncated")
    shape = tuple(int(dim) for dim in np.frombuffer(data, ">u4", count=ndim, offset=4))
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) - header_end != expected:
        raise AsrError(f"{path}: IDX data has {len(data) - header_end} bytes, header says {expected}")
    array = np.frombuffer(data, dtype, offset=header_end).reshape(shape)
    return array.astype(dtype.newbyteorder("="))


def _read_maybe_gzip(path: Path) -> bytes:
    try:
        with open(path, "rb") as handle:
            data = handle.read()
        # Sniff the gzip magic so a renamed file still reads.
        return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
    except (OSError, EOFError) as exc:
        raise AsrError(f"cannot read {path}: {exc}") from None


# --------------------------------------------------------------------------- image preprocessing


@dataclass(frozen=True)
class _ImagePlan:
    """Preprocessing resolved against one model input."""

    spec: InputSpec
    preprocess: Preprocess
    size: tuple[int, int] | None  # None only with a hook
    channels: int
    layout: str | None  # None for a rank-3 (N, H, W) input: no channel axis
    mean: np.ndarray
    std: np.ndarray
    hook: Callable | None


def _plan_images(specs: list[InputSpec], preprocess: Preprocess) -> _ImagePlan:
    if len(specs) != 1:
        names = ", ".join(spec.name for spec in specs)
        raise AsrError(f"images need a single-input model, this one has {names}; pass .npz keyed by input name")
    spec = specs[0]
    if preprocess.hook is not None:
        hook = _load_hook(preprocess.hook)
        none = np.zeros(1, np.float32)
        return _ImagePlan(spec, preprocess, preprocess.size, 0, None, none, none, hook)
    layout, channels = _layout_and_channels(spec, preprocess.layout)
    size = _target_size(spec, layout, preprocess)
    mean = _per_channel("mean", preprocess.mean, 0.0, channels, spec)
    std = _per_channel("std", preprocess.std, 1.0, channels, spec)
    return _ImagePlan(spec, preprocess, size, channels, layout, mean, std, None)


def infer_layout(shape: tuple) -> str:
    """Guess "nchw" or "nhwc" for a 4-D input; "nchw" when ambiguous."""
    first_is_channel = shape[1] in (1, 3)
    last_is_channel = shape[3] in (1, 3)
    if last_is_channel and not first_is_channel:
        return "nhwc"
    return "nchw"


def _layout_and_channels(spec: InputSpec, layout: str | None) -> tuple[str | None, int]:
    if len(spec.shape) == 3:
        return None, 1  # (N, H, W): a grayscale model without a channel axis
    if len(spec.shape) != 4:
        raise AsrError(f"images need a 4-D model input, '{spec.name}' is {spec.describe()}; pass .npy arrays")
    layout = layout or infer_layout(spec.shape)
    channel_dim = spec.shape[1] if layout == "nchw" else spec.shape[3]
    if not _is_static(channel_dim):
        raise AsrError(f"model input '{spec.name}' {spec.describe()} has a dynamic channel dim; pass .npy arrays")
    if channel_dim not in (1, 3):
        raise AsrError(
            f"model input '{spec.name}' {spec.describe()} has {channel_dim} channels ({layout}); "
            "images give 1 or 3; pass .npy arrays or a hook"
        )
    return layout, int(channel_dim)


def _spatial_dims(spec: InputSpec, layout: str | None) -> tuple:
    if layout is None:
        return spec.shape[1], spec.shape[2]
    return (spec.shape[2], spec.shape[3]) if layout == "nchw" else (spec.shape[1], spec.shape[2])


def _target_size(spec: InputSpec, layout: str | None, preprocess: Preprocess) -> tuple[int, int]:
    model_hw = _spatial_dims(spec, layout)
    size = preprocess.size
    if size is None:
        if not all(_is_static(dim) for dim in model_hw):
            raise AsrError(f"model input '{spec.name}' {spec.describe()} has dynamic H,W; pass --size")
        size = (int(model_hw[0]), int(model_hw[1]))
    for wanted, dim in zip(size, model_hw):
        if _is_static(dim) and wanted != dim:
            raise AsrError(
                f"--size {size[0]}x{size[1]} does not match model input '{spec.name}' {spec.describe()}"
            )
    if preprocess.resize is not None and preprocess.resize < max(size):
        raise AsrError(f"--resize {preprocess.resize} is smaller than the crop size {size[0]}x{size[1]}")
    return size


def _per_channel(name: str, values, default: float, channels: int, spec: InputSpec) -> np.ndarray:
    if values is None:
        return np.full(1, default, np.float32)
    if len(values) not in (1, channels):
        raise AsrError(
            f"preprocessing {name} has {len(values)} values but model input '{spec.name}' has {channels} channel(s)"
        )
    return np.asarray(values, np.float32)


def _load_hook(hook: str) -> Callable:
    target, sep, function_name = hook.rpartition(":")
    if not sep or not target or not function_name:
        raise AsrError(f"hook must be 'module:function' or 'file.py:function', got {hook!r}")
    try:
        module = _import_hook_module(target)
    except AsrError:
        raise
    except Exception as exc:  # user code: any import-time failure is an input problem
        raise AsrError(f"cannot load hook {hook}: {type(exc).__name__}: {exc}") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise AsrError(f"hook {hook}: {target} has no function {function_name!r}")
    return function


def _import_hook_module(target: str):
    if not (target.endswith(".py") or "/" in target or os.sep in target):
        return importlib.import_module(target)
    path = Path(target).expanduser()
    if not path.is_file():
        raise AsrError(f"hook file {path} does not exist")
    module_spec = importlib.util.spec_from_file_location(f"asr_onnx_hook_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def _resize_then_crop(image: Image.Image, resize: int, size: tuple[int, int]) -> Image.Image:
    """Scale the shorter side to ``resize`` (bilinear), then centre-crop to ``size`` (H, W)."""
    width, height = image.size
    if min(width, height) != resize:
        # Truncating the longer side matches torchvision's Resize(int).
        if width <= height:
            width, height = resize, int(resize * height / width)
        else:
            width, height = int(resize * width / height), resize
        from PIL import Image

        image = image.resize((width, height), Image.Resampling.BILINEAR)
    crop_height, crop_width = size
    left, top = (width - crop_width) // 2, (height - crop_height) // 2
    return image.crop((left, top, left + crop_width, top + crop_height))


def _image_to_sample(image: Image.Image, plan: _ImagePlan) -> np.ndarray:
    """Convert, resize, scale, normalise and lay out one image as float32."""
    image = image.convert("L" if plan.channels == 1 else "RGB")
    if plan.preprocess.resize is not None:
        image = _resize_then_crop(image, plan.preprocess.resize, plan.size)
    pixels = np.asarray(image).astype(np.float32)  # (H, W) or (H, W, 3)
    if plan.channels == 3 and plan.preprocess.channel_order == "bgr":
        pixels = pixels[..., ::-1]
    sample = (pixels * np.float32(plan.preprocess.scale) - plan.mean) / plan.std
    if plan.layout is None:
        return sample
    if plan.channels == 1:
        sample = sample[..., np.newaxis]
    return sample.transpose(2, 0, 1) if plan.layout == "nchw" else sample


def _hook_to_sample(image: Image.Image, plan: _ImagePlan, origin: str) -> np.ndarray:
    try:
        sample = np.asarray(plan.hook(image, plan.spec))
    except Exception as exc:  # user code: report which input broke it
        raise AsrError(f"hook {plan.preprocess.hook} failed on {origin}: {type(exc).__name__}: {exc}") from None
    label = f"{origin} (hook {plan.preprocess.hook})"
    _check_dtype(label, sample.dtype, plan.spec)
    _check_sample_shape(label, sample.shape, sample.shape, plan.spec)
    if sample.dtype.kind in "fc" and not np.isfinite(sample).all():
        raise AsrError(f"{label}: output contains NaN or Inf")
    return sample


def _check_image_size(origin: str, width: int, height: int, plan: _ImagePlan):
    if plan.hook is not None or plan.preprocess.resize is not None:
        return
    if (height, width) != plan.size:
        raise AsrError(
            f"image {origin} is {height}x{width} but the model expects {plan.size[0]}x{plan.size[1]}; "
            "pass --size or --resize"
        )


def _stack_images(images: Iterator[tuple[Image.Image, str]], plan: _ImagePlan) -> dict[str, np.ndarray]:
    samples = []
    for image, origin in images:
        if plan.hook is not None:
            samples.append(_hook_to_sample(image, plan, origin))
        else:
            samples.append(_image_to_sample(image, plan))
    return {plan.spec.name: np.ascontiguousarray(np.stack(samples), dtype=plan.spec.dtype)}


# --------------------------------------------------------------------------- array checks


def _check_dtype(origin: str, dtype: np.dtype, spec: InputSpec):
    """Floats feed float inputs, integers feed integer inputs; anything else is refused."""
    wanted = spec.dtype.kind
    accepted = {"f": "f", "i": "iu", "u": "iu", "b": "b"}.get(wanted)
    ok = dtype.kind in accepted if accepted else dtype == spec.dtype
    if not ok:
        raise AsrError(f"{origin}: array dtype {dtype} cannot feed model input '{spec.name}' ({spec.dtype})")


def _check_sample_shape(origin: str, sample_shape: tuple, shown_shape: tuple, spec: InputSpec):
    expected = spec.shape[1:]
    matches = len(sample_shape) == len(expected) and all(
        not _is_static(dim) or dim == got for dim, got in zip(expected, sample_shape)
    )
    if not matches:
        raise AsrError(
            f"{origin}: sample shape {tuple(shown_shape)} does not match model input '{spec.name}' {spec.describe()}"
        )


def _sample_count(origin: str, array: np.ndarray, spec: InputSpec) -> tuple[int, bool]:
    """Validate one array against ``spec``; return (samples, is_single_sample)."""
    _check_dtype(origin, array.dtype, spec)
    if array.ndim == len(spec.shape):
        _check_sample_shape(origin, array.shape[1:], array.shape[1:], spec)
        count, single = array.shape[0], False
    elif array.ndim == len(spec.shape) - 1:
        _check_sample_shape(origin, array.shape, array.shape, spec)
        count, single = 1, True
    else:
        raise AsrError(
            f"{origin}: array shape {array.shape} does not match model input '{spec.name}' {spec.describe()}"
        )
    _check_finite(origin, array)
    return count, single


def _check_finite(origin: str, array: np.ndarray):
    if array.dtype.kind not in "fc":
        return
    flat = array.reshape(1, -1) if array.ndim == 0 else array
    # Chunked so a memory-mapped file is scanned without a full-size boolean copy.
    for start in range(0, max(len(flat), 1), _FINITE_CHUNK_ROWS):
        if not np.isfinite(flat[start : start + _FINITE_CHUNK_ROWS]).all():
            raise AsrError(f"{origin}: array contains NaN or Inf")


# --------------------------------------------------------------------------- sources


class _Source:
    """Samples addressed by index 0..count-1; subclasses read them in batches."""

    count: int
    labels: np.ndarray | None
    root: Path
    files: list[Path]
    _digest: bytes | None = None

    def read(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """Model-ready arrays for sorted ``indices``."""
        raise NotImplementedError

    def digest(self) -> bytes:
        """sha256 over relative file names and contents, cached."""
        if self._digest is None:
            hasher = hashlib.sha256()
            for path in self.files:
                _hash_file(hasher, path, self.root)
            self._digest = hasher.digest()
        return self._digest


def _hash_file(hasher, path: Path, root: Path):
    # Length-prefixed name and size keep file boundaries unambiguous.
    name = path.relative_to(root).as_posix().encode()
    hasher.update(len(name).to_bytes(8, "little") + name)
    hasher.update(path.stat().st_size.to_bytes(8, "little"))
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            hasher.update(chunk)


class _ImageFiles(_Source):
    """Image files decoded on demand."""

    def __init__(self, root: Path, paths: list[Path], labels: np.ndarray | None, plan: _ImagePlan):
        self.root, self.files, self.labels, self.plan = root, paths, labels, plan
        self.count = len(paths)

    def read(self, indices):
        return _stack_images(self._decoded(indices), self.plan)

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


class _IdxImages(_Source):
    """IDX uint8 images (N, H, W), preprocessed like image files."""

    def __init__(self, images_path: Path, labels_path: Path | None, plan: _ImagePlan):
        self.root = images_path.parent
        self.files = [images_path] + ([labels_path] if labels_path else [])
        self.plan = plan
        self.pixels = read_idx(images_path)
        if self.pixels.ndim != 3 or self.pixels.dtype != np.uint8:
            found = f"{self.pixels.dtype} {self.pixels.shape}"
            raise AsrError(f"{images_path}: IDX images must be uint8 (N, H, W), got {found}")
        self.count = len(self.pixels)
        self.labels = _read_idx_labels(labels_path, self.count) if labels_path else None
        if self.count:
            _check_image_size(f"0 of {images_path.name}", self.pixels.shape[2], self.pixels.shape[1], plan)

    def read(self, indices):
        from PIL import Image

        name = self.files[0].name
        images = ((Image.fromarray(self.pixels[index]), f"{index} of {name}") for index in indices)
        return _stack_images(images, self.plan)


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


class _ArrayFiles(_Source):
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
            spec.name: np.ascontiguousarray(parts[spec.name][0] if len(parts[spec.name]) == 1
                                            else np.concatenate(parts[spec.name]), dtype=spec.dtype)
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
        counts[spec.name], single[spec.name] = _sample_count(origin, array, spec)
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


# --------------------------------------------------------------------------- discovery


def _is_hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _list_files(folder: Path) -> list[Path]:
    try:
        paths = [path for path in folder.rglob("*") if path.is_file() and not _is_hidden(path, folder)]
    except OSError as exc:
        raise AsrError(f"cannot read {folder}: {exc}") from None
    return sorted(paths)


def _idx_labels_path(images_path: Path) -> Path | None:
    base = re.sub(r"images([-.])idx3-ubyte(\.gz)?$", r"labels\1idx1-ubyte", images_path.name)
    for name in (base, base + ".gz"):
        candidate = images_path.with_name(name)
        if candidate.is_file():
            return candidate
    return None


def _scan_images(folder: Path, paths: list[Path], plan: _ImagePlan, strict: bool) -> list[Path]:
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
        _check_image_size(str(path), width, height, plan)
        good.append(path)
    if not good:
        raise AsrError(f"no readable images in {folder} ({len(paths)} corrupt)")
    return good


def _class_labels(folder: Path, paths: list[Path], all_paths: list[Path]) -> np.ndarray | None:
    """Labels from first-level subfolders, or None when any image sits at the root."""
    if any(len(path.relative_to(folder).parts) < 2 for path in all_paths):
        return None
    classes = sorted({path.relative_to(folder).parts[0] for path in all_paths})
    if all(re.fullmatch(r"\d+", name) for name in classes):
        index_of = {name: int(name) for name in classes}  # "3" is class 3 even when other classes are absent
    else:
        index_of = {name: index for index, name in enumerate(classes)}
    return np.array([index_of[path.relative_to(folder).parts[0]] for path in paths], np.int64)


def _folder_source(folder: Path, specs, preprocess: Preprocess, strict: bool) -> _Source:
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
        return _ArrayFiles(folder, arrays, specs)
    if not images:
        found = f" (found {len(paths)} other file(s), e.g. {paths[0].name})" if paths else ""
        raise AsrError(f"no images or .npy/.npz files in {folder}{found}")
    plan = _plan_images(specs, preprocess)
    good = _scan_images(folder, images, plan, strict)
    return _ImageFiles(folder, good, _class_labels(folder, good, images), plan)


def _idx_source(images_path: Path, specs, preprocess: Preprocess) -> _IdxImages:
    plan = _plan_images(specs, preprocess)
    return _IdxImages(images_path, _idx_labels_path(images_path), plan)


def _file_source(path: Path, specs, preprocess: Preprocess, strict: bool) -> _Source:
    suffix = path.suffix.lower()
    if suffix in ARRAY_SUFFIXES:
        return _ArrayFiles(path.parent, [path], specs)
    if _IDX_ANY.search(path.name) and "label" in path.name:
        raise AsrError(f"{path} is an IDX labels file; pass the images file (labels are found beside it)")
    if _IDX_IMAGES.search(path.name) or _IDX_ANY.search(path.name):
        return _idx_source(path, specs, preprocess)
    if suffix in IMAGE_SUFFIXES:
        plan = _plan_images(specs, preprocess)
        return _ImageFiles(path.parent, _scan_images(path.parent, [path], plan, strict), None, plan)
    raise AsrError(f"{path}: unsupported file type; expected a folder, an image, .npy/.npz or an IDX images file")


# --------------------------------------------------------------------------- public set


class CalibSet:
    """A calibration/eval set over a folder or file: lazily loaded, streamed in batches.

    Attributes:
        specs: The model inputs each batch feeds.
    """

    def __init__(self, source: _Source, specs: list[InputSpec], preprocess: Preprocess, indices: np.ndarray):
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

    def batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        """Yield ``{input_name: array (b, ...)}`` in the model's dtype, in source order.

        Args:
            batch_size: Samples per batch (>= 1); the last batch may be smaller.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise AsrError(f"batch size must be a positive integer, got {batch_size!r}")
        for start in range(0, len(self._indices), batch_size):
            yield self._source.read(self._indices[start : start + batch_size])

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
        return [(self._subset(np.concatenate(parts[:i] + parts[i + 1 :])), self._subset(part))
                for i, part in enumerate(parts)]

    def fingerprint(self) -> str:
        """sha256 hex over source file names+contents, selected indices, preprocessing and input specs."""
        hasher = hashlib.sha256(self._source.digest())
        hasher.update(self._indices.astype("<i8").tobytes())
        hasher.update(self.preprocess.key().encode())
        hasher.update(repr([(spec.name, spec.shape, spec.dtype.str) for spec in self.specs]).encode())
        hook_file = _hook_source_file(self._source)
        if hook_file is not None:
            _hash_file(hasher, hook_file, hook_file.parent)  # edits to the hook change the data
        return hasher.hexdigest()

    def _permuted(self, seed: int) -> np.ndarray:
        return self._indices[np.random.default_rng(seed).permutation(len(self._indices))]

    def _subset(self, indices: np.ndarray) -> "CalibSet":
        return CalibSet(self._source, self.specs, self.preprocess, np.sort(indices))


def _hook_source_file(source: _Source) -> Path | None:
    hook = getattr(getattr(source, "plan", None), "hook", None)
    if hook is None:
        return None
    try:
        return Path(inspect.getsourcefile(hook))
    except (TypeError, OSError):
        return None  # builtins and C functions have no source file


def load_calib(path, specs: list[InputSpec], preprocess: Preprocess = Preprocess(), strict: bool = False) -> CalibSet:
    """Open a calibration source and validate it against the model inputs.

    Args:
        path: Folder (images, .npy/.npz, or IDX files) or a single file of those kinds.
        specs: The model's inputs.
        preprocess: Image preprocessing; default ``Preprocess()``. Arrays ignore it.
        strict: Refuse corrupt images instead of skipping them with a warning; default False.

    Raises:
        AsrError: Any problem with the path, its files or their fit to the model.
    """
    if not specs:
        raise AsrError("model has no inputs")
    path = Path(path).expanduser()
    if not path.exists():
        raise AsrError(f"calibration path {path} does not exist")
    if not os.access(path, os.R_OK) or (path.is_dir() and not os.access(path, os.X_OK)):
        raise AsrError(f"cannot read calibration path {path}: permission denied")
    if path.is_dir():
        source = _folder_source(path, specs, preprocess, strict)
    else:
        source = _file_source(path, specs, preprocess, strict)
    if source.count == 0:
        raise AsrError(f"no samples in {path}")
    return CalibSet(source, specs, preprocess, np.arange(source.count))
