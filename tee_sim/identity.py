"""The device's identity under ``SHADOWNET_HOME``: a root sealing key and an Ed25519 attestation key.

Both are created on first use (mode 0600, created atomically so two processes starting at once agree
on one key) and read only by the secure world.
"""

from __future__ import annotations

import errno
import fcntl
import glob
import os
import re
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from tee_sim.errors import TEE_ERROR_CORRUPT_OBJECT, TEEC_ORIGIN_TEE, TEEError

ROOT_KEY_FILE = "root_sealing.key"
ATTESTATION_KEY_FILE = "attestation_ed25519.key"


def resolve_home(home: str | os.PathLike[str] | None = None) -> Path:
    """``home``, else ``$SHADOWNET_HOME``, else ``~/.shadownet``."""
    if home is None:
        home = os.environ.get("SHADOWNET_HOME")
    if not home:
        try:
            home = Path.home() / ".shadownet"
        except RuntimeError:  # no $HOME, and a user without a passwd entry (a container's arbitrary uid)
            raise ValueError("no home directory to keep the simulated device's keys in ($HOME is not set "
                             "and this user has no passwd entry): set SHADOWNET_HOME") from None
    return Path(home).expanduser().absolute()


def private_dir(path: Path) -> Path:
    """Create ``path`` and any missing parent with mode 0700 (existing ones are left alone), each new one's
    entry synced into its parent; return it."""
    if not path.is_dir():
        if not path.parent.exists():
            private_dir(path.parent)
        path.mkdir(mode=0o700, exist_ok=True)
        _sync_directory(path.parent)
    return path


# A temp file left by a writer that is gone (killed between writing it and unlinking it; after the link, a
# second name of the live key) is removed by the next writer or reader, once it is this old and no process
# holds its lock: a writer locks its temp from creation to unlinking. The age covers a writer between its
# create and its lock, and file systems without flock; the lock, a live writer in another PID namespace
# (a review: a process id alone took one for dead).
STALE_TEMP_S = 60.0
_NO_LOCKS = (errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP)
_TEMP = re.compile(r"[0-9]+\.[0-9a-f]{8}\.tmp")


def _remove_dead_temps(path: Path) -> None:
    """Delete the stale ``.NAME.PID.RANDOM.tmp`` siblings of ``path``: best effort (a read-only home, a
    directory of that name: nothing is removed, and the keys still load)."""
    for entry in glob.glob(os.path.join(glob.escape(str(path.parent)), f".{glob.escape(path.name)}.*.tmp")):
        if not _TEMP.fullmatch(os.path.basename(entry)[len(path.name) + 2:]):
            continue
        try:
            found = os.lstat(entry)
            if not stat.S_ISREG(found.st_mode) or time.time() - found.st_mtime < STALE_TEMP_S:
                continue  # (a FIFO of that name would block the open: a review)
            fd = os.open(entry, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as exc:
                    if exc.errno not in _NO_LOCKS:
                        continue  # held: its writer is alive
                    # no locks on this file system: its age alone
                os.unlink(entry)
            finally:
                os.close(fd)
        except OSError:
            continue


@contextmanager
def _private_temp(path: Path, data: bytes) -> Iterator[Path]:
    """A fresh mode-0600 sibling of ``path`` holding ``data``, synced to disk and locked (``flock``) until
    it is unlinked, after the body (which links or renames it into place)."""
    _remove_dead_temps(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # no locks on this file system: the cleaner's age alone protects it
            pass
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
        yield tmp
    finally:
        try:
            tmp.unlink(missing_ok=True)  # renamed into place: gone already
        finally:
            os.close(fd)


def write_new_file(path: Path, data: bytes) -> bool:
    """Create ``path`` with ``data`` (mode 0600) atomically unless it exists; False if someone else won."""
    with _private_temp(path, data) as tmp:
        try:
            os.link(tmp, path)  # unlike rename, link never replaces an existing key
        except FileExistsError:
            return False
    _sync_directory(path.parent)
    return True


def replace_file(path: Path, data: bytes) -> None:
    """Write ``path`` atomically (temp file, fsync, rename), mode 0600."""
    with _private_temp(path, data) as tmp:
        os.replace(tmp, path)
    _sync_directory(path.parent)


def _sync_directory(directory: Path) -> None:
    """The directory's entries on disk, as far as its file system can: a key's name lost in a power cut
    while the secrets sealed under it survived would make a new key, and those secrets unreadable (a
    helper's reading). A file system that cannot sync a directory leaves it to its own schedule (the write
    itself succeeded: a review)."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _load_or_create(path: Path, make: bytes) -> bytes:
    _remove_dead_temps(path)
    if not path.exists():
        write_new_file(path, make)
    data = path.read_bytes()
    if len(data) != 32:
        # Not TEE_ERROR_SECURITY: the trusted app took that for a changed secrets.sealed (a helper's sweep)
        raise TEEError(TEE_ERROR_CORRUPT_OBJECT, TEEC_ORIGIN_TEE,
                       f"device key {path} is corrupt: this device's secure storage is damaged, and nothing "
                       "sealed or provisioned with its keys can be opened")
    return data


@dataclass(frozen=True)
class DeviceKeys:
    root_key: bytes
    attestation_key: Ed25519PrivateKey

    @property
    def attestation_public_key(self) -> bytes:
        return self.attestation_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    @classmethod
    def load_or_create(cls, home: Path) -> DeviceKeys:
        device = private_dir(home / "device")
        root = _load_or_create(device / ROOT_KEY_FILE, os.urandom(32))
        fresh = Ed25519PrivateKey.generate().private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        seed = _load_or_create(device / ATTESTATION_KEY_FILE, fresh)
        return cls(root, Ed25519PrivateKey.from_private_bytes(seed))
