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
