"""The typed report: one frozen dataclass per section, built from a dict by one validating function.

A report is input like any other (someone may send one), so the page and the terminal summary render
only from a :class:`Report` that :func:`from_dict` built: every number is a finite number in its stated
range, every count a non-negative int of bounded size, every string a string of bounded length, every
list a list of bounded length; anything else is one :class:`~asr_onnx.errors.AsrError` line naming the
field. :func:`read_json` reads a file (a regular file of at most ``MAX_JSON_BYTES``) and :func:`write_json`
writes one; :func:`to_dict` gives back the JSON keys the report was read with, in their order, so an old
report round-trips and a live one is written as :func:`asr_onnx.report.build.build_report` assembled it.

A key the schema does not know is kept, validated as plain JSON (bounded depth, finite numbers), in the
section's ``extra`` and written back; the page shows only a settings entry of that kind (as text).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from asr_onnx.errors import AsrError

MAX_JSON_BYTES = 128 << 20  # a ResNet-50 report is about 5 MB
MAX_CONTAINERS = 1_000_000  # JSON arrays and objects in one file: each costs ~100 bytes once parsed
MAX_STRING = 1 << 16
MAX_LAYERS = MAX_SITES = 100_000
MAX_SITE_CHANNELS = 1 << 20  # a site's per-channel lists; a vision model's widest layer has a few thousand
MAX_COUNT = 1 << 53  # weights, parameters, MACs: exact in a float64
MAX_ITEMS = 10_000  # timings, candidates, exclusions, reasons, the groups of a channel plan
MAX_DEPTH = 32  # nesting of an unknown key's value
BIG = 1e100  # a variance, mean, gain or error past this comes from no float32 activation (3.4e38 squared is 1.2e77)
MAX_EPS = BIG
MAX_SECONDS = 1e9
LABELS = ("usable", "degraded", "broken")


class _Oversized:
    """An integer literal too long to be a report's value; the field that holds it is named on validation."""

    def __init__(self, digits: int):
        self.digits = digits


def _parse_int(text: str):
    return int(text) if len(text) <= 40 else _Oversized(len(text))


def _kind(value) -> str:
    if isinstance(value, _Oversized):
        return f"an integer of {value.digits:,} digits"
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, (int, float)):
        return repr(value) if math.isfinite(value) else str(value)
    if isinstance(value, str):
        return "a string " + (repr(value[:24]) + ("…" if len(value) > 24 else ""))
    if isinstance(value, dict):
        return "an object"
    return "a list" if isinstance(value, (list, tuple)) else type(value).__name__


def _fail(where, what: str):
    raise AsrError(f"report field {_path(where)}: {what}")


def _is_number(value) -> bool:
    """An int or a float (a numpy float64 of a live report included), never a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _too_long(value, where: str) -> None:
    if isinstance(value, _Oversized):
        _fail(where, f"an integer of {value.digits:,} digits is out of range")


def _sub(where, key) -> tuple:
    """The place of ``key`` (a str or a list index) inside ``where``; spelt out only for an error."""
    return (where, key)


def _path(where) -> str:
    """``sites[3].eps`` from nested (where, key) pairs."""
    keys = []
    while isinstance(where, tuple):
        where, key = where
        keys.append(key)
    text = str(where or "")
    for key in reversed(keys):
        if isinstance(key, int):
            text += f"[{key}]"
        else:
            shown = key if key.replace("_", "a").isalnum() and len(key) <= 40 else repr(key[:40])
            text = f"{text}.{shown}" if text else shown
    return text


# ---------------------------------------------------------------- checks: value, where -> the typed value


class Str:
    def __init__(self, choices: tuple | None = None):
        self.choices = choices

    def __call__(self, value, where):
        if not isinstance(value, str):
            _fail(where, f"{_kind(value)} is not a string")
        if len(value) > MAX_STRING:
            _fail(where, f"a string of {len(value):,} characters (at most {MAX_STRING:,})")
        if self.choices and value not in self.choices:
            _fail(where, f"{_kind(value)} is not one of {', '.join(self.choices)}")
        return value


class Int:
    def __init__(self, lo: int = 0, hi: int = MAX_COUNT):
        self.lo, self.hi = lo, hi

    def __call__(self, value, where):
        _too_long(value, where)
        if type(value) is not int:
            _fail(where, f"{_kind(value)} is not an integer")
        if not self.lo <= value <= self.hi:
            _fail(where, f"{value} is outside [{self.lo:,}, {self.hi:,}]")
        return value


class Num:
    def __init__(self, lo: float = -BIG, hi: float = BIG):
        self.lo, self.hi = lo, hi

    def __call__(self, value, where):
        _too_long(value, where)
        if not _is_number(value):
            _fail(where, f"{_kind(value)} is not a number")
        if not math.isfinite(value):
            _fail(where, f"{value} is not a finite number")
        if not self.lo <= value <= self.hi:
            _fail(where, f"{value!r} is outside [{self.lo:g}, {self.hi:g}]")
        return value


class Bool:
    def __call__(self, value, where):
        if not isinstance(value, bool):
            _fail(where, f"{_kind(value)} is not true or false")
        return value


class Opt:
    """None, or what ``check`` accepts."""

    def __init__(self, check):
        self.check = check

    def __call__(self, value, where):
        return None if value is None else self.check(value, where)


class AnyOf:
    def __init__(self, *checks, what: str):
        self.checks, self.what = checks, what

    def __call__(self, value, where):
        for check in self.checks:
            try:
                return check(value, where)
            except AsrError:
                pass
        _fail(where, f"{_kind(value)} is not {self.what}")


class ListOf:
    def __init__(self, check, max_len: int = MAX_ITEMS, length: int | None = None):
        self.check, self.max_len, self.length = check, max_len, length

    def __call__(self, value, where):
        if not isinstance(value, (list, tuple)):  # a tuple comes from a live report, never from JSON
            _fail(where, f"{_kind(value)} is not a list")
        if len(value) > self.max_len or (self.length is not None and len(value) != self.length):
            _fail(where, f"a list of {len(value):,} items (" + (f"{self.length} expected)" if self.length is not None
                                                               else f"at most {self.max_len:,})"))
        return tuple(self.check(v, _sub(where, i)) for i, v in enumerate(value))


class MapOf:
    def __init__(self, check, max_len: int = MAX_ITEMS):
        self.check, self.max_len = check, max_len

    def __call__(self, value, where):
        if not isinstance(value, dict):
            _fail(where, f"{_kind(value)} is not an object")
        if len(value) > self.max_len:
            _fail(where, f"an object of {len(value):,} keys (at most {self.max_len:,})")
        for key in value:
            Str()(key, where)
        return {key: self.check(v, _sub(where, key)) for key, v in value.items()}


class Values:
    """A per-channel list of numbers in [lo, hi], as a read-only float64 array."""

    def __init__(self, lo: float = -BIG, hi: float = BIG, integer: bool = False):
        self.lo, self.hi, self.integer = lo, hi, integer

    def __call__(self, value, where):
        if not isinstance(value, (list, tuple)):
            _fail(where, f"{_kind(value)} is not a list")
        if len(value) > MAX_SITE_CHANNELS:
            _fail(where, f"a list of {len(value):,} values (at most {MAX_SITE_CHANNELS:,} channels a site)")
        allowed, lo, hi = ((int,) if self.integer else (int, float)), self.lo, self.hi
        # one pass in Python (sooner than numpy for the few channels of most sites); NaN and inf fail the bounds
        if not all(type(v) in allowed and lo <= v <= hi for v in value):
            self._explain(value, where)
        try:
            array = np.array(value, np.int64 if self.integer else np.float64)
        except OverflowError:
            _fail(where, "holds an integer out of range")
        array.flags.writeable = False
        return array

    def _explain(self, value, where):
        """Fails on the first value that is not a number in range (a subclass of float, np.float64, passes)."""
        for i, v in enumerate(value):
            _too_long(v, _sub(where, i))
            if (type(v) is not int) if self.integer else not _is_number(v):
                _fail(_sub(where, i), f"{_kind(v)} is not {'an integer' if self.integer else 'a number'}")
            if not self.lo <= v <= self.hi:
                _fail(_sub(where, i), f"{v!r} is not a finite number in [{self.lo:g}, {self.hi:g}]")


class Json:
    """Any JSON value: strings and lists bounded, numbers finite, at most MAX_DEPTH deep."""

    def __call__(self, value, where, depth: int = 0):
        if depth > MAX_DEPTH:
            _fail(where, f"nested deeper than {MAX_DEPTH} levels")
        if value is None or isinstance(value, bool):
            return value
        if _is_number(value):
            return Num(-math.inf, math.inf)(value, where)
        if isinstance(value, str):
            return Str()(value, where)
        if isinstance(value, (list, tuple)):
            if len(value) > MAX_SITE_CHANNELS:
                _fail(where, f"a list of {len(value):,} items (at most {MAX_SITE_CHANNELS:,})")
            return [self(v, _sub(where, i), depth + 1) for i, v in enumerate(value)]
        if isinstance(value, dict):
            for key in value:
                Str()(key, where)
            return {key: self(v, _sub(where, key), depth + 1) for key, v in value.items()}
        _fail(where, f"{_kind(value)} is not a JSON value")


class Section:
    def __init__(self, cls):
        self.cls = cls

    def __call__(self, value, where):
        return _parse(self.cls, value, where)


def spec(check, default=None, *, factory=None, key: str | None = None, aliases: tuple = (), required: bool = False):
    """A field of a section: its check, its JSON key (the field's name by default) and older spellings."""
    metadata = {"check": check, "key": key, "aliases": aliases, "required": required}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class _Base:
    """``extra``: keys the schema does not know, validated as plain JSON; ``keys``: the JSON keys read, in
    order (None: built in code, every field is written)."""

    extra: dict = field(default_factory=dict, compare=False, repr=False)
    keys: tuple | None = field(default=None, compare=False, repr=False)

    def check(self, where: str) -> None:
        """Checks between fields, after each field passed its own."""


@functools.cache
def _fields(cls) -> dict:
    """JSON key (older spellings included) -> (field name, check, the key it is written under)."""
    found = {}
    for f in dataclasses.fields(cls):
        if "check" in f.metadata:
            for key in (f.metadata["key"] or f.name, *f.metadata["aliases"]):
                found[key] = (f.name, f.metadata["check"], f.metadata["key"] or f.name)
    return found


@functools.cache
def _required(cls) -> tuple:
    return tuple(f for f in dataclasses.fields(cls) if f.metadata.get("required"))


def _parse(cls, value, where):
    if not isinstance(value, dict):
        _fail(where, f"{_kind(value)} is not an object")
    if len(value) > MAX_ITEMS:
        _fail(where, f"an object of {len(value):,} keys")
    known, kwargs, extra, keys = _fields(cls), {}, {}, []
    for key, item in value.items():
        entry = known.get(key)
        if entry is None:
            Str()(key, where)
            extra[key] = Json()(item, (where, key))
            keys.append(key)
        else:
            name, check, canonical = entry
            kwargs[name] = check(item, (where, key))
            keys.append(canonical)
    for f in _required(cls):
        if f.name not in kwargs:
            _fail(_sub(where, f.metadata["key"] or f.name), "is missing")
    section = cls(extra=extra, keys=tuple(dict.fromkeys(keys)), **kwargs)
    section.check(where)
    return section


# ---------------------------------------------------------------- the sections

COUNT, SHARE, ERROR = Opt(Int()), Opt(Num(0.0, 1.0)), Opt(Num(0.0, BIG))
TEXT = Opt(Str())
TEXTS = ListOf(Str())


@dataclass(frozen=True)
class Tool(_Base):
    name: str | None = spec(TEXT)
    version: str | None = spec(TEXT)


@dataclass(frozen=True)
class Runtime(_Base):
    version: str | None = spec(TEXT)
    provider: str | None = spec(TEXT)


@dataclass(frozen=True)
class Scores(_Base):
    """A candidate's held-out scores against the dense model: the standardised error (every output channel in
    units of the dense spread) and, for a detector, the detection F1 (the mean over classes)."""

    agreement: float | None = spec(SHARE)
    logit_rel_l2: float | None = spec(ERROR)
    standardised_error: float | None = spec(ERROR)
    detection_f1: float | None = spec(SHARE)


@dataclass(frozen=True)
class Guard(_Base):
    mode: str | None = spec(TEXT)
    held_out: int | None = spec(COUNT)
    folds: int | None = spec(COUNT)
    metric: str | None = spec(TEXT)  # the score that decided: agreement, detection_f1 or standardised_error
    agreement_classes: int | None = spec(COUNT)
    repair: Scores | None = spec(Opt(Section(Scores)))
    pruned: Scores | None = spec(Opt(Section(Scores)))
    refit: Scores | None = spec(Opt(Section(Scores)))  # the refit alone, before the correction
    correction_loses: bool | None = spec(Opt(Bool()))
    repair_refitted: bool | None = spec(Opt(Bool()))
    refit_in_repair_passes: bool | None = spec(Opt(Bool()))  # the fold refits solved from the repair's own passes
    verdict: str | None = spec(TEXT)
    repair_loses: bool | None = spec(Opt(Bool()))
    best: str | None = spec(TEXT)  # what fallback keeps: repair, refit or pruned
    kept: str | None = spec(TEXT)
    cost_s: float | None = spec(Opt(Num(0.0, MAX_SECONDS)))
    rule: str | None = spec(TEXT)
    skipped: str | None = spec(TEXT)


LAMBDA_RULE = Opt(AnyOf(Str(), Num(), what="a rule's name or a number"))


@dataclass(frozen=True)
class Picked(Scores):
    """A candidate's held-out :class:`Scores`, and whether it tied with the best."""

    tied: bool | None = spec(Opt(Bool()))


@dataclass(frozen=True)
class Candidate(Picked):
    """One method ``auto`` scored."""

    method: str | None = spec(TEXT)
    placement: str | None = spec(TEXT)
    lambda_rule: str | float | None = spec(LAMBDA_RULE)


@dataclass(frozen=True)
class Auto(_Base):
    picked: Candidate | None = spec(Opt(Section(Candidate)))
    candidates: tuple = spec(ListOf(Section(Candidate), 1000), ())
    folds: int | None = spec(COUNT)
    held_out: int | None = spec(COUNT)
    reason: str | None = spec(TEXT)


@dataclass(frozen=True)
class RefitCandidate(Picked):
    """The refit or no refit, as ``--reconstruct auto`` scored it."""

    reconstruct: str | None = spec(TEXT)


@dataclass(frozen=True)
class ReconstructAuto(_Base):
    picked: RefitCandidate | None = spec(Opt(Section(RefitCandidate)))
    candidates: tuple = spec(ListOf(Section(RefitCandidate), 100), ())
    folds: int | None = spec(COUNT)
    held_out: int | None = spec(COUNT)
    scored_with: str | None = spec(TEXT)
    reason: str | None = spec(TEXT)


@dataclass(frozen=True)
class Settings(_Base):
    """What the run was asked to do and what its choices were."""

    sparsity: float | None = spec(SHARE)
    pattern: str | None = spec(TEXT)
    flops_target: float | None = spec(SHARE)
    exclude: tuple = spec(TEXTS, ())
    keep_first: bool | None = spec(Opt(Bool()))
    keep_last: bool | None = spec(Opt(Bool()))
    allocation: str | None = spec(TEXT)
    score: str | None = spec(TEXT)
    reconstruct: str | None = spec(TEXT)
    max_gram_mb: float | None = spec(Opt(Num(0.0, BIG)))
    refit_passes: int | None = spec(COUNT)
    refit_samples: int | None = spec(COUNT)
    reconstruct_auto: ReconstructAuto | None = spec(Opt(Section(ReconstructAuto)))
    calib_size: int | None = spec(COUNT)
    batch_size: int | None = spec(COUNT)
    sequential: bool | None = spec(Opt(Bool()))
    symbolic_batch: bool | None = spec(Opt(Bool()))
    reference: str | None = spec(TEXT)
    layernorm: bool | None = spec(Opt(Bool()))  # LayerNorm outputs were sites (absent: reports from before)
    refit_target: str | None = spec(TEXT)  # "block" when residual branches were refitted to their block (else absent)
    method: str | None = spec(TEXT)
    placement: str | None = spec(TEXT)
    recal: str | None = spec(TEXT)
    momentum: float | None = spec(SHARE)
    lambda_rule: str | float | None = spec(LAMBDA_RULE)
    correct_head: bool | None = spec(Opt(Bool()))
    auto: Auto | None = spec(Opt(Section(Auto)))
    fold_bn: bool | None = spec(Opt(Bool()))
    refit_rounds: int | None = spec(COUNT)  # written by reports from before a second refit round left the Recipe
    guard: Guard | None = spec(Opt(Section(Guard)))
    fp16: bool | None = spec(Opt(Bool()))
    fp16_io: bool | None = spec(Opt(Bool()))
    fp16_rel_l2: dict | None = spec(Opt(MapOf(ERROR)))
    int8: bool | None = spec(Opt(Bool()))
    int8_target: str | None = spec(TEXT)

    def picked_method(self) -> str | None:
        """The method that ran: ``auto``'s pick when the method is auto."""
        if self.method == "auto" and self.auto is not None and self.auto.picked is not None:
            return self.auto.picked.method
        return self.method


@dataclass(frozen=True)
class Totals(_Base):
    prunable_weights: int | None = spec(COUNT)
    sparsity: float | None = spec(SHARE)


@dataclass(frozen=True)
class Refit(_Base):
    """A layer's least-squares refit: its output error relative to the dense model's, before and after
    (``||y - y_dense|| / ||y_dense||`` on the calibration set), or why it was skipped."""

    err_before: float | None = spec(ERROR)
    err_after: float | None = spec(ERROR)
    cond: float | None = spec(ERROR)
    gram_size: int | None = spec(COUNT)
    skipped: str | None = spec(TEXT)


@dataclass(frozen=True)
class Layer(_Base):
    name: str = spec(Str(), "", required=True)
    weight: str | None = spec(TEXT)
    op: str | None = spec(TEXT)
    shape: tuple = spec(ListOf(Int(0, 1 << 31), 8), ())
    pruned: bool = spec(Bool(), True)
    reason: str | None = spec(TEXT)
    sparsity: float | None = spec(SHARE)
    allocation: str | None = spec(TEXT)
    score: str | None = spec(TEXT)
    refit: Refit | None = spec(Opt(Section(Refit)))


@dataclass(frozen=True)
class Spread(_Base):
    min: float | None = spec(Opt(Num()))
    median: float | None = spec(Opt(Num()))
    max: float | None = spec(Opt(Num()))


PER_CHANNEL = ("reference_var", "pruned_var", "reference_mean", "pruned_mean", "dense_var", "dense_mean",
               "gains", "repaired_var")


@dataclass(frozen=True, eq=False)
class Site(_Base):
    """One normalisation site: its statistics per channel (read-only float64 arrays) and its correction."""

    tensor: str = spec(Str(), "", required=True)
    layer: str | None = spec(TEXT)
    norm: str | None = spec(TEXT)
    written: str | None = spec(TEXT)
    channels: int | None = spec(Opt(Int(0, MAX_SITE_CHANNELS)))
    eps: float | None = spec(Opt(Num(0.0, MAX_EPS)))
    reference: str | None = spec(TEXT)
    pruned_upstream: bool | None = spec(Opt(Bool()))
    reference_var: np.ndarray | None = spec(Opt(Values()))
    pruned_var: np.ndarray | None = spec(Opt(Values()))
    reference_mean: np.ndarray | None = spec(Opt(Values()))
    pruned_mean: np.ndarray | None = spec(Opt(Values()))
    dense_var: np.ndarray | None = spec(Opt(Values()))
    dense_mean: np.ndarray | None = spec(Opt(Values()))
    lambda_: float | None = spec(Opt(Num()), key="lambda", aliases=("lambda_",))
    gain: Spread | None = spec(Opt(Section(Spread)))
    gains: np.ndarray | None = spec(Opt(Values()))
    collapsed: np.ndarray | None = spec(Opt(Values(0, MAX_SITE_CHANNELS, integer=True)))
    repaired_var: np.ndarray | None = spec(Opt(Values()))

    def check(self, where: str) -> None:
        sizes = {name: getattr(self, name).size for name in PER_CHANNEL if getattr(self, name) is not None}
        channels = self.channels if self.channels is not None else next(iter(sizes.values()), None)
        for name, size in sizes.items():
            if size != channels:
                _fail(_sub(where, name), f"{size:,} values for {channels:,} channels")
        if self.collapsed is not None and self.collapsed.size and channels is not None \
                and int(self.collapsed.max()) >= channels:
            _fail(_sub(where, "collapsed"), f"channel {int(self.collapsed.max())} of a site of {channels} channels")

    @property
    def label(self) -> str:
        """What the summary, ``inspect`` and the page call the site: its layer's node name, else its tensor."""
        return self.layer or self.tensor

    @property
    def has_variances(self) -> bool:
        return self.reference_var is not None and self.pruned_var is not None


@dataclass(frozen=True)
class NormAfter(_Base):
    kind: str | None = spec(TEXT)
    node: str | None = spec(TEXT)
    ops: tuple = spec(TEXTS, ())
    constant_params: bool | None = spec(Opt(Bool()))


@dataclass(frozen=True)
class SparseCoreRow(_Base):
    """A layer's 2:4 conformance and sparse-tensor-core eligibility (see :func:`asr_onnx.prune.sparsecore.layer_rows`)."""

    name: str = spec(Str(), "", required=True)
    op: str | None = spec(TEXT)
    weight: str | None = spec(TEXT)
    shape: tuple = spec(ListOf(Int(0, 1 << 31), 8), ())
    params: int | None = spec(COUNT)
    zeros: int | None = spec(COUNT)
    sparsity: float | None = spec(SHARE)
    shared: bool | None = spec(Opt(Bool()))
    nm_24: str | None = spec(TEXT)
    axis_24: int | None = spec(Opt(Int(0, 8)))
    eligible: bool | None = spec(Opt(Bool()))
    eligibility: str | None = spec(TEXT)
    reasons: tuple = spec(TEXTS, ())
    norm: NormAfter | None = spec(Opt(Section(NormAfter)))
    precision: str | None = spec(TEXT)  # a QDQ model's: "int8" (2:4 read on the codes) or "float"


@dataclass(frozen=True)
class ScaleRange(_Base):
    """The smallest and largest of a layer's int8 weight scales."""

    min: float | None = spec(Opt(Num(0.0, BIG)))
    max: float | None = spec(Opt(Num(0.0, BIG)))


@dataclass(frozen=True)
class QuantLayer(_Base):
    """One layer of an ``--int8`` output: where its weight went, its scales, 2:4 on the float weight and on the
    integer codes, and its output error against the float model before and after the correction."""

    name: str = spec(Str(), "", required=True)
    op: str | None = spec(TEXT)
    weight: str | None = spec(TEXT)
    quantized: bool | None = spec(Opt(Bool()))
    zeros: int | None = spec(COUNT)
    zeros_kept: bool | None = spec(Opt(Bool()))
    float_nm_24: str | None = spec(TEXT)
    nm_24: str | None = spec(TEXT)
    scale: ScaleRange | None = spec(Opt(Section(ScaleRange)))
    rel_l2_ptq: float | None = spec(ERROR)
    rel_l2_corrected: float | None = spec(ERROR)


@dataclass(frozen=True)
class Requantized(_Base):
    """One layer weight of a QDQ input, quantized again after its repair: how many channels went which way."""

    layer: str | None = spec(TEXT)
    weight: str | None = spec(TEXT)
    channels: int = spec(Int(0, MAX_SITE_CHANNELS), 0)
    kept: int = spec(Int(0, MAX_SITE_CHANNELS), 0)
    rescaled: int = spec(Int(0, MAX_SITE_CHANNELS), 0)
    rounded: int = spec(Int(0, MAX_SITE_CHANNELS), 0)
    new_scale: int = spec(Int(0, MAX_SITE_CHANNELS), 0)

    def check(self, where: str) -> None:
        if self.kept + self.rescaled + self.rounded + self.new_scale != self.channels:
            _fail(where, f"{self.kept + self.rescaled + self.rounded + self.new_scale:,} channels counted of "
                         f"{self.channels:,}")


@dataclass(frozen=True)
class WeightForm(_Base):
    """What the int8 weights or activations are: their type, scales, symmetry and (weights) code range."""

    type: str | None = spec(TEXT)
    scales: str | None = spec(TEXT)
    symmetric: bool | None = spec(Opt(Bool()))
    range: int | None = spec(Opt(Int(0, 1 << 31)))


@dataclass(frozen=True)
class QuantCandidate(_Base):
    """A held-out candidate of the INT8 stage: a calibration method and weight range, or a correction."""

    calibration: str | None = spec(TEXT)
    weights: str | None = spec(TEXT)
    correction: str | None = spec(TEXT)
    agreement: float | None = spec(SHARE)
    logit_rel_l2: float | None = spec(ERROR)
    tied: bool | None = spec(Opt(Bool()))


@dataclass(frozen=True)
class Calibration(_Base):
    picked: QuantCandidate | None = spec(Opt(Section(QuantCandidate)))
    fit: int | None = spec(COUNT)
    held_out: int | None = spec(COUNT)
    candidates: tuple = spec(ListOf(Section(QuantCandidate), 100), ())


@dataclass(frozen=True)
class FloatCandidate(_Base):
    """Some layers left in float by the quantizer, as the INT8 stage scored them on held-out samples."""

    layers: tuple = spec(TEXTS, ())
    agreement: float | None = spec(SHARE)
    logit_rel_l2: float | None = spec(ERROR)
    picked: bool | None = spec(Opt(Bool()))


@dataclass(frozen=True)
class FloatLayers(_Base):
    """Which layers the quantizer leaves in float (with their input), chosen on held-out samples."""

    picked: tuple = spec(TEXTS, ())
    candidates: tuple = spec(ListOf(Section(FloatCandidate), 100), ())
    rule: str | None = spec(TEXT)


@dataclass(frozen=True)
class CorrectedSite(_Base):
    """One layer the quantization correction changed."""

    layer: str | None = spec(TEXT)
    channels: int | None = spec(Opt(Int(0, MAX_SITE_CHANNELS)))
    gain: Spread | None = spec(Opt(Section(Spread)))
    mean_shift: float | None = spec(ERROR)
    var_ratio: float | None = spec(ERROR)


@dataclass(frozen=True)
class QuantCorrectionEntry(_Base):
    picked: str | None = spec(TEXT)
    candidates: tuple | None = spec(Opt(ListOf(Section(QuantCandidate), 100)))
    verdict: str | None = spec(TEXT)
    rule: str | None = spec(TEXT)
    sites: dict = spec(MapOf(Section(CorrectedSite), MAX_SITES), factory=dict)


@dataclass(frozen=True)
class QuantOutput(_Base):
    """The INT8 output against the float model on calibration samples: plain PTQ and corrected."""

    samples: int | None = spec(COUNT)
    ptq: Scores | None = spec(Opt(Section(Scores)))
    corrected: Scores | None = spec(Opt(Section(Scores)))


@dataclass(frozen=True)
class Quantization(_Base):
    """``--int8`` (the repaired model quantized by onnxruntime's static quantizer), or a QDQ input quantized
    again after its repair (``input`` "quantized")."""

    format: str | None = spec(TEXT)
    input: str | None = spec(TEXT)
    unchanged: bool | None = spec(Opt(Bool()))
    tensors: tuple = spec(ListOf(Section(Requantized), MAX_LAYERS), ())
    target: str | None = spec(TEXT)
    runtime: str | None = spec(TEXT)
    weights: WeightForm | None = spec(Opt(Section(WeightForm)))
    activations: WeightForm | None = spec(Opt(Section(WeightForm)))
    calibration: Calibration | None = spec(Opt(Section(Calibration)))
    float_layers: FloatLayers | None = spec(Opt(Section(FloatLayers)))
    correction: QuantCorrectionEntry | None = spec(Opt(Section(QuantCorrectionEntry)))
    output: QuantOutput | None = spec(Opt(Section(QuantOutput)))
    layers: tuple = spec(ListOf(Section(QuantLayer), MAX_LAYERS), ())


@dataclass(frozen=True)
class Group(_Base):
    kind: str | None = spec(TEXT)
    channels: int = spec(Int(0, MAX_COUNT), 0)
    removed: int = spec(Int(0, MAX_COUNT), 0)
    whole: bool | None = spec(Opt(Bool()))
    reason: str | None = spec(TEXT)


@dataclass(frozen=True)
class Channels(_Base):
    """``--pattern channels``: every channel group, and parameters and MACs before and after."""

    groups: tuple = spec(ListOf(Section(Group), MAX_LAYERS), ())
    score: str | None = spec(TEXT)
    params: tuple = spec(ListOf(Int(), length=2), (0, 0))
    macs: tuple = spec(ListOf(Int(), length=2), (0, 0))
    speedup: float | None = spec(Opt(Num(0.0, BIG)))  # dense median latency over the output's, timed alternately
    speedup_batch: int | None = spec(COUNT)


@dataclass(frozen=True)
class ClassCounts(_Base):
    """One class's detections matched to the dense model's: true and false positives, false negatives."""

    tp: int | None = spec(COUNT)
    fp: int | None = spec(COUNT)
    fn: int | None = spec(COUNT)
    precision: float | None = spec(SHARE)
    recall: float | None = spec(SHARE)
    f1: float | None = spec(SHARE)


@dataclass(frozen=True)
class Detection(_Base):
    """A detector's detections against the dense model's (:mod:`asr_onnx.verify.detection`): the means over the
    classes either model detects, the pooled (micro) F1, the counts per class (keyed by the class index), and
    the decoding's settings."""

    f1: float | None = spec(SHARE)
    precision: float | None = spec(SHARE)
    recall: float | None = spec(SHARE)
    f1_pooled: float | None = spec(SHARE)
    classes_scored: int | None = spec(COUNT)
    reference_detections: int | None = spec(COUNT)
    detections: int | None = spec(COUNT)
    per_class: dict = spec(MapOf(Section(ClassCounts)), factory=dict)
    score_threshold: float | None = spec(SHARE)
    nms_iou: float | None = spec(SHARE)
    match_iou: float | None = spec(SHARE)


@dataclass(frozen=True)
class Eval(_Base):
    """``repair --eval``: the output against the dense model (and the labels, when the data has them); the
    standardised error, a detector's detections, each output's kind and the metric the verdict reads."""

    data: str | None = spec(TEXT)
    samples: int | None = spec(COUNT)
    top1: float | None = spec(SHARE)
    dense_top1: float | None = spec(SHARE)
    agreement: float | None = spec(SHARE)
    logit_rel_l2: float | None = spec(ERROR)
    standardised_error: float | None = spec(ERROR)
    detection: Detection | None = spec(Opt(Section(Detection)))
    output_kinds: dict | None = spec(Opt(MapOf(Opt(Str()))))
    metric: str | None = spec(TEXT)
    agreement_classes: int | None = spec(COUNT)


@dataclass(frozen=True)
class Verdict(_Base):
    """Whether the output is usable: a held-out metric against two thresholds, and what to try when not."""

    label: str = spec(Str(LABELS), "usable", required=True)
    metric: str = spec(Str(), "", required=True)
    value: float = spec(Num(), 0.0, required=True)
    threshold_usable: float = spec(Num(), 0.0, required=True)
    threshold_broken: float = spec(Num(), 0.0, required=True)
    reason: str = spec(Str(), "", required=True)
    suggestion: str | None = spec(TEXT)

    def line(self) -> str:
        """``verdict: degraded - held-out agreement 0.82 < 0.95; try --reconstruct ls``."""
        return f"verdict: {self.label} - {self.reason}" + (f"; {self.suggestion}" if self.suggestion else "")


@dataclass(frozen=True)
class Worker(_Base):
    """``--engine ray``: one worker of the sharded passes."""

    host: str | None = spec(TEXT)
    device: str | None = spec(TEXT)
    samples: int | None = spec(COUNT)


@dataclass(frozen=True)
class EnginePass(_Base):
    """``--engine ray``: one sharded pass, with its samples, shards and time."""

    pass_: str | None = spec(TEXT, key="pass")
    samples: int | None = spec(COUNT)
    shards: int | None = spec(COUNT)
    seconds: float | None = spec(Opt(Num(0.0, MAX_SECONDS)))


@dataclass(frozen=True, eq=False)
class Report(_Base):
    """A repair's report (see :func:`asr_onnx.report.build.build_report` for what each section holds)."""

    tool: Tool | None = spec(Opt(Section(Tool)))
    onnxruntime: Runtime | None = spec(Opt(Section(Runtime)))
    input: str | None = spec(TEXT)
    verdict: Verdict | None = spec(Opt(Section(Verdict)))
    settings: Settings = spec(Section(Settings), factory=Settings)
    totals: Totals | None = spec(Opt(Section(Totals)))
    layers: tuple = spec(ListOf(Section(Layer), MAX_LAYERS), ())
    sites: tuple = spec(ListOf(Section(Site), MAX_SITES), ())
    sparse_core: tuple | None = spec(Opt(ListOf(Section(SparseCoreRow), MAX_LAYERS)))
    timings_s: dict = spec(MapOf(Num(0.0, MAX_SECONDS)), factory=dict)
    eval: Eval | None = spec(Opt(Section(Eval)))
    channels: Channels | None = spec(Opt(Section(Channels)))
    quantization: Quantization | None = spec(Opt(Section(Quantization)))
    engine: str | None = spec(TEXT)
    workers: tuple | None = spec(Opt(ListOf(Section(Worker), MAX_LAYERS)))
    engine_passes: tuple | None = spec(Opt(ListOf(Section(EnginePass), MAX_LAYERS)))

    def check(self, where: str) -> None:
        if self.keys is not None and not {"settings", "layers", "sites"} & set(self.keys):
            raise AsrError("not an asr-onnx report (no settings, layers or sites)")


# ---------------------------------------------------------------- dict <-> Report, JSON <-> Report


def from_dict(report) -> Report:
    """The typed report of a report dict (as :func:`asr_onnx.report.build.build_report` builds it, or as JSON
    gives it back); a Report is returned as it is.

    Raises:
        AsrError: a field of the wrong type or outside its range, one line naming it.
    """
    if isinstance(report, Report):
        return report
    if not isinstance(report, dict):
        raise AsrError(f"not an asr-onnx report: {_kind(report)}, not an object")
    return _parse(Report, report, "")


def _plain(value):
    if isinstance(value, _Base):
        return to_dict(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def to_dict(section: _Base) -> dict:
    """The JSON-ready dict of a section: the keys it was read with, in their order (every field when it
    was built in code), each under its JSON name."""
    fields = {f.metadata["key"] or f.name: f for f in dataclasses.fields(section) if "check" in f.metadata}
    keys = section.keys if section.keys is not None else tuple(fields) + tuple(section.extra)
    out = {}
    for key in keys:
        if key in fields:
            out[key] = _plain(getattr(section, fields[key].name))
        elif key in section.extra:
            out[key] = _plain(section.extra[key])
    return out


def to_json(report) -> str:
    """The report as JSON text (one space of indent a level, the keys in their order)."""
    return json.dumps(to_dict(from_dict(report)), indent=1, allow_nan=False) + "\n"


def write_json(report, path) -> Path:
    """Writes the report (a Report or a report dict) as JSON, atomically (a staging file, then rename)."""
    from asr_onnx.outputs import write_file

    text = to_json(report).encode("utf-8")
    return write_file(path, lambda handle: handle.write(text))


def read_json(path) -> Report:
    """A saved JSON report, validated.

    Only a regular file of at most MAX_JSON_BYTES is read (a device, a FIFO or a folder is refused before
    anything is read from it), and one with more than MAX_CONTAINERS arrays and objects before it is
    parsed.

    Raises:
        AsrError: the file cannot be read, is not JSON, or is not a valid report; one line.
    """
    import os
    import stat

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise AsrError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise AsrError(f"{path} is not a regular file: a JSON report is one")
        if info.st_size > MAX_JSON_BYTES:
            raise AsrError(f"{path} holds {info.st_size:,} bytes: a JSON report is at most {MAX_JSON_BYTES >> 20} MiB")
        chunks, size = [], 0
        while size <= MAX_JSON_BYTES and (chunk := os.read(fd, min(1 << 24, MAX_JSON_BYTES + 1 - size))):
            chunks.append(chunk)
            size += len(chunk)
    except OSError as e:
        raise AsrError(f"cannot read {path}: {e.strerror or e}") from None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > MAX_JSON_BYTES:
        raise AsrError(f"{path} is larger than {MAX_JSON_BYTES >> 20} MiB: not a JSON report")
    containers = data.count(b"[") + data.count(b"{")
    if containers > MAX_CONTAINERS:
        raise AsrError(f"{path} holds {containers:,} JSON arrays and objects (at most {MAX_CONTAINERS:,})")
    try:
        raw = json.loads(data.decode("utf-8"), parse_int=_parse_int)
    except UnicodeDecodeError as e:
        raise AsrError(f"{path} is not a JSON report: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except RecursionError:
        raise AsrError(f"{path} is not a JSON report: it nests too deeply") from None
    except ValueError as e:  # JSONDecodeError included
        raise AsrError(f"{path} is not a JSON report: {str(e).splitlines()[0]}") from None
    try:
        return from_dict(raw)
    except AsrError as e:
        raise AsrError(f"{path}: {e}") from None


def as_report(report) -> Report:
    """``report`` itself when typed, else :func:`from_dict` of it."""
    return from_dict(report)


def field_names(cls) -> tuple[str, ...]:
    """The JSON keys a section knows."""
    return tuple(_fields(cls))

