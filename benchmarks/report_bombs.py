"""``asr-onnx report`` on the inputs of issue 25 that ran for minutes or exhausted memory: wall time and peak
memory of each run of the CLI (a fresh process), and its exit status and error line.

Cases: 50,000 sites of 2 channels (with 50,000 layers, each refitted); 5,000,000 channels spread over 5 sites
of 1,000,000; 5,000,000 channels in one site (past the cap of 1,048,576 a site: refused); ``/dev/zero``;
``sites[0].channels = 1e12``.

    python benchmarks/report_bombs.py [--out benchmarks/results/report_bombs.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def many_sites(count: int) -> dict:
    sites = [{"tensor": f"/b{i}/Conv_output_0", "layer": f"/b{i}/Conv", "norm": "bn", "channels": 2, "eps": 1e-5,
              "reference_var": [1.0, 2.0], "pruned_var": [(i % 97) / 97, 0.5], "gains": [1.0, 1.1],
              "gain": {"min": 1.0, "median": 1.05, "max": 1.1}, "collapsed": []} for i in range(count)]
    layers = [{"name": f"/b{i}/Conv", "op": "Conv", "shape": [2, 2, 3, 3], "pruned": True, "reason": None,
               "sparsity": 0.5, "refit": {"err_before": 0.3, "err_after": 0.1}} for i in range(count)]
    return {"settings": {"pattern": "global", "method": "bn"}, "layers": layers, "sites": sites,
            "timings_s": {"prune": 1.0}}


def wide_sites(sites: int, channels: int) -> dict:
    values = [0.5, 1.0, 0.25, 2.0] * (channels // 4)
    return {"settings": {"pattern": "global"}, "layers": [],
            "sites": [{"tensor": f"t{i}", "channels": channels, "eps": 1e-5, "reference_var": values,
                       "pruned_var": values[::-1]} for i in range(sites)]}


def run(source: str, folder: Path) -> dict:
    """One fresh ``asr-onnx report`` process: its exit status, wall time, own peak memory and error line."""
    page, log = folder / "page.html", folder / "stderr.txt"
    page.unlink(missing_ok=True)
    start = time.perf_counter()
    with open(log, "w") as err:
        child = subprocess.Popen([sys.executable, "-m", "asr_onnx.cli.main", "report", source, "-o", str(page)],
                                 stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(child.pid, 0)  # this child's own rusage
    seconds = time.perf_counter() - start
    lines = log.read_text().strip().splitlines()
    return {"exit": os.waitstatus_to_exitcode(status), "wall_s": round(seconds, 2),
            "cpu_s": round(usage.ru_utime + usage.ru_stime, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
            "error": lines[-1] if lines else None,
            "page_mb": round(page.stat().st_size / 1e6, 2) if page.exists() else None}


CASES = {"50,000 sites and layers": lambda: many_sites(50_000),
         "5 sites of 1,000,000 channels": lambda: wide_sites(5, 1_000_000),
         "1 site of 5,000,000 channels": lambda: wide_sites(1, 5_000_000),
         "sites[0].channels = 1e12": lambda: dict(many_sites(3), sites=[dict(many_sites(1)["sites"][0],
                                                                                channels=1e12)])}


def write_cases(folder: Path) -> None:
    """Writes each case's JSON (in a process of its own: a child's peak memory on Linux counts what it was
    forked from)."""
    for i, make in enumerate(CASES.values()):
        (folder / f"{i}.json").write_text(json.dumps(make()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="also write the rows as JSON here")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
                        f"import report_bombs; report_bombs.write_cases(__import__('pathlib').Path({str(folder)!r}))"],
                       check=True)
        sources = {"/dev/zero": "/dev/zero"} | {name: str(folder / f"{i}.json") for i, name in enumerate(CASES)}
        for name, source in sources.items():
            size = os.path.getsize(source) if source != "/dev/zero" else None
            row = {"case": name, "json_mb": None if size is None else round(size / 1e6, 1), **run(source, folder)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        args.out.write_text(json.dumps({"load_average": os.getloadavg(), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
