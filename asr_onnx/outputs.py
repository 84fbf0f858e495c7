"""Every path a run reads and writes: checked for overlap before any work, then written all at once.

A command registers what it reads (the model and its external data, statistics, data sets) and what
it writes (the model and its ``<name>.data``, a report, statistics, a sweep folder) in a
:class:`Plan`, calls :meth:`Plan.check` before any work, and writes every output inside
:meth:`Plan.staged`: each output goes to a staging folder beside its destination, and only when all
are written are they renamed into place. A failure (or SIGINT/SIGTERM) removes every staging folder;
one left by SIGKILL is removed by the next run to the same destination. SIGINT and SIGTERM wait while
the outputs are renamed, and a plan made with ``final=True`` (the command line's) ignores them from then
on: a run whose outputs are in place has succeeded, so the commit is its last act.

Inputs must be regular files or folders (a FIFO would block the read, a device never ends); an output
that exists must be a regular file (a device or a FIFO is never replaced), except the null device
(/dev/null), to which an output is discarded: written to a temporary folder and removed, the node
untouched. A symlink named as an output is followed: the file it points to is replaced, never the link.
A new output option is one more ``plan.write`` and one more write inside the block::

    plan = Plan(final=True)
    inputs = plan.read_model(model_path)
    plan.read_data(calib_path, "the --calib data")
    model_out = plan.write(output, "-o", siblings=(f"{output.name}.data",))
    page = plan.write(html_path, "--html")
    plan.check()                      # before any work
    ...                               # the work
    with plan.staged():               # then every output at once
        save_model(model, model_out.staged)
        write_html(report, page.staged)
        print(summary)                # before the commit, which is the run's last act
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from asr_onnx.errors import AsrError
from asr_onnx.filekinds import check_input, file_kind
from asr_onnx.tempdirs import make_folder

STAGING_SUFFIX = ".asr-staging"


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def real(path) -> Path:
    """The absolute path with every symlink and ``..`` resolved (the target need not exist)."""
    return Path(os.path.realpath(os.path.abspath(os.fspath(path))))


def staging_path(path) -> Path:
    """A staging name beside ``path`` that says which process owns it: ``.<name>.<pid>.asr-staging``."""
    path = Path(path)
    return path.parent / f".{path.name}.{os.getpid()}{STAGING_SUFFIX}"


def remove_stale_staging(path) -> None:
    """Removes staging leftovers of ``path`` whose process is gone (a run killed by SIGKILL)."""
    path = Path(path)
    prefix = f".{path.name}."
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return
    for entry in entries:
        name = entry.name
        if not (name.startswith(prefix) and name.endswith(STAGING_SUFFIX)):
            continue
        pid = name[len(prefix) : -len(STAGING_SUFFIX)]
        if pid.isdigit() and not _alive(int(pid)):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    from asr_onnx.tempdirs import pid_alive

    if pid == os.getpid():
        return False  # this run has not started staging yet: anything of its pid is a leftover
    return pid_alive(pid)


def is_null_device(path) -> bool:
    """Whether ``path`` (followed through symlinks) is the null device: /dev/null or a node of its number."""
    try:
        mode, device = os.stat(path), os.stat(os.devnull)
    except (OSError, ValueError):
        return False
    return stat.S_ISCHR(mode.st_mode) and mode.st_rdev == device.st_rdev


def _refuse_non_regular(path: Path, what: str, named: Path) -> None:
    """Refuses a destination that exists and is not a regular file: it is never renamed over."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return
    if not stat.S_ISREG(mode):
        where = "" if path == real(named) else f" ({path})"
        raise AsrError(f"{what} {named}{where} is {file_kind(mode)}, not a regular file; it is never replaced")


@dataclass
class Output:
    """One destination.

    Attributes:
        path: where it goes.
        what: how the user named it, for messages ("-o", "--report").
        folder: a folder of ``files`` (a sweep) rather than one file.
        files: for a folder, the names written into it; for a file, the sibling names it may write
            beside itself (a model's ``<name>.data``).
        replaces: read paths that this output may replace (``--overwrite``).
        discard: the destination is the null device: the output is written to a temporary folder and
            removed, never renamed onto the node (set by :meth:`Plan.check`).
    """

    path: Path
    what: str
    folder: bool = False
    files: tuple = ()
    replaces: set = field(default_factory=set)
    discard: bool = False
    staging: Path | None = None

    @property
    def staged(self) -> Path:
        """Where a writer writes this output during :meth:`Plan.staged`."""
        if self.staging is None:
            raise RuntimeError("outputs are written inside Plan.staged()")
        return self.staging / self.path.name

    def targets(self) -> list[Path]:
        """Every real path this output may write."""
        base = real(self.path)
        if self.folder:
            return [base / name for name in self.files]
        return [base] + [base.parent / name for name in self.files]


class Plan:
    """The paths one run reads and writes. Register inputs and outputs, :meth:`check`, then :meth:`staged`."""

    def __init__(self, final: bool = False):
        """Args:
            final: the commit is the run's last act (the command line): from it on, SIGINT and SIGTERM
                are ignored until the process exits, so that a run whose outputs are in place never
                reports failure. Otherwise they wait until the outputs are renamed, then arrive. Defaults
                to False.
        """
        self.final = final
        self.reads: list[tuple[Path, str]] = []
        self.folders: list[tuple[Path, str]] = []  # data folders: nothing may be written inside them
        self.outputs: list[Output] = []

    def read(self, path, what: str) -> None:
        """Registers a file that the run reads.

        Raises:
            AsrError: it exists and is not a regular file or a folder (see :func:`check_input`).
        """
        if path is not None:
            check_input(path, what)
            self.reads.append((real(path), what))

    def read_model(self, path, what: str = "the input model") -> list[Path]:
        """Registers a model file and the external data files it names; returns their real paths."""
        check_input(path, what)  # before external_locations reads it
        files = [path] + [Path(path).parent / location for location in external_locations(path)]
        self.read(path, what)
        for location in files[1:]:
            self.read(location, f"the external data of {what}")
        return [real(f) for f in files]

    def read_data(self, path, what: str) -> None:
        """Registers a data set: a folder, a file (an IDX images file with its labels), or a named set."""
        from asr_onnx.calib.discovery import idx_labels_path
        from asr_onnx.calib.named import NAMED_DATA

        path = NAMED_DATA.get(str(path), path)
        self.read(path, what)  # refuses a FIFO or a device before anything below reads it
        if Path(path).is_dir():  # a file written there would be read as data by the next run
            self.folders.append((real(path), what))
        labels = idx_labels_path(Path(path)) if Path(path).is_file() else None
        if labels is not None:
            self.read(labels, what)

    def write(self, path, what: str, *, siblings=(), replaces=()) -> Output:
        """Registers an output file (and ``siblings`` it may write beside itself)."""
        output = Output(Path(path), what, files=tuple(siblings), replaces={real(p) for p in replaces})
        self.outputs.append(output)
        return output

    def write_folder(self, path, what: str, files) -> Output:
        """Registers an output folder into which ``files`` are written (it is made when missing)."""
        output = Output(Path(path), what, folder=True, files=tuple(files))
        self.outputs.append(output)
        return output

    def check(self) -> Plan:
        """Refuses, with one error, any output that is or lies inside an input, or that another output
        also writes, any destination whose folder is missing or read-only, and any destination (or file
        of it) that exists and is not a regular file. An output to the null device is marked
        :attr:`Output.discard`.

        Raises:
            AsrError: the first conflict found.
        """
        for output in self.outputs:
            _check_destination(output)
        written: dict[Path, Output] = {}
        for output in self.outputs:
            if output.discard:
                continue  # nothing is written anywhere the user could see
            for target in output.targets():
                for read, what in self.reads:
                    if target in output.replaces:
                        continue
                    if target == read or _same_file(target, read):
                        raise AsrError(_overlap(output, target, read, what))
                for read, what in self.folders:
                    if read in target.parents:
                        raise AsrError(f"{output.what} {output.path} writes {target.name} inside {what} ({read})")
                other = written.get(target)
                if other is not None and other is not output:
                    raise AsrError(f"{output.what} and {other.what} both write {target}")
                written[target] = output
            if output.folder:
                for read, what in self.folders:
                    if real(output.path) == read:
                        raise AsrError(f"{output.what} {output.path} is {what}")
        return self

    @contextmanager
    def staged(self):
        """Within the block every output is written to its :attr:`Output.staged` path; after it, all are
        renamed into place together, with SIGINT and SIGTERM held back (see ``final``). On any failure,
        or SIGINT/SIGTERM before the renames, no staged file is left."""
        try:
            for output in self.outputs:
                if output.discard:
                    output.staging = make_folder("discard")
                    continue
                destination = real(output.path)  # beside the file a symlink names: one file system
                remove_stale_staging(destination)
                output.staging = staging_path(destination)
                output.staging.mkdir()
            yield self
            with _signals_held(self.final):
                for output in self.outputs:
                    if not output.discard:
                        _commit(output)
        except OSError as e:  # a full disk, a file system that refuses the rename
            raise AsrError(f"cannot write {_failed(e, self.outputs)}: {e.strerror or e}") from None
        finally:
            for output in self.outputs:
                if output.staging is not None:
                    shutil.rmtree(output.staging, ignore_errors=True)
                    output.staging = None


@contextmanager
def _signals_held(final: bool):
    """SIGINT and SIGTERM wait while the block runs (the renames of a commit: no run stops half-way
    through them). With ``final`` they are ignored after it, until the process exits, and the ones that
    arrived are dropped; otherwise they arrive when it ends.

    A Python handler that records them, rather than a blocked signal mask: onnxruntime's threads would
    take a signal that the main thread blocks, and Python runs every handler in the main thread anyway.
    """
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers cannot be set here, and none runs in this thread
        return
    arrived: list[int] = []
    previous: dict = {}
    try:
        for number in STOP_SIGNALS:  # one at a time: a signal between the two finds its own handler put back
            previous[number] = signal.signal(number, lambda number, frame: arrived.append(number))
        yield
    except BaseException:
        _restore(previous)
        raise
    if final:
        for number in STOP_SIGNALS:
            signal.signal(number, signal.SIG_IGN)
        return
    _restore(previous)
    if arrived:
        signal.raise_signal(arrived[0])  # its own handler runs now, the outputs in place


def _restore(handlers: dict) -> None:
    for number, handler in handlers.items():
        signal.signal(number, handler if handler is not None else signal.SIG_DFL)


def write_file(path, write) -> Path:
    """Writes one file atomically: ``write(handle)`` fills a staging file beside ``path``, which is then
    renamed to ``path``; on any failure no file is left.

    A symlink is followed (the file it points to is replaced); the null device gets the bytes and stays
    as it is; any other path that exists and is not a regular file is refused.

    Raises:
        AsrError: the file cannot be written (a full disk, a missing folder, a device or FIFO there).
    """
    path = Path(path)
    if is_null_device(path):
        with open(os.devnull, "wb") as handle:
            write(handle)
        return path
    _refuse_non_regular(real(path), "output", path)
    destination = real(path)
    remove_stale_staging(destination)
    staged = staging_path(destination)
    try:
        with open(staged, "wb") as handle:
            write(handle)
        os.replace(staged, destination)
    except OSError as e:
        raise AsrError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        staged.unlink(missing_ok=True)
    return path


def external_files(model) -> set[str]:
    """The relative locations of an onnx.ModelProto's external data files."""
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data

    return {ExternalDataInfo(t).location for t in _get_all_tensors(model) if uses_external_data(t)}


def external_locations(path) -> list[str]:
    """The sorted external data locations named by the model file at ``path`` (reads no weights); [] when
    the file cannot be read."""
    try:
        import onnx

        return sorted(external_files(onnx.load(str(path), load_external_data=False)))
    except Exception:  # noqa: BLE001 - an unreadable model is refused when it is loaded, with its own message
        return []


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)  # hard links
    except OSError:
        return False


def _overlap(output: Output, target: Path, read: Path, what: str) -> str:
    if target == real(output.path) and what == "the input model" and output.what in ("-o", "output"):
        return f"output {output.path} is the input model; pass --overwrite to replace it"
    if target == real(output.path):
        return f"{output.what} {output.path} is {what} ({read})"
    return f"{output.what} {output.path} would write {target.name}, which is {what} ({read})"


def _check_destination(output: Output) -> None:
    path = output.path
    if is_null_device(path):
        output.discard = True
        return
    if output.folder:
        if path.exists() and not path.is_dir():
            kind = file_kind(os.stat(path).st_mode)
            raise AsrError(f"{output.what} {path} is {'an existing file' if kind == 'a regular file' else kind}, "
                           "not a folder")
    elif path.is_dir():
        raise AsrError(f"{output.what} {path} is a folder")
    for target in output.targets():  # the file, its siblings, a folder's files: none may be a device
        _refuse_non_regular(target, output.what, path if target == real(path) else target)
    folder = real(path).parent
    if not folder.is_dir():
        raise AsrError(f"the folder of {output.what} {path} does not exist: {folder}")
    if not os.access(folder, os.W_OK):
        raise AsrError(f"the folder of {output.what} {path} is not writable: {folder}")


def _commit(output: Output) -> None:
    """Renames a staged output into place: siblings first, the named file last, so that a model never
    appears before its weights."""
    staged, destination = output.staged, real(output.path)
    if output.folder:
        if not staged.exists():
            return
        if not destination.exists():
            os.replace(staged, destination)
            return
        for item in sorted(staged.iterdir()):
            os.replace(item, destination / item.name)
        return
    for item in sorted(staged.parent.iterdir(), key=lambda p: p.name == output.path.name):  # the staging folder
        os.replace(item, destination.parent / (destination.name if item.name == output.path.name else item.name))


def _failed(error: OSError, outputs: list[Output]) -> str:
    name = getattr(error, "filename", None)
    for output in outputs:
        if name and output.staging is not None and str(output.staging) in str(name):
            return str(output.path)
    return ", ".join(str(o.path) for o in outputs)
