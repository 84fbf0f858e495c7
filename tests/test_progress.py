"""Progress off a TTY: one line per stage with its time on stderr, nothing with -q, nothing on a TTY (the
bars are there); issue 29: a run of several minutes printed nothing in a log."""

import json
import re
import sys

from asr_onnx.cli.main import main
from asr_onnx.progress import stage_done

STAGE_LINE = re.compile(r"(\w+) done in (\d+\.\d\d) s")


def test_repair_off_a_tty_prints_each_stage_with_its_time(bn_model, calib_dir, tmp_path, capsys):
    argv = ["repair", str(bn_model), "--calib", str(calib_dir), "--sparsity", "0.5", "--batch-size", "16",
            "--device", "cpu", "-o", str(tmp_path / "out.onnx")]
    assert main([*argv, "--report", str(tmp_path / "r.json")]) == 0
    lines = capsys.readouterr().err.strip().splitlines()
    matches = [STAGE_LINE.fullmatch(line) for line in lines]
    assert lines and all(matches), lines
    timings = json.loads((tmp_path / "r.json").read_text())["timings_s"]
    printed = [m.group(1) for m in matches]
    parts = {"reconstruct_gram", "reconstruct_solve"}  # the refit's own split of its stage, not stages
    assert set(printed) == set(timings) - parts and {"prune", "reconstruct", "measure_dense", "guard", "save"} <= set(printed)
    assert sum(float(m.group(2)) for m in matches) > 0
    assert main([*argv, "-q", "--reconstruct", "none", "--guard", "off"]) == 0  # a cheaper run will do
    assert capsys.readouterr().err == ""


def test_no_stage_line_on_a_tty_or_when_disabled(capsys, monkeypatch):
    stage_done("measure", 1.234)
    assert capsys.readouterr().err == "measure done in 1.23 s\n"
    stage_done("measure", 1.0, enabled=False)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    stage_done("measure", 1.0)
    assert capsys.readouterr().err == ""
