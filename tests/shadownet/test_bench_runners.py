"""The runners of ``shadownet bench``'s modes (``shadownet.bench_runners``) on models the bench's own
small model does not cover."""

import numpy as np
import pytest

from shadownet import bench_runners


def test_an_output_whose_shape_litert_computes_at_run_time_is_measured():
    """A Keras model exported with an open batch, with a transposed convolution: LiteRT allocates its output
    at the first invoke, and the unprotected runner read it before ('Tensor data is null'), which ended
    the whole bench (a helper's probe)."""
    tf = pytest.importorskip("tensorflow")
    inputs = tf.keras.Input((8, 8, 4))
    model = tf.keras.Model(inputs, tf.keras.layers.Conv2DTranspose(4, 3, strides=2, padding="same")(inputs))
    converted = tf.lite.TFLiteConverter.from_keras_model(model).convert()
    runner = bench_runners.Unprotected(converted, 1, [])
    x = np.random.default_rng(0).standard_normal((1, 8, 8, 4)).astype(np.float32)
    runner([x])
    assert np.allclose(runner.results[0], model(x).numpy(), atol=1e-4)


def test_all_in_tee_gives_its_shared_memory_back_when_its_set_up_fails():
    """A BIND_SHARED_MEMORY that fails after the registration, or a session whose close fails: the shared
    memory is released all the same (a review: it was kept for the process's life)."""
    import tee_sim
    from tee_sim.ta_all_in_tee_commands import Command

    released = []

    class Memory:
        size = 1 << 12

        def ndarray(self, dtype, shape, offset):
            return np.zeros(shape, dtype)

        def release(self):
            released.append(True)

    class Session:
        def __init__(self, fail_on):
            self.fail_on = fail_on

        def invoke_command(self, command, params=()):
            if command == self.fail_on:
                raise tee_sim.TEEError(tee_sim.TEE_ERROR_OUT_OF_MEMORY, tee_sim.TEEC_ORIGIN_TRUSTED_APP, "no")

        def close(self):
            if self.fail_on == "close":
                raise tee_sim.TEEError(tee_sim.TEE_ERROR_TARGET_DEAD, tee_sim.TEEC_ORIGIN_COMMS, "gone")

    class Context:
        def __init__(self, fail_on):
            self.fail_on = fail_on

        def open_session(self, uuid):
            return Session(self.fail_on)

        def register_shared_memory(self, size):
            return Memory()

    specs = [((1, 4), np.float32), ((1, 2), np.float32)]
    with pytest.raises(tee_sim.TEEError):
        bench_runners.AllInTEE(Context(Command.BIND_SHARED_MEMORY), b"model", 0, specs, 1)
    assert released == [True]
    runner = bench_runners.AllInTEE(Context("close"), b"model", 0, specs, 1)
    with pytest.raises(tee_sim.TEEError):
        runner.close()
    assert released == [True, True]


def test_two_frames_that_do_not_fit_say_so_without_the_loads_advice(monkeypatch, tmp_path):
    """The pair's second session did not fit: the report gave the load's advice, "1 other protected model
    open in this process ... closing it frees it" - the pair's own first session, nothing the user could
    close (a helper's probe)."""
    from shadownet import bench_throughput, runtime
    from shadownet.exceptions import SecureMemoryError

    loads = []

    class Opened:
        def close(self):
            pass

    def load(*args, **kwargs):
        loads.append(kwargs["mask_pool"])
        if len(loads) % 2 == 0:
            try:
                raise SecureMemoryError("secure memory exhausted: requested 8.0 MiB")
            except SecureMemoryError as cause:
                raise SecureMemoryError(f"{cause} (1 other protected model open in this process ...: closing "
                                        "it frees it)") from cause
        return Opened()

    monkeypatch.setattr(runtime, "load", load)
    result = bench_throughput.pipelined_fps(tmp_path, 2, None, [], 10)
    assert loads == [4, 4, 2, 2, 1, 1] and result["fps"] is None
    assert result["error"] == ("two frames in flight hold two sessions of the model, which do not fit in the "
                               "secure-memory cap together: secure memory exhausted: requested 8.0 MiB")
