"""The system pseudo-TA: part of the secure OS, it answers questions about the device itself.

``EXPORT_IDENTITY``: the device's attestation public key and a report on a trusted app's persistent
provisioning key (what ``shadownet device export`` writes, for a vendor to convert for this device).
Its command ids are this module's ``Cmd`` (the "header" the normal world imports).
"""

from __future__ import annotations

import enum
import json
import uuid
from typing import Any

from tee_sim.errors import (
    TEE_ERROR_BAD_PARAMETERS,
    TEE_ERROR_NOT_SUPPORTED,
    TEEC_ORIGIN_TRUSTED_APP,
    TEEError,
)
from tee_sim.params import (
    TEE_PARAM_TYPE_MEMREF_INPUT,
    TEE_PARAM_TYPE_MEMREF_OUTPUT,
    TAParams,
    check_param_types,
)
from tee_sim.registry import SYSTEM_PTA_UUID
from tee_sim.ta import TrustedApp, write_output


class Cmd(enum.IntEnum):
    EXPORT_IDENTITY = (
        1  # memref in: 16-byte TA UUID + nonce; memref out: JSON {attestation_public_key, report}
    )


class SystemPTA(TrustedApp):
    UUID = SYSTEM_PTA_UUID
    SIGNER = "tee_sim"
    VERSION = 1
    PSEUDO = True  # the secure OS gives it ``self.secure_os``

    def invoke_command(self, session: Any, cmd_id: int, params: TAParams) -> None:
        if cmd_id == Cmd.EXPORT_IDENTITY:
            check_param_types(params, TEE_PARAM_TYPE_MEMREF_INPUT, TEE_PARAM_TYPE_MEMREF_OUTPUT)
            request = bytes(params[0].buffer)
            if len(request) < 17:
                raise TEEError(
                    TEE_ERROR_BAD_PARAMETERS, TEEC_ORIGIN_TRUSTED_APP, "need a TA UUID and a nonce"
                )
            public_key, report = self.secure_os.identity_report(uuid.UUID(bytes=request[:16]), request[16:])
            answer = json.dumps(
                {"attestation_public_key": public_key.hex(), "report": report.to_json()}
            ).encode()
            write_output(params[1], answer)
        else:
            raise TEEError(TEE_ERROR_NOT_SUPPORTED, TEEC_ORIGIN_TRUSTED_APP, f"unknown command {cmd_id}")
