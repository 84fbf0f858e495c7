"""Issue 28's table: magnitude masks against OBS masks (LAMP + least-squares refit), against the issue's targets.

Reads the rows that ``benchmarks/reconstruct_table.py --allocations lamp --reconstructs ls --score S`` wrote for
S = magnitude and obs, and prints top-1 (%) per model and cell, OBS as a fraction of dense, and the target:

    python benchmarks/reconstruct_table.py --cells 0.9,0.95,2:4 --allocations lamp --reconstructs ls \
        --eval test --score obs --out benchmarks/results/obs_test.json      # and --score magnitude
    python benchmarks/obs_table.py benchmarks/results/obs_test.json

Targets (issue 28): at 0.9, 90% of dense on every model; at 0.95, 85% of dense on the ResNets and VGGs and 50%
on the MobileNetV2s; under 2:4, at least the refit's figure before OBS (given as ``--before`` for the test set).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

BEFORE_2_4 = {"resnet20_bn": 93.5, "resnet50s_bn": 92.2, "mobilenetv2_bn": 91.0}  # the 2:4 figures (test)


def target(model: str, cell: str, dense: float, test: bool) -> tuple[float, str] | None:
    """(the top-1 the cell must reach, its wording), or None where the issue sets none."""
    if cell == "0.9":
        return 0.9 * dense, "90% of dense"
    if cell == "0.95":
        share = 0.5 if model.startswith("mobilenet") else 0.85
        return share * dense, f"{share:.0%} of dense"
    if cell == "2:4" and test and model in BEFORE_2_4:
        return BEFORE_2_4[model], "the refit before OBS"
    return None


def table(rows: list[dict]) -> str:
    cells = {(r["model"], r["cell"], r.get("score", "magnitude")): r for r in rows}
    order = list(dict.fromkeys(r["model"] for r in rows))
    test = all(r.get("eval", "test") == "test" for r in rows)
    lines = ["| model | dense | cell | magnitude | OBS | OBS / dense | target | met |", "|---|---|---|---|---|---|---|---|"]
    for model in order:
        for cell in ("0.9", "0.95", "2:4"):
            obs, mag = cells.get((model, cell, "obs")), cells.get((model, cell, "magnitude"))
            if obs is None:
                continue
            dense = 100 * obs["dense"]
            goal = target(model, cell, dense, test)
            got, before = 100 * obs["top1"], "–" if mag is None else f"{100 * mag['top1']:.2f}"
            lines.append(f"| {model} | {dense:.2f} | {cell} | {before} | "
                         f"**{got:.2f}** | {got / dense:.1%} | "
                         + (f"{goal[0]:.2f} ({goal[1]}) | {'yes' if got >= goal[0] else '**no**'} |" if goal else "– | |"))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("json", nargs="+", help="reconstruct_table.py output files")
    args = parser.parse_args()
    rows = [row for path in args.json for row in json.loads(Path(path).read_text())["rows"]]
    print(table(rows))


if __name__ == "__main__":
    main()
