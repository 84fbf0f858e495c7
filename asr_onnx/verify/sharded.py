"""Evaluation on a distributed engine: :func:`asr_onnx.verify.evaluation.evaluate` run on shards of whole
batches, each worker scoring its own shard, and the shards' scores joined in shard order here.

Every score is then the single-process one: top-1 and agreement are counts, the squared errors are per sample
and joined in order, the worst sample is the worst of the shards' worst. Only the reference's squared norm
is a sum of the shards' sums (a float64 rounding apart, about 1e-16 of it).
"""

from __future__ import annotations

import numpy as np


def merge_scores(parts: list[dict], *, reference: bool, per_sample: bool, rel_l2) -> dict:
    """The scores of the whole set from its shards' (each :func:`asr_onnx.verify.evaluation.evaluate`'s, with
    ``per_sample`` where there is a reference), in shard order.

    Args:
        parts: the shards' scores, in shard order.
        reference: whether a reference was scored against.
        per_sample: return the per-sample scores too, as ``evaluate`` does.
        rel_l2: ``logit_rel_l2(err2, ref2)``, the relative error of the pooled squared errors.
    """
    samples = sum(part["samples"] for part in parts)
    result: dict = {"samples": samples}
    if "top1" in parts[0]:
        result["top1"] = None if parts[0]["top1"] is None else \
            sum(round(part["top1"] * part["samples"]) for part in parts) / samples
    if not reference:
        return result
    err2 = np.concatenate([part["err2"] for part in parts])
    ref2 = float(sum(part["ref2"] for part in parts))
    found = [part["matches"] for part in parts]
    matches = None if any(m is None for m in found) else np.concatenate(found)
    result.update(agreement=None if matches is None else float(matches.mean()),
                  agreement_kind=parts[0]["agreement_kind"], logit_rel_l2=rel_l2(err2, ref2),
                  max_rel_l2=max(part["max_rel_l2"] for part in parts))
    if per_sample:
        result.update(matches=matches, err2=err2, ref2=ref2)
    return result
