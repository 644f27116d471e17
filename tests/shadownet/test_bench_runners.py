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
