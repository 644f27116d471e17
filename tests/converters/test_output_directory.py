"""The output directory's atomic writing (``converters.output_directory``)."""

import os
import subprocess
import sys

import pytest

from converters.output_directory import _remove_leftovers, write_artifacts
from shadownet.exceptions import ArtifactError


def _gone_pid() -> int:
    """A process id that no process has now: a child's, after it was reaped."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_only_the_outputs_own_leftovers_of_gone_processes_are_removed(tmp_path):
    """``.a.PID.RANDOM.tmp`` of a gone process is removed; a sibling output ``a.N``'s temporary directory
    (``.a.N.PID.RANDOM.tmp``) is not, though N names no process (a helper's probe: it was deleted while
    that conversion wrote it), nor a live process's, nor other names."""
    gone = _gone_pid()
    leftover = tmp_path / f".a.{gone}.k2x_9qzv.tmp"
    leftover_old = tmp_path / f".a.{gone}.abcdefgh.old"
    sibling = tmp_path / f".a.{gone}.{os.getpid()}.k2x_9qzv.tmp"  # output "a.<gone>", its writer alive
    live = tmp_path / f".a.{os.getpid()}.abcdefgh.tmp"
    others = [tmp_path / ".a.notes", tmp_path / f".a.{gone}.tmp", tmp_path / f".b.{gone}.abcdefgh.tmp"]
    for d in (leftover, leftover_old, sibling, live, *others):
        d.mkdir()
    _remove_leftovers(tmp_path, "a")
    assert not leftover.exists() and not leftover_old.exists()
    assert sibling.exists() and live.exists() and all(d.exists() for d in others)


def test_a_write_replaces_its_own_leftovers_and_keeps_a_siblings_work(tmp_path):
    gone = _gone_pid()
    leftover = tmp_path / f".out.{gone}.abcdefgh.tmp"
    sibling = tmp_path / f".out.{gone}.{os.getpid()}.abcdefgh.tmp"
    leftover.mkdir()
    sibling.mkdir()
    write_artifacts(tmp_path / "out", False, {"manifest.json": b"{}"})
    assert (tmp_path / "out" / "manifest.json").read_bytes() == b"{}"
    assert not leftover.exists() and sibling.exists()


@pytest.mark.parametrize("force", [False, True])
def test_a_directory_filled_while_converting_is_kept_not_replaced(tmp_path, monkeypatch, force):
    """The output was checked before the work and renamed into place after it: a file written into it
    meanwhile (by a user, or a second conversion to the same name) was deleted and the conversion said it
    succeeded (a helper's probe). Without force the rename itself refuses a non-empty directory; with it the
    check runs again before the earlier conversion is moved aside."""
    from converters import output_directory

    out = tmp_path / "out"
    if force:  # an earlier conversion's, which force may replace
        write_artifacts(out, False, {"manifest.json": b"earlier"})
    chmod = os.chmod

    def user_writes_meanwhile(path, mode):
        (out / "precious.txt").parent.mkdir(exist_ok=True)
        (out / "precious.txt").write_text("mine")
        chmod(path, mode)

    monkeypatch.setattr(output_directory.os, "chmod", user_writes_meanwhile)
    with pytest.raises(ArtifactError, match="was filled while converting" if not force else "precious.txt"):
        write_artifacts(out, force, {"manifest.json": b"{}"})
    assert (out / "precious.txt").read_text() == "mine"
    assert sorted(p.name for p in out.iterdir()) == (["manifest.json", "precious.txt"] if force
                                                     else ["precious.txt"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary directory left


@pytest.mark.parametrize("when", ["between the renames", "in the second rename", "removing the earlier one"])
def test_a_force_swap_interrupted_keeps_one_whole_conversion_and_no_leftover(tmp_path, monkeypatch, when):
    """--force moves the earlier conversion aside, renames the new one into place, then removes the earlier
    one. Interrupted between the renames, the earlier one sat in a leftover the next conversion deletes, with
    no output (a review); interrupted while removing it, a half-removed leftover stayed beside the new one."""
    from converters import output_directory

    out = tmp_path / "out"
    write_artifacts(out, False, {"manifest.json": b"earlier"})
    real_replace, real_rmtree = os.replace, output_directory.shutil.rmtree
    interrupted = []

    def replace(a, b):
        real_replace(a, b)  # a signal's exception surfaces after the call it arrived in
        target = {"between the renames": "replaced", "in the second rename": "out"}.get(when)
        if target and str(b).endswith(target) and str(a).endswith(".tmp") == (target == "out") \
                and not interrupted:
            interrupted.append(b)
            raise KeyboardInterrupt

    def rmtree(path, **kw):
        if when == "removing the earlier one" and str(path).endswith(".old") and not interrupted:
            interrupted.append(path)
            raise KeyboardInterrupt
        real_rmtree(path, **kw)

    monkeypatch.setattr(output_directory.os, "replace", replace)
    monkeypatch.setattr(output_directory.shutil, "rmtree", rmtree)
    with pytest.raises(KeyboardInterrupt):
        write_artifacts(out, True, {"manifest.json": b"new"})
    assert interrupted
    expected = b"earlier" if when == "between the renames" else b"new"  # the new one in place: kept
    assert (out / "manifest.json").read_bytes() == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
