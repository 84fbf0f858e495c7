"""Progress bars on stderr that stay silent when not on a TTY or when disabled."""

from __future__ import annotations

import sys


def bar(iterable, *, total=None, desc: str = "", enabled: bool = True):
    """Wraps ``iterable`` in a tqdm bar when ``enabled`` and stderr is a terminal."""
    if not (enabled and sys.stderr.isatty()):
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False, unit="batch")
