"""GlobalPlatform result codes, error origins and the one exception type of ``tee_sim``."""

from __future__ import annotations

# Result codes (GlobalPlatform TEE Client API / Internal Core API, same values as OP-TEE's headers).
TEE_SUCCESS = 0x00000000
TEE_ERROR_GENERIC = 0xFFFF0000
TEE_ERROR_ACCESS_DENIED = 0xFFFF0001
TEE_ERROR_CANCEL = 0xFFFF0002
TEE_ERROR_ACCESS_CONFLICT = 0xFFFF0003
TEE_ERROR_EXCESS_DATA = 0xFFFF0004
TEE_ERROR_BAD_FORMAT = 0xFFFF0005
TEE_ERROR_BAD_PARAMETERS = 0xFFFF0006
TEE_ERROR_BAD_STATE = 0xFFFF0007
TEE_ERROR_ITEM_NOT_FOUND = 0xFFFF0008
TEE_ERROR_NOT_IMPLEMENTED = 0xFFFF0009
TEE_ERROR_NOT_SUPPORTED = 0xFFFF000A
TEE_ERROR_NO_DATA = 0xFFFF000B
TEE_ERROR_OUT_OF_MEMORY = 0xFFFF000C
TEE_ERROR_BUSY = 0xFFFF000D
TEE_ERROR_COMMUNICATION = 0xFFFF000E
TEE_ERROR_SECURITY = 0xFFFF000F
TEE_ERROR_SHORT_BUFFER = 0xFFFF0010
TEE_ERROR_TARGET_DEAD = 0xFFFF3024
TEE_ERROR_MAC_INVALID = 0xFFFF3071  # Internal Core API: a check of data failed (ShadowNet: --verify)
TEE_ERROR_CORRUPT_OBJECT = 0xF0100001  # Internal Core API: a persistent object (a device key) is damaged
TEE_ERROR_STORAGE_NOT_AVAILABLE = 0xF0100003  # Internal Core API: the secure storage cannot be reached

# Where an error was raised.
TEEC_ORIGIN_API = 1  # the client library, in the normal world
TEEC_ORIGIN_COMMS = 2  # the channel between the worlds (crash, hang, protocol error)
TEEC_ORIGIN_TEE = 3  # the secure OS
TEEC_ORIGIN_TRUSTED_APP = 4  # the trusted app's own code

CODE_NAMES: dict[int, str] = {
    value: name for name, value in globals().items() if name.startswith("TEE_") and isinstance(value, int)
}
ORIGIN_NAMES: dict[int, str] = {
    value: name.removeprefix("TEEC_ORIGIN_")
    for name, value in globals().items()
    if name.startswith("TEEC_ORIGIN_")
}


class TEEError(Exception):
    """A GlobalPlatform result other than ``TEE_SUCCESS``: ``.code`` and ``.origin`` are the GP values.

    ``str()`` names both, e.g. ``TEE_ERROR_OUT_OF_MEMORY (origin TEE): requested 8.0 MiB, ...``.
    """

    def __init__(self, code: int, origin: int = TEEC_ORIGIN_TRUSTED_APP, message: str = "") -> None:
        self.code = int(code)
        self.origin = int(origin)
        self.message = message
        super().__init__(code, origin, message)

    @property
    def code_name(self) -> str:
        return CODE_NAMES.get(self.code, f"0x{self.code:08x}")

    @property
    def origin_name(self) -> str:
        return ORIGIN_NAMES.get(self.origin, str(self.origin))

    def __str__(self) -> str:
        text = f"{self.code_name} (origin {self.origin_name})"
        return f"{text}: {self.message}" if self.message else text

    def __reduce__(self):  # keep pickling (e.g. pytest-xdist) working with the custom __init__
        return (type(self), (self.code, self.origin, self.message))
