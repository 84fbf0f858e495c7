"""The recipe: every choice of one repair, as one frozen value.

Built once, from the CLI's options or the API's keyword arguments, and read by every stage that needs a
choice: the driver, ``auto``, the guard and the sweep. The report records what ran; nothing reads the
report back as configuration. ``auto`` choices are resolved into a new recipe (:meth:`Recipe.resolved`),
so that the guard refits and corrects exactly what was kept.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from asr_onnx.correct.gains import METHODS
from asr_onnx.correct.recal import PLACEMENTS
from asr_onnx.errors import AsrError
from asr_onnx.measure.norms import DEFAULT_REFERENCE, REFERENCES

RECONSTRUCTIONS = ("none", "ls", "auto")
REFIT_TARGETS = ("layer", "block")  # asr_onnx.refit.reconstruct.TARGETS (pipeline reads refit through the driver)
GUARD_MODES = ("fallback", "warn", "off")
RECAL_MODES = ("exact", "momentum")
UNSTRUCTURED = ("global", "uniform")  # the patterns whose defaults below were measured
# the block target by default from this unstructured sparsity on, in a network that keeps its BatchNorms, chosen
# on held-out training images (results/block_target_heldout.json, 2 seeds, resnet20_bn, resnet50s_bn,
# mobilenetv2_bn: at 0.95 it won 5 of 6 cells, +16.9 points summed; at 0.9 2 of 6, -3.1. Folded into their convs,
# results/block_target_folded_heldout.json: resnet50s -2.4 and mobilenetv2 -13.2 at 0.95)
BLOCK_TARGET_FROM = 0.95


def refit_target_default(sparsity: float, pattern: str, batchnorm: bool = True) -> str:
    """The refit's target by default: "block" from BLOCK_TARGET_FROM on after unstructured pruning of a network
    that keeps BatchNormalization nodes (``batchnorm``), else "layer"."""
    return "block" if str(pattern) in UNSTRUCTURED and batchnorm and sparsity >= BLOCK_TARGET_FROM else "layer"


# whether LayerNorm outputs are sites when the recipe leaves it open, chosen on held-out training images
# (benchmarks/layernorm_sites.py, results/layernorm_sites_heldout.json, 2 seeds): statistics only after unstructured
# pruning they bought ViT +0.9 and +1.2 points at 90% (mean +0.3); after 2:4 they lost 0.03 points of agreement
# on average, after the refit 0.01 of top-1; channel pruning was not measured, so it keeps them off too
def layernorm_default(refit: str, pattern: str) -> bool:
    """Whether LayerNorms are sites by default: statistics only (``refit`` "none"), after unstructured pruning."""
    return refit == "none" and str(pattern) in UNSTRUCTURED


@dataclass(frozen=True)
class Recipe:
    """How a pruned model is repaired (the pruning itself is :meth:`Repair.prune`'s arguments).

    Attributes:
        method: "none", "bn", "lw", "naive", "asr" or "auto" (picked on held-out folds). Defaults to "bn".
        placement: "recal" or "pre-bn". Defaults to "recal".
        recal: "exact" or "momentum". Defaults to "exact".
        momentum: with "momentum", PyTorch's running-average momentum. Defaults to 0.1.
        lambda_rule: ASR's lambda: "median", "mean" or a number. Defaults to "median".
        correct_head: match the classifier head's logit statistics too. Defaults to True.
        reference: what a BN's correction restores, "calib" or "running". Defaults to DEFAULT_REFERENCE.
        sequential: one statistics pass per depth of sites. Defaults to False.
        layernorm: LayerNorm outputs are sites, their γ and β recalibrated; None: as :func:`layernorm_default`
            says for the refit that runs and the pattern (:meth:`layernorm_for`). Defaults to None.
        fold_bn: fold every BN into its layer at the end. Defaults to False.
        reconstruct: "none", "ls" (least-squares refit) or "auto" (picked on held-out folds). Defaults to "none".
        max_gram_mb: skip a layer whose Gram matrices exceed this. Defaults to 256.
        refit_passes: Gram passes, 0 for one per depth level. Defaults to 0.
        refit_samples: refit on a seeded subset of this size, 0 for all. Defaults to 0.
        refit_target: what the refit matches: "layer" (each layer's dense output) or "block" (a residual
            branch's last layer, its dense block output; :func:`asr_onnx.refit.gram.block_targets`); None: as
            :func:`refit_target_default` says for the sparsity and the pattern (:meth:`Repair.reconstruct`).
            Defaults to None.
        frontier_mb: MB of the refit's kept activations held in memory, the rest on disk. Defaults to 0.
        guard: "fallback", "warn" or "off". Defaults to "off" (the CLI's default is "fallback").
        seed: the calibration batches' order, the folds and the refit subset. Defaults to 0.
    """

    method: str = "bn"
    placement: str = "recal"
    recal: str = "exact"
    momentum: float = 0.1
    lambda_rule: str | float = "median"
    correct_head: bool = True
    reference: str = DEFAULT_REFERENCE
    sequential: bool = False
    layernorm: bool | None = None
    fold_bn: bool = False
    reconstruct: str = "none"
    max_gram_mb: float = 256.0
    refit_passes: int = 0
    refit_samples: int = 0
    refit_target: str | None = None
    frontier_mb: float = 0.0
    guard: str = "off"
    seed: int = 0

    def __post_init__(self):
        for name, value, allowed in (("method", self.method, METHODS + ("auto",)),
                                     ("placement", self.placement, PLACEMENTS), ("recal", self.recal, RECAL_MODES),
                                     ("reference", self.reference, REFERENCES),
                                     ("reconstruction", self.reconstruct, RECONSTRUCTIONS),
                                     ("refit target", self.refit_target or "layer", REFIT_TARGETS),
                                     ("guard", self.guard, GUARD_MODES)):
            if value not in allowed:
                raise AsrError(f"unknown {name} {value!r}; choose one of {', '.join(allowed)}")
        if not 0 < self.momentum <= 1:
            raise AsrError(f"momentum must be in (0, 1], got {self.momentum}")
        if not self.max_gram_mb > 0:  # also refuses NaN
            raise AsrError(f"max_gram_mb must be a positive number of MB, got {self.max_gram_mb}")
        if not self.frontier_mb >= 0:
            raise AsrError(f"frontier_mb must be a number of MB >= 0, got {self.frontier_mb}")
        if self.refit_samples < 0 or self.refit_passes < 0 or self.seed < 0:
            raise AsrError("refit_samples, refit_passes and seed must be >= 0")

    def correction(self) -> dict:
        """The keyword arguments of :meth:`Repair.correct`."""
        return {"method": self.method, "placement": self.placement, "recal": self.recal, "momentum": self.momentum,
                "lambda_rule": self.lambda_rule, "correct_head": self.correct_head}

    def refit(self) -> dict | None:
        """The keyword arguments of a probe's refit (:func:`asr_onnx.pipeline.crossfit.fit_probe`), or None."""
        if self.reconstruct != "ls":
            return None
        return {"method": "ls", "max_gram_mb": self.max_gram_mb, "passes": self.refit_passes,
                "samples": self.refit_samples, "seed": self.seed, "target": self.refit_target}

    def layernorm_for(self, refit: str, pattern: str = "global") -> bool:
        """Whether LayerNorm outputs are sites when ``refit`` ("none" or "ls") runs after ``pattern``: ``layernorm``,
        or :func:`layernorm_default`."""
        return layernorm_default(refit, pattern) if self.layernorm is None else self.layernorm

    def resolved(self, **picked) -> "Recipe":
        """This recipe with ``auto``'s picks (method, placement, lambda_rule; reconstruct) in place of "auto"."""
        return replace(self, **picked)

    def as_dict(self) -> dict:
        return asdict(self)
