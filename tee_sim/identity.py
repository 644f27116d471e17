"""The device's identity under ``SHADOWNET_HOME``: a root sealing key and an Ed25519 attestation key.

Both are created on first use (mode 0600, created atomically so two processes starting at once agree
on one key) and read only by the secure world.
"""

from __future__ import annotations

import glob
import os
import re
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
        home = os.environ.get("SHADOWNET_HOME") or Path.home() / ".shadownet"
    return Path(home).expanduser().absolute()


def private_dir(path: Path) -> Path:
    """Create ``path`` and any missing parent with mode 0700 (existing ones are left alone); return it."""
    if not path.is_dir():
        if not path.parent.exists():
            private_dir(path.parent)
        path.mkdir(mode=0o700, exist_ok=True)
    return path


def _remove_dead_temps(path: Path) -> None:
    """Delete ``.NAME.PID.RANDOM.tmp`` siblings of ``path`` whose process is gone: what a process killed
    between writing one and unlinking it left (after the link: a second name of the live key, which
    deleting ``path`` would not remove)."""
    for entry in glob.glob(os.path.join(glob.escape(str(path.parent)), f".{glob.escape(path.name)}.*.tmp")):
        owner = re.fullmatch(r"(\d+)\.[0-9a-f]{8}\.tmp", os.path.basename(entry)[len(path.name) + 2:])
        if owner is None:
            continue
        try:
            os.kill(int(owner[1]), 0)
        except ProcessLookupError:
            try:
                os.unlink(entry)
            except FileNotFoundError:
                pass
        except (PermissionError, OverflowError):
            pass


def _write_private_temp(path: Path, data: bytes) -> Path:
    """Write ``data`` to a fresh mode-0600 sibling of ``path``, synced to disk; return its path."""
    _remove_dead_temps(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def write_new_file(path: Path, data: bytes) -> bool:
    """Create ``path`` with ``data`` (mode 0600) atomically unless it exists; False if someone else won."""
    tmp = _write_private_temp(path, data)
    try:
        os.link(tmp, path)  # unlike rename, link never replaces an existing key
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)
    _sync_directory(path.parent)
    return True


def _sync_directory(directory: Path) -> None:
    """The directory's entries on disk: a key's name lost in a power cut while the secrets sealed under it
    survived would make a new key, and those secrets unreadable (a helper's reading)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_file(path: Path, data: bytes) -> None:
    """Write ``path`` atomically (temp file, fsync, rename), mode 0600."""
    tmp = _write_private_temp(path, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _sync_directory(path.parent)


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
