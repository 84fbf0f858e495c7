"""What a path is (a regular file, a folder, a device, a FIFO), and the refusal of inputs that are neither a
file nor a folder: a FIFO would block the read forever, and a device such as /dev/zero never ends."""

from __future__ import annotations

import os
import stat

from asr_onnx.errors import AsrError


def file_kind(mode: int) -> str:
    """What a file of ``os.stat`` mode ``mode`` is, in words ("a FIFO", "a character device")."""
    for test, kind in ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a folder"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "not a regular file"


def check_input(path, what: str) -> None:
    """Refuses an input that exists and is neither a regular file nor a folder, before anything reads it.
    A missing path passes: its reader refuses it in its own words.

    Raises:
        AsrError: ``path`` is a device, a FIFO or a socket (or a symlink to one).
    """
    try:
        mode = os.stat(path).st_mode  # follows symlinks; never opens the file, so a FIFO cannot block it
    except (OSError, ValueError):
        return
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise AsrError(f"{what} {path} is {file_kind(mode)}, not a regular file or a folder")
