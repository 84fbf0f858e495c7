"""Issue 6, bad input: the cases tests/test_cli.py does not cover, each a one-line error with exit code 1
that writes nothing and leaves the input as it was; and determinism of the whole run."""

import hashlib
import json
import os

import numpy as np
import onnx
import pytest
from PIL import Image
from zoo import conv_net, random_inputs

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


@pytest.mark.parametrize("command", ["repair -o", "repair --report", "stats -o", "sweep -o", "report -o"])
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


@pytest.mark.parametrize("stdout", ["/dev/full", "closed"])
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
