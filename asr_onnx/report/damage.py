"""How badly pruning hurt each site, read from a report's site entries, and short names for sites."""

from __future__ import annotations

import numpy as np


def short_name(name: str, width: int = 36) -> str:
    """A site's or layer's name without its op and repeated scope prefixes.

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


def variance_ratio(site: dict) -> np.ndarray | None:
    """Per channel, pruned / reference variance (1 = undamaged), or None when the report lacks either."""
    if site.get("pruned_var") is None or site.get("reference_var") is None:
        return None
    floor = float(site.get("eps") or 0.0) + 1e-30  # the reference variance is floored before it divides
    return np.asarray(site["pruned_var"], np.float64) / np.maximum(np.asarray(site["reference_var"], np.float64),
                                                                   floor)


def collapsed(site: dict) -> int:
    """How many channels collapsed: the report's own count, else pruned variance under the site's epsilon."""
    if "collapsed" in site:
        return len(site["collapsed"])
    if site.get("pruned_var") is not None and site.get("eps") is not None:
        return int((np.asarray(site["pruned_var"]) < site["eps"]).sum())
    return 0


def most_damaged(sites: list[dict], name: str | None = None) -> dict | None:
    """The site named ``name`` (its tensor, layer or short name), else the one with the lowest median ratio.

    Raises:
        KeyError: no site has that name.
    """
    if name is not None:
        for site in sites:
            if name in (site.get("tensor"), site.get("layer"), short_name(site.get("layer") or site.get("tensor"))):
                return site
        raise KeyError(name)
    scored = [(float(np.median(r)), -collapsed(s), i) for i, s in enumerate(sites)
              if (r := variance_ratio(s)) is not None and len(r)]
    return sites[min(scored)[2]] if scored else None


def dead_threshold(reference) -> float:
    """A channel is dead below 1e-6 of the reference's median variance (a standard deviation 0.1% of typical)."""
    reference = np.asarray(reference, np.float64)
    positive = reference[reference > 0]
    return 1e-6 * float(np.median(positive)) if positive.size else 1e-30


def site_label(site: dict) -> str:
    return short_name(site.get("layer") or site.get("tensor") or "?")

