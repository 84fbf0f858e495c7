"""The defaults of `repair` and `search`, in one place: the CLI and the demo both resolve them here."""

from __future__ import annotations


def resolved_defaults(pattern: str, method: str, sparsity: str | None, allocation: str | None, score: str | None,
                      reconstruct: str | None, has_data: bool) -> tuple[str, str | None, str, str]:
    """The defaults of the options left out: the best repair measured (benchmarks/RESULTS.md, "The default"),
    0.9 with LAMP's per-layer budget and the least-squares refit, its masks chosen by OBS; for channels 0.3 of
    each group, the greedy selection (given data) and the refit; pruning alone (``method="none"``) refits
    nothing unless asked. An allocation that the pattern fixes stays None, so that only an explicit one is
    refused.

    Returns:
        (sparsity, allocation, score, reconstruct).
    """
    from asr_onnx.prune.channels import DEFAULT_SPARSITY

    kind = str(pattern).strip().lower()
    channels = kind == "channels"
    if sparsity is None:
        sparsity = str(DEFAULT_SPARSITY if channels else 0.9)
    if allocation is None:
        allocation = "lamp" if kind == "global" else None
    if reconstruct is None:
        reconstruct = "none" if method == "none" else "ls"
    if score is None:
        score = ("greedy" if has_data else "magnitude") if channels else "obs" if reconstruct == "ls" else "magnitude"
    return sparsity, allocation, score, reconstruct
