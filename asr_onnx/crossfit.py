"""Cross-fitting: repair on part of the calibration set, score against dense on the part it did not see.

``auto`` (which candidate?) and the guard (repair or pruning alone?) ask the same question of different
variants, so both score their variants here.
"""

from __future__ import annotations

import numpy as np


def held_out_scores(job, calib, variants, *, folds: int, seed: int, measure: dict, batch_size: int | None = None):
    """Scores every variant on every calibration sample, each time with a probe fitted on the other folds.

    Args:
        job: the Repair whose dense and pruned models the probes share.
        calib: the calibration set (needs ``folds``).
        variants: functions ``probe -> onnx.ModelProto``; a probe is a measured Repair on the fit folds.
        folds: how many parts; each sample is held out once.
        seed: the parts' seed, and the probes' batch order.
        measure: keyword arguments of the probes' :meth:`Repair.measure`.
        batch_size: samples per evaluation run. Defaults to None (evaluate's own default).

    Returns:
        (matches, err2, ref2): per variant, each held-out sample's top-1 match with dense (None for every
        variant where top-1 means nothing, such as a detector's output) and its squared error; and the
        dense outputs' squared norm, the same for every variant.
    """
    from .api import Repair
    from .evaluation import evaluate

    sizing = {} if batch_size is None else {"batch_size": batch_size}
    matches, err2, ref2 = [[] for _ in variants], [[] for _ in variants], 0.0
    for fit, held in calib.folds(folds, seed):
        probe = Repair(job.dense, device=job.device, batch_size=min(job.requested_batch, len(fit)), progress=False,
                       threads=job.threads)
        probe.pruned, probe.source = job.pruned, job.source
        probe.measure(fit, seed=seed, **measure)
        dense_outputs: list = []  # filled by the first evaluation, reused by the others
        for i, variant in enumerate(variants):
            result = evaluate(variant(probe), held, reference=job.dense, device=job.device, progress=False,
                              reference_logits=dense_outputs, per_sample=True, **sizing)
            matches[i].append(result["matches"])
            err2[i].append(result["err2"])
        ref2 += result["ref2"]
    has_top1 = all(m is not None for per_fold in matches for m in per_fold)
    return ([np.concatenate(m) for m in matches] if has_top1 else [None] * len(variants),
            [np.concatenate(e) for e in err2], ref2)
