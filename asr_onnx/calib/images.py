"""Image preprocessing: layout, resize and crop, scaling, mean/std, user hooks."""

from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np

from asr_onnx.calib.checks import check_dtype, check_sample_shape
from asr_onnx.calib.specs import InputSpec, Preprocess, is_static
from asr_onnx.errors import AsrError
from asr_onnx.filekinds import check_input

if TYPE_CHECKING:  # Pillow is imported where images are decoded: array data never needs it
    from PIL import Image


MAX_SAMPLE_BYTES = 2**30  # one preprocessed image; 8192x8192 RGB float32 is 0.75 GiB


@dataclass(frozen=True)
class ImagePlan:
    """Preprocessing resolved against one model input."""

    spec: InputSpec
    preprocess: Preprocess
    size: tuple[int, int] | None  # None only with a hook
    channels: int
    layout: str | None  # None for a rank-3 (N, H, W) input: no channel axis
    mean: np.ndarray
    std: np.ndarray
    hook: Callable | None


def plan_images(specs: list[InputSpec], preprocess: Preprocess) -> ImagePlan:
    if len(specs) != 1:
        names = ", ".join(spec.name for spec in specs)
        raise AsrError(f"images need a single-input model, this one has {names}; pass .npz keyed by input name")
    spec = specs[0]
    if preprocess.hook is not None:
        hook = _load_hook(preprocess.hook)
        none = np.zeros(1, np.float32)
        return ImagePlan(spec, preprocess, preprocess.size, 0, None, none, none, hook)
    layout, channels = _layout_and_channels(spec, preprocess.layout)
    size = _target_size(spec, layout, preprocess)
    sample_bytes = size[0] * size[1] * channels * spec.dtype.itemsize
    if sample_bytes > MAX_SAMPLE_BYTES:  # a batch of such samples would not fit in any memory
        raise AsrError(f"model input '{spec.name}' {spec.describe()} at {size[0]}x{size[1]} makes one preprocessed "
                       f"image {sample_bytes / 2**30:,.0f} GiB, over the {MAX_SAMPLE_BYTES / 2**30:g} GiB bound; "
                       "pass a smaller --size or .npy arrays")
    mean = _per_channel("mean", preprocess.mean, 0.0, channels, spec)
    std = _per_channel("std", preprocess.std, 1.0, channels, spec)
    return ImagePlan(spec, preprocess, size, channels, layout, mean, std, None)


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
    if not is_static(channel_dim):
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
        if not all(is_static(dim) for dim in model_hw):
            raise AsrError(f"model input '{spec.name}' {spec.describe()} has dynamic H,W; pass --size")
        size = (int(model_hw[0]), int(model_hw[1]))
    for wanted, dim in zip(size, model_hw):
        if is_static(dim) and wanted != dim:
            raise AsrError(f"--size {size[0]}x{size[1]} does not match model input '{spec.name}' {spec.describe()}")
    if preprocess.resize is not None and preprocess.resize < max(size):  # a crop: only resize_mode crop has one
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
    check_input(path, "hook file")
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


SIXTEEN_BIT_AS_I = frozenset({"PNG", "PPM"})  # formats whose 16-bit grayscale Pillow reads as mode I


def _stretched(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """A plain bilinear resize to ``size`` (H, W); the aspect is not kept."""
    if image.size == (size[1], size[0]):
        return image
    from PIL import Image

    return image.resize((size[1], size[0]), Image.Resampling.BILINEAR)


def _letterboxed(image: Image.Image, size: tuple[int, int], pad_value: float) -> Image.Image:
    """Scaled to fit inside ``size`` (H, W) with its aspect kept (bilinear), centred on a ``pad_value``
    canvas, with Ultralytics' LetterBox arithmetic (the rounding of the new size and of the offsets)."""
    from PIL import Image

    height, width = size
    scale = min(height / image.height, width / image.width)
    new_width, new_height = int(round(image.width * scale)), int(round(image.height * scale))
    if (new_width, new_height) != image.size:
        image = image.resize((new_width, new_height), Image.Resampling.BILINEAR)
    left, top = int(round((width - new_width) / 2 - 0.1)), int(round((height - new_height) / 2 - 0.1))
    fill: float | int | tuple = pad_value if image.mode == "F" else int(round(pad_value))
    if image.mode == "RGB":
        fill = (fill,) * 3
    canvas = Image.new(image.mode, (width, height), fill)
    canvas.paste(image, (left, top))
    return canvas


def _in_8bit_range(image: Image.Image, channels: int) -> Image.Image:
    """The image as L or RGB; a 16-bit grayscale one as float pixels scaled to 0..255 (65535 -> 255); a
    32-bit integer one (a TIFF, mode I) with the values it holds.

    Pillow's own conversions to 8 bits clip every value above 255, so these become float images (mode
    F), and --scale then applies as for any 8-bit image. Mode I is told apart by the file's format: a
    16-bit PNG or PGM (Pillow reads those as I, older Pillow every 16-bit PNG), or else 32-bit integers,
    which are pixel values as they are: one within 0..255 is an 8-bit image (L, so that a resize rounds
    as it does for one), and a 32-bit TIFF gives the same array as an 8-bit PNG of the same pixels.
    """
    sixteen = image.mode.startswith("I;16") or (image.mode == "I" and image.format in SIXTEEN_BIT_AS_I)
    if sixteen or image.mode == "I":
        from PIL import Image

        values = np.asarray(image)
        if not sixteen and values.size and 0 <= values.min() and values.max() <= 255:
            return Image.fromarray(values.astype(np.uint8)).convert("L" if channels == 1 else "RGB")
        factor = np.float32(255 / 65535) if sixteen else np.float32(1)
        return Image.fromarray(values.astype(np.float32) * factor, mode="F")
    return image.convert("L" if channels == 1 else "RGB")


def _image_to_sample(image: Image.Image, plan: ImagePlan) -> np.ndarray:
    """Convert, resize, scale, normalise and lay out one image as float32."""
    image = _in_8bit_range(image, plan.channels)
    if plan.preprocess.resize_mode == "stretch":
        image = _stretched(image, plan.size)
    elif plan.preprocess.resize_mode == "letterbox":
        image = _letterboxed(image, plan.size, plan.preprocess.pad_value)
    elif plan.preprocess.resize is not None:
        image = _resize_then_crop(image, plan.preprocess.resize, plan.size)
    pixels = np.asarray(image).astype(np.float32)  # (H, W) or (H, W, 3)
    if plan.channels == 3 and pixels.ndim == 2:  # a 16-bit grayscale image for an RGB model
        pixels = np.repeat(pixels[..., np.newaxis], 3, axis=2)
    if plan.channels == 3 and plan.preprocess.channel_order == "bgr":
        pixels = pixels[..., ::-1]
    sample = (pixels * np.float32(plan.preprocess.scale) - plan.mean) / plan.std
    if plan.layout is None:
        return sample
    if plan.channels == 1:
        sample = sample[..., np.newaxis]
    return sample.transpose(2, 0, 1) if plan.layout == "nchw" else sample


def _hook_to_sample(image: Image.Image, plan: ImagePlan, origin: str) -> np.ndarray:
    try:
        sample = np.asarray(plan.hook(image, plan.spec))
    except Exception as exc:  # user code: report which input broke it
        raise AsrError(f"hook {plan.preprocess.hook} failed on {origin}: {type(exc).__name__}: {exc}") from None
    label = f"{origin} (hook {plan.preprocess.hook})"
    check_dtype(label, sample.dtype, plan.spec)
    check_sample_shape(label, sample.shape, sample.shape, plan.spec)
    if sample.dtype.kind in "fc" and not np.isfinite(sample).all():
        raise AsrError(f"{label}: output contains NaN or Inf")
    return sample


def check_image_size(origin: str, width: int, height: int, plan: ImagePlan):
    if plan.hook is not None or plan.preprocess.resize is not None or plan.preprocess.resize_mode != "crop":
        return
    if (height, width) != plan.size:
        given = plan.preprocess.size is not None  # then "pass --size" would be no help
        raise AsrError(
            f"image {origin} is {height}x{width} but {'--size' if given else 'the model'} expects "
            f"{plan.size[0]}x{plan.size[1]}; pass {'' if given else '--size, '}--resize (the shorter side, then a "
            "centre crop) or --resize-mode stretch or letterbox"
        )


def stack_images(images: Iterator[tuple[Image.Image, str]], plan: ImagePlan) -> dict[str, np.ndarray]:
    samples = []
    for image, origin in images:
        if plan.hook is not None:
            samples.append(_hook_to_sample(image, plan, origin))
        else:
            samples.append(_image_to_sample(image, plan))
    return {plan.spec.name: np.ascontiguousarray(np.stack(samples), dtype=plan.spec.dtype)}
