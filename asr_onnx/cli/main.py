"""The ``asr-onnx`` entry point: one line per error, exit 1 for bad input and 2 for bad usage."""

from __future__ import annotations

import sys

import click

from asr_onnx.cli.bench import bench_command
from asr_onnx.cli.demo import demo_command
from asr_onnx.cli.eval import eval_command
from asr_onnx.cli.inspect import inspect_command
from asr_onnx.cli.repair import repair_command
from asr_onnx.cli.report import report_command
from asr_onnx.cli.search import search_command
from asr_onnx.cli.stats import stats_command
from asr_onnx.cli.sweep import sweep_command
from asr_onnx.cli.verify import verify_command

COMMANDS = {"repair": repair_command, "eval": eval_command, "stats": stats_command,
            "sweep": sweep_command, "demo": demo_command, "inspect": inspect_command,
            "verify": verify_command, "report": report_command, "bench": bench_command,
            "search": search_command}


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="asr-onnx")
def cli():
    """Prune an ONNX CNN in one shot and repair it without training."""


for _name, _command in COMMANDS.items():
    cli.add_command(_command, _name)


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"


MIN_OPEN_FILES = 32  # the heaviest command (a sweep with plots) needs 16 on a small model; onnxruntime's import
# fails below 8, printing its own lines beside ours


def _terminate(signum, frame):
    raise KeyboardInterrupt  # SIGTERM ends a run as SIGINT does: its staging folders are removed on the way out


def check_open_files(needed: int = MIN_OPEN_FILES) -> None:
    """Raises the soft limit on open files to ``needed`` where the hard limit allows, before onnxruntime is
    imported: below a handful, its import prints "Error in cpuinfo" and log lines that no handler can catch.

    Raises:
        AsrError: the hard limit is below ``needed``.
    """
    try:
        import resource
    except ImportError:  # not POSIX
        return
    from asr_onnx.errors import AsrError

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise AsrError(f"the limit on open files (ulimit -n) is {hard}; asr-onnx needs at least {needed}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def main(argv=None) -> int:
    """Runs the CLI; every failure becomes one line on stderr, and so does every warning.

    Args:
        argv: the arguments. Defaults to None: the process's own (``sys.argv``), and then the run is the
            process's: once its outputs are committed, SIGINT and SIGTERM stay ignored until it exits, so
            that a run that wrote its outputs never reports failure. With a list (a caller in Python), the
            signal handlers are as they were when main returns.
    """
    import signal
    import warnings

    warnings.formatwarning = _one_line_warning
    stops = (signal.SIGINT, signal.SIGTERM)
    try:
        previous = {number: signal.getsignal(number) for number in stops}
        signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # not the main thread: signals cannot be caught here
        previous = {}
    try:
        return _run(argv)
    finally:
        committed = signal.getsignal(signal.SIGTERM) is not _terminate  # outputs.Plan(final=True) ignores both
        if previous and not (committed and argv is None):
            for number, handler in previous.items():
                if handler is not None:  # None: a handler not installed from Python, which cannot be put back
                    signal.signal(number, handler)


def _run(argv) -> int:
    from asr_onnx.errors import AsrError
    from asr_onnx.tempdirs import remove_dead_folders

    try:
        check_open_files()
        remove_dead_folders()  # the temporary folders of runs killed by SIGKILL
        cli.main(args=argv, prog_name="asr-onnx", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as e:
        click.echo(e.ctx.get_help() if e.ctx else str(e))
        return 2
    except click.UsageError as e:
        click.echo(f"error: {e.format_message()}", err=True)
        return 2
    except click.exceptions.Exit as e:
        return e.exit_code
    except (click.Abort, KeyboardInterrupt):
        click.echo("error: aborted", err=True)
        return 1
    except AsrError as e:
        click.echo(f"error: {e}", err=True)
        return 1
    except OSError as e:  # the command's own output (eval's table, --json) cannot be written: no traceback
        click.echo(f"error: cannot write the output: {e.strerror or e}", err=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
