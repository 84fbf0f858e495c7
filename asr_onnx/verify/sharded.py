"""Evaluation on a distributed engine: :func:`asr_onnx.verify.evaluation.evaluate` run on shards of whole
batches, each worker scoring its own shard by one scoring plan (decided on the whole set's first batch), and
the shards' scores joined in shard order here.

Every score is then the single-process one, bit for bit: top-1 and agreement are counts, every per-sample
figure (squared errors, the reference's squared norms, standardised errors, detection counts) is joined in
sample order, and the reference's per-channel moments are kept per batch and merged in batch order
(:class:`asr_onnx.verify.scoring.Scores`).
"""

from __future__ import annotations

from asr_onnx.verify.scoring import Scores, compared


def merge_scores(parts: list[dict], *, reference: bool, per_sample: bool) -> dict:
    """The scores of the whole set from its shards' (each :func:`asr_onnx.verify.evaluation.evaluate`'s, with
    ``per_sample`` where there is a reference, all by the same plan), in shard order.

    Args:
        parts: the shards' scores, in shard order.
        reference: whether a reference was scored against.
        per_sample: return the per-sample scores too, as ``evaluate`` does.
    """
    samples = sum(part["samples"] for part in parts)
    result: dict = {"samples": samples}
    if "top1" in parts[0]:
        result["top1"] = None if parts[0]["top1"] is None else \
            sum(round(part["top1"] * part["samples"]) for part in parts) / samples
    if not reference:
        return result
    scores = Scores.pooled([part["scores"] for part in parts])
    return result | compared(scores, parts[0]["agreement_kind"], parts[0]["output_kinds"], per_sample)
