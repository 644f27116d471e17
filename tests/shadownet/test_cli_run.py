"""`shadownet run` and `shadownet convert` end to end, and the one-line errors a user can cause."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import zipfile

import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter as LiteRTInterpreter

from converters.fidelity import relative_error
from shadownet.cli import main

TOLERANCE = 1e-4  # the default scheme's fidelity target


def _one_line_error(capsys, code: int) -> str:
    err = capsys.readouterr().err
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("shadownet: error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_run_npy_prints_a_summary(small_cnn, tmp_path, capsys):
    (x,) = small_cnn.random_inputs()
    np.save(tmp_path / "x.npy", x)
    assert main(["run", str(small_cnn.out), "--input", str(tmp_path / "x.npy"), "--num_threads", "1"]) == 0
    out = capsys.readouterr().out
    (want,) = small_cnn.reference(x)
    assert f"argmax {int(np.argmax(want))}" in out and "top-5" in out
    summary = re.search(r"^(\d+) rounds?, (\d+) TEE entries, [\d.]+ ms", out, re.M)
    manifest = json.loads((small_cnn.out / "manifest.json").read_text())
    assert summary and int(summary.group(1)) == len(manifest["rounds"]) >= 2  # the small CNN has several
    assert int(summary.group(2)) == len(manifest["rounds"]) + 1  # one entry per round, plus the last


def test_run_summarises_outputs_of_one_value_per_row():
    from shadownet.api import _summary

    one = _summary("y", np.array([[0.25]], np.float32))
    assert one == "y: shape [1, 1] float32; min 0.25, max 0.25, mean 0.25"
    assert "argmax 2" in _summary("y", np.array([[0.1, 0.2, 0.7]], np.float32))
    assert "min 1, max 5" in _summary("y", np.arange(1, 6, dtype=np.float32).reshape(5, 1))
    # Indices (top_k's, an argmax's) are not scores: no argmax of them.
    assert _summary("i", np.array([[4, 0, 2]], np.int32)) == "i: shape [1, 3] int32; min 0, max 4, mean 2"


def test_run_npz_writes_outputs_keyed_by_tensor_name(two_by_two, tmp_path, capsys):
    import shadownet

    inputs = two_by_two.random_inputs()
    want = two_by_two.reference(*inputs)
    with shadownet.load(two_by_two.out) as model:
        in_names = [t.name for t in model.inputs]
        out_names = [t.name for t in model.outputs]
    np.savez(tmp_path / "x.npz", **dict(zip(in_names, inputs, strict=True)))
    target = tmp_path / "y.npz"
    argv = ["run", str(two_by_two.out), "--input", str(tmp_path / "x.npz"), "--output", str(target)]
    assert main(argv) == 0
    with np.load(target) as got:
        assert list(got.files) == out_names
        for name, w in zip(out_names, want, strict=True):
            assert relative_error(got[name], w) <= TOLERANCE
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left
    assert "wrote" in capsys.readouterr().out


def small_cnn_input_name(model) -> str:
    return LiteRTInterpreter(model_path=str(model.original)).get_input_details()[0]["name"]


@pytest.mark.parametrize("case, message", [
    ("no_artifacts", "does not exist"),
    ("no_input", "does not exist"),
    ("not_numpy", "is not an .npy or .npz file"),
    ("keras_zip", "model.keras is a zip archive but not an .npz (it holds config.json, not .npy arrays)"),
    ("truncated_npy", "cannot read"),
    ("damaged_npz", "cannot read"),
    ("wrong_shape", "must be [1, 16, 16, 3] float32"),
    ("huge_header", "claims an array too large to read"),  # MemoryError, an internal error
    ("fifo", "is not a regular file"),  # read for ever
    ("tampered", "SHA-256"),
    ("delegate", "cannot load the accelerator delegate"),
    ("delegate_here", "mine.so: invalid ELF header"),  # a bare name that is a file here: not "No such file"
    ("output_nowhere", "nowhere/y.npz: No such file or directory"),  # not "[Errno 2] ..."
])
def test_run_errors_are_one_line(small_cnn, tmp_path, capsys, monkeypatch, case, message):
    (x,) = small_cnn.random_inputs()
    np.save(tmp_path / "x.npy", x)
    artifacts, data = str(small_cnn.out), str(tmp_path / "x.npy")
    extra: list[str] = []
    if case == "no_artifacts":
        artifacts = str(tmp_path / "nowhere")
    elif case == "no_input":
        data = str(tmp_path / "missing.npy")
    elif case == "not_numpy":
        (tmp_path / "junk.npy").write_bytes(b"\x00junk" * 10)
        data = str(tmp_path / "junk.npy")
    elif case == "keras_zip":  # numpy read its members as bytes, taken for inputs' names
        with zipfile.ZipFile(tmp_path / "model.keras", "w") as keras_file:
            keras_file.writestr("config.json", "{}")
        data = str(tmp_path / "model.keras")
    elif case == "truncated_npy":
        (tmp_path / "x.npy").write_bytes((tmp_path / "x.npy").read_bytes()[:100])
    elif case == "damaged_npz":  # a member's CRC fails as it is read (an internal error before)
        np.savez(tmp_path / "x.npz", **{small_cnn_input_name(small_cnn): x})
        damaged = bytearray((tmp_path / "x.npz").read_bytes())
        damaged[len(damaged) // 2] ^= 0xFF
        (tmp_path / "x.npz").write_bytes(damaged)
        data = str(tmp_path / "x.npz")
    elif case == "wrong_shape":
        np.save(tmp_path / "x.npy", x[:, :8])
    elif case == "huge_header":  # a header claiming 10.9 PiB, then a few bytes
        with open(tmp_path / "x.npy", "wb") as f:
            np.lib.format.write_array_header_1_0(
                f, {"descr": "<f4", "fortran_order": False, "shape": (1, 32, 32, 3_000_000_000_000)})
            f.write(b"\0" * 64)
    elif case == "fifo":
        os.mkfifo(tmp_path / "x.fifo")
        data = str(tmp_path / "x.fifo")
    elif case == "delegate":
        extra = ["--delegate", str(tmp_path / "no_such_delegate.so")]
    elif case == "delegate_here":
        (tmp_path / "mine.so").write_bytes(b"not a library " * 16)
        monkeypatch.chdir(tmp_path)
        extra = ["--delegate", "mine.so"]
    elif case == "output_nowhere":
        extra = ["--output", str(tmp_path / "nowhere" / "y.npz")]
    elif case == "tampered":
        shutil.copytree(small_cnn.out, tmp_path / "out")
        sealed = tmp_path / "out" / "secrets.sealed"
        sealed.write_bytes(sealed.read_bytes()[:-1])
        artifacts = str(tmp_path / "out")
    line = _one_line_error(capsys, main(["run", artifacts, "--input", data, *extra]))
    assert message in line


@pytest.mark.parametrize("target", ["secrets.sealed.npz", "manifest.json.npz", "new.npz", "input", "y.npy"])
def test_an_output_that_would_replace_what_the_run_reads_is_refused(small_cnn, tmp_path, capsys, target):
    """--output into the protected model's directory replaced its files (the model had to be converted again),
    over the input file replaced the user's input, and y.npy was written as a zip of arrays; all ran and
    exited 0 (helpers' probes). Now refused before anything runs, and nothing changes."""
    shutil.copytree(small_cnn.out, tmp_path / "out")
    (x,) = small_cnn.random_inputs()
    given = tmp_path / ("x.npz" if target == "input" else "x.npy")
    np.savez(given, x=x) if target == "input" else np.save(given, x)
    before = {p.name: p.read_bytes() for p in [*(tmp_path / "out").iterdir(), given]}
    output = {"input": str(given), "y.npy": str(tmp_path / "y.npy")}.get(target,
                                                                         str(tmp_path / "out" / target))
    line = _one_line_error(capsys, main(["run", str(tmp_path / "out"), "--input", str(given),
                                         "--output", output]))
    said = {"input": "is a file this command reads", "y.npy": "name it .npz"}
    assert said.get(target, "lies in the protected model's directory") in line
    assert not (tmp_path / "y.npy").exists()
    assert {p.name: p.read_bytes() for p in [*(tmp_path / "out").iterdir(), given]} == before


@pytest.mark.parametrize("library", ["missing", "not_a_library", "not_a_delegate"])
def test_a_bad_delegate_is_one_line_in_a_real_process(small_cnn, tmp_path, library):
    """Whatever the --delegate file is, stderr holds one line: LiteRT's half-built Delegate, collected
    later, used to add an ignored AttributeError and its traceback."""
    import ctypes.util

    (x,) = small_cnn.random_inputs()
    np.save(tmp_path / "x.npy", x)
    path = {"missing": str(tmp_path / "none.so"), "not_a_library": str(tmp_path / "x.npy"),
            "not_a_delegate": ctypes.util.find_library("m") or "libm.so.6"}[library]
    command = [sys.executable, "-m", "shadownet", "run", str(small_cnn.out), "--input",
               str(tmp_path / "x.npy"), "--delegate", path]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    lines = [line for line in result.stderr.splitlines() if not line.startswith("INFO:")]
    assert result.returncode == 1 and len(lines) == 1 and lines[0].startswith("shadownet: error:"), lines
    assert path in lines[0]


def test_output_into_a_closed_pipe_ends_quietly(small_cnn, tmp_path):
    """``shadownet demo | head -1`` said "shadownet: error: [Errno 32] Broken pipe" and exited 1 (a helper's
    walkthrough): a reader that stops early ends the command quietly, exit 141, as tools do."""
    (x,) = small_cnn.random_inputs()
    np.save(tmp_path / "x.npy", x)
    import socket

    for kind in ("pipe", "socket"):  # a socket's peer gone too (a review; poll says POLLHUP there)
        if kind == "pipe":
            read, write = os.pipe()
            os.close(read)  # the reader is gone before the first line
        else:
            ours, theirs = socket.socketpair()
            theirs.close()
            write = os.dup(ours.fileno())
            ours.close()
        try:
            command = [sys.executable, "-m", "shadownet", "run", str(small_cnn.out), "--input",
                       str(tmp_path / "x.npy")]
            result = subprocess.run(command, stdout=write, stderr=subprocess.PIPE, text=True, timeout=120)
        finally:
            os.close(write)
        lines = [line for line in result.stderr.splitlines() if not line.startswith("INFO:")]
        assert (result.returncode, lines) == (141, []), kind


@pytest.mark.parametrize("closed", [1, 2])
def test_a_closed_standard_output_or_error_loses_nothing(small_cnn, tmp_path, closed):
    """``run --output y.npz >&-`` ran the inference, then failed at its first flush (sys.stdout is None),
    exit 3, and wrote no y.npz; with ``2>&-`` every command, valid or not, was an "internal error" printed
    on stdout (a helper's probe). A closed descriptor is /dev/null now: the work is done, the exit code
    the command's."""
    (x,) = small_cnn.random_inputs()
    np.save(tmp_path / "x.npy", x)
    y = tmp_path / "y.npz"
    command = [sys.executable, "-m", "shadownet", "run", str(small_cnn.out), "--input",
               str(tmp_path / "x.npy"), "--output", str(y)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120,
                            preexec_fn=lambda: os.close(closed))  # noqa: PLW1509 - the child's, before exec
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert (result.stdout != "") == (closed == 2) and result.stderr == ""
    with np.load(y) as saved:
        (got,) = [saved[name] for name in saved.files]
    assert relative_error(got, small_cnn.reference(x)[0]) <= TOLERANCE
    missing = [*command[:4], str(tmp_path / "nowhere"), *command[5:]]  # an error: its code, said nowhere
    result = subprocess.run(missing, capture_output=True, text=True, timeout=120,
                            preexec_fn=lambda: os.close(closed))  # noqa: PLW1509
    assert result.returncode == 1 and ("does not exist" in result.stderr) == (closed == 1)
    assert "error" not in result.stdout


def test_standard_output_on_a_full_device_is_said_to_be_that(small_cnn, tmp_path):
    """``convert ... > /dev/full`` wrote the conversion, then said "[Errno 28] No space left on device" as if
    the conversion had failed (a helper's probe)."""
    out = tmp_path / "out"
    with open("/dev/full", "w") as full:
        result = subprocess.run([sys.executable, "-m", "shadownet", "convert", str(small_cnn.original), "-o",
                                 str(out)], stdout=full, stderr=subprocess.PIPE, text=True, timeout=300)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == \
        "shadownet: error: writing standard output: No space left on device"
    assert (out / "manifest.json").is_file()


def test_an_error_without_a_file_is_one_line_when_stdout_has_no_descriptor(capsys):
    """Under a captured stdout (an app's, pytest's) an OSError naming no file became a traceback
    (io.UnsupportedOperation from the check of whether stdout failed: a review)."""
    import errno

    from shadownet.cli import _report

    reason = os.strerror(errno.ENOMEM)
    assert _report(OSError(errno.ENOMEM, reason)) == 1
    assert capsys.readouterr().err == f"shadownet: error: [Errno {errno.ENOMEM}] {reason}\n"


def test_an_internal_errors_line_says_something_when_its_message_starts_with_a_line_break(capsys):
    """numpy's ImportError out of memory at start-up begins with a line break: the line said "internal error
    (ImportError: )" (a helper's probe); its first line that says something, and its cause."""
    from shadownet.cli import _report

    try:
        try:
            raise OSError("libopenblas.so: failed to map segment from shared object")
        except OSError as cause:
            raise ImportError("\n\nImporting the numpy C-extensions failed.\nMore.") from cause
    except ImportError as exc:
        assert _report(exc) == 3
    line = capsys.readouterr().err.strip()
    assert line.startswith("shadownet: internal error (ImportError: Importing the numpy C-extensions failed. "
                           "(libopenblas.so: failed to map segment from shared object))")


def test_a_file_that_is_no_device_identity_is_one_line_without_a_tee_code(small_cnn, tmp_path, capsys):
    (tmp_path / "junk.npy").write_text("junk")
    line = _one_line_error(capsys, main(["convert", str(small_cnn.original), "-o", str(tmp_path / "out"),
                                         "--device", str(tmp_path / "junk.npy")]))
    junk = tmp_path / "junk.npy"
    assert line == f"shadownet: error: provisioning failed: {junk} is not a device identity file"


def test_npy_for_a_two_input_model_is_refused(two_by_two, tmp_path, capsys):
    np.save(tmp_path / "x.npy", two_by_two.random_inputs()[0])
    line = _one_line_error(capsys, main(["run", str(two_by_two.out), "--input", str(tmp_path / "x.npy")]))
    assert "2 inputs" in line


def test_convert_prints_a_summary(small_cnn, tmp_path, capsys):
    out = tmp_path / "converted"
    argv = ["convert", str(small_cnn.original), "-o", str(out), "--scheme", "shadownet", "--seed", "3"]
    assert main(argv) == 0
    printed = capsys.readouterr()
    assert "rounds" in printed.out
    warning_lines = printed.err.strip().splitlines()
    assert len(warning_lines) == 2 and "INSECURE" in warning_lines[0] and "--calibration" in warning_lines[1]
    assert (out / "manifest.json").is_file()
    # A non-empty output directory is refused without --force.
    _one_line_error(capsys, main(["convert", str(small_cnn.original), "-o", str(out), "--seed", "3"]))


def test_real_process_error_has_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "shadownet", "run", str(tmp_path / "nowhere"), "--input",
                             str(tmp_path / "x.npy")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    expected = f"shadownet: error: artifact directory {tmp_path / 'nowhere'} does not exist"
    assert result.stderr.strip().splitlines() == [expected]


def test_demo_without_tensorflow_is_one_line(monkeypatch, capsys):
    import models.backend

    def missing():
        raise models.backend.TensorFlowMissingError("the model zoo needs TensorFlow (No module named "
                                                    "'tensorflow'); install the tf extra")

    monkeypatch.setattr(models.backend, "require_tensorflow", missing)
    line = _one_line_error(capsys, main(["demo"]))
    assert "install the tf extra" in line


def test_version_is_the_package_version(capsys):
    import shadownet

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"shadownet {shadownet.__version__}"


@pytest.mark.parametrize("argv", [[], ["run"], ["run", "out", "--bogus"],
                                  ["run", "out", "--input", "x", "--bogus"],
                                  ["convert", "m.tflite", "-o", "o", "--seed", "notint"],
                                  ["run", "out", "--input", "x.npy", "--num_threads", "0"],
                                  ["run", "out", "--input", "x.npy", "--num_threads", "50000"],  # SIGSEGV
                                  ["bench", "--num_threads", "257"],
                                  ["bench", "--num_runs", "0"], ["bench", "--warmup_runs", "-1"],
                                  ["bench", "--num_threads", "two"],
                                  ["audit", "out", "--reference", "m.tflite", "--inferences", "-1"],
                                  ["convert", "m.tflite", "-o", "o", "--seed", "-1"],
                                  ["zoo", "minivgg", "-o", "m.tflite", "--seed", str(2**32)],
                                  ["convert", "m.tflite", "-o", "o", "--scheme", "nope"],
                                  ["convert", "m.tflite", "-o", "o", "--scheme", "groupmix:bogus=1"],
                                  ["bench", "--scheme", "shadownet:ratio"],
                                  ["convert", "m.tflite", "-o", "o", "--mask-rounds", "xx"],
                                  ["convert", "m.tflite", "-o", "o", "--mask-rounds", "3-1"],
                                  ["convert", "m.tflite", "-o", "o", "--mask-rounds", "0"],
                                  ["bench", "--mask-rounds", ""],
                                  ["convert", "m.tflite", "-o", "o", "--device-key", "ab" * 32],  # no FILE
                                  ["convert", "m.tflite", "-o", "o", "--device", "d", "--device-key", "  "]])
def test_usage_errors_are_one_line(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("shadownet") and ": error: " in lines[0], err
    # The command's own help (an unknown flag and a --device-key without --device pointed at the top's).
    assert lines[0].endswith(f"(see shadownet {argv[0]} --help)" if argv else "(see shadownet --help)"), err


def test_the_scheme_flags_help_names_the_default_scheme(capsys):
    from converters.schemes import DEFAULT_SCHEME

    for command in ("convert", "bench"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert f"{DEFAULT_SCHEME} (the default)" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("command", ["bench", "demo"])
def test_a_workdir_that_is_a_file_is_one_line_naming_it(command, tmp_path, capsys):
    pytest.importorskip("tensorflow")  # demo says first that it needs the tf extra
    (tmp_path / "x.npy").write_bytes(b"")
    line = _one_line_error(capsys, main([command, "--workdir", str(tmp_path / "x.npy")]))
    assert line.endswith(f"{tmp_path / 'x.npy'}: Not a directory")  # was "x.npy: File exists"


def test_demo_with_a_workdir_holding_what_it_would_replace_fails_before_any_work(tmp_path, capsys):
    """A user's file in the work directory's mobilenet.protected, or a directory named mobilenet.tflite,
    was found after MiniVGG's 20 s of training and protection (helpers' reviews): now at once, naming it."""
    pytest.importorskip("tensorflow")
    kept = tmp_path / "work" / "mobilenet.protected"
    kept.mkdir(parents=True)
    (kept / "keep.txt").write_text("mine")
    line = _one_line_error(capsys, main(["demo", "--workdir", str(tmp_path / "work")]))
    assert "mobilenet.protected holds what no conversion wrote (keep.txt)" in line, line
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["mobilenet.protected"]  # nothing made
    assert (kept / "keep.txt").read_text() == "mine"
    (kept / "keep.txt").unlink()
    (tmp_path / "work" / "mobilenet.tflite").mkdir()
    line = _one_line_error(capsys, main(["demo", "--workdir", str(tmp_path / "work")]))
    assert line.endswith("mobilenet.tflite: Is a directory"), line
    made = sorted(p.name for p in (tmp_path / "work").iterdir())
    assert made == ["mobilenet.protected", "mobilenet.tflite"], made


def test_demo_with_an_unusable_home_fails_before_any_work(tmp_path):
    """It trained MiniVGG for 20 s before finding SHADOWNET_HOME unusable (a helper's walkthrough)."""
    pytest.importorskip("tensorflow")
    import os
    import subprocess
    import sys

    (tmp_path / "a-file").write_text("not a directory")
    env = {**os.environ, "SHADOWNET_HOME": str(tmp_path / "a-file")}
    result = subprocess.run([sys.executable, "-m", "shadownet", "demo", "--workdir", str(tmp_path / "work")],
                            env=env, capture_output=True, text=True, timeout=300)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and "TEE_ERROR_STORAGE_NOT_AVAILABLE" in lines[0], lines
    assert not (tmp_path / "work").exists() or not any((tmp_path / "work").iterdir())  # nothing trained


@pytest.mark.parametrize("argv, message", [
    (["device", "export", "."], ".: Is a directory"),  # said "Device or resource busy"
    (["audit", ".", "--reference", "."], "reference model . is a directory but not a SavedModel"),
    (["bench", "--models", ","], "--models ',' names no model"),  # ran all five zoo models
])
def test_paths_and_lists_that_name_nothing_are_one_line_before_any_work(argv, message, capsys):
    assert message in _one_line_error(capsys, main(argv))


@pytest.mark.parametrize("debug", [None, "0", "1"])
def test_an_internal_error_exits_3_in_one_line_and_a_traceback_only_when_debugging(tmp_path, capsys,
                                                                                   monkeypatch, debug):
    """A bug (an exception no user input explains) exits 3 whether or not SHADOWNET_DEBUG asks for its
    traceback (it exited 1 with one, as a user's error does), and its line keeps its end when the message
    has several lines ('boom' cut the hint off); SHADOWNET_DEBUG=0 is off (a helper's probe)."""
    import shadownet.api as api

    def boom(args):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(api, "run_cli", boom)
    if debug is None:
        monkeypatch.delenv("SHADOWNET_DEBUG", raising=False)
    else:
        monkeypatch.setenv("SHADOWNET_DEBUG", debug)
    assert main(["run", str(tmp_path), "--input", str(tmp_path / "x.npy")]) == 3
    err = capsys.readouterr().err
    assert ("Traceback" in err) == (debug == "1"), err
    last = err.strip().splitlines()[-1]
    assert last.startswith("shadownet: internal error (RuntimeError: boom)"), err
    if debug != "1":
        assert err.count("\n") == 1 and last.endswith("set SHADOWNET_DEBUG=1 for a traceback"), err


def test_running_out_of_memory_is_the_users_error_not_an_internal_one(capsys):
    """``ulimit -v`` too small: a MemoryError was reported as an internal error (exit 3, "a bug to report";
    a helper's probe)."""
    from shadownet.cli import _report

    assert _report(MemoryError()) == 1
    assert capsys.readouterr().err == "shadownet: error: out of memory\n"
    assert _report(MemoryError("cannot allocate 3 GiB")) == 1
    assert capsys.readouterr().err == "shadownet: error: out of memory (cannot allocate 3 GiB)\n"


def test_main_leaves_the_callers_sigterm_handler_as_it_found_it(small_cnn, tmp_path, capsys):
    """main() handles SIGTERM while a command runs (as Ctrl-C) and puts the caller's handler back, on success
    and on error."""
    import signal

    def mine(signum, frame):
        pass

    previous = signal.signal(signal.SIGTERM, mine)
    try:
        (x,) = small_cnn.random_inputs()
        np.save(tmp_path / "x.npy", x)
        assert main(["run", str(small_cnn.out), "--input", str(tmp_path / "x.npy")]) == 0
        assert signal.getsignal(signal.SIGTERM) is mine
        assert main(["run", str(tmp_path / "missing"), "--input", str(tmp_path / "x.npy")]) == 1
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, previous)
    capsys.readouterr()


def test_a_signal_the_caller_ignores_stays_ignored(monkeypatch, capsys):
    """A background job of a script has SIGINT ignored; main() took it over, and a Ctrl-C aimed at the script
    stopped the job, "interrupted" (a review). It runs to its end, and the caller's setting is kept."""
    import shadownet.cli as cli

    done = []

    def command(args):
        signal.raise_signal(signal.SIGINT)
        done.append(True)

    monkeypatch.setattr(cli, "_cmd_device_export", command)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        assert main(["device", "export", "unused"]) == 0 and done == [True]
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
    assert capsys.readouterr().err == ""


def test_a_path_with_a_line_break_keeps_its_error_on_one_whole_line(tmp_path, capsys):
    """``run $'no\\nsuch'`` printed "artifact directory no": the first line, without its reason (a helper's
    probe). The break is shown escaped, and the reason follows."""
    missing = tmp_path / "no\nsuch"
    line = _one_line_error(capsys, main(["run", str(missing), "--input", str(tmp_path / "x.npy")]))
    assert f"{tmp_path}/no\\nsuch" in line and "does not exist" in line, line


@pytest.mark.parametrize("then", ["raised", "swallowed", "became_another_error"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_python_m_exits_as_main_said_when_the_interrupt_left_code_run_by_exec(tmp_path, sig, then):
    """SIGTERM inside code that ``exec`` ran from a string (a dataclass's methods, built while a module is
    imported mid-command) made ``python -m shadownet`` exit by SIGINT (-2) after printing "terminated" - the
    flaky test_cli_convert_interrupted_at_random_times[15]: CPython's unhandled-interrupt flag stayed set.
    Also when the interrupt was swallowed by a callback or became another error (a review)."""
    handled = {"raised": "raise", "swallowed": "pass", "became_another_error": "raise RuntimeError('boom')"}
    result = _python_m_with_command(tmp_path, f"""
        def command(args):
            try:
                exec("import signal; signal.raise_signal({int(sig)})")
            except KeyboardInterrupt:
                {handled[then]}
    """)
    # Ctrl-C as SIGTERM: one that became another error was an internal error, exit 3 (inside Keras, a
    # helper's probe: "SystemError: ... bad argument to internal function"), and one swallowed exit 0
    said = (143, "shadownet: terminated") if sig == signal.SIGTERM else (130, "shadownet: interrupted")
    then_said = " (and then RuntimeError: boom)" if "error" in then else ""
    assert (result.returncode, result.stderr.strip()) == (said[0], said[1] + then_said), result.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_once_the_command_is_done_exits_with_its_code(tmp_path, sig):
    """A Ctrl-C during the interpreter's teardown, the command's work done and its output complete, ended
    the process by the signal with no word (a helper's probe: ``zoo`` had printed "wrote ..."): the exit
    code is the command's."""
    result = _python_m_with_command(tmp_path, f"""
        import atexit, signal

        def command(args):
            print("wrote it")
            atexit.register(signal.raise_signal, {int(sig)})  # in the teardown
    """)
    assert (result.returncode, result.stdout, result.stderr) == (0, "wrote it\n", "")


def _python_m_with_command(tmp_path, command: str) -> subprocess.CompletedProcess:
    """``python -m shadownet device export unused`` in a process of its own, its command replaced by the
    ``command`` function that ``command``'s code defines."""
    (tmp_path / "entry.py").write_text(textwrap.dedent(command) + textwrap.dedent("""
        import runpy, sys
        from shadownet import cli

        cli._cmd_device_export = command
        sys.argv = ["shadownet", "device", "export", "unused"]
        runpy.run_module("shadownet", run_name="__main__")
    """))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "entry"], capture_output=True, text=True, timeout=120,
                          env=env, cwd=tmp_path)


@pytest.mark.parametrize("argv", [
    ["zoo", "minivgg", "-o", ""], ["convert", "", "-o", "x"], ["convert", "m", "-o", ""],
    ["convert", "m", "-o", "x", "--calibration", ""], ["convert", "m", "-o", "x", "--device", ""],
    ["run", "", "--input", "x"], ["run", "a", "--input", ""], ["run", "a", "--input", "x", "--output", ""],
    ["run", "a", "--input", "x", "--delegate", ""], ["bench", ""], ["bench", "m", "--json", ""],
    ["bench", "m", "--markdown", ""], ["bench", "m", "--plot", ""], ["bench", "m", "--delegate", ""],
    ["bench", "m", "--workdir", ""], ["audit", "", "--reference", "m"], ["audit", "a", "--reference", ""],
    ["audit", "a", "--reference", "m", "--public", ""], ["audit", "a", "--reference", "m", "--json", ""],
    ["demo", "--workdir", ""], ["device", "export", ""],
])
def test_every_path_argument_refuses_an_empty_path(argv, capsys):
    """An empty path was the current directory to some commands ("." has no manifest.json, "." is not a
    SavedModel, convert -o "" blamed the current directory), a delegate to load to others, and ignored by
    demo --workdir (a helper's sweep): now a usage error naming the argument."""
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == 2
    assert ": an empty path (see shadownet " in capsys.readouterr().err.strip().splitlines()[-1]


def test_an_empty_scheme_is_no_scheme(capsys):
    """``--scheme ""`` converted with the default scheme (a helper's sweep)."""
    from converters.schemes import get_scheme

    with pytest.raises(ValueError, match="unknown scheme ''"):
        get_scheme("")
    with pytest.raises(SystemExit) as caught:
        main(["convert", "m", "-o", "x", "--scheme", ""])
    assert caught.value.code == 2 and "unknown scheme ''" in capsys.readouterr().err


def test_audit_of_a_file_says_it_is_a_file(tmp_path, capsys):
    """``audit MODEL.tflite --reference MODEL.tflite`` said "artifact directory ... does not exist" of the
    file it was given (``run`` said it was a file; a helper's sweep)."""
    model = tmp_path / "m.tflite"
    model.write_bytes(b"a model")
    line = _one_line_error(capsys, main(["audit", str(model), "--reference", str(model)]))
    assert f"{model} is a file, not an artifact directory" in line


def test_a_damaged_device_key_is_blamed_not_the_sealed_secrets(tmp_path):
    """A truncated root_sealing.key was reported as "secrets.sealed was changed, or sealed by another device"
    of an intact file (a helper's sweep): the damaged key is named, with what it costs."""
    from tests.shadownet.small_models import small_cnn

    (tmp_path / "m.tflite").write_bytes(small_cnn())
    np.save(tmp_path / "x.npy", np.zeros((1, 16, 16, 3), np.float32))
    env = {**os.environ, "SHADOWNET_HOME": str(tmp_path / "home")}

    def shadownet(*argv):
        return subprocess.run([sys.executable, "-m", "shadownet", *argv], capture_output=True, text=True,
                              env=env, cwd=tmp_path, timeout=120)

    assert shadownet("convert", "m.tflite", "-o", "out", "--seed", "1").returncode == 0
    assert shadownet("run", "out", "--input", "x.npy").returncode == 0
    key = tmp_path / "home" / "device" / "root_sealing.key"
    key.write_bytes(key.read_bytes()[:10])
    result = shadownet("run", "out", "--input", "x.npy")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert f"device key {key} is corrupt: this device's secure storage is damaged" in lines[0]
    assert "secrets.sealed was changed" not in lines[0]
