"""``shadownet.files``: whole files or nothing (``write_atomically``), errors that name the file, and
destinations checked before the work (``check_destination``)."""

import errno
import os

import pytest

from shadownet import files


def test_writes_bytes_and_text_replacing_the_old_file_with_the_umask_mode(tmp_path):
    target = tmp_path / "report.json"
    files.write_atomically(target, b"old")
    old = os.umask(0o027)
    try:
        files.write_atomically(target, "new \u2713\n")
    finally:
        os.umask(old)
    assert target.read_text(encoding="utf-8") == "new \u2713\n"
    assert target.stat().st_mode & 0o777 == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_a_failed_write_leaves_the_old_file_and_names_the_target(tmp_path, monkeypatch):
    target = tmp_path / "out.npz"
    target.write_bytes(b"before")

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(files.os, "fsync", full)
    with pytest.raises(OSError) as caught:
        files.write_atomically(target, b"x" * 1000)
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(target)
    assert target.read_bytes() == b"before" and [p.name for p in tmp_path.iterdir()] == ["out.npz"]


def test_a_missing_directory_is_named(tmp_path):
    target = tmp_path / "missing" / "y.npz"
    with pytest.raises(FileNotFoundError) as caught:
        files.write_atomically(target, b"data")
    assert caught.value.filename == str(target)


def test_a_destination_is_checked_before_the_work(tmp_path):
    files.check_destination(None)
    files.check_destination(tmp_path / "new.json")  # its directory exists: fine
    for bad, error in ((tmp_path / "missing" / "r.json", FileNotFoundError), (tmp_path, IsADirectoryError),
                       # as the rename resolves it, through the missing directory (a review's)
                       (f"{tmp_path / 'missing'}{os.sep}..{os.sep}r.json", FileNotFoundError),
                       (f"{tmp_path / 'not-yet'}{os.sep}", IsADirectoryError)):  # its rename's error named a
        # temporary file after the work (a helper's zoo -o somedir/)
        with pytest.raises(error) as caught:
            files.check_destination(bad)
        assert caught.value.filename == str(bad)
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(NotADirectoryError):
        files.check_destination(tmp_path / "a-file" / "r.json")


def test_bench_refuses_an_unwritable_report_before_measuring(tmp_path, capsys, monkeypatch):
    from shadownet import bench
    from shadownet.cli import main

    def measure(*args, **kwargs):
        raise AssertionError("measured before checking where the report goes")

    monkeypatch.setattr(bench, "run_bench", measure)
    report = tmp_path / "missing" / "r.json"
    assert main(["bench", "--models", "minivgg", "--json", str(report)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"shadownet: error: {report}: No such file or directory"]


def _protected_directory(path):
    """A directory as a conversion leaves it (check_destination looks for its manifest and sealed secrets)."""
    path.mkdir()
    for name in ("manifest.json", "secrets.sealed", "untrusted.tflite"):
        (path / name).write_bytes(b"kept")
    return path


def test_a_destination_that_would_destroy_what_is_read_or_a_protected_model_is_refused(tmp_path):
    model = tmp_path / "model.tflite"
    model.write_bytes(b"model")
    protected = _protected_directory(tmp_path / "out")
    refusals = [
        (model, [model], "is a file this command reads"),
        (tmp_path / "link.tflite", [model], "is a file this command reads"),  # through a symlink
        (tmp_path / "data" / "r.json", [tmp_path / "data"], "which this command reads"),
        (protected / "manifest.json", [], "lies in the protected model's directory"),
        (protected / "report.json", [], "lies in the protected model's directory"),
    ]
    (tmp_path / "link.tflite").symlink_to(model)
    (tmp_path / "data").mkdir()
    os.mkfifo(tmp_path / "fifo")  # renamed over: device export made it a regular file (a review's)
    refusals += [(tmp_path / "fifo", [], "is not a regular file"), ("/dev/null", [], "is not a regular file")]
    for target, reads, said in refusals:
        with pytest.raises(ValueError, match=said):
            files.check_destination(target, reads=reads)
    files.check_destination(tmp_path / "report.json", reads=[model, protected])  # elsewhere: fine
    assert model.read_bytes() == b"model" and {p.read_bytes() for p in protected.iterdir()} == {b"kept"}


def test_a_name_of_up_to_255_bytes_is_written(tmp_path):
    """A temporary sibling's name adds ~22 characters: an output named with 234-255 bytes was refused "File
    name too long" after the whole job (a helper's probe). Its name is cut; the output keeps its own."""
    from converters.output_directory import write_artifacts

    for name in ("r" * 250 + ".json", "é" * 127):  # 255 bytes each, the second two bytes a character
        files.write_atomically(tmp_path / name, "x")
        assert (tmp_path / name).read_text() == "x"
        write_artifacts(tmp_path / name[:-1], False, {"manifest.json": b"m"})
        write_artifacts(tmp_path / name[:-1], True, {"manifest.json": b"n"})  # and the swap of --force
        assert (tmp_path / name[:-1] / "manifest.json").read_bytes() == b"n"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        n for name in ("r" * 250 + ".json", "é" * 127) for n in (name, name[:-1]))


def test_a_directory_that_cannot_be_written_is_said_before_the_work(tmp_path, monkeypatch):
    """A read-only mount (a helper's probe: a report lost after 38 s of audit) is found by making a nameless
    file there; the error names the destination."""
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(files.tempfile, "TemporaryFile", read_only)
    with pytest.raises(OSError) as caught:
        files.check_destination(tmp_path / "r.json")
    assert caught.value.errno == errno.EROFS and caught.value.filename == str(tmp_path / "r.json")


@pytest.mark.parametrize("command", ["zoo", "device", "audit", "bench", "bench --models"])
def test_no_command_writes_over_its_input_or_into_a_protected_model(tmp_path, capsys, command):
    """``audit --json`` over its reference model, ``bench --json`` over the model it measures, ``zoo -o`` and
    ``device export`` into a protected model's directory: each replaced the file and exited 0 (a helper's
    probe). Refused now, before any work, and nothing changes."""
    from shadownet.cli import main

    model = tmp_path / "model.tflite"
    model.write_bytes(b"model")
    protected = _protected_directory(tmp_path / "out")
    argv = {"zoo": ["zoo", "minivgg", "-o", str(protected / "untrusted.tflite")],
            "device": ["device", "export", str(protected / "manifest.json")],
            "audit": ["audit", str(protected), "--reference", str(model), "--json", str(model)],
            "bench": ["bench", str(model), "--json", str(model)],
            # named in --models, it was measured, then replaced by the report (a helper's probe)
            "bench --models": ["bench", "--models", f"minivgg,{model}", "--markdown", str(model)]}[command]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and ("lies in the protected model's directory" in err[0]
                              or "is a file this command reads" in err[0]), err
    assert model.read_bytes() == b"model" and {p.read_bytes() for p in protected.iterdir()} == {b"kept"}


@pytest.mark.parametrize("command", [["demo"], ["bench", "minivgg", "--num_runs", "1"]])
def test_an_empty_working_directory_is_refused(command, capsys):
    """``demo --workdir ""`` exited 0 having worked in a temporary directory, kept nothing; ``bench``'s said
    ": No such file or directory" (a helper's probe). The CLI refuses every empty path as a usage error; the
    functions behind it say so too."""
    from shadownet import bench
    from shadownet.cli import main

    with pytest.raises(SystemExit) as caught:
        main([*command, "--workdir", ""])
    assert caught.value.code == 2 and "argument --workdir: an empty path" in capsys.readouterr().err
    with pytest.raises(ValueError, match="a working directory path is empty"):
        bench.run_bench(["minivgg"], num_runs=1, workdir="", progress=False)


@pytest.mark.parametrize("command", ["zoo", "device"])
def test_zoo_and_device_export_replace_an_existing_file_only_with_force(tmp_path, capsys, command):
    """``zoo -o x.npy`` wrote a model over the user's input array and ``device export`` over any file, exit 0
    (a helper's review): what they write is the user's to keep, so an existing file needs --force."""
    from shadownet.cli import main

    if command == "zoo":
        pytest.importorskip("tensorflow")
    kept = tmp_path / ("x.npy" if command == "device" else "x.bin")  # (zoo refuses x.npy: test_zoo)
    kept.write_bytes(b"the user's array")
    argv = {"zoo": ["zoo", "minivgg", "-o", str(kept)], "device": ["device", "export", str(kept)]}[command]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"shadownet: error: {kept} exists: --force replaces it"], err
    assert kept.read_bytes() == b"the user's array"
    assert main([*argv, "--force"]) == 0
    assert kept.read_bytes() != b"the user's array"
