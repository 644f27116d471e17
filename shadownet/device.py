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
from tee_sim import Context, TempMemRef, default_context
from tee_sim.attestation import DeviceIdentity, Report, device_file_json, measurement_of, verify_report
from tee_sim.registry import SYSTEM_PTA_UUID, trusted_apps
from tee_sim.system_pta import Cmd


def device_identity(context: Context | None = None, ta_uuid: uuid.UUID | None = None) -> DeviceIdentity:
    """Ask the secure world for its attestation public key and a fresh report on ``ta_uuid``'s
    provisioning key (default: the ShadowNet TA), and check the report before returning it."""
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
    verify_report(report, public_key, measurement_of(trusted_apps()[ta_uuid]), nonce)
    return DeviceIdentity(public_key, ta_uuid, report)


def export_identity(
    path: str | os.PathLike[str], *, context: Context | None = None, ta_uuid: uuid.UUID | None = None
) -> None:
    """Write this device's identity file (JSON) to ``path``: public key and report, nothing secret."""
    identity = device_identity(context, ta_uuid)
    text = (
        json.dumps(
            device_file_json(identity.attestation_public_key, identity.trusted_app, identity.report), indent=2
        )
        + "\n"
    )
    write_atomically(path, text)
