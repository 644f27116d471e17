"""A simulated Trusted Execution Environment with OP-TEE / GlobalPlatform vocabulary.

Normal world: ``Context`` -> ``open_session(uuid)`` -> ``Session.invoke_command(cmd_id, params)`` with
``Value``, ``TempMemRef`` and ``MemRef`` (of ``SharedMemory`` from ``Context.register_shared_memory``);
every failure is a ``TEEError`` with a GlobalPlatform ``code`` and ``origin``. Secure world: trusted
apps subclass ``tee_sim.ta.TrustedApp`` and are listed in ``tee_sim.registry``.
"""

import logging

from tee_sim.client import Context, Session, default_context
from tee_sim.errors import (
    TEE_ERROR_ACCESS_CONFLICT,
    TEE_ERROR_ACCESS_DENIED,
    TEE_ERROR_BAD_FORMAT,
    TEE_ERROR_BAD_PARAMETERS,
    TEE_ERROR_BAD_STATE,
    TEE_ERROR_CANCEL,
    TEE_ERROR_COMMUNICATION,
    TEE_ERROR_CORRUPT_OBJECT,
    TEE_ERROR_EXCESS_DATA,
    TEE_ERROR_GENERIC,
    TEE_ERROR_ITEM_NOT_FOUND,
    TEE_ERROR_MAC_INVALID,
    TEE_ERROR_NO_DATA,
    TEE_ERROR_NOT_IMPLEMENTED,
    TEE_ERROR_NOT_SUPPORTED,
    TEE_ERROR_OUT_OF_MEMORY,
    TEE_ERROR_SECURITY,
    TEE_ERROR_SHORT_BUFFER,
    TEE_ERROR_TARGET_DEAD,
    TEE_SUCCESS,
    TEEC_ORIGIN_API,
    TEEC_ORIGIN_COMMS,
    TEEC_ORIGIN_TEE,
    TEEC_ORIGIN_TRUSTED_APP,
    TEEError,
)
from tee_sim.params import (
    TEE_PARAM_TYPE_MEMREF_INOUT,
    TEE_PARAM_TYPE_MEMREF_INPUT,
    TEE_PARAM_TYPE_MEMREF_OUTPUT,
    TEE_PARAM_TYPE_NONE,
    TEE_PARAM_TYPE_VALUE_INOUT,
    TEE_PARAM_TYPE_VALUE_INPUT,
    TEE_PARAM_TYPE_VALUE_OUTPUT,
    TEE_PARAM_TYPES,
    MemRef,
    TAParams,
    TEEParam,
    TempMemRef,
    Value,
    check_param_types,
)
from tee_sim.shared_memory import SharedMemory, shared_memory_of
from tee_sim.transport import resolve_secure_core

# A TA's panic is logged by the secure OS; in-process that must not reach the user's terminal by default.
logging.getLogger("tee_sim").addHandler(logging.NullHandler())

__all__ = [
    "Context",
    "Session",
    "SharedMemory",
    "shared_memory_of",
    "default_context",
    "resolve_secure_core",
    "Value",
    "TempMemRef",
    "MemRef",
    "TEEParam",
    "TAParams",
    "check_param_types",
    "TEE_PARAM_TYPES",
    "TEE_PARAM_TYPE_NONE",
    "TEE_PARAM_TYPE_VALUE_INPUT",
    "TEE_PARAM_TYPE_VALUE_OUTPUT",
    "TEE_PARAM_TYPE_VALUE_INOUT",
    "TEE_PARAM_TYPE_MEMREF_INPUT",
    "TEE_PARAM_TYPE_MEMREF_OUTPUT",
    "TEE_PARAM_TYPE_MEMREF_INOUT",
    "TEEError",
    "TEE_SUCCESS",
    "TEE_ERROR_GENERIC",
    "TEE_ERROR_ACCESS_DENIED",
    "TEE_ERROR_CANCEL",
    "TEE_ERROR_ACCESS_CONFLICT",
    "TEE_ERROR_EXCESS_DATA",
    "TEE_ERROR_BAD_FORMAT",
    "TEE_ERROR_BAD_PARAMETERS",
    "TEE_ERROR_BAD_STATE",
    "TEE_ERROR_ITEM_NOT_FOUND",
    "TEE_ERROR_MAC_INVALID",
    "TEE_ERROR_NO_DATA",
    "TEE_ERROR_NOT_IMPLEMENTED",
    "TEE_ERROR_NOT_SUPPORTED",
    "TEE_ERROR_OUT_OF_MEMORY",
    "TEE_ERROR_COMMUNICATION",
    "TEE_ERROR_CORRUPT_OBJECT",
    "TEE_ERROR_SECURITY",
    "TEE_ERROR_SHORT_BUFFER",
    "TEE_ERROR_TARGET_DEAD",
    "TEEC_ORIGIN_API",
    "TEEC_ORIGIN_COMMS",
    "TEEC_ORIGIN_TEE",
    "TEEC_ORIGIN_TRUSTED_APP",
]
