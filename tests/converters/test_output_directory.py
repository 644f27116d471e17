"""The output directory's atomic writing (``converters.output_directory``), and conversions killed at
several points while they write it: no directory ``load`` would take half-written; leftovers are refused,
then cleaned up."""

import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

import shadownet
from converters.fidelity import relative_error
from converters.output_directory import _remove_leftovers, write_artifacts
from shadownet.exceptions import ArtifactError
from tests.shadownet.hardening import SEED, protect_small

TOLERANCE = 1e-3  # the small model's, under its scheme
pytestmark = pytest.mark.filterwarnings("ignore:converting with seed")


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


@pytest.mark.parametrize("swap", ["one step", "two renames"])
def test_a_replaced_conversion_that_cannot_be_removed_is_said(tmp_path, monkeypatch, swap):
    """--force put the new conversion in place and left the earlier one, when it could not be removed (an
    immutable file), in a hidden sibling without a word, exit 0 (a helper's probe): a warning names it."""
    from converters import output_directory

    out = tmp_path / "out"
    write_artifacts(out, False, {"manifest.json": b"earlier"})
    monkeypatch.setattr(output_directory.shutil, "rmtree", lambda path, **kw: None)  # nothing removed
    if swap == "two renames":  # a system without renameat2's exchange
        monkeypatch.setattr(output_directory, "_exchange", lambda a, b: False)
    with pytest.warns(UserWarning, match="the replaced conversion could not be removed entirely") as said:
        write_artifacts(out, True, {"manifest.json": b"new"})
    assert (out / "manifest.json").read_bytes() == b"new"
    (left,) = [p for p in tmp_path.iterdir() if p.name != "out"]
    assert str(left) in str(said[0].message)
    assert (left / ("manifest.json" if swap == "one step" else "replaced/manifest.json")).read_bytes() \
        == b"earlier"


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
    monkeypatch.setattr(output_directory, "_exchange", lambda a, b: False)  # a system without the swap
    with pytest.raises(KeyboardInterrupt):
        write_artifacts(out, True, {"manifest.json": b"new"})
    assert interrupted
    expected = b"earlier" if when == "between the renames" else b"new"  # the new one in place: kept
    assert (out / "manifest.json").read_bytes() == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_an_output_the_conversion_could_not_write_is_refused_before_the_work(tmp_path, monkeypatch):
    """``convert -o`` into a protected model's directory, onto a mount point, through a symbolic link that
    leads to itself, or where nothing can be made: each was found only after the whole conversion, or (the
    first) not at all (a helper's probe)."""
    import errno

    from converters import output_directory

    protected = tmp_path / "m.out"
    protected.mkdir()
    for name in ("manifest.json", "secrets.sealed", "untrusted.tflite"):
        (protected / name).write_bytes(b"kept")
    with pytest.raises(ArtifactError, match="lies in the protected model's directory"):
        output_directory.check_output(protected / "sub" / "deeper", False)
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    with pytest.raises(ArtifactError, match="symbolic link that leads to itself"):
        output_directory.check_output(tmp_path / "loop", False)
    mount = tmp_path / "mnt"
    mount.mkdir()
    monkeypatch.setattr(output_directory.os.path, "ismount", lambda path: Path(path) == mount)
    with pytest.raises(ArtifactError, match="is a mount point"):
        output_directory.check_output(mount, False)

    def read_only(*args, **kwargs):  # root writes anywhere: a read-only mount's answer
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(output_directory.tempfile, "TemporaryFile", read_only)
    with pytest.raises(OSError) as caught:
        output_directory.check_output(tmp_path / "new" / "out", False)
    assert caught.value.errno == errno.EROFS and caught.value.filename == str(tmp_path / "new" / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loop", "m.out", "mnt"]
    assert sorted(p.name for p in protected.iterdir()) == ["manifest.json", "secrets.sealed",
                                                           "untrusted.tflite"]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return protect_small(tmp_path_factory.mktemp("small"), which=1)


# --- conversion interrupted ---------------------------------------------------------------------------------

_KILLER = textwrap.dedent("""
    import os, signal, sys, tempfile, warnings
    from converters import pipeline

    from converters import output_directory

    model, out, point, force = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "force"
    if point.startswith("two renames: "):  # where the system cannot swap two directories in one step
        point = point.removeprefix("two renames: ")
        output_directory._exchange = lambda a, b: False
    real_exchange = output_directory._exchange

    def exchange(a, b):
        if armed and point == "before the exchange": die()
        swapped = real_exchange(a, b)
        if armed and point == "after the exchange": die()
        return swapped

    output_directory._exchange = exchange
    counts = {"fsync": 0, "replace": 0}
    armed = False
    real_fsync, real_replace, real_mkdtemp = os.fsync, os.replace, tempfile.mkdtemp
    real_write = pipeline.write_artifacts

    def die(): os.kill(os.getpid(), signal.SIGKILL)

    def fsync(fd):
        real_fsync(fd)
        if armed:
            counts["fsync"] += 1
            if point == f"fsync{counts['fsync']}": die()

    def replace(a, b):
        if armed:
            counts["replace"] += 1
            if point == f"replace{counts['replace']}": die()
        real_replace(a, b)

    def mkdtemp(*a, **k):
        d = real_mkdtemp(*a, **k)
        if armed and point == "mkdtemp": die()
        return d

    def write(*a, **k):
        global armed
        armed = True
        real_write(*a, **k)

    os.fsync, os.replace, tempfile.mkdtemp, pipeline.write_artifacts = fsync, replace, mkdtemp, write
    warnings.simplefilter("ignore")
    pipeline.convert(model, out, seed=int(sys.argv[5]), force=force)
""")


def _check_no_half_directory(small, out: Path) -> None:
    """``out`` is absent or a complete, right conversion; every sibling a killed run left is refused by
    ``load`` or complete and right."""
    x = small.input()
    want = small.reference(x)
    if out.exists():
        with shadownet.load(out) as model:
            assert relative_error(model(x), want) <= TOLERANCE
    else:
        with pytest.raises(ArtifactError):
            shadownet.load(out)
    for sibling in out.parent.glob(f".{out.name}.*"):
        for candidate in (sibling, sibling / "replaced"):
            if not candidate.is_dir():
                continue
            try:
                with shadownet.load(candidate) as model:
                    assert relative_error(model(x), want) <= TOLERANCE  # complete: it loads right
            except ArtifactError:
                pass  # incomplete: refused


@pytest.mark.parametrize("point, force", [
    ("mkdtemp", False), ("fsync1", False), ("fsync2", False), ("fsync3", False), ("replace1", False),
    ("before the exchange", True), ("after the exchange", True),
    ("two renames: replace1", True), ("two renames: replace2", True),
])
def test_convert_killed_while_writing(small, tmp_path, point, force):
    """Killed anywhere in the write, no half directory is left; a ``--force`` replace swaps the two
    directories in one step where the system can (Linux), so that an earlier conversion is never missing
    (killed between two renames, it was left in a sibling the next conversion deleted: a helper's probe)."""
    model = tmp_path / "model.tflite"
    model.write_bytes(small.original)
    out = tmp_path / "out"
    if force:
        shadownet.convert(str(model), str(out), seed=SEED)
    command = [sys.executable, "-c", _KILLER, str(model), str(out), point, "force" if force else "new",
               str(SEED)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == -signal.SIGKILL, result.stderr
    _check_no_half_directory(small, out)
    if not force and point != "replace1":
        assert not out.exists()
    if force and not point.startswith("two renames"):
        assert out.exists()
    # The next conversion succeeds and removes what the killed one left.
    shadownet.convert(str(model), str(out), seed=SEED, force=True)
    assert not list(tmp_path.glob(".out.*"))
    _check_no_half_directory(small, out)


@pytest.mark.parametrize("force", [False, True])
def test_convert_onto_a_full_disk(small, tmp_path, monkeypatch, force):
    """A write that fails (ENOSPC on the second file) names the output it was writing, leaves no temporary
    directory, and leaves an earlier conversion in place."""
    import errno

    from converters import pipeline

    out = tmp_path / "out"
    if force:
        pipeline.convert(small.original, out, seed=SEED)
    before = sorted(p.name for p in tmp_path.iterdir())
    real, calls = os.fsync, []

    def fsync(fd):
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd)

    monkeypatch.setattr(pipeline.os, "fsync", fsync)
    with pytest.raises(OSError, match="No space left") as caught:
        pipeline.convert(small.original, out, seed=SEED, force=force)
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(out)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing half-written beside it
    _check_no_half_directory(small, out)


@pytest.mark.parametrize("target, force", [(".", False), (".", True), ("..", True)])
def test_convert_refuses_the_current_directory_and_its_parents(small, tmp_path, monkeypatch, target, force):
    """The conversion renames a directory into place: ``-o .`` failed with EBUSY and left a
    ``..PID.*.old`` directory beside it; made absolute, ``-o . --force`` would have replaced the working
    directory, ``-o .. --force`` its parent with everything in it. Refused, before any work."""
    from converters import pipeline

    here = tmp_path / "project" / "here"
    here.mkdir(parents=True)
    if force:
        (here / "notes.txt").write_text("keep")
    monkeypatch.chdir(here)
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    with pytest.raises(ArtifactError, match="is the current directory or holds it"):
        pipeline.convert(small.original, target, seed=SEED, force=force)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before


def test_convert_refuses_to_replace_a_directory_that_holds_what_it_reads(small, tmp_path):
    """``convert work/model.tflite -o work --force`` replaced ``work`` and deleted the model it had just
    converted (a helper's walkthrough); so would a calibration file or a SavedModel given as the output.
    Refused, before any work; and a directory the output cannot be made in is named as the output, not
    as the temporary directory beside it."""
    from converters import pipeline

    work = tmp_path / "work"
    work.mkdir()
    model = work / "model.tflite"
    model.write_bytes(small.original)
    calibration = work / "calibration.npy"
    calibration.write_bytes(b"read by the conversion")
    for out, kw in ((work, {}), (tmp_path, {}), (work, {"calibration": calibration})):
        with pytest.raises(ArtifactError, match=r"holds .*, which the conversion reads"):
            pipeline.convert(model if not kw else small.original, out, seed=SEED, force=True, **kw)
    assert sorted(p.name for p in work.iterdir()) == ["calibration.npy", "model.tflite"]
    # -o the model itself: "output directory .../model.tflite holds .../model.tflite" (a helper's sweep)
    with pytest.raises(ArtifactError, match=r"model.tflite is a file, not a directory: give the name of"):
        pipeline.convert(model, model, seed=SEED)
    # below a file: a raw FileExistsError once the whole conversion was done (a helper's sweep)
    with pytest.raises(ArtifactError, match=r"out cannot be made: .*model.tflite is a file"):
        pipeline.convert(model, model / "out", seed=SEED)
    assert model.read_bytes() == small.original
    if os.path.isdir("/proc/self"):  # /proc takes no new entry
        with pytest.raises(OSError) as caught:
            pipeline.convert(small.original, "/proc/shadownet-out", seed=SEED)
        assert caught.value.filename == "/proc/shadownet-out"


def test_convert_through_a_symlink_writes_where_it_points(small, tmp_path):
    """Beside the target, so the rename stays on its file system (a link into /dev/shm failed with EXDEV,
    naming the temporary directory); the link stays a link."""
    from converters import pipeline

    shm = Path("/dev/shm")
    where = Path(tempfile.mkdtemp(dir=shm)) if shm.is_dir() and os.access(shm, os.W_OK) else tmp_path / "t"
    try:
        (where / "out").mkdir(parents=True)
        (tmp_path / "link").symlink_to(where / "out")
        pipeline.convert(small.original, tmp_path / "link", seed=SEED)
        assert (tmp_path / "link").is_symlink() and (where / "out" / "manifest.json").exists()
        _check_no_half_directory(small, tmp_path / "link")
        assert sorted(p.name for p in where.iterdir()) == ["out"]
    finally:
        shutil.rmtree(where, ignore_errors=True)


@pytest.mark.parametrize("swap", ["one step", "two renames"])
def test_a_replacement_that_fails_puts_the_earlier_output_back(small, tmp_path, monkeypatch, swap):
    import errno

    from converters import output_directory, pipeline

    out = tmp_path / "out"
    pipeline.convert(small.original, out, seed=SEED)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real, calls = os.replace, []

    def replace(a, b):
        calls.append(b)
        if len(calls) == 2:  # the new directory into place
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real(a, b)

    def exchange(a, b):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    if swap == "one step":
        monkeypatch.setattr(output_directory, "_exchange", exchange)
    else:  # a system without renameat2's exchange
        monkeypatch.setattr(output_directory, "_exchange", lambda a, b: False)
        monkeypatch.setattr(pipeline.os, "replace", replace)
    with pytest.raises(OSError, match="Input/output error"):
        pipeline.convert(small.original, out, seed=SEED + 1, force=True)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT, signal.SIGTERM])
def test_cli_convert_interrupted_at_random_times(small, tmp_path, sig):
    """Killed: never half a directory. Interrupted (Ctrl-C) or terminated (SIGTERM, which left a half-written
    temporary directory before: a helper's probe): one line, exit 130 / 143, nothing left behind."""
    model = tmp_path / "model.tflite"
    model.write_bytes(small.original)
    command = [sys.executable, "-m", "shadownet", "convert", str(model), "-o", str(tmp_path / "out"),
               "--seed", str(SEED)]
    start = time.monotonic()
    subprocess.run(command, check=True, capture_output=True, timeout=300)
    duration = time.monotonic() - start
    rng = random.Random(int(sig))
    for k in range(3):
        out = tmp_path / f"out{k}"
        proc = subprocess.Popen([*command[:-4], "-o", str(out), "--seed", str(SEED)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        time.sleep(rng.uniform(0.3, 1.0) * duration)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=300)
        if sig != signal.SIGKILL and proc.returncode not in (0, -sig):
            # (-sig: it came before the CLI set its handler, or while the interpreter was shutting down)
            said = {signal.SIGINT: (130, "interrupted"), signal.SIGTERM: (143, "terminated")}[sig]
            assert (proc.returncode, err.strip().splitlines()[-1]) == (said[0], f"shadownet: {said[1]}"), err
        _check_no_half_directory(small, out)
        if sig != signal.SIGKILL:
            assert not list(tmp_path.glob(f".{out.name}.*"))  # an interrupted run cleans up after itself


def test_cli_convert_terminated_while_writing_cleans_up_and_says_so(small, tmp_path):
    """SIGTERM (``kill``, a service manager) while the artifacts are written: the process died at once and
    left a half-written temporary directory beside the output (a helper's probe); now as Ctrl-C - the
    temporary directory removed, one line, exit 143."""
    model = tmp_path / "model.tflite"
    model.write_bytes(small.original)
    script = textwrap.dedent(f"""
        import os, signal, sys
        from converters import output_directory
        from shadownet.cli import main

        def fsync(fd):  # the signal arrives while the first file is being written
            os.kill(os.getpid(), signal.SIGTERM)

        output_directory.os.fsync = fsync
        sys.exit(main(["convert", {str(model)!r}, "-o", {str(tmp_path / "out")!r}, "--seed", "{SEED}"]))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert (result.returncode, result.stderr.strip().splitlines()[-1]) == (143, "shadownet: terminated"), \
        result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.tflite"]  # no output, no temporary one
