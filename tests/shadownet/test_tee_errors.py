import pytest

import tee_sim
from shadownet.exceptions import IntegrityError, SecureMemoryError, ShadowNetError, TEECommunicationError
from shadownet.tee_errors import LOST_SESSION, translate_tee_error, translated
from tee_sim import TEEError


@pytest.mark.parametrize(("code", "cls"), [
    (tee_sim.TEE_ERROR_OUT_OF_MEMORY, SecureMemoryError),
    (tee_sim.TEE_ERROR_MAC_INVALID, IntegrityError),
    (tee_sim.TEE_ERROR_TARGET_DEAD, TEECommunicationError),
    (0xFFFF0123, ShadowNetError),  # a code with no mapping: the base class
])
def test_a_tee_error_becomes_its_flat_exception_naming_what_was_done(code, cls):
    error = translate_tee_error(TEEError(code, message="details here"), "loading model X")
    assert type(error) is cls
    assert str(error).startswith("loading model X: the secure world said ") and "details here" in str(error)


def test_translated_raises_the_flat_exception_from_the_tee_error():
    with pytest.raises(SecureMemoryError) as caught:
        with translated("refilling"):
            raise TEEError(tee_sim.TEE_ERROR_OUT_OF_MEMORY, message="cap")
    assert isinstance(caught.value.__cause__, TEEError)
    assert tee_sim.TEE_ERROR_TARGET_DEAD in LOST_SESSION
    assert tee_sim.TEE_ERROR_OUT_OF_MEMORY not in LOST_SESSION


def test_the_clients_own_shared_memory_failing_is_not_called_the_secure_worlds():
    """A process out of file descriptors cannot map shared memory: the client API says so (origin API),
    which is not the secure world's memory cap (``SecureMemoryError``)."""
    error = translate_tee_error(TEEError(tee_sim.TEE_ERROR_OUT_OF_MEMORY, tee_sim.TEEC_ORIGIN_API,
                                         "cannot allocate 4096 bytes of shared memory: Too many open files"),
                                "loading OUT")
    assert type(error) is ShadowNetError
    assert str(error) == ("loading OUT: the TEE client said TEE_ERROR_OUT_OF_MEMORY: cannot allocate 4096 "
                          "bytes of shared memory: Too many open files")


def test_a_dead_or_unstartable_world_is_reported_by_the_communication_stack_not_by_itself():
    """TEEC_ORIGIN_COMMS: the secure world died, hung or would not start, so it said nothing."""
    error = translate_tee_error(TEEError(tee_sim.TEE_ERROR_TARGET_DEAD, tee_sim.TEEC_ORIGIN_COMMS,
                                         "the secure world is not running"), "inference step 3")
    assert type(error) is TEECommunicationError
    assert str(error) == ("inference step 3: the communication stack said TEE_ERROR_TARGET_DEAD: the secure "
                          "world is not running")
    started = translate_tee_error(TEEError(tee_sim.TEE_ERROR_COMMUNICATION, tee_sim.TEEC_ORIGIN_COMMS,
                                           "cannot start the secure world: [Errno 24] Too many open files"),
                                  "loading OUT")
    assert "the secure world said" not in str(started)
    assert str(started).startswith("loading OUT: the communication stack said TEE_ERROR_COMMUNICATION: ")
