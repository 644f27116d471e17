"""The one place where the secure world's GlobalPlatform codes become ``shadownet.exceptions``' flat
exceptions (the runtime's, ``shadownet.runtime``)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import tee_sim
from shadownet.exceptions import (
    ArtifactError,
    IntegrityError,
    InvokeError,
    MaskPoolExhaustedError,
    SecureMemoryError,
    SecurityError,
    ShadowNetError,
    TEECommunicationError,
)
from tee_sim import TEEError

TEE_ERRORS: dict[int, type[ShadowNetError]] = {
    tee_sim.TEE_ERROR_SECURITY: SecurityError,
    tee_sim.TEE_ERROR_ACCESS_DENIED: SecurityError,
    tee_sim.TEE_ERROR_CORRUPT_OBJECT: SecurityError,  # a device key damaged
    tee_sim.TEE_ERROR_OUT_OF_MEMORY: SecureMemoryError,
    tee_sim.TEE_ERROR_COMMUNICATION: TEECommunicationError,
    tee_sim.TEE_ERROR_TARGET_DEAD: TEECommunicationError,
    tee_sim.TEE_ERROR_BAD_PARAMETERS: ArtifactError,
    tee_sim.TEE_ERROR_BAD_FORMAT: ArtifactError,
    tee_sim.TEE_ERROR_NOT_SUPPORTED: ArtifactError,
    tee_sim.TEE_ERROR_ITEM_NOT_FOUND: ArtifactError,
    tee_sim.TEE_ERROR_MAC_INVALID: IntegrityError,  # an accelerator result failed verification
    tee_sim.TEE_ERROR_NO_DATA: MaskPoolExhaustedError,  # empty one-time mask pool, policy "fail"
}
LOST_SESSION = frozenset({tee_sim.TEE_ERROR_COMMUNICATION, tee_sim.TEE_ERROR_TARGET_DEAD})


def translate_tee_error(exc: TEEError, doing: str, step: bool = False) -> ShadowNetError:
    """The flat exception for a ``TEEError`` raised while ``doing`` (e.g. "loading model X"). ``step``: an
    inference step, where the trusted app's own TEE_ERROR_GENERIC says an op of the model failed on the
    input (``InvokeError``, LiteRT's RuntimeError; ``tee_sim.ta_shadownet_compile``)."""
    invoke = step and exc.code == tee_sim.TEE_ERROR_GENERIC and exc.origin == tee_sim.TEEC_ORIGIN_TRUSTED_APP
    cls = InvokeError if invoke else TEE_ERRORS.get(exc.code, ShadowNetError)
    detail = exc.message or exc.code_name
    if exc.origin == tee_sim.TEEC_ORIGIN_API and exc.code == tee_sim.TEE_ERROR_OUT_OF_MEMORY:
        # The client's own shared memory (out of memory or of file descriptors): not the secure world's.
        return ShadowNetError(f"{doing}: the TEE client said {exc.code_name}: {detail}")
    # OP-TEE's origins: the secure world (its OS or the trusted app) said it, or the communication stack
    # between the worlds did - a world that died, hung or would not start cannot say anything itself.
    speaker = "the communication stack" if exc.origin == tee_sim.TEEC_ORIGIN_COMMS else "the secure world"
    # What the caller can do, in the API's words (the secure world speaks of its pool)
    advice = " - call model.refill_masks() between inferences, or load with on_exhausted='refill'" \
        if cls is MaskPoolExhaustedError else ""
    return cls(f"{doing}: {speaker} said {exc.code_name}: {detail}{advice}")


@contextmanager
def translated(doing: str) -> Iterator[None]:
    """Run the body, raising a ``TEEError`` from it as its flat exception (``translate_tee_error``)."""
    try:
        yield
    except TEEError as exc:
        raise translate_tee_error(exc, doing) from exc
