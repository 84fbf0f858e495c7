"""Issue 6, bad input: the cases tests/test_cli.py does not cover, each a one-line error with exit code 1
that writes nothing and leaves the input as it was; and determinism of the whole run."""

import contextlib
import hashlib
import json
import os
import re

import numpy as np
import onnx
import pytest
from PIL import Image
from zoo import conv_net, random_inputs, slow_except

from asr_onnx.cli.main import main


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def images(folder, count, size=8, seed=0):
    folder.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    return folder


def checker_failing(tmp_path):
    model = conv_net(bn=True)
    model.graph.node[1].input[0] = "nowhere"  # a BN reading a tensor that nothing produces
    path = tmp_path / "broken.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def missing_external(tmp_path):
    path = tmp_path / "ext.onnx"
    onnx.save(conv_net(bn=True), path, save_as_external_data=True, size_threshold=0, location="ext.weights")
    (tmp_path / "ext.weights").unlink()
    return path


def unknown_op(tmp_path):
    """A custom-domain op that onnxruntime has no kernel for: the model cannot be measured."""
    import zoo

    g = zoo.G(1)
    h = g.relu(g.conv(g.node("Mystery", [g.conv("input", 3, 6)], domain="com.example"), 6, 8))
    model = g.model([("input", ["N", 3, 8, 8], None)], g.head(h, 8), out_shape=["N", 5],
                    extra_opsets=[("com.example", 1)])
    onnx.save(model, tmp_path / "mystery.onnx")
    return tmp_path / "mystery.onnx"


def escaping_external(tmp_path):
    """External data whose location climbs out of the model's folder."""
    path = missing_external(tmp_path)
    model = onnx.load(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../elsewhere.bin"
    path.write_bytes(model.SerializeToString())
    return path


def bad_case(name, tmp_path, model, calib):
    """(argv, message) for one bad input."""
    if name == "checker":
        return [str(checker_failing(tmp_path)), "--calib", calib], "fails onnx.checker"
    if name == "external data missing":
        return [str(missing_external(tmp_path)), "--calib", calib], "external data of"
    if name == "external data outside":
        return [str(escaping_external(tmp_path)), "--calib", calib], "outside its folder"
    if name == "non-images":
        (tmp_path / "text").mkdir()
        for i in range(3):
            (tmp_path / "text" / f"{i}.txt").write_text("not an image")
        return [model, "--calib", str(tmp_path / "text")], "no images or .npy/.npz files"
    if name == "corrupt png strict":
        folder = images(tmp_path / "img", 6)
        (folder / "03.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"junk" * 20)
        return [model, "--calib", str(folder), "--strict", "--batch-size", "4"], "corrupt image"
    if name == "wrong image size":
        return [model, "--calib", str(images(tmp_path / "big", 6, size=10)), "--batch-size", "4"], "pass --size"
    if name == "inf data":
        x = random_inputs(16)
        x[5, 1, 2, 3] = np.inf
        (tmp_path / "inf").mkdir()
        np.save(tmp_path / "inf" / "x.npy", x)
        return [model, "--calib", str(tmp_path / "inf")], "NaN or Inf"
    if name == "unknown op":
        return [str(unknown_op(tmp_path)), "--calib", calib, "--batch-size", "16"], "onnxruntime cannot load"
    if name == "n:m with 0":
        return [model, "--calib", calib, "--pattern", "0:4"], "0 < N < M"
    if name == "initializer longer than its dims":
        edited = onnx.load(model)
        edited.graph.initializer[0].raw_data += b"\0" * 64
        onnx.save(edited, tmp_path / "long.onnx")
        return [str(tmp_path / "long.onnx"), "--calib", calib], "does not fit its dims"
    if name == "duplicate node names":
        edited = onnx.load(model)
        edited.graph.node[1].name = edited.graph.node[0].name
        onnx.save(edited, tmp_path / "dup.onnx")
        return [str(tmp_path / "dup.onnx"), "--calib", calib], "node names must be unique"
    if name == "terabyte input":
        edited = onnx.load(model)
        for dim in edited.graph.input[0].type.tensor_type.shape.dim[2:]:
            dim.dim_value = 10**6
        onnx.save(edited, tmp_path / "huge.onnx")
        return [str(tmp_path / "huge.onnx"), "--calib", str(images(tmp_path / "img", 4)), "--resize", "1000000"], \
            "GiB bound"
    if name.startswith("stats "):
        return [model, "--calib", calib, "--batch-size", "16",
                "--stats", str(bad_stats(name[6:], tmp_path, model, calib))], \
            {"nan": "NaN or Inf", "inf": "NaN or Inf", "channels": "channels", "m2 length": "one length",
             "negative m2": "negative", "count": "count"}[name[6:]]
    raise AssertionError(name)


def bad_stats(kind, tmp_path, model, calib):
    """A statistics file with the right key (made by `asr-onnx stats`) whose first entry is then spoilt."""
    path = tmp_path / "s.npz"
    assert main(["stats", model, "--calib", calib, "-o", str(path), "--batch-size", "16", "-q"]) == 0
    arrays = dict(np.load(path))
    spoilt = {"nan": ("0.mean", lambda a: np.where(np.arange(a.size) == 1, np.nan, a)),
              "inf": ("0.m2", lambda a: np.where(np.arange(a.size) == 0, np.inf, a)),
              "channels": ("0.mean", lambda a: a[:-1]), "m2 length": ("0.m2", lambda a: a[:-1]),
              "negative m2": ("0.m2", lambda a: -a), "count": ("0.count", lambda a: np.array(0.0))}
    key, spoil = spoilt[kind]
    if kind == "channels":
        arrays["0.m2"] = arrays["0.m2"][:-1]
    arrays[key] = spoil(arrays[key])
    np.savez(path, **arrays)
    return path


BAD = ["checker", "external data missing", "external data outside", "non-images", "corrupt png strict", "wrong image size", "inf data",
       "n:m with 0", "unknown op", "initializer longer than its dims", "duplicate node names", "terabyte input",
       "stats nan", "stats inf", "stats channels", "stats m2 length", "stats negative m2", "stats count"]


@pytest.mark.parametrize("name", BAD)
def test_bad_input_gives_one_line_and_writes_nothing(name, tmp_path, bn_model, calib_dir, capsys):
    argv, message = bad_case(name, tmp_path, str(bn_model), str(calib_dir))
    out = tmp_path / "out" / "result.onnx"
    out.parent.mkdir()
    inputs = {p: digest(p) for p in tmp_path.rglob("*") if p.is_file()}
    code = main(["repair", *argv, "-o", str(out), "--report", str(out.parent / "r.json"), "-q"])
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert code == 1
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err, err
    assert captured.out == ""  # no graph dump either
    assert list(out.parent.iterdir()) == []
    assert {p: digest(p) for p in tmp_path.rglob("*") if p.is_file()} == inputs


# issue 25: a bound that is not a size is one usage line (status 2), before any work
BAD_BOUNDS = [(["--max-gram-mb", "-1"], "--max-gram-mb"), (["--max-gram-mb", "nan"], "--max-gram-mb"),
              (["--max-gram-mb", "inf"], "--max-gram-mb")]


@pytest.mark.parametrize(("option", "message"), BAD_BOUNDS)
def test_a_bound_that_is_not_a_size_is_one_usage_line(option, message, bn_model, calib_dir, tmp_path, capsys):
    out = tmp_path / "out.onnx"
    code = main(["repair", str(bn_model), "--calib", str(calib_dir), "--reconstruct", "ls", "-o", str(out), *option])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: ") and message in err, err
    assert not out.exists()


def test_corrupt_png_is_skipped_with_a_warning(tmp_path, bn_model):
    folder = images(tmp_path / "img", 6)
    (folder / "03.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"junk" * 20)
    out = tmp_path / "out.onnx"
    with pytest.warns(UserWarning, match="skipping corrupt image .*03.png"):
        code = main(["repair", str(bn_model), "--calib", str(folder), "-o", str(out), "--batch-size", "4",
                     "--report", str(tmp_path / "r.json"), "-q"])
    assert code == 0 and out.exists()
    assert json.loads((tmp_path / "r.json").read_text())["settings"]["calib_size"] == 5


@pytest.mark.parametrize("where", ["missing", "read-only", "a folder"])
def test_unwritable_output_folder(where, tmp_path, bn_model, calib_dir, capsys, monkeypatch):
    if where == "missing":
        out, message = tmp_path / "no" / "such" / "out.onnx", "does not exist"
    elif where == "a folder":
        (tmp_path / "taken.onnx").mkdir()
        out, message = tmp_path / "taken.onnx", "is a folder"
    else:
        (tmp_path / "ro").mkdir()
        out, message = tmp_path / "ro" / "out.onnx", "not writable"
        real = os.access  # root writes anywhere, so the permission check itself is what is tested
        monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(out.parent) else real(p, mode))
    before = sorted(p.name for p in tmp_path.rglob("*"))
    assert main(["repair", str(bn_model), "--calib", str(calib_dir), "-o", str(out), "-q"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_overwrite_replaces_the_input_and_leaves_no_temporary_file(bn_model, calib_dir):
    before = bn_model.read_bytes()
    code = main(["repair", str(bn_model), "--calib", str(calib_dir), "-o", str(bn_model), "--overwrite",
                 "--batch-size", "16", "-q"])
    assert code == 0 and bn_model.read_bytes() != before
    onnx.checker.check_model(str(bn_model))
    assert sorted(p.name for p in bn_model.parent.iterdir()) == sorted(["bn.onnx", "calib"])


@pytest.mark.slow  # bit-for-bit repeatability also holds in the search's and Ray's tests, which run by default
def test_same_inputs_give_identical_model_and_report(bn_model, calib_dir, tmp_path):
    runs = []
    for name in ("a", "b"):
        out, report = tmp_path / f"{name}.onnx", tmp_path / f"{name}.json"
        argv = ["repair", str(bn_model), "--calib", str(calib_dir), "-o", str(out), "--report", str(report),
                "--method", "asr", "--sparsity", "0.7", "--calib-size", "40", "--seed", "3", "--batch-size", "16",
                "--device", "cpu", "-q"]
        assert main(argv) == 0
        data = json.loads(report.read_text())
        del data["timings_s"], data["settings"]["guard"]["cost_s"]
        runs.append((out.read_bytes(), data))
    assert runs[0][0] == runs[1][0]
    assert runs[0][1] == runs[1][1]
    other = tmp_path / "c.onnx"  # and the seed matters: a different subset gives a different model
    assert main(["repair", str(bn_model), "--calib", str(calib_dir), "-o", str(other), "--method", "asr",
                 "--sparsity", "0.7", "--calib-size", "40", "--seed", "4", "--batch-size", "16", "-q"]) == 0
    assert other.read_bytes() != runs[0][0]


# ---------------------------------------------------------------- issue 14: no model runs code


def test_a_hook_in_model_metadata_never_runs(tmp_path, capsys):
    """Issue 14.1: metadata may only carry data; a hook it names is refused, and never imported."""
    marker = tmp_path / "ran"
    hook = tmp_path / "evil.py"
    hook.write_text(f"open({str(marker)!r}, 'w').close()\ndef prep(image, spec):\n    return image\n")
    model = conv_net(bn=True)
    onnx.helper.set_model_props(model, {"asr_onnx.preprocess": json.dumps({"hook": f"{hook}:prep"})})
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    folder = images(tmp_path / "img", 16)
    runs = [["repair", str(path), "--calib", str(folder), "-o", str(tmp_path / "o.onnx"), "--batch-size", "8"],
            ["stats", str(path), "--calib", str(folder), "-o", str(tmp_path / "s.npz"), "--batch-size", "8"],
            ["eval", str(path), "--data", str(folder), "--reference", str(path)],
            ["verify", str(path), "--reference", str(path), "--data", str(folder)]]
    for argv in runs:
        assert main([*argv, "-q"] if argv[0] in ("repair", "stats") else argv) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "names a hook" in err and "--preprocess" in err, err
    assert not marker.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.py", "img", "m.onnx"]


# ---------------------------------------------------------------- issue 14: outputs never alias inputs


@pytest.fixture
def inputs(tmp_path):
    """A model with external data named as a default output's ``.data`` would be, calibration data, an
    evaluation set and valid statistics: every kind of file a command reads. Returns (folder, paths)."""
    folder = tmp_path / "in"
    folder.mkdir()
    onnx.save(conv_net(bn=False), folder / "m.onnx", save_as_external_data=True, size_threshold=0,
              location="aim.onnx.data")
    (folder / "calib").mkdir()
    np.save(folder / "calib" / "x.npy", random_inputs(32))
    np.savez(folder / "eval.npz", x=random_inputs(16, seed=1), y=np.arange(16) % 5)
    assert main(["stats", str(folder / "m.onnx"), "--calib", str(folder / "calib"), "-o", str(folder / "s.npz"),
                 "--batch-size", "16", "-q"]) == 0
    assert main(["repair", str(folder / "m.onnx"), "--calib", str(folder / "calib"), "-o", str(folder / "rep.onnx"),
                 "--report", str(folder / "r.json"), "--batch-size", "16", "-q"]) == 0
    (folder / "link.onnx").symlink_to(folder / "m.onnx")
    (folder / "r.html").symlink_to(folder / "r.json")  # `report -o` takes only .html names, --report .json
    for name, target in (("m.json", "m.onnx"), ("w.json", "aim.onnx.data"), ("x.json", "calib/x.npy"),
                         ("s.json", "s.npz")):
        (folder / name).symlink_to(folder / target)
    return folder


def commands(folder):
    """Each subcommand that writes, with a path option as the placeholder {}, and the files it reads."""
    model, calib, stats = str(folder / "m.onnx"), str(folder / "calib"), str(folder / "s.npz")
    model_files = ["m.onnx", "aim.onnx.data", "calib/../m.onnx", "link.onnx"]  # also through `..` and a symlink
    calib_files = ["calib/x.npy", "calib", "calib/new.onnx"]  # nothing may be written inside a data folder
    repair = ["repair", model, "--calib", calib, "--stats", stats, "--batch-size", "16"]
    return {
        # aim.onnx is new, but the model's weights are its .data
        "repair -o": ([*repair, "-o", "{}"], [*model_files, *calib_files, "s.npz", "aim.onnx"]),
        "repair --report": ([*repair, "-o", str(folder.parent / "ok.onnx"), "--report", "{}"],
                            [*model_files, *calib_files, "s.npz", "m.json", "w.json", "x.json", "s.json",
                             "calib/new.json"]),
        "stats -o": (["stats", model, "--calib", calib, "--batch-size", "16", "-o", "{}"],
                     [*model_files, *calib_files]),
        "sweep -o": (["sweep", model, "--calib", calib, "--eval", str(folder / "eval.npz"), "--stats", stats,
                      "--sparsity", "0.5", "--method", "bn", "--batch-size", "16", "--no-plots", "-o", "{}"],
                     [*model_files, *calib_files, "s.npz", "eval.npz"]),
        "report -o": (["report", str(folder / "r.json"), "-o", "{}"], ["r.html", "calib/../r.html"]),
    }


def snapshot(folder):
    return {p: (digest(p) if p.is_file() else None) for p in sorted(folder.parent.rglob("*"))}


# every command goes through the same outputs.Plan: repair --report, which aims at the most inputs, runs by default
@pytest.mark.parametrize("command", slow_except(["repair -o", "repair --report", "stats -o", "sweep -o", "report -o"],
                                                ("repair --report",)))
def test_no_path_option_aimed_at_an_input_writes_anything(command, inputs, capsys):
    """Issue 14.2: every subcommand with every path option aimed at every input file (and spelt through
    `..` or a symlink) is refused with one line, and every input stays byte-identical."""
    before = snapshot(inputs)
    template, targets = commands(inputs)[command]
    for target in targets:
        code = main([*(str(inputs / target) if a == "{}" else a for a in template), "-q"])
        err = capsys.readouterr().err.strip()
        # 1: the path conflict; 2: a name the option refuses anyway (--report m.onnx is not .json or .html)
        assert code in (1, 2) and len(err.splitlines()) == 1 and err.startswith("error: "), (target, err)
        assert snapshot(inputs) == before, target


@pytest.mark.parametrize(("argv", "message"), [
    (["-o", "{out}/same.json", "--report", "{out}/same.json"], "both write"),
    (["-o", "{out}/x.onnx", "--report", "{out}/alias.json"], "both write"),  # alias.json -> x.onnx
    (["-o", "{out}/x.onnx", "--report", "{out}/missing/r.json"], "does not exist"),
    (["-o", "{out}/x.onnx", "--report", "{out}/taken.json"], "is a folder"),
])
def test_two_outputs_that_collide_or_cannot_be_written_are_refused_before_any_work(argv, message, bn_model, calib_dir,
                                                                                  tmp_path, capsys):
    """Issue 14.2/14.3: --report equal to -o (or a symlink to it), or into a missing folder or onto a folder."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "alias.json").symlink_to(out / "x.onnx")
    (out / "taken.json").mkdir()
    argv = [a.format(out=out) for a in argv]
    assert main(["repair", str(bn_model), "--calib", str(calib_dir), "--batch-size", "16", *argv, "-q"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert sorted(p.name for p in out.iterdir()) == ["alias.json", "taken.json"]


def test_a_report_that_fails_after_the_model_is_staged_leaves_nothing(bn_model, calib_dir, tmp_path, capsys,
                                                                      monkeypatch):
    """Issue 14.3: a full disk while the report is written: neither the model nor the report appears."""
    import errno

    import asr_onnx.report.build

    def full(report, path):
        path.write_bytes(b"{")
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(asr_onnx.report.build, "write_json", full)
    out = tmp_path / "out"
    out.mkdir()
    code = main(["repair", str(bn_model), "--calib", str(calib_dir), "--batch-size", "16", "-o", str(out / "m.onnx"),
                 "--report", str(out / "r.json"), "-q"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1 and "No space left" in err, err
    assert list(out.iterdir()) == []


def test_overwrite_may_replace_the_model_and_its_weights_but_never_the_report_onto_them(inputs, capsys):
    model = inputs / "m.onnx"
    before = snapshot(inputs)
    assert main(["repair", str(model), "--calib", str(inputs / "calib"), "--batch-size", "16", "-o", str(model),
                 "--overwrite", "--report", str(inputs / "m.json"), "-q"]) == 1  # m.json -> m.onnx
    assert "--report" in capsys.readouterr().err and snapshot(inputs) == before
    assert main(["repair", str(model), "--calib", str(inputs / "calib"), "--batch-size", "16", "-o", str(model),
                 "--overwrite", "-q"]) == 0
    onnx.checker.check_model(str(model))


# ---------------------------------------------------------------- issue 14: signals and stdout


def cli(args, **kwargs):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "asr_onnx.cli.main", *args], text=True, timeout=120, **kwargs)


def test_a_staging_folder_left_by_sigkill_is_removed_by_the_next_run(bn_model, calib_dir, tmp_path):
    """Issue 14.4: leftovers are named ``.<name>.<pid>.asr-staging``; a dead pid's are removed, a live
    writer's are kept."""
    import os

    out = tmp_path / "out"
    out.mkdir()
    dead, live = out / ".m.onnx.4194305.asr-staging", out / f".m.onnx.{os.getppid()}.asr-staging"
    for folder in (dead, live):
        folder.mkdir()
        (folder / "m.onnx").write_bytes(b"half")
    assert main(["repair", str(bn_model), "--calib", str(calib_dir), "--batch-size", "16", "-o", str(out / "m.onnx"),
                 "-q"]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(["m.onnx", live.name])


def test_sigterm_while_outputs_are_staged_leaves_nothing(bn_model, calib_dir, tmp_path):
    """Issue 14.4: SIGTERM is handled as SIGINT: exit 1, one line, no output and no staging folder."""
    import signal
    import subprocess
    import sys

    out = tmp_path / "out"
    out.mkdir()
    slow_report = ("import sys, time\nimport asr_onnx.report.build as r\nreal = r.write_json\n"
                   "def slow(report, path):\n    real(report, path)\n    print('staged', flush=True)\n"
                   "    time.sleep(60)\nr.write_json = slow\nfrom asr_onnx.cli.main import main\n"
                   "sys.exit(main(sys.argv[1:]))\n")
    child = subprocess.Popen([sys.executable, "-c", slow_report, "repair", str(bn_model), "--calib", str(calib_dir),
                              "--batch-size", "16", "-o", str(out / "m.onnx"), "--report", str(out / "r.json"), "-q"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "staged"
        assert any(p.name.endswith(".asr-staging") for p in out.iterdir())
        child.send_signal(signal.SIGTERM)
        _, err = child.communicate(timeout=60)
    finally:
        child.kill()
    assert child.returncode == 1 and err.strip() == "error: aborted", err
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("stdout", slow_except(["/dev/full", "closed"], ("closed",)))
def test_a_summary_that_cannot_be_printed_never_fails_a_repair(stdout, bn_model, calib_dir, tmp_path):
    """Issue 14.5: the repair succeeded, so it exits 0 with its model, and no onnxruntime error is claimed."""
    import os

    out = tmp_path / "m.onnx"
    argv = ["repair", str(bn_model), "--calib", str(calib_dir), "--batch-size", "16", "-o", str(out)]
    if stdout == "closed":
        result = cli(argv, stderr=-1, stdout=None, preexec_fn=lambda: os.close(1))
    else:
        with open(stdout, "w") as full:
            result = cli(argv, stderr=-1, stdout=full)
    assert result.returncode == 0 and "onnxruntime" not in result.stderr and "Traceback" not in result.stderr, \
        result.stderr
    onnx.checker.check_model(str(out))


@pytest.mark.parametrize("command", ["eval", "verify"])
def test_a_reference_whose_outputs_differ_in_shape_is_one_line(command, tmp_path, calib_dir, capsys):
    """Issue 14.7: a 10-class model against a 7-class reference cannot be compared."""
    model, reference = tmp_path / "m.onnx", tmp_path / "ref.onnx"
    onnx.save(conv_net(bn=True), model)
    onnx.save(conv_net(bn=True, classes=7), reference)
    argv = {"eval": ["eval", str(model), "--data", str(calib_dir), "--reference", str(reference)],
            "verify": ["verify", str(model), "--reference", str(reference), "--data", str(calib_dir)]}[command]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot be compared" in err, err


@pytest.mark.parametrize("command", ["eval", "verify"])
def test_a_model_onnxruntime_cannot_load_is_one_line_in_eval_and_verify(command, tmp_path, calib_dir, capsys):
    model = str(unknown_op(tmp_path))
    argv = {"eval": ["eval", model, "--data", str(calib_dir), "--reference", model],
            "verify": ["verify", model, "--reference", model, "--data", str(calib_dir)]}[command]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "onnxruntime cannot load the model" in err, err


def test_a_result_that_cannot_be_printed_is_one_line_with_status_1(bn_model, calib_dir):
    """eval's table is its product: to /dev/full it fails, but with one line and no traceback."""
    with open("/dev/full", "w") as full:
        result = cli(["eval", str(bn_model), "--data", str(calib_dir), "--reference", str(bn_model)], stdout=full,
                     stderr=-1)
    assert result.returncode == 1 and result.stderr.strip() == "error: cannot write the output: No space left on device"


# ---------------------------------------------------------------- issue 25: the second round


@pytest.mark.parametrize("limit", slow_except(["hard", "soft"], ("soft",)))
def test_a_low_limit_on_open_files_is_our_one_line_and_never_onnxruntimes(limit, bn_model, calib_dir, tmp_path):
    """With `ulimit -n 6`, importing onnxruntime prints "Error in cpuinfo" and log lines beside the error.
    A hard limit that low is refused before the import; a soft one is raised, and the run goes on."""
    import resource

    hard = 6 if limit == "hard" else resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    out = tmp_path / "m.onnx"
    result = cli(["repair", str(bn_model), "--calib", str(calib_dir), "--batch-size", "16", "-o", str(out), "-q"],
                 capture_output=True, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (6, hard)))
    if limit == "hard":
        assert result.returncode == 1 and not out.exists()
        assert result.stderr == "error: the limit on open files (ulimit -n) is 6; asr-onnx needs at least 32\n", \
            result.stderr
    else:
        assert result.returncode == 0 and result.stderr == "" and out.exists(), result.stderr


NODES = {"null": (1, 3), "full": (1, 7), "zero": (1, 5)}  # character devices: the numbers of /dev/null, full, zero


def make_node(path, kind):
    """A copy of /dev/null, /dev/full or /dev/zero made with mknod, or a FIFO; skips without root."""
    import stat

    if kind == "fifo":
        os.mkfifo(path)
        return path
    try:
        os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(*NODES[kind]))
    except PermissionError:
        pytest.skip("mknod needs root (CAP_MKNOD)")
    return path


def node_state(path):
    """What must not change about a node: its inode, type and device number."""
    info = os.lstat(path)
    return info.st_ino, info.st_mode, info.st_rdev


def output_cases(folder, other):
    """Every output option, as (argv with the node's place as {}, the node's name, what the node is in that place):
    "named" for the path the option names (the null device discards it), "inside" for a file the output would
    write beside or inside it (never replaced, whatever it is)."""
    model, calib, stats = str(folder / "m.onnx"), str(folder / "calib"), str(folder / "s.npz")
    repair = ["repair", model, "--calib", calib, "--stats", stats, "--batch-size", "16"]
    sweep = ["sweep", model, "--calib", calib, "--eval", str(folder / "eval.npz"), "--sparsity", "0.5",
             "--method", "bn", "--batch-size", "16", "--no-plots"]
    return {
        "repair -o": ([*repair, "-o", "{}"], "m.onnx", "named"),
        "repair -o, its .data": ([*repair, "-o", "{}"], "m.onnx.data", "inside"),
        "repair --report .json": ([*repair, "-o", str(other / "ok.onnx"), "--report", "{}"], "r.json", "named"),
        "stats -o": (["stats", model, "--calib", calib, "--batch-size", "16", "-o", "{}"], "s.npz", "named"),
        "sweep -o": ([*sweep, "-o", "{}"], "sweep", "named"),
        "sweep -o, its results.json": ([*sweep, "-o", "{}"], "sweep/results.json", "inside"),
        "report -o": (["report", str(folder / "r.json"), "-o", "{}"], "page.html", "named"),
        "-o through a symlink": ([*repair, "-o", "{}"], "link.onnx", "named"),
    }


@pytest.fixture(scope="module")
def workbench(tmp_path_factory):
    """A model, calibration data, an evaluation set, its statistics and a JSON report: every kind of input,
    made once for the tables below (which never write into it)."""
    folder = tmp_path_factory.mktemp("workbench")
    onnx.save(conv_net(bn=True), folder / "m.onnx")
    (folder / "calib").mkdir()
    np.save(folder / "calib" / "x.npy", random_inputs(32))
    np.savez(folder / "eval.npz", x=random_inputs(16, seed=1), y=np.arange(16) % 5)
    assert main(["stats", str(folder / "m.onnx"), "--calib", str(folder / "calib"), "-o", str(folder / "s.npz"),
                 "--batch-size", "16", "-q"]) == 0
    assert main(["repair", str(folder / "m.onnx"), "--calib", str(folder / "calib"), "-o", str(folder / "rep.onnx"),
                 "--report", str(folder / "r.json"), "--batch-size", "16", "-q"]) == 0
    return folder


OUTPUT_OPTIONS = ["repair -o", "repair -o, its .data", "repair --report .json", "stats -o",
                  "sweep -o", "sweep -o, its results.json", "report -o", "-o through a symlink"]


@pytest.mark.parametrize("kind", ["null", "full", "fifo"])
@pytest.mark.parametrize("option", slow_except(OUTPUT_OPTIONS, ("repair -o", "report -o")))
def test_a_device_or_fifo_named_as_an_output_is_never_replaced(option, kind, workbench, tmp_path, capsys):
    """Issue 25: a copy of /dev/full or a FIFO as any output is refused with one line; a copy of /dev/null as
    the path an option names discards that output. The node stays as it was, and nothing is written beside it."""
    devices, other = tmp_path / "dev", tmp_path / "other"
    devices.mkdir()
    other.mkdir()
    template, name, place = output_cases(workbench, other)[option]
    node = devices / name
    node.parent.mkdir(exist_ok=True)
    make_node(devices / "target" if option.endswith("symlink") else node, kind)
    if option.endswith("symlink"):
        node.symlink_to(devices / "target")
    aimed = devices / ("m.onnx" if option == "repair -o, its .data" else name.split("/")[0])
    before, inputs = {p: node_state(p) for p in devices.rglob("*")}, snapshot(workbench / "calib")
    code = main([*(str(aimed) if a == "{}" else a for a in template), *(["-q"] if template[0] != "report" else [])])
    err = capsys.readouterr().err.strip()
    assert {p: node_state(p) for p in devices.rglob("*")} == before, option  # the node, and nothing new beside it
    assert snapshot(workbench / "calib") == inputs
    if kind == "null" and place == "named":
        assert code == 0 and err == "", err
    else:
        what = "a FIFO" if kind == "fifo" else "a character device"
        assert code == 1 and len(err.splitlines()) == 1 and err.startswith("error: ") and what in err, err
        assert list(other.iterdir()) == []  # refused before any work: the other outputs are not written either


def test_write_file_follows_a_symlink_discards_to_the_null_device_and_refuses_any_other_device(tmp_path):
    """The API's atomic writer (reports, pages, statistics, plots) keeps the same rules as a Plan."""
    from asr_onnx.errors import AsrError
    from asr_onnx.outputs import write_file

    null, full, fifo = (make_node(tmp_path / name, name) for name in ("null", "full", "fifo"))
    states = {p: node_state(p) for p in (null, full, fifo)}
    assert write_file(null, lambda handle: handle.write(b"gone")) == null
    for node, what in ((full, "a character device"), (fifo, "a FIFO")):
        with pytest.raises(AsrError, match=what):
            write_file(node, lambda handle: handle.write(b"never"))
    assert {p: node_state(p) for p in states} == states
    (tmp_path / "real.json").write_text("old")
    (tmp_path / "link.json").symlink_to(tmp_path / "real.json")
    write_file(tmp_path / "link.json", lambda handle: handle.write(b"new"))
    assert (tmp_path / "link.json").is_symlink() and (tmp_path / "real.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo", "full", "link.json", "null", "real.json"]


class Blocked(BaseException):
    """Not an Exception (nor an OSError), so that no handler of the tool can turn it into an error line."""


@contextlib.contextmanager
def bounded(seconds=20, memory=2**30):
    """A FIFO read blocks and /dev/zero never ends: a tool that reads them fails this test (Blocked, or a
    MemoryError past ``memory`` more bytes of address space) instead of hanging it or eating the machine."""
    import re
    import resource
    import signal

    def expired(signum, frame):
        raise Blocked(f"still running after {seconds} s")

    used = int(re.search(r"VmSize:\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    previous = signal.signal(signal.SIGALRM, expired)
    resource.setrlimit(resource.RLIMIT_AS, (used + memory, hard))
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def input_cases(folder):
    """Every input a command reads, as (argv with the node's place as {}, the node's name)."""
    model, calib, data, stats = (str(folder / name) for name in ("m.onnx", "calib", "eval.npz", "s.npz"))
    repair = ["repair", "{m}", "--calib", "{c}", "--stats", "{s}", "--eval", "{e}", "--batch-size", "16", "-q"]
    sweep = ["sweep", "{m}", "--calib", "{c}", "--eval", "{e}", "--stats", "{s}", "--sparsity", "0.5", "--method",
             "bn", "--batch-size", "16", "--no-plots", "-q"]
    cases = {
        "repair MODEL": (repair, "m", "m.onnx"), "repair --calib": (repair, "c", "x.npy"),
        "repair --stats": (repair, "s", "s.npz"), "repair --eval": (repair, "e", "eval.npz"),
        "stats MODEL": (["stats", "{m}", "--calib", "{c}", "-q"], "m", "m.onnx"),
        "stats --calib": (["stats", "{m}", "--calib", "{c}", "-q"], "c", "x.npy"),
        "sweep MODEL": (sweep, "m", "m.onnx"), "sweep --calib": (sweep, "c", "x.npy"),
        "sweep --eval": (sweep, "e", "eval.npz"), "sweep --stats": (sweep, "s", "s.npz"),
        "eval MODEL": (["eval", "{m}", "--data", "{e}"], "m", "m.onnx"),
        "eval --data": (["eval", "{m}", "--data", "{e}"], "e", "eval.npz"),
        "eval --reference": (["eval", "{m}", "--data", "{c}", "--reference", "{r}"], "r", "ref.onnx"),
        "verify MODEL": (["verify", "{m}", "--reference", "{r}", "--data", "{c}"], "m", "m.onnx"),
        "verify --reference": (["verify", "{m}", "--reference", "{r}", "--data", "{c}"], "r", "ref.onnx"),
        "verify --data": (["verify", "{m}", "--reference", "{r}", "--data", "{c}"], "c", "x.npy"),
        "inspect MODEL": (["inspect", "{m}"], "m", "m.onnx"),
        "bench MODEL": (["bench", "{m}", "--runs", "1", "--warmup", "0"], "m", "m.onnx"),
        "bench --reference": (["bench", "{m}", "--reference", "{r}", "--runs", "1", "--warmup", "0"], "r", "ref.onnx"),
        "report REPORT.json": (["report", "{j}", "-o", "{out}/page.html"], "j", "r.json"),
    }
    defaults = {"m": model, "c": calib, "s": stats, "e": data, "r": model, "j": str(folder / "r.json")}
    return cases, defaults


INPUTS = ["repair MODEL", "repair --calib", "repair --stats", "repair --eval", "stats MODEL", "stats --calib",
          "sweep MODEL", "sweep --calib", "sweep --eval", "sweep --stats", "eval MODEL", "eval --data",
          "eval --reference", "verify MODEL", "verify --reference", "verify --data", "inspect MODEL", "bench MODEL",
          "bench --reference", "report REPORT.json"]


@pytest.mark.parametrize("kind", ["fifo", "zero"])
@pytest.mark.parametrize("case", INPUTS)
def test_an_input_that_is_a_fifo_or_a_device_is_refused_before_it_is_read(case, kind, workbench, tmp_path, capsys):
    """Issue 25: a FIFO as any input blocked the run, and /dev/zero was read until the memory ran out: each is
    one line, before anything opens it, and nothing is written."""
    cases, paths = input_cases(workbench)
    template, slot, name = cases[case]
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    node = make_node(tmp_path / "in" / name, kind)
    paths = {**paths, slot: str(node), "out": str(tmp_path / "out")}
    argv = [a.format(**paths) for a in template]
    if template[0] in ("repair", "stats", "sweep"):
        argv += ["-o", str(tmp_path / "out" / {"repair": "o.onnx", "stats": "s.npz", "sweep": "sweep"}[template[0]])]
    with bounded():
        code = main(argv)
    err = capsys.readouterr().err.strip()
    what = "a FIFO" if kind == "fifo" else "a character device"
    assert code == 1 and len(err.splitlines()) == 1 and err.startswith("error: ") and what in err, err
    assert str(node) in err
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize("kind", ["fifo", "zero"])
def test_external_data_that_is_a_fifo_or_a_device_is_refused(kind, tmp_path, calib_dir, capsys):
    path = missing_external(tmp_path)  # its weights belong in ext.weights, which is a node here
    make_node(tmp_path / "ext.weights", kind)
    for argv in (["repair", str(path), "--calib", str(calib_dir), "-o", str(tmp_path / "o.onnx"), "-q"],
                 ["inspect", str(path)]):
        with bounded():
            assert main(argv) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "ext.weights" in err and ("a FIFO" if kind == "fifo" else "device") in err, err
    assert not (tmp_path / "o.onnx").exists()


def signalled_run(moment, signal_name, argv):
    """Runs the CLI in a child that sends itself ``signal_name`` at ``moment``: "summary" (while the summary is
    printed, before the commit), "first rename", "between renames" (after the model's, before the report's) or
    "after the renames" (the report's done, the run not yet over)."""
    import subprocess
    import sys

    script = f"""
import os, signal, sys
import asr_onnx.cli.common as common
import asr_onnx.outputs as outputs
moment, number, renames = {moment!r}, signal.{signal_name}, []
say, commit = common.say, outputs._commit
def send():
    os.kill(os.getpid(), number)
def say_then_signal(text):
    say(text)
    if moment == "summary" and text.startswith("wrote"):
        send()
def commit_with_signal(output):
    if output.what not in ("-o", "--report"):  # the plan of save_model, inside the command's staging folder
        return commit(output)
    if moment == "first rename" and not renames or moment == "between renames" and len(renames) == 1:
        send()
    commit(output)
    renames.append(output)
    if moment == "after the renames" and len(renames) == 2:
        send()
common.say, outputs._commit = say_then_signal, commit_with_signal
from asr_onnx.cli.main import main
sys.exit(main(sys.argv[1:]))
"""
    return subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(("moment", "signal_name"), [
    ("summary", "SIGINT"), pytest.param("first rename", "SIGINT", marks=pytest.mark.slow),
    pytest.param("between renames", "SIGINT", marks=pytest.mark.slow), ("between renames", "SIGTERM"),
    pytest.param("after the renames", "SIGINT", marks=pytest.mark.slow)])
def test_a_signal_never_leaves_a_run_that_reports_failure_with_its_outputs(moment, signal_name, bn_model, calib_dir,
                                                                           tmp_path):
    """Issue 25: a SIGINT in the last moments of a run exited 130 with "wrote" printed and its outputs in place.
    The summary comes before the commit, and the commit is the run's last act: a signal before it ends the run
    with nothing written; one during or after it is ignored, and the run succeeds."""
    out = tmp_path / "out"
    out.mkdir()
    result = signalled_run(moment, signal_name, ["repair", str(bn_model), "--calib", str(calib_dir), "--batch-size",
                                                 "16", "--guard", "fallback", "-o", str(out / "m.onnx"),
                                                 "--report", str(out / "r.json")])
    assert "wrote" in result.stdout
    # off a TTY each stage says it is done on stderr (progress.stage_done); everything else there is an error
    stderr = "".join(line for line in result.stderr.splitlines(True) if not re.fullmatch(r"\w+ done in [\d.]+ s\n?", line))
    if moment == "summary":
        assert result.returncode == 1 and stderr.strip() == "error: aborted", result.stderr
        assert list(out.iterdir()) == []
    else:
        assert result.returncode == 0 and stderr == "", result.stderr
        assert sorted(p.name for p in out.iterdir()) == ["m.onnx", "r.json"]
        onnx.checker.check_model(str(out / "m.onnx"))


def test_a_plan_of_the_api_defers_a_signal_until_every_output_is_renamed(tmp_path):
    """Outside the command line (Plan(final=False)) a signal during the commit arrives once it is complete."""
    import signal

    import asr_onnx.outputs as outputs

    plan = outputs.Plan()
    first, second = plan.write(tmp_path / "a.txt", "a"), plan.write(tmp_path / "b.txt", "b")
    plan.check()
    real_commit = outputs._commit

    def commit(output):
        if output is first:
            os.kill(os.getpid(), signal.SIGINT)
        real_commit(output)

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(outputs, "_commit", commit)
                with plan.staged():
                    first.staged.write_text("a")
                    second.staged.write_text("b")
    finally:
        signal.signal(signal.SIGINT, previous)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt"]


def test_main_called_from_python_gives_back_the_signal_handlers(bn_model, calib_dir, tmp_path):
    """A committed run ignores SIGINT and SIGTERM to its end; a Python caller gets its handlers back."""
    import signal

    before = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    assert main(["repair", str(bn_model), "--calib", str(calib_dir), "--batch-size", "16", "-o",
                 str(tmp_path / "m.onnx"), "-q"]) == 0
    assert {number: signal.getsignal(number) for number in before} == before


def test_a_refit_folder_left_by_sigkill_is_removed_by_the_next_run(bn_model, tmp_path, monkeypatch):
    """Issue 25: a refit killed by SIGKILL left its frontier folder in $TMPDIR for good. Its folders now name
    their process, and every run removes those of processes that are gone, never a live one's or another
    user's."""
    import subprocess
    import sys
    import tempfile

    temp = tmp_path / "tmp"
    temp.mkdir()
    child = ("import os, signal, numpy as np\nfrom asr_onnx.refit.frontier import BatchStore\nstore = BatchStore(0)\n"
             "store.put(0, {'x': np.zeros(1000, np.float32)})\nprint(store._folder.name, flush=True)\n"
             "os.kill(os.getpid(), signal.SIGKILL)\n")
    killed = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "TMPDIR": str(temp)})
    assert killed.returncode == -9
    left = temp / os.path.basename(killed.stdout.strip())
    assert left.is_dir() and any(left.iterdir())  # the array it wrote is still there
    live = temp / f"asr-onnx-frontier.{os.getppid()}.live0001"
    others = temp / "asr-onnx-frontier.4194305.other001"  # a pid that no process has, but another user's folder
    unrelated = temp / "asr-onnx-frontier.4194305"  # not a name this tool makes
    for folder in (live, others, unrelated):
        folder.mkdir()
    if os.geteuid() == 0:
        os.chown(others, 4242, 4242)
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    assert main(["inspect", str(bn_model)]) == 0
    kept = [live, unrelated] + ([others] if os.geteuid() == 0 else [])
    assert sorted(temp.iterdir()) == sorted(kept)


def wide_input(tmp_path, dims=(3, 100000, 100000)):
    model = conv_net(bn=True)
    for dim, value in zip(model.graph.input[0].type.tensor_type.shape.dim[1:], dims, strict=True):
        dim.dim_value = value
    path = tmp_path / "wide.onnx"
    path.write_bytes(model.SerializeToString())  # onnx.save would run no checks either: the graph is not run
    return path


@pytest.mark.parametrize(("case", "code", "message"), [
    ("3x100000x100000 input", 1, "one sample is too large"),
    ("--batch-size 1000000000", 1, "pass a smaller --batch-size"),
    ("--batch-size 1e9", 2, "not a valid integer"),
])
def test_bench_refuses_a_batch_the_machine_cannot_hold_before_allocating_it(case, code, message, bn_model, tmp_path,
                                                                            capsys):
    """Issue 25: the random batch of `bench` is bounded by the memory available before it is drawn."""
    model = wide_input(tmp_path) if case.endswith("input") else bn_model
    argv = ["bench", str(model), "--runs", "1", "--warmup", "0"] + (case.split() if case.startswith("--") else [])
    with bounded():
        assert main(argv) == code
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err and captured.out == "", err


def test_the_bench_batch_may_take_a_quarter_of_the_available_memory():
    from asr_onnx.calib import InputSpec
    from asr_onnx.errors import AsrError
    from asr_onnx.verify.timing import check_feed_size

    specs = [InputSpec("image", ("N", 3, 8, 8), np.dtype(np.float32)), InputSpec("mask", ("N", 1, 8, 8),
                                                                                 np.dtype(np.float16))]
    size = 5 * (3 * 64 * 4 + 64 * 2)  # both inputs, 5 samples
    assert check_feed_size(specs, 5, available=4 * size) == size
    with pytest.raises(AsrError, match=r"\(image 5x3x8x8, mask 5x1x8x8\) takes 4\.4 KiB, over a quarter of the 17\.5 KiB"):
        check_feed_size(specs, 5, available=4 * size - 1)


@pytest.mark.parametrize("case", ["IDX labels", "--preprocess hook file"])
def test_a_fifo_beside_the_data_is_refused_too(case, tmp_path, capsys):
    """The files that come with the data: an IDX images file's labels, a hook's file."""
    from calib_files import write_idx

    model = tmp_path / "gray.onnx"
    onnx.save(conv_net(bn=True, channels=(1, 8, 16)), model)  # a grayscale model: IDX images have one channel
    (tmp_path / "data").mkdir()
    images = write_idx(tmp_path / "data" / "train-images-idx3-ubyte", np.zeros((4, 8, 8), np.uint8), False)
    if case == "IDX labels":
        node, argv = make_node(tmp_path / "data" / "train-labels-idx1-ubyte", "fifo"), []
    else:
        node = make_node(tmp_path / "hook.py", "fifo")
        argv = ["--preprocess", f"{node}:prep"]
    with bounded():
        code = main(["eval", str(model), "--data", str(images), "--reference", str(model), *argv])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1 and "a FIFO" in err and str(node) in err, err
