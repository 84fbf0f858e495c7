"""``asr-onnx sweep``: a grid of repairs on one model, as JSON, Markdown and (optionally) plots."""

from __future__ import annotations

import click

from asr_onnx.cli.common import COUNT, NON_NEGATIVE, parse_list, run_options, say


def parse_regimes(recal: str, placement: str) -> tuple:
    from asr_onnx.cli.repair import parse_recal

    regimes = []
    for text in parse_list(recal):
        parse_recal(text)  # checked here; the text travels whole, so that each regime keeps its own momentum
        regimes += [(text, p) for p in parse_list(placement)]
    return tuple(regimes)


@click.command("sweep")
@click.argument("model", type=click.Path())
@click.option("--calib", "calib_path", required=True, help="Calibration data, as for `repair`.")
@click.option("--eval", "eval_path", required=True, help="Evaluation data, as for `eval` (fashion-mnist:test works).")
@click.option("--sparsity", default="0.5,0.7,0.8,0.9,0.95", show_default=True)
@click.option("--pattern", default="global", show_default=True, help="Comma list: global, uniform, N:M.")
@click.option("--method", default="none,bn,lw,naive,asr", show_default=True, help="Comma list; auto allowed.")
@click.option("--recal", "recal_modes", default="exact", show_default=True, help="Comma list: exact, momentum[=M].")
@click.option("--placement", default="recal", show_default=True, help="Comma list: recal, pre-bn.")
@click.option("--lambda-rule", default="median", show_default=True)
@click.option("--no-head", is_flag=True, help="Leave the classifier head uncorrected, as REFLOW does.")
@click.option("--calib-size", default=1024, show_default=True, type=COUNT)
@click.option("--eval-size", type=COUNT, help="Evaluate on a seeded subset of this size. Default: all.")
@click.option("--seed", default=0, show_default=True, type=NON_NEGATIVE)
@click.option("--stats", "stats_path", type=click.Path(), help="Dense statistics from `asr-onnx stats`.")
@click.option("-o", "--output", "out_dir", default="sweep", show_default=True, help="Folder for results and plots.")
@click.option("--plots/--no-plots", default=True, show_default=True, help="PNG plots (needs the plots extra).")
@click.option("--plot-site", help="The site of the channel-variance plot (tensor, layer or short name). "
                                  "Default: the most damaged one.")
@click.option("-q", "--quiet", is_flag=True)
@run_options()
def sweep_command(model, calib_path, eval_path, sparsity, pattern, method, recal_modes, placement, lambda_rule,
                  no_head, calib_size, eval_size, seed, stats_path, out_dir, plots, plot_site, quiet,
                  run):
    """Repair MODEL over a grid and write results.json, results.md and plots."""
    from asr_onnx.measure.cache import load_stats, stats_key
    from asr_onnx.model.files import load_model
    from asr_onnx.outputs import Plan
    from asr_onnx.pipeline.sweep import RESULT_FILES, Grid, run_sweep
    from asr_onnx.prune.masks import Pattern, check_sparsity
    from asr_onnx.report.plots import PLOT_FILES

    plan = Plan(final=True)
    plan.read_model(model)
    plan.read_data(calib_path, "the --calib data")
    plan.read_data(eval_path, "the --eval data")
    plan.read(stats_path, "the --stats file")
    folder = plan.write_folder(out_dir, "-o", RESULT_FILES + (PLOT_FILES if plots else ()))
    plan.check()
    proto = load_model(model)
    grid = Grid(sparsities=tuple(check_sparsity(s) for s in parse_list(sparsity)),
                patterns=tuple(str(Pattern.parse(p)) for p in parse_list(pattern)),
                methods=tuple(parse_list(method)), regimes=parse_regimes(recal_modes, placement),
                lambda_rule=lambda_rule, correct_head=not no_head)
    calib = run.open_data(calib_path, proto, limit=calib_size, seed=seed)
    eval_data = run.open_data(eval_path, proto, limit=eval_size, seed=seed)
    dense_stats = load_stats(stats_path, stats_key(proto, calib)) if stats_path else None

    def show(row):
        if not quiet:
            top1 = f"{100 * row['top1']:.2f}%" if row.get("top1") is not None else "-"
            agreement = f"{100 * row['agreement']:.1f}%" if row.get("agreement") is not None else "-"
            say(f"{row['pattern']:>7} {row['sparsity'] or '-':>5} {row['recal']:>8} {row['placement']:>6} "
                       f"{row['method']:>5}  top-1 {top1}  agreement {agreement}  "
                       f"repair {row['repair_s']:.2f}s")

    result = run_sweep(model, calib, eval_data, grid, batch_size=run.batch_size, device=run.device, progress=not quiet,
                       dense_stats=dense_stats, on_row=show, watch_site=plot_site)
    with plan.staged():  # results and plots appear together, or not at all; the commit is the last act
        written = list(result.write(folder.staged))
        if plots:
            from asr_onnx.report.plots import sweep_plots

            written += sweep_plots(result, folder.staged)
        if not quiet:
            say("wrote " + ", ".join(str(folder.path / p.name) for p in written))
