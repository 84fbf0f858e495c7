"""How badly pruning hurt each site, read from a report's sites, and the names sites go by.

A site is a typed :class:`asr_onnx.report.schema.Site` or a plain dict with the same keys (the sweep
builds those).
"""

from __future__ import annotations

import numpy as np


def _get(site, name: str):
    return site.get(name) if isinstance(site, dict) else getattr(site, name, None)


def short_name(name: str, width: int = 36) -> str:
    """A site's or layer's name without its op and repeated scope prefixes, for a plot's tick labels.

    ``/stages/stages.8/branch/branch.2/branch.2.1/BatchNormalization_output_0`` reads
    ``stages.8/branch.2.1``; a name without scopes is kept. At most ``width`` characters (the tail).
    """
    parts = [p for p in str(name).split("/") if p]
    if len(parts) > 1:
        parts = parts[:-1]  # the op, or the op's output tensor
    # drop a scope whose name the next scope repeats (stages -> stages.8)
    parts = [p for p, nxt in zip(parts, parts[1:] + [""]) if not (nxt.startswith(p) and nxt != p)]
    short = "/".join(parts) or str(name)
    return short if len(short) <= width else "…" + short[-(width - 1):]


def site_label(site) -> str:
    """What the summary, ``inspect`` and the page call a site: its layer's node name, else its tensor."""
    return str(_get(site, "layer") or _get(site, "tensor") or "?")


def variance_ratio(site) -> np.ndarray | None:
    """Per channel, pruned / reference variance (1 = undamaged), or None when the report lacks either."""
    pruned, reference = _get(site, "pruned_var"), _get(site, "reference_var")
    if pruned is None or reference is None:
        return None
    floor = float(_get(site, "eps") or 0.0) + 1e-30  # the reference variance is floored before it divides
    return np.asarray(pruned, np.float64) / np.maximum(np.asarray(reference, np.float64), floor)


def dead_mask(site) -> np.ndarray:
    """Per channel, whether it collapsed: the report's own list, else pruned variance under the epsilon."""
    pruned, eps, listed = _get(site, "pruned_var"), _get(site, "eps"), _get(site, "collapsed")
    size = len(pruned) if pruned is not None else int(_get(site, "channels") or 0)
    dead = np.zeros(size, bool)
    if listed is not None:
        indices = np.asarray(listed, np.int64)
        dead[indices[(indices >= 0) & (indices < size)]] = True
    elif pruned is not None and eps is not None:
        dead = np.asarray(pruned, np.float64) < eps
    return dead


def collapsed(site) -> int:
    """How many channels collapsed: the report's own count, else pruned variance under the site's epsilon."""
    listed = _get(site, "collapsed")
    if listed is not None:
        return len(listed)
    pruned, eps = _get(site, "pruned_var"), _get(site, "eps")
    if pruned is not None and eps is not None:
        return int((np.asarray(pruned, np.float64) < eps).sum())
    return 0


def median(values: np.ndarray) -> float:
    """np.median's value, sooner for the few channels of most sites (a report may hold 100,000 sites)."""
    if values.size > 64:
        return float(np.median(values))
    ordered = sorted(values.tolist())
    mid = len(ordered) // 2
    return float(ordered[mid]) if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def damage_key(site) -> tuple | None:
    """What orders sites by damage, the worst first: (median ratio, -collapsed); None without variances."""
    ratio = variance_ratio(site)
    if ratio is None or not ratio.size:
        return None
    return median(ratio), -collapsed(site)


def worst(sites, count: int, keys: list | None = None) -> list[int]:
    """The indices of the ``count`` most damaged sites that have variances, in graph order.

    Args:
        sites: the sites.
        count: how many.
        keys: :func:`damage_key` of each site, when known. Defaults to None (computed).
    """
    keys = [damage_key(site) for site in sites] if keys is None else keys
    ranked = sorted((key, i) for i, key in enumerate(keys) if key is not None)
    return sorted(i for _, i in ranked[:count])


def find_site(sites, name: str):
    """The site named ``name``: its tensor, its layer or the layer's short name.

    Raises:
        KeyError: no site has that name.
    """
    for site in sites:
        if name in (_get(site, "tensor"), _get(site, "layer"), short_name(site_label(site))):
            return site
    raise KeyError(name)


def most_damaged(sites, name: str | None = None, keys: list | None = None):
    """The site named ``name`` (see :func:`find_site`), else the one with the lowest median ratio, or None.

    Args:
        keys: as for :func:`worst`.

    Raises:
        KeyError: no site has that name.
    """
    if name is not None:
        return find_site(sites, name)
    chosen = worst(sites, 1, keys)
    return sites[chosen[0]] if chosen else None


def dead_threshold(reference) -> float:
    """A channel is dead below 1e-6 of the reference's median variance (a standard deviation 0.1% of typical)."""
    reference = np.asarray(reference, np.float64)
    positive = reference[reference > 0]
    return 1e-6 * float(np.median(positive)) if positive.size else 1e-30
