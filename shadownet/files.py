"""Writing an output file so that a reader never sees half of it: the CLI's results (``run --output``),
reports (``bench``, ``audit``, ``soak``) and the device file (``device export``).
"""

from __future__ import annotations

import os
import secrets


def write_atomically(path: str | os.PathLike, data: bytes | str) -> None:
    """Write ``data`` (a str as UTF-8) to ``path`` through a temporary sibling, synced, then a rename: a
    reader sees the old file or the new one. On failure nothing is left behind and the ``OSError`` names
    ``path`` (a full disk, a missing directory). Not ``mkstemp``: its 0600 mode would survive the rename;
    "x" mode respects the umask."""
    target = os.fspath(path)
    directory, base = os.path.split(os.path.abspath(target))
    tmp = os.path.join(directory, f".{base}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
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
