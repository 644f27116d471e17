"""The table of trusted apps: UUID -> ``"module:Class"``, imported inside the secure world on first use.

The normal world only ever names a UUID; what code runs for it is decided here, in the secure world.
"""

from __future__ import annotations

import importlib
import logging
import traceback
import uuid

from tee_sim.errors import TEE_ERROR_ITEM_NOT_FOUND, TEEC_ORIGIN_TEE, TEEError

SYSTEM_PTA_UUID = uuid.UUID("1f0c6cb0-2ed4-40b1-b9a5-d3950685064a")
TEST_TA_UUID = uuid.UUID("15c02fb4-e696-4276-849c-5e8690eb95ac")
OTHER_TEST_TA_UUID = uuid.UUID("9a4c3f7e-0b1d-4e55-8f1a-2c6d7e8f9a0b")


def trusted_apps() -> dict[uuid.UUID, str]:
    """Every trusted app this secure world can run."""
    from tee_sim.ta_all_in_tee_commands import UUID as ALL_IN_TEE_UUID
    from tee_sim.ta_shadownet_commands import UUID as SHADOWNET_UUID

    return {
        SYSTEM_PTA_UUID: "tee_sim.system_pta:SystemPTA",
        TEST_TA_UUID: "tee_sim.testing_ta:TestTA",
        OTHER_TEST_TA_UUID: "tee_sim.testing_ta:OtherTestTA",
        SHADOWNET_UUID: "tee_sim.ta_shadownet:ShadowNetTA",
        ALL_IN_TEE_UUID: "tee_sim.ta_all_in_tee:AllInTEETA",
    }


def load_ta_class(ta_uuid: uuid.UUID) -> type:
    from tee_sim.ta import TrustedApp

    spec = trusted_apps().get(ta_uuid)
    if spec is None:
        raise TEEError(TEE_ERROR_ITEM_NOT_FOUND, TEEC_ORIGIN_TEE, f"no trusted app with UUID {ta_uuid}")
    module, _, name = spec.partition(":")
    try:
        ta_class = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        logging.getLogger("tee_sim.registry").error("cannot load %s:\n%s", spec, traceback.format_exc())
        # OP-TEE leaves the reason in the secure world's log; the simulator also gives it to the caller,
        # whose user can act on it (the kernels not built, say).
        raise TEEError(
            TEE_ERROR_ITEM_NOT_FOUND, TEEC_ORIGIN_TEE, f"trusted app {ta_uuid} failed to load: {exc}"
        ) from None
    if not (isinstance(ta_class, type) and issubclass(ta_class, TrustedApp)) or ta_class.UUID != ta_uuid:
        raise TEEError(TEE_ERROR_ITEM_NOT_FOUND, TEEC_ORIGIN_TEE, f"{spec} is not the trusted app {ta_uuid}")
    return ta_class
