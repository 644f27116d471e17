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
