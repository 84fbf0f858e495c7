"""Model input specs, fixed batches and image preprocessing settings (from metadata or the CLI)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields

import numpy as np

from asr_onnx.errors import AsrError

METADATA_KEY = "asr_onnx.preprocess"
# what a model file may say about its preprocessing: data only, never code (no hook: a model never runs anything)
METADATA_FIELDS = ("size", "resize", "mean", "std", "scale", "channel_order", "layout", "resize_mode", "pad_value")
RESIZE_MODES = ("crop", "stretch", "letterbox")
# fields added after stats files were first keyed: left out of Preprocess.key() at their defaults, so that a
# saved --stats file stays valid
_KEYED_WHEN_SET = {"resize_mode": "crop", "pad_value": 114.0}


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


def input_specs(model) -> list[InputSpec]:
    """An onnx.ModelProto's real inputs (initializers excluded)."""
    from onnx import helper

    inits = {t.name for t in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in inits:
            continue
        tensor = value.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim)
        specs.append(InputSpec(value.name, dims, np.dtype(helper.tensor_dtype_to_np_dtype(tensor.elem_type))))
    return specs


def metadata(model) -> dict[str, str]:
    """An onnx.ModelProto's metadata_props as a dict."""
    return {p.key: p.value for p in model.metadata_props}


def fixed_batch(specs) -> int | None:
    """The batch size that every input fixes, or None when the batch axis is dynamic."""
    sizes = {s.shape[0] for s in specs if s.shape and isinstance(s.shape[0], int) and s.shape[0] > 0}
    return sizes.pop() if len(sizes) == 1 else None


def _dim_text(dim, axis: int) -> str:
    if isinstance(dim, int):
        return str(dim)
    if isinstance(dim, str) and dim:
        return dim
    return "N" if axis == 0 else "?"


def is_static(dim) -> bool:
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
            one sample without batch axis; replaces all other preprocessing. Default None. ``pil_image`` is
            the decoded file as Pillow opened it (any mode: RGB, L, RGBA, P, I;16...), ``spec`` the
            :class:`InputSpec` of the model input; the sample must have the input's dtype (or one that casts
            to it) and its shape without the batch axis, and be finite.
        resize_mode: how an image of another size meets ``size``: "crop" (default: ``resize`` then a centre
            crop, or no resize at all without ``resize``), "stretch" (a plain bilinear resize to ``size``,
            aspect not kept) or "letterbox" (scaled to fit inside ``size`` with its aspect kept, centred,
            the border filled with ``pad_value``: a YOLO export's preprocessing).
        pad_value: the letterbox border, in pixel units before ``scale`` (0..255). Default 114, Ultralytics'.
    """

    size: tuple[int, int] | None = None
    resize: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    scale: float = 1 / 255
    channel_order: str = "rgb"
    layout: str | None = None
    hook: str | None = None
    resize_mode: str = "crop"
    pad_value: float = 114.0

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
        object.__setattr__(self, "resize_mode", _as_choice("resize_mode", self.resize_mode, RESIZE_MODES))
        object.__setattr__(self, "pad_value", _as_finite_float("pad_value", self.pad_value))
        if not 0 <= self.pad_value <= 255:
            raise AsrError(f"preprocessing pad_value must be between 0 and 255 (pixel units), got {self.pad_value}")
        if self.resize is not None and self.resize_mode != "crop":
            raise AsrError(f"--resize {self.resize} goes with --resize-mode crop; {self.resize_mode} resizes to "
                           "--size itself")

    def key(self) -> str:
        """Stable JSON text of all fields, for cache keys."""
        values = asdict(self)
        for name, default in _KEYED_WHEN_SET.items():
            if values[name] == default:
                del values[name]
        return json.dumps(values, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_metadata(cls, props: dict[str, str], **overrides) -> "Preprocess":
        """Build from model metadata key ``asr_onnx.preprocess`` (JSON of METADATA_FIELDS).

        A hook comes only from ``overrides`` (the command line or the API), never from the model file.

        Args:
            props: Model metadata_props as a dict; the key is optional.
            **overrides: Field values that win over the metadata when not None.

        Raises:
            AsrError: Invalid JSON, a field that is not data (a hook), unknown field names or invalid values.
        """
        known = {field.name for field in fields(cls)}
        values = _metadata_fields(props)
        for name, value in overrides.items():
            if name not in known:
                raise AsrError(f"unknown preprocessing option {name!r}")
            if value is not None:
                values[name] = value
        if overrides.get("resize_mode") not in (None, "crop") and overrides.get("resize") is None:
            values.pop("resize", None)  # the model's crop gives way to the stretch or letterbox asked for
        return cls(**values)

    @classmethod
    def for_model(cls, model, **overrides) -> "Preprocess":
        """The preprocessing an onnx.ModelProto asks for in its ``asr_onnx.preprocess`` metadata (see
        :meth:`from_metadata`), with ``overrides`` winning where they are not None."""
        return cls.from_metadata(metadata(model), **overrides)


def _metadata_fields(props: dict[str, str]) -> dict:
    text = (props or {}).get(METADATA_KEY)
    if text is None:
        return {}
    try:
        values = json.loads(text)
    except json.JSONDecodeError as exc:
        raise AsrError(f"model metadata {METADATA_KEY} is not valid JSON: {exc}") from None
    if not isinstance(values, dict):
        raise AsrError(f"model metadata {METADATA_KEY} must be a JSON object, got {text!r}")
    if "hook" in values:
        raise AsrError(f"model metadata {METADATA_KEY} names a hook ({values['hook']!r}); a model file may "
                       f"only carry data ({', '.join(METADATA_FIELDS)}) and never runs code: pass "
                       "--preprocess to run a hook")
    unknown = sorted(set(values) - set(METADATA_FIELDS))
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
