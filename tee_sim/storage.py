"""Persistent objects (GP trusted storage): one sealed file per object, written atomically.

A TA's objects live in ``HOME/storage/<TA UUID>/``, each file named by the SHA-256 of the object id
(so an id never becomes a path) and sealed with the object id as AAD (so files cannot be swapped
between ids). Not protected: rolling a whole object back to an older file; a real TEE uses RPMB or
a monotonic counter for that.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from pathlib import Path

from tee_sim.errors import (
    TEE_ERROR_ACCESS_CONFLICT,
    TEE_ERROR_BAD_PARAMETERS,
    TEE_ERROR_ITEM_NOT_FOUND,
    TEE_ERROR_STORAGE_NOT_AVAILABLE,
    TEEC_ORIGIN_TEE,
    TEEError,
)
from tee_sim.identity import private_dir, replace_file, write_new_file
from tee_sim.sealing import SealingIdentity, seal, unseal

MAX_OBJECT_ID = 64  # TEE_OBJECT_ID_MAX_LEN
_AAD = b"tee_sim object v1\x00"


def storage_not_available(where: Path, exc: OSError) -> TEEError:
    """The error for storage the file system refuses (a file where a directory should be, no permission):
    one the caller can act on, not a panic of the trusted app that asked."""
    return TEEError(TEE_ERROR_STORAGE_NOT_AVAILABLE, TEEC_ORIGIN_TEE,
                    f"the secure world's storage {where} is not usable ({exc.strerror or exc}): set "
                    "SHADOWNET_HOME to a writable directory")


def _object_id(object_id: bytes | str) -> bytes:
    oid = object_id.encode() if isinstance(object_id, str) else bytes(object_id)
    if not 1 <= len(oid) <= MAX_OBJECT_ID:
        raise TEEError(
            TEE_ERROR_BAD_PARAMETERS, TEEC_ORIGIN_TEE, f"object id must be 1..{MAX_OBJECT_ID} bytes"
        )
    return oid


class ObjectStore:
    def __init__(self, home: Path, root_key: bytes, identity: SealingIdentity) -> None:
        self._dir = home / "storage" / str(identity.ta_uuid)
        self._root_key, self._identity = root_key, identity

    def _path(self, oid: bytes) -> Path:
        return self._dir / (hashlib.sha256(oid).hexdigest() + ".obj")

    @contextlib.contextmanager
    def _reaching(self) -> Iterator[None]:
        """File-system errors but a missing object (which the callers answer) as STORAGE_NOT_AVAILABLE."""
        try:
            yield
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise storage_not_available(self._dir, exc) from exc

    def exists(self, object_id: bytes | str) -> bool:
        return self._path(_object_id(object_id)).exists()

    def create(self, object_id: bytes | str, data: bytes, overwrite: bool = False) -> None:
        oid = _object_id(object_id)
        blob = seal(self._root_key, self._identity, data, _AAD + oid)
        with self._reaching():
            private_dir(self._dir)
            if overwrite:
                replace_file(self._path(oid), blob)
                return
            written = write_new_file(self._path(oid), blob)
        if not written:
            raise TEEError(TEE_ERROR_ACCESS_CONFLICT, TEEC_ORIGIN_TEE, "object already exists")

    def write(self, object_id: bytes | str, data: bytes) -> None:
        oid = _object_id(object_id)
        if not self._path(oid).exists():
            raise TEEError(TEE_ERROR_ITEM_NOT_FOUND, TEEC_ORIGIN_TEE, "no such object")
        self.create(oid, data, overwrite=True)

    def read(self, object_id: bytes | str) -> bytes:
        oid = _object_id(object_id)
        try:
            with self._reaching():
                blob = self._path(oid).read_bytes()
        except FileNotFoundError:
            raise TEEError(TEE_ERROR_ITEM_NOT_FOUND, TEEC_ORIGIN_TEE, "no such object") from None
        return unseal(self._root_key, self._identity, blob, _AAD + oid)

    def delete(self, object_id: bytes | str) -> None:
        try:
            with self._reaching():
                self._path(_object_id(object_id)).unlink()
        except FileNotFoundError:
            raise TEEError(TEE_ERROR_ITEM_NOT_FOUND, TEEC_ORIGIN_TEE, "no such object") from None
