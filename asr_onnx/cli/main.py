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
from asr_onnx.cli.stats import stats_command
from asr_onnx.cli.sweep import sweep_command
from asr_onnx.cli.verify import verify_command

COMMANDS = {"repair": repair_command, "eval": eval_command, "stats": stats_command,
            "sweep": sweep_command, "demo": demo_command, "inspect": inspect_command,
            "verify": verify_command, "report": report_command, "bench": bench_command}


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="asr-onnx")
def cli():
    """Prune an ONNX CNN in one shot and repair it without training."""


for _name, _command in COMMANDS.items():
    cli.add_command(_command, _name)


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"


def _terminate(signum, frame):
    raise KeyboardInterrupt  # SIGTERM ends a run as SIGINT does: its staging folders are removed on the way out


def main(argv=None) -> int:
    """Runs the CLI; every failure becomes one line on stderr, and so does every warning."""
    import signal
    import warnings

    warnings.formatwarning = _one_line_warning
    try:
        previous = signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # not the main thread: signals cannot be caught here
        previous = None
    try:
        return _run(argv)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _run(argv) -> int:
    from asr_onnx.errors import AsrError

    try:
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
