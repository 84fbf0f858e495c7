"""Summaries of benchmarks/results/*.json (written by paper_table.py): headline cells, winners, auto's gap.

    python benchmarks/summarize.py
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXED = ("none", "reflow", "bn", "lw", "naive", "asr")


def load() -> dict:
    order = [f"{m}{s}" for m in ("resnet20", "resnet50s", "vgg_bn", "mobilenetv2") for s in ("_bn", "")]
    found = {p.stem: json.loads(p.read_text()) for p in (ROOT / "benchmarks" / "results").glob("*.json")}
    return {name: found[name] for name in order if name in found}


def cells(result) -> dict:
    """(pattern, sparsity, recal) -> {method: top-1 %}."""
    table = {}
    for row in result["rows"]:
        key = (row["pattern"], row["sparsity"], row["recal"])
        table.setdefault(key, {})[row["method"]] = 100 * row["top1"]
    none = {(p, s): v["none"] for (p, s, r), v in table.items() if "none" in v}
    for (p, s, _r), v in table.items():
        v.setdefault("none", none.get((p, s)))
    return table


def main() -> int:
    results = load()
    print("### Top-1 at 90% global sparsity (%)\n")
    print("| model | dense | regime | none | reflow | bn | lw | naive | asr | auto |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, result in results.items():
        for recal in ("exact", "momentum"):
            v = cells(result).get(("global", 0.9, recal), {})
            shown = " | ".join(f"{v[m]:.1f}" if v.get(m) is not None else "-" for m in FIXED + ("auto",))
            print(f"| {name} | {100 * result['dense']['top1']:.1f} | {recal} | {shown} |")
    print("\n### Which fixed method wins, per regime (cells won, ties shared)\n")
    for recal in ("exact", "momentum"):
        wins = Counter()
        for result in results.values():
            for (_pattern, _sparsity, r), v in cells(result).items():
                if r != recal:
                    continue
                scored = {m: v[m] for m in FIXED[1:] if v.get(m) is not None}
                best = max(scored.values())
                for m, top1 in scored.items():
                    wins[m] += top1 == best
        print(f"- {recal}: " + ", ".join(f"{m} {n}" for m, n in wins.most_common()))
    print("\n### auto against the best of bn, lw, naive, asr (points of top-1; negative = auto is behind)\n")
    gaps = []
    for name, result in results.items():
        for (p, s, r), v in cells(result).items():
            if v.get("auto") is None:
                continue
            best = max(v[m] for m in ("bn", "lw", "naive", "asr") if v.get(m) is not None)
            gaps.append((v["auto"] - best, name, p, s, r))
    gaps.sort()
    within = sum(g >= -0.3 for g, *_ in gaps)
    print(f"{within} of {len(gaps)} cells within 0.3 points; worst: "
          + "; ".join(f"{n} {p} {s or ''} {r}: {g:+.2f}" for g, n, p, s, r in gaps[:5]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
