"""``shadownet.files.write_atomically``: whole files or nothing, errors that name the file."""

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
    for bad, error in ((tmp_path / "missing" / "r.json", FileNotFoundError), (tmp_path, IsADirectoryError)):
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
