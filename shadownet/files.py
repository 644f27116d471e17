"""Writing an output file so that a reader never sees half of it - the CLI's results (``run --output``),
reports (``bench``, ``audit``, ``soak``) and the device file (``device export``) - checking where a long
job's report goes before the job rather than after it, and the reports' JSON encoding of numpy scalars.
"""

from __future__ import annotations

import errno
import os
import secrets
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from converters.output_directory import MANIFEST, SECRETS, sibling_stem


def check_destination(path: str | os.PathLike | None, reads: Sequence[str | os.PathLike] = (),
                      replace: bool = True) -> None:
    """Before long work whose result goes to ``path`` (None: nothing to check): an ``OSError`` naming it
    now, rather than after the work, when its directory does not exist or is not one, cannot be written (a
    read-only file system, no permission), or it is a directory (a ``ValueError`` when it is empty). A
    ``ValueError`` too when writing it would destroy what the command reads, a protected model or a special
    file: ``path`` is one of ``reads`` (files) or inside one (directories), lies in a protected model's
    directory (one holding a conversion's manifest and sealed secrets), or exists and is not a regular file
    (the result is renamed into place: ``write_atomically``), or exists at all unless ``replace`` (a command
    whose output is the user's to keep: ``zoo -o``, ``device export`` without ``--force``)."""
    if path is None:
        return
    target = os.fspath(path)
    if not target:
        raise ValueError("an output path is empty")
    # As given, not normalised: the rename resolves "sub/../y" through sub, as the kernel does (abspath
    # dropped "sub/..", and a missing sub failed only after the work: a review's).
    if os.path.isdir(target) or target.endswith(os.sep):  # "DIR/" names a directory, made or not
        raise OSError(errno.EISDIR, os.strerror(errno.EISDIR), target)
    directory = os.path.dirname(target) or "."
    if not os.path.isdir(directory):
        code = errno.ENOTDIR if os.path.exists(directory) else errno.ENOENT
        raise OSError(code, os.strerror(code), target)
    if os.path.exists(target) and not os.path.isfile(target):  # the rename would replace a FIFO, /dev/null
        raise ValueError(f"{target} is not a regular file (a device, a FIFO or a socket): writing the result "
                         "would replace it; give a file's name")
    real = Path(os.path.realpath(target))
    if all((real.parent / name).is_file() for name in (MANIFEST, SECRETS)):
        raise ValueError(f"{target} lies in the protected model's directory {real.parent}: writing it would "
                         "replace or add to the model's own files; give another place")
    for read in reads:
        given = Path(os.path.realpath(read))
        if real == given:
            raise ValueError(f"{target} is a file this command reads: writing it would replace it; give "
                             "another name")
        if given in real.parents:
            raise ValueError(f"{target} lies in {os.fspath(read)}, which this command reads: writing it "
                             "would change it; give another place")
    if not replace and os.path.lexists(target):  # zoo -o over the user's input array (a helper's review)
        raise ValueError(f"{target} exists: --force replaces it")
    try:  # writable at all (os.access hides a read-only mount's reason): a nameless file, gone at close
        tempfile.TemporaryFile(dir=directory).close()
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, target) from None


def working_directory(path: str | os.PathLike) -> str:
    """``path`` made a directory if need be (``--workdir``); an ``OSError`` naming it when it is a file
    (``mkdir`` said only "File exists"), a ``ValueError`` when it is empty (``demo --workdir ""`` worked in
    a temporary directory instead, ``bench``'s said ": No such file or directory")."""
    target = os.fspath(path)
    if not target:
        raise ValueError("a working directory path is empty")
    if os.path.exists(target) and not os.path.isdir(target):
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), target)
    os.makedirs(target, exist_ok=True)
    return target


def write_atomically(path: str | os.PathLike, data: bytes | str) -> None:
    """Write ``data`` (a str as UTF-8) to ``path`` through a temporary sibling, synced, then a rename: a
    reader sees the old file or the new one. On failure nothing is left behind and the ``OSError`` names
    ``path`` (a full disk, a missing directory). Not ``mkstemp``: its 0600 mode would survive the rename;
    "x" mode respects the umask."""
    target = os.fspath(path)
    directory, base = os.path.split(target)  # not normalised: beside the target as the rename resolves it
    tmp = os.path.join(directory or ".", f"{sibling_stem(base)}{secrets.token_hex(4)}.tmp")
    raw = data.encode() if isinstance(data, str) else data
    try:
        with open(tmp, "xb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError) and exc.errno is not None:
            raise OSError(exc.errno, exc.strerror, target) from exc
        raise


def json_default(value: Any) -> Any:
    """``json.dumps``'s ``default`` for the reports: numpy scalars as the numbers they hold."""
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
