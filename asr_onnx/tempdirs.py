"""Temporary folders that name the process that owns them, so that a later run removes a killed run's.

A folder is ``$TMPDIR/asr-onnx-<kind>.<pid>.<random>`` (a refit's frontier, a model over 2 GB opened by
path, a discarded output). A run killed by SIGKILL cannot remove its own: every command-line run, and
the first folder a process makes, removes this user's folders whose process is gone.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

PREFIX = "asr-onnx-"
_OWNED = re.compile(rf"^{re.escape(PREFIX)}[a-z]+\.(\d+)\.[^.]+$")
_swept = False


def temporary_folder(kind: str) -> tempfile.TemporaryDirectory:
    """A TemporaryDirectory named ``asr-onnx-<kind>.<pid>.<random>`` in $TMPDIR (removed on cleanup, or
    by a later run once this process is gone)."""
    _sweep_once()
    return tempfile.TemporaryDirectory(prefix=f"{PREFIX}{kind}.{os.getpid()}.")


def make_folder(kind: str) -> Path:
    """A folder like :func:`temporary_folder`'s, which the caller removes."""
    _sweep_once()
    return Path(tempfile.mkdtemp(prefix=f"{PREFIX}{kind}.{os.getpid()}."))


def remove_dead_folders(root=None) -> list[Path]:
    """Removes this user's ``asr-onnx-<kind>.<pid>.*`` folders in ``root`` whose process is gone.

    Args:
        root: the folder to sweep. Defaults to None ($TMPDIR, as tempfile finds it).

    Returns:
        The folders removed. Nothing here fails: an unreadable root or entry is left as it is.
    """
    root = Path(root if root is not None else tempfile.gettempdir())
    removed: list[Path] = []
    try:
        entries = list(os.scandir(root))
    except OSError:
        return removed
    for entry in entries:
        owner = _OWNED.match(entry.name)
        try:
            mine = entry.is_dir(follow_symlinks=False) and entry.stat(follow_symlinks=False).st_uid == os.getuid()
        except OSError:
            continue
        if owner and mine and not pid_alive(int(owner.group(1))):
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(Path(entry.path))
    return removed


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (another user's counts: it cannot be signalled, but it lives)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # gone, or past the range of pids
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _sweep_once() -> None:
    global _swept
    if not _swept:
        _swept = True
        remove_dead_folders()
