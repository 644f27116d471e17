"""This device's attestation identity, for a model vendor to convert for it (``shadownet device export``).

The file holds the device's Ed25519 attestation public key (what the vendor pins) and a fresh report,
signed by that key, binding the ShadowNet trusted app's measurement to the TA's persistent X25519
provisioning key. The vendor checks it with ``tee_sim.attestation.verify_device_file`` and encrypts
the model's secrets to it with ``tee_sim.attestation.encrypt_to_report``; only that TA on this
device can open them. Keys never leave the secure world: the normal world only relays the report.
"""

from __future__ import annotations

import json
import os
import uuid

from shadownet.files import write_atomically
from tee_sim import Context
from tee_sim.attestation import device_file_json, device_identity, key_fingerprint


def export_identity(
    path: str | os.PathLike[str], *, context: Context | None = None, ta_uuid: uuid.UUID | None = None
) -> str:
    """Write this device's identity file (JSON) to ``path``: public key and report, nothing secret.
    Returns the device key's fingerprint, for the vendor to pin (``convert --device-key``)."""
    identity = device_identity(context, ta_uuid)
    text = (
        json.dumps(
            device_file_json(identity.attestation_public_key, identity.trusted_app, identity.report), indent=2
        )
        + "\n"
    )
    write_atomically(path, text)
    return key_fingerprint(identity.attestation_public_key)
