"""Progress on stderr: bars on a TTY, one line per finished stage elsewhere (a log, a CI job), nothing when
disabled."""

from __future__ import annotations

import sys


def bar(iterable, *, total=None, desc: str = "", enabled: bool = True):
    """Wraps ``iterable`` in a tqdm bar when ``enabled`` and stderr is a terminal."""
    if not (enabled and sys.stderr.isatty()):
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False, unit="batch")


def stage_done(stage: str, seconds: float, *, enabled: bool = True) -> None:
    """Prints ``<stage> done in <seconds> s`` on stderr when ``enabled`` and stderr is not a terminal, where
    no bar shows that a run of several minutes is alive. A stderr that cannot be written is no failure."""
    if not enabled or sys.stderr.isatty():
        return
    try:
        print(f"{stage} done in {seconds:.2f} s", file=sys.stderr, flush=True)
    except (OSError, ValueError):  # closed or full: progress is not worth failing a run for
        pass
