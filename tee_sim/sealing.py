"""Sealing: AES-256-GCM under a key only this device and this trusted app (or its successors) derive.

Policy (as SGX's MRSIGNER): the key is HKDF-SHA256(root key; signer, TA UUID, security version), not
the exact code hash, so a TA update keeps its data. A blob records the version that sealed it; a TA at
version ``v`` derives the key of any version ``<= v`` (an upgrade reads old blobs) and refuses newer
ones (no rollback to an older, maybe vulnerable, version). The header is authenticated as AAD; every
failure is one opaque ``TEE_ERROR_SECURITY``.

Blob: ``magic "TSB1" | format u16 | sealing version u32 | 12-byte nonce | ciphertext + 16-byte tag``.
"""

from __future__ import annotations

import os
import struct
import uuid
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from tee_sim.errors import TEE_ERROR_SECURITY, TEEC_ORIGIN_TEE, TEEError

FORMAT_VERSION = 1
_MAGIC = b"TSB1"
_HEADER = struct.Struct("<4sHI12s")
_SALT = b"tee_sim sealing v1"
TAG_SIZE = 16
OVERHEAD = _HEADER.size + TAG_SIZE


@dataclass(frozen=True)
class SealingIdentity:
    """Who may unseal: the TA's signer and UUID, and the highest security version it may read."""

    signer: str
    ta_uuid: uuid.UUID
    version: int


def sealing_key(root_key: bytes, identity: SealingIdentity, version: int) -> bytes:
    signer = identity.signer.encode()
    info = struct.pack("<H", len(signer)) + signer + identity.ta_uuid.bytes + struct.pack("<I", version)
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=_SALT, info=info).derive(root_key)


def _refused() -> TEEError:
    return TEEError(TEE_ERROR_SECURITY, TEEC_ORIGIN_TEE, "sealed data failed authentication")


def seal(root_key: bytes, identity: SealingIdentity, plaintext: bytes, aad: bytes = b"") -> bytes:
    nonce = os.urandom(12)
    header = _HEADER.pack(_MAGIC, FORMAT_VERSION, identity.version, nonce)
    key = sealing_key(root_key, identity, identity.version)
    return header + AESGCM(key).encrypt(nonce, bytes(plaintext), header + bytes(aad))


def unseal(root_key: bytes, identity: SealingIdentity, blob: bytes, aad: bytes = b"") -> bytes:
    blob = bytes(blob)
    if len(blob) < OVERHEAD:
        raise _refused()
    magic, fmt, version, nonce = _HEADER.unpack_from(blob)
    if magic != _MAGIC or fmt != FORMAT_VERSION or version > identity.version:
        raise _refused()
    key = sealing_key(root_key, identity, version)
    try:
        return AESGCM(key).decrypt(nonce, blob[_HEADER.size :], blob[: _HEADER.size] + bytes(aad))
    except InvalidTag:
        raise _refused() from None
