"""Provisioning: the TEE program encrypted to the target device's ShadowNet trusted app through
attestation (``provision``; the local simulated device, or a device file that ``shadownet device export``
wrote on another), so that no secret is ever written in clear; and the TA's identity the converter writes
into the manifest (``ta_uuid``, ``manifest_digest``).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

from shadownet.exceptions import ArtifactError, SecurityError


def ta_uuid() -> Any:
    """The ShadowNet trusted app's UUID."""
    from tee_sim.ta_shadownet_commands import UUID

    return UUID


def manifest_digest(manifest: dict[str, Any]) -> bytes:
    """The manifest's digest as the TA checks it at load (the program holds it)."""
    from tee_sim.ta_shadownet_commands import manifest_digest as digest

    return digest(manifest)


def _expected_measurement() -> bytes:
    from tee_sim.attestation import measurement_of
    from tee_sim.registry import trusted_apps

    return measurement_of(trusted_apps()[ta_uuid()])


def fingerprint_of(text: str) -> str:
    """A device key's fingerprint as given (hex, in any case, colons allowed), normalised; ``ValueError``
    unless it is one: 64 hex digits, as ``shadownet device export`` prints them (``TypeError``: not text)."""
    if not isinstance(text, str):
        raise TypeError(f"a device key's fingerprint is a string of 64 hex digits, not {text!r}")
    digits = text.strip().lower().replace(":", "")
    if len(digits) != 64 or any(c not in "0123456789abcdef" for c in digits):
        raise ValueError(f"a device key's fingerprint is 64 hex digits (`shadownet device export` prints "
                         f"it), not {text!r}")
    return digits


def device_file(device: Any, device_key: str | None, warn: bool = False) -> Any:
    """The identity in device file ``device`` (``tee_sim.attestation.DeviceIdentity``), its key the pinned
    ``device_key`` if one is given (``SecurityError`` otherwise); ``warn``: say which key is trusted when
    none is pinned (anyone who can swap the file on its way from the device gets the secrets)."""
    from tee_sim import TEEError
    from tee_sim.attestation import DeviceIdentity, key_fingerprint, read_device_file

    if isinstance(device, DeviceIdentity):  # read (and its key checked) already
        return device
    if not Path(device).is_file():
        raise ArtifactError(f"device file {device} does not exist or is not a file (write it on the target "
                            "device with `shadownet device export FILE`)")
    try:
        identity = read_device_file(device)
    except TEEError as exc:  # read here, by the client library: its message says what is wrong, not its code
        raise SecurityError(f"provisioning failed: {exc.message or exc}") from None
    if identity.trusted_app != ta_uuid():
        raise SecurityError(f"device file {device} is for trusted app {identity.trusted_app}, "
                            "not ShadowNet's")
    fingerprint = key_fingerprint(identity.attestation_public_key)
    if device_key is not None and fingerprint_of(device_key) != fingerprint:
        raise SecurityError(f"device file {device}: its device key {fingerprint} is not the pinned one "
                            f"({device_key})")
    if device_key is None and warn:
        warnings.warn(f"trusting the device key in {device} as it is (fingerprint {fingerprint}): check it "
                      "against what `shadownet device export` printed on the device, or pin it with "
                      "--device-key", stacklevel=3)
    return identity


def provision(program: bytes, device: Any = None, device_key: str | None = None) -> bytes:
    """Encrypt the TEE program for the target device's ShadowNet TA; return the bytes of ``secrets.sealed``.

    ``device=None`` / a ``tee_sim.Context``: attest the TA of that (local) device with a fresh nonce,
    verify the report against the device's attestation key, encrypt to the report's one-time X25519 key
    and let the TA re-seal the program for its device. ``device=FILE``: verify the identity file's
    report (against ``device_key``, the pinned key's fingerprint, if given) and encrypt to the TA's
    persistent provisioning key; the target device opens it at LOAD_MODEL.
    """
    from tee_sim import TEEError
    from tee_sim.attestation import PROVISIONING_KEY, encrypt_to_report, verify_report
    from tee_sim.ta_shadownet_commands import PROVISIONED, SECRETS_AAD, SECRETS_MAGIC

    try:
        if device is not None and not hasattr(device, "open_session"):
            identity = device_file(device, device_key)
            report = verify_report(identity.report, identity.attestation_public_key, _expected_measurement(),
                                   None, PROVISIONING_KEY)
            return SECRETS_MAGIC + PROVISIONED + encrypt_to_report(report, program, SECRETS_AAD)
        return _provision_local(program, device)
    except TEEError as exc:
        raise SecurityError(f"provisioning failed: {exc}") from None


def _provision_local(program: bytes, context: Any) -> bytes:
    from tee_sim import TempMemRef, default_context
    from tee_sim.attestation import ONE_TIME_KEY, device_identity, encrypt_to_report, verify_report
    from tee_sim.ta_shadownet_commands import SECRETS_AAD, Command

    context = context or default_context()
    # The local device's attestation key, as `shadownet device export` reads it (trust on first use of
    # this machine's simulated device; a real vendor pins the key of each device it provisions).
    pinned = device_identity(context).attestation_public_key
    nonce = os.urandom(32)
    with context.open_session(ta_uuid()) as session:
        out = session.invoke_command(Command.GET_REPORT,
                                     [TempMemRef(nonce), TempMemRef(size=4096, direction="out")])
        report = verify_report(out[1].data, pinned, _expected_measurement(), nonce, ONE_TIME_KEY)
        envelope = encrypt_to_report(report, program, SECRETS_AAD)
        sealed = TempMemRef(size=len(envelope) + 4096, direction="out")
        session.invoke_command(Command.PROVISION, [TempMemRef(envelope), sealed])
        return sealed.data
