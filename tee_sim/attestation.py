"""The attestation and provisioning protocol, in one place for both ends.

Device side (inside the secure world): ``sign_report`` binds a trusted app's measurement, a verifier's
nonce and an X25519 public key whose private half only that TA can use; ``open_envelope`` decrypts
what was sent to it. Vendor side (public: ``converters`` may import this module): ``verify_report``
checks a report against a pinned device key, the expected measurement and the nonce;
``encrypt_to_report`` encrypts a secret to the report's key (X25519 + HKDF-SHA256 + AES-256-GCM).
A device identity file (``shadownet device export``) is the attestation public key plus a report on
the TA's persistent provisioning key: ``read_device_file`` / ``device_file_json``; ``device_identity``
asks the local secure world for one.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import uuid
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from tee_sim.errors import TEE_ERROR_SECURITY, TEEC_ORIGIN_API, TEEC_ORIGIN_TEE, TEEError

REPORT_FORMAT = "tee_sim-report-2"
DEVICE_FILE_FORMAT = "tee_sim-device-2"
# What a report's key is for, signed with it: an identity file must carry the TA's persistent provisioning
# key, or a report on a one-time key (GET_REPORT, for any nonce) put in its place has the vendor encrypt
# to a key the device forgets - artifacts that never load, blamed on "another device" (a helper's review).
ONE_TIME_KEY, PROVISIONING_KEY = "one-time", "provisioning"
MAX_NONCE = 64
_REPORT_DOMAIN = b"tee_sim attestation report v2\x00"
_MEASURE_DOMAIN = b"tee_sim measurement v1\x00"
_ENVELOPE_MAGIC = b"TSP1"
_ENVELOPE_INFO = b"tee_sim provisioning v1\x00"
_ENVELOPE_HEADER = struct.Struct("<4s32s32s12s")  # magic, recipient key, sender's ephemeral key, GCM nonce


def measure(ta_uuid: uuid.UUID, signer: str, version: int, code: bytes) -> bytes:
    """A TA's measurement: SHA-256 over its UUID, signer, security version and code (32 bytes)."""
    signer_bytes = signer.encode()
    return hashlib.sha256(
        _MEASURE_DOMAIN
        + ta_uuid.bytes
        + struct.pack("<H", len(signer_bytes))
        + signer_bytes
        + struct.pack("<I", version)
        + hashlib.sha256(code).digest()
    ).digest()


def measurement_of(ta: str | type) -> bytes:
    """The measurement of a trusted app given as a class or a ``"module:Class"`` string (imports it)."""
    if isinstance(ta, str):
        import importlib

        module, _, name = ta.partition(":")
        ta = getattr(importlib.import_module(module), name)
    return ta.measurement()


@dataclass(frozen=True)
class Report:
    """A signed statement: "the TA with ``measurement`` holds the private key of ``public_key``, a key for
    ``key_use``"."""

    measurement: bytes  # 32 bytes
    nonce: bytes  # the verifier's challenge, 1..64 bytes
    public_key: bytes  # raw X25519 public key, 32 bytes
    key_use: str  # ONE_TIME_KEY or PROVISIONING_KEY
    signature: bytes  # Ed25519 over signed_message(), 64 bytes

    def signed_message(self) -> bytes:
        return (
            _REPORT_DOMAIN
            + self.key_use.encode()
            + b"\x00"
            + self.measurement
            + struct.pack("<H", len(self.nonce))
            + self.nonce
            + self.public_key
        )

    def to_json(self) -> dict[str, str]:
        return {
            "format": REPORT_FORMAT,
            "measurement": self.measurement.hex(),
            "nonce": self.nonce.hex(),
            "public_key": self.public_key.hex(),
            "key_use": self.key_use,
            "signature": self.signature.hex(),
        }

    def to_bytes(self) -> bytes:
        return json.dumps(self.to_json(), sort_keys=True).encode()

    @classmethod
    def parse(cls, report: Report | dict[str, Any] | bytes | str) -> Report:
        """Accept a ``Report``, its JSON dict or JSON text; ``TEE_ERROR_SECURITY`` if malformed."""
        if isinstance(report, Report):
            return report
        try:
            fields = json.loads(report) if isinstance(report, bytes | str) else report
            if fields.get("format") != REPORT_FORMAT:
                raise ValueError("format")
            measurement, nonce, public_key, signature = (
                bytes.fromhex(fields[k]) for k in ("measurement", "nonce", "public_key", "signature")
            )
            if fields["key_use"] not in (ONE_TIME_KEY, PROVISIONING_KEY):
                raise ValueError("key_use")
            parsed = cls(measurement, nonce, public_key, fields["key_use"], signature)
        except (ValueError, TypeError, KeyError, AttributeError, RecursionError):
            raise TEEError(TEE_ERROR_SECURITY, TEEC_ORIGIN_API, "malformed attestation report") from None
        if (len(parsed.measurement), len(parsed.public_key), len(parsed.signature)) != (
            32,
            32,
            64,
        ) or not 1 <= len(parsed.nonce) <= MAX_NONCE:
            raise TEEError(TEE_ERROR_SECURITY, TEEC_ORIGIN_API, "malformed attestation report")
        return parsed


def sign_report(
    signing_key: Ed25519PrivateKey, measurement: bytes, nonce: bytes, public_key: bytes, key_use: str
) -> Report:
    """Device side: sign a report (called inside the secure world only)."""
    if not 1 <= len(nonce) <= MAX_NONCE:
        raise TEEError(TEE_ERROR_SECURITY, TEEC_ORIGIN_TEE, f"nonce must be 1..{MAX_NONCE} bytes")
    unsigned = Report(measurement, bytes(nonce), public_key, key_use, b"")
    return Report(measurement, bytes(nonce), public_key, key_use, signing_key.sign(unsigned.signed_message()))


def _public_key_bytes(key: Ed25519PublicKey | bytes | str) -> bytes:
    if isinstance(key, Ed25519PublicKey):
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        return key.public_bytes(Encoding.Raw, PublicFormat.Raw)
    return bytes.fromhex(key) if isinstance(key, str) else bytes(key)


def verify_report(
    report: Report | dict[str, Any] | bytes | str,
    pinned_public_key: Ed25519PublicKey | bytes | str,
    expected_measurement: bytes | str,
    nonce: bytes | None,
    key_use: str,
) -> Report:
    """Vendor side: check a report's signature against a device key (pinned, or an identity file's own),
    its measurement, nonce and key use.

    ``nonce`` is the challenge the verifier sent; ``None`` skips the freshness check, which is only
    right for a device identity file (its key is long-lived, there was no challenge). ``key_use``: what
    the verifier will encrypt to - ``ONE_TIME_KEY`` right after its challenge, ``PROVISIONING_KEY`` from an
    identity file, whose key must outlive the secure world that made the report. Returns the
    parsed ``Report``; raises ``TEEError(TEE_ERROR_SECURITY, TEEC_ORIGIN_API)`` naming the failed check.
    """
    parsed = Report.parse(report)
    try:
        key = Ed25519PublicKey.from_public_bytes(_public_key_bytes(pinned_public_key))
        key.verify(parsed.signature, parsed.signed_message())
    except (InvalidSignature, ValueError):
        raise TEEError(
            TEE_ERROR_SECURITY, TEEC_ORIGIN_API,
            "attestation report: its signature does not verify under the device key it was checked against "
            "(the identity file's own, or the one pinned)"
        ) from None
    expected = (
        bytes.fromhex(expected_measurement) if isinstance(expected_measurement, str) else expected_measurement
    )
    if parsed.measurement != expected:
        raise TEEError(
            TEE_ERROR_SECURITY,
            TEEC_ORIGIN_API,
            "attestation report: measurement is not the expected trusted app's (the device runs another "
            "build or version of it than this converter's, or another app)",
        )
    if nonce is not None and parsed.nonce != nonce:
        raise TEEError(
            TEE_ERROR_SECURITY, TEEC_ORIGIN_API, "attestation report: nonce mismatch (stale or replayed)"
        )
    if parsed.key_use != key_use:
        raise TEEError(
            TEE_ERROR_SECURITY, TEEC_ORIGIN_API,
            f"attestation report: its key is a {parsed.key_use} key, not the {key_use} key asked for"
        )
    return parsed


def _envelope_key(shared: bytes, sender_public: bytes, recipient_public: bytes) -> bytes:
    return HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=None,
        info=_ENVELOPE_INFO + sender_public + recipient_public,
    ).derive(shared)


def _raw(public: X25519PublicKey) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return public.public_bytes(Encoding.Raw, PublicFormat.Raw)


def encrypt_to_report(
    report: Report | dict[str, Any] | bytes | str, plaintext: bytes, aad: bytes = b""
) -> bytes:
    """Vendor side: encrypt ``plaintext`` so that only the attested TA can open it (verify the report first).

    A fresh sender X25519 key per envelope; AES-256-GCM under HKDF-SHA256 of the shared secret; the
    header (both public keys, the GCM nonce) and ``aad`` are authenticated.
    """
    recipient = Report.parse(report).public_key
    ephemeral = X25519PrivateKey.generate()
    sender_public = _raw(ephemeral.public_key())
    try:
        shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(recipient))
    except ValueError:  # a low-order point: no secret could be agreed
        raise TEEError(TEE_ERROR_SECURITY, TEEC_ORIGIN_API, "report: unusable public key") from None
    gcm_nonce = os.urandom(12)
    header = _ENVELOPE_HEADER.pack(_ENVELOPE_MAGIC, recipient, sender_public, gcm_nonce)
    key = _envelope_key(shared, sender_public, recipient)
    return header + AESGCM(key).encrypt(gcm_nonce, bytes(plaintext), header + bytes(aad))


def envelope_recipient(envelope: bytes) -> bytes:
    """The X25519 public key an envelope was encrypted to; opaque error if malformed."""
    if len(envelope) < _ENVELOPE_HEADER.size + 16 or envelope[:4] != _ENVELOPE_MAGIC:
        raise TEEError(TEE_ERROR_SECURITY, TEEC_ORIGIN_TEE, "provisioned data failed authentication")
    return bytes(envelope[4:36])


def open_envelope(private_key: X25519PrivateKey, envelope: bytes, aad: bytes = b"") -> bytes:
    """Device side: decrypt an envelope; any malformed, tampered or foreign one is ``TEE_ERROR_SECURITY``."""
    envelope = bytes(envelope)
    recipient = envelope_recipient(envelope)
    _, _, sender_public, gcm_nonce = _ENVELOPE_HEADER.unpack_from(envelope)
    try:
        if recipient != _raw(private_key.public_key()):
            raise ValueError("not for this key")
        shared = private_key.exchange(X25519PublicKey.from_public_bytes(sender_public))
        key = _envelope_key(shared, sender_public, recipient)
        header = envelope[: _ENVELOPE_HEADER.size]
        return AESGCM(key).decrypt(gcm_nonce, envelope[_ENVELOPE_HEADER.size :], header + bytes(aad))
    except (InvalidTag, ValueError):
        raise TEEError(
            TEE_ERROR_SECURITY, TEEC_ORIGIN_TEE, "provisioned data failed authentication"
        ) from None


def device_file_json(attestation_public_key: bytes, ta_uuid: uuid.UUID, report: Report) -> dict[str, Any]:
    """The content of a device identity file (``shadownet device export``)."""
    return {
        "format": DEVICE_FILE_FORMAT,
        "attestation_public_key": attestation_public_key.hex(),
        "trusted_app": str(ta_uuid),
        "report": report.to_json(),
    }


@dataclass(frozen=True)
class DeviceIdentity:
    attestation_public_key: bytes  # raw Ed25519, 32 bytes: what a vendor pins
    trusted_app: uuid.UUID
    report: Report  # on the TA's persistent provisioning key; verify with nonce=None


def key_fingerprint(public_key: bytes) -> str:
    """A device attestation key's fingerprint, as ``shadownet device export`` prints it and ``convert
    --device-key`` pins it: the SHA-256 of the raw key, in hex."""
    return hashlib.sha256(public_key).hexdigest()


def device_identity(context: Any = None, ta_uuid: uuid.UUID | None = None) -> DeviceIdentity:
    """Ask the secure world of ``context`` (a ``tee_sim.Context``; default: this machine's) for its
    attestation public key and a fresh report on ``ta_uuid``'s provisioning key (default: the ShadowNet
    TA), and check the report before returning it."""
    from tee_sim.client import default_context
    from tee_sim.params import TempMemRef
    from tee_sim.registry import SYSTEM_PTA_UUID, trusted_apps
    from tee_sim.system_pta import Cmd
    from tee_sim.ta_shadownet_commands import UUID as SHADOWNET_UUID

    context = context or default_context()
    ta_uuid = ta_uuid or SHADOWNET_UUID
    nonce = os.urandom(32)
    with context.open_session(SYSTEM_PTA_UUID) as session:
        answer = session.invoke_command(
            Cmd.EXPORT_IDENTITY, [TempMemRef(ta_uuid.bytes + nonce), TempMemRef(size=4096, direction="out")]
        )[1].data
    fields = json.loads(answer)
    public_key = bytes.fromhex(fields["attestation_public_key"])
    report = Report.parse(fields["report"])
    # Catch a mismatch between this code and the secure world's here, not at the vendor's.
    verify_report(report, public_key, measurement_of(trusted_apps()[ta_uuid]), nonce, PROVISIONING_KEY)
    return DeviceIdentity(public_key, ta_uuid, report)


def read_device_file(path: str | os.PathLike[str]) -> DeviceIdentity:
    """Parse a device identity file; ``TEEError(TEE_ERROR_SECURITY)`` if it is not one."""
    try:
        with open(path, "rb") as f:
            fields = json.loads(f.read())
        if fields.get("format") == "tee_sim-device-1":  # reports that did not sign their key's use
            raise TEEError(TEE_ERROR_SECURITY, TEEC_ORIGIN_API,
                           f"{os.fspath(path)} is a device identity file of an older format: export it "
                           "again on the device (`shadownet device export FILE`)")
        if fields.get("format") != DEVICE_FILE_FORMAT:
            raise ValueError("format")
        key = bytes.fromhex(fields["attestation_public_key"])
        if len(key) != 32:
            raise ValueError("key")
        return DeviceIdentity(key, uuid.UUID(fields["trusted_app"]), Report.parse(fields["report"]))
    except (ValueError, TypeError, KeyError, AttributeError, UnicodeDecodeError, RecursionError):
        raise TEEError(
            TEE_ERROR_SECURITY, TEEC_ORIGIN_API, f"{os.fspath(path)} is not a device identity file"
        ) from None


def verify_device_file(
    path: str | os.PathLike[str],
    expected_measurement: bytes | str,
    pinned_public_key: Ed25519PublicKey | bytes | str | None = None,
) -> Report:
    """Vendor side: read a device identity file and check its report; return it for ``encrypt_to_report``.

    ``pinned_public_key``: the device key the vendor already trusts (e.g. from the device maker); the
    file's key must match it. ``None`` trusts the key in the file itself (trust on first use).
    """
    identity = read_device_file(path)
    if (
        pinned_public_key is not None
        and _public_key_bytes(pinned_public_key) != identity.attestation_public_key
    ):
        raise TEEError(TEE_ERROR_SECURITY, TEEC_ORIGIN_API, "device identity file: not the pinned device key")
    pinned = identity.attestation_public_key if pinned_public_key is None else pinned_public_key
    return verify_report(identity.report, pinned, expected_measurement, None, PROVISIONING_KEY)
