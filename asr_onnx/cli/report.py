"""``asr-onnx report``: the HTML page of a saved JSON report."""

from __future__ import annotations

import click


@click.command("report")
@click.argument("report_path", metavar="REPORT.json", type=click.Path())
@click.option("-o", "--output", required=True, help="The page to write (.html).")
@click.option("--site", help="The site of the per-channel plot (tensor, layer or short name). "
                             "Default: the most damaged one.")
def report_command(report_path, output, site):
    """Render a JSON report from `repair --report` as one self-contained HTML page."""
    from pathlib import Path

    from asr_onnx.outputs import Plan
    from asr_onnx.report.build import FORMATS
    from asr_onnx.report.html import load_report, write_html

    if FORMATS.get(Path(output).suffix.lower()) != "html":
        raise click.BadParameter(f"{output}: the page must end in .html", param_hint="-o")
    plan = Plan(final=True)
    plan.read(report_path, "the JSON report")
    page = plan.write(output, "-o")
    plan.check()
    report = load_report(report_path)
    with plan.staged():
        write_html(report, page.staged, site=site)
