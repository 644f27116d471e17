"""The output directory of a conversion: the names of the files it holds, the check of where it may be
written (before any work, and again at the write), and its atomic writing: a reader never sees half of
it, and what a killed conversion left beside it is removed by the next.
"""

from __future__ import annotations

import ctypes
import errno
import glob
import os
import re
import shutil
import sys
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

from shadownet.exceptions import ArtifactError

# The artifacts' contract (../shared/design/ARCHITECTURE.md): the manifest's format and the three files;
# the runtime reads them by these names (``shadownet.artifacts``).
FORMAT = "shadownet-artifacts"
FORMAT_VERSION = 1  # what this converter writes (the runtime's KNOWN_VERSIONS: what it reads)
UNTRUSTED, SECRETS, MANIFEST = "untrusted.tflite", "secrets.sealed", "manifest.json"
ARTIFACTS = frozenset({UNTRUSTED, SECRETS, MANIFEST})


# The longest name most file systems take (bytes): a temporary sibling's name must fit too.
NAME_MAX = 255


def sibling_stem(name: str, room: int = 32) -> str:
    """``.NAME.PID.``, the start of a temporary sibling's name, with ``NAME`` cut to leave ``room`` of
    ``NAME_MAX`` bytes for what follows: an output named with 234-255 bytes was refused "File name too
    long" after the whole job (a helper's probe). A cut name's leftovers are not recognised as its own."""
    stem = f".{name}.{os.getpid()}."
    excess = len(os.fsencode(stem)) + room - NAME_MAX
    if excess > 0:
        cut = os.fsencode(name)[:-excess - 1]
        stem = f".{os.fsdecode(cut)}~.{os.getpid()}."
    return stem


def check_output(out: Path, force: bool, reads: Sequence[str | os.PathLike] = ()) -> None:
    """Refuse an output directory the conversion cannot write, or may not replace: the current directory
    or one above it, a file, a non-empty directory without ``force`` (with it, one that holds anything but
    a conversion's files), or one that holds a file or directory in ``reads`` (the model, calibration and
    device files given by path), which replacing it would delete; a directory inside a protected model's, a
    mount point, a symbolic link that leads nowhere, or a place where it cannot be made (each found only
    after the whole conversion before: a helper's probe)."""
    given = out
    out = Path(os.path.realpath(out))
    if out.is_symlink():  # realpath leaves a loop as it is
        raise ArtifactError(f"output directory {given} is a symbolic link that leads to itself: give the "
                            "name of another directory")
    try:
        here = Path(os.path.realpath(os.getcwd()))
    except OSError:  # the working directory was deleted: nothing to protect
        here = None
    if here is not None and (out == here or out in here.parents):
        raise ArtifactError(f"output directory {out} is the current directory or holds it: the conversion "
                            "renames its directory into place, so give the name of another directory")
    if out.exists() and not out.is_dir():  # before the reads: -o the model itself was said to "hold" it
        raise ArtifactError(f"output {out} is a file, not a directory: give the name of the directory to "
                            "write (it must not exist, or be an earlier conversion's with --force)")
    above = next((p for p in out.parents if p.exists()), Path("/"))
    if not above.is_dir():  # "FILE/sub" was a raw FileExistsError after the whole conversion (a helper's)
        raise ArtifactError(f"output directory {out} cannot be made: {above} is a file")
    inside = next((p for p in out.parents if all((p / name).is_file() for name in (MANIFEST, SECRETS))), None)
    if inside is not None:
        raise ArtifactError(f"output directory {out} lies in the protected model's directory {inside}: "
                            "writing it would add to the model's own files; give another place")
    if out.is_dir() and os.path.ismount(out):
        raise ArtifactError(f"output directory {out} is a mount point: the conversion renames a directory "
                            "into its place, which a mount point cannot take; give the name of a directory "
                            "inside it")
    try:  # where the temporary sibling (and any missing parent) is made: writable at all
        tempfile.TemporaryFile(dir=above).close()
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, str(out)) from None
    for path in reads:
        real = Path(os.path.realpath(path))
        if real == out or out in real.parents:
            raise ArtifactError(f"output directory {out} holds {path}, which the conversion reads: replacing "
                                "the directory would delete it, so give the name of another directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ArtifactError(f"output directory {out} is not empty (--force, or force=True, replaces an "
                            "earlier conversion's)")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in ARTIFACTS or not p.is_file()) \
        if out.is_dir() else []
    if foreign:  # force replaces an earlier conversion, not whatever a mistyped -o named
        listed = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise ArtifactError(f"output directory {out} holds what no conversion wrote ({listed}): replacing it "
                            "would delete them, so move them or give the name of another directory")


def write_artifacts(out: Path, force: bool, files: dict[str, bytes]) -> None:
    """Write into a temporary sibling directory, manifest.json last, then rename it into place: a reader
    never sees half, and a sibling left by a killed conversion lacks its manifest (``load`` refuses it)
    unless it is complete. Such leftovers (named after a process that no longer runs) are removed first.
    A directory replaced with ``force`` is put back if its replacement fails. The sibling is made beside
    where ``out`` really is (a symlink's target: the rename stays on one file system)."""
    out = Path(os.path.realpath(out))
    check_output(out, force)
    parent = out.parent
    parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(parent, out.name)
    stem = sibling_stem(out.name)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=stem, suffix=".tmp", dir=parent))
    except OSError as exc:  # the output's name, not the temporary one
        raise OSError(exc.errno, exc.strerror, str(out)) from exc
    old: Path | None = None
    swapped = False
    try:
        for name in sorted(files, key=lambda n: n == MANIFEST):
            with open(tmp / name, "wb") as f:
                f.write(files[name])
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, 0o755)
        if force and out.exists() and any(out.iterdir()):
            check_output(out, force)  # still an earlier conversion: what it held at the start may change
            if _exchange(tmp, out):  # one step: OUT is never missing (killed between two renames, it was)
                swapped = True
                replaced = tmp
            else:
                old = Path(tempfile.mkdtemp(prefix=stem, suffix=".old", dir=parent))
                os.replace(out, old / "replaced")
                os.replace(tmp, out)
                swapped = True
                replaced = old
            shutil.rmtree(replaced, ignore_errors=True)
            if replaced.exists():  # the conversion is in place, not all of the earlier one's copy went
                warnings.warn(f"the replaced conversion could not be removed entirely: what is left of it is "
                              f"in {replaced}", stacklevel=4)
        else:
            # One rename, onto nothing or an empty directory, which the OS refuses onto one that is not empty:
            # a directory filled during the conversion (by a user, or another conversion to the same name)
            # is kept, where checking it again before the rename left a moment to replace it in (a helper's
            # probe: a file written there meanwhile was deleted, and the conversion said it succeeded).
            try:
                os.replace(tmp, out)
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                raise ArtifactError(f"output directory {out} was filled while converting: left as it is "
                                    "(--force, or force=True, replaces an earlier conversion's)") from None
        _sync_directory(parent)  # the rename itself survives a power cut
    except BaseException as exc:
        # A signal's exception surfaces after the call it arrived in: a rename that raised may be done (a
        # review: Ctrl-C in the second one put the earlier conversion back onto the new one, ENOTEMPTY).
        swapped = swapped or (old is not None and not tmp.exists())
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            # Interrupted (Ctrl-C, SIGTERM) or failed between the two renames: the earlier conversion goes
            # back, not to a leftover the next conversion deletes (a review); after them: it is removed.
            if not swapped and (old / "replaced").exists() and not out.exists():
                os.replace(old / "replaced", out)
            if swapped or not (old / "replaced").exists():
                shutil.rmtree(old, ignore_errors=True)
        if isinstance(exc, OSError):  # say what it was writing (e.g. a full disk), not the temporary name
            raise OSError(exc.errno, exc.strerror, str(out)) from exc
        raise


def _remove_leftovers(parent: Path, name: str) -> None:
    """Delete ``.NAME.PID.RANDOM.tmp`` / ``.old`` siblings of conversions whose process is gone. RANDOM is
    ``mkdtemp``'s, without a dot: a sibling output's ``.NAME.5.PID.RANDOM.tmp`` (of ``NAME.5``) is not one,
    though ``5`` names no process (it was taken for one, and deleted while that conversion wrote it). The
    pattern is ``tempfile``'s alphabet (an implementation detail): were it to change, leftovers would stay,
    never would another conversion's directory go."""
    for entry in parent.glob(f".{glob.escape(name)}.*"):
        owner = re.fullmatch(r"(\d+)\.[a-z0-9_]+\.(?:tmp|old)", entry.name[len(name) + 2:])
        if owner is not None and not _alive(int(owner[1])):
            shutil.rmtree(entry, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one step (Linux's ``renameat2`` with ``RENAME_EXCHANGE``); False where the
    system or the file system has no such call (the caller renames twice)."""
    if sys.platform != "linux":
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)  # glibc >= 2.28, musl
    if renameat2 is None:
        return False
    renameat2.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    at_cwd, exchange = -100, 2  # AT_FDCWD, RENAME_EXCHANGE
    if renameat2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):  # an old kernel, a file system without it
        return False
    raise OSError(code, os.strerror(code), str(b))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot sync a directory; the rename is still atomic
    finally:
        os.close(fd)
