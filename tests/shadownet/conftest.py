"""Protected test models for the runtime tests: built with Keras, converted by TensorFlow's TFLite converter
and protected by ``shadownet.convert`` once per session; LiteRT on the ORIGINAL model is the reference."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # before TensorFlow is first imported

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter as LiteRTInterpreter

from tests.shadownet.small_models import protect_small_cnn

SEED = 7  # reproducible secrets: INSECURE, tests only


@dataclass(frozen=True)
class Protected:
    original: Path   # the float .tflite
    out: Path        # its artifact directory (the default scheme)

    def reference(self, *inputs: np.ndarray) -> list[np.ndarray]:
        """LiteRT's outputs on the original model, in get_output_details() order."""
        interpreter = LiteRTInterpreter(model_path=str(self.original), num_threads=1)
        interpreter.allocate_tensors()
        for detail, x in zip(interpreter.get_input_details(), inputs, strict=True):
            interpreter.set_tensor(detail["index"], x)
        interpreter.invoke()
        return [interpreter.get_tensor(d["index"]) for d in interpreter.get_output_details()]

    def random_inputs(self, seed: int = 0) -> list[np.ndarray]:
        interpreter = LiteRTInterpreter(model_path=str(self.original))
        rng = np.random.default_rng(seed)
        return [rng.uniform(-1, 1, d["shape"]).astype(d["dtype"]) for d in interpreter.get_input_details()]




@pytest.fixture(scope="session")
def keras():
    pytest.importorskip("tensorflow")
    import keras
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")
    return keras


def _to_tflite(model) -> bytes:
    import tensorflow as tf

    from models.backend import quiet

    with quiet():
        return bytes(tf.lite.TFLiteConverter.from_keras_model(model).convert())


def _protect(tmp: Path, name: str, data: bytes) -> Protected:
    import shadownet

    original = tmp / f"{name}.tflite"
    original.write_bytes(data)
    out = tmp / f"{name}.protected"
    shadownet.convert(str(original), str(out), seed=SEED)
    return Protected(original, out)


@pytest.fixture(scope="session")
def small_cnn(keras, tmp_path_factory) -> Protected:
    """One input, one output: conv + ReLU, depthwise + ReLU6, pointwise conv, pooling, dense, softmax."""
    keras.utils.set_random_seed(0)
    layers = keras.layers
    x = keras.Input((16, 16, 3), batch_size=1, name="image")
    h = layers.Conv2D(8, 3, padding="same", activation="relu")(x)
    h = layers.DepthwiseConv2D(3, padding="same", activation="relu6")(h)
    h = layers.Conv2D(16, 1, activation="relu")(h)
    h = layers.GlobalAveragePooling2D()(h)
    y = layers.Dense(10, activation="softmax")(h)
    return _protect(tmp_path_factory.mktemp("small_cnn"), "small_cnn", _to_tflite(keras.Model(x, y)))


@pytest.fixture(scope="session")
def two_by_two(keras, tmp_path_factory) -> Protected:
    """Two inputs, two outputs (a feature map and a vector), with a residual ADD between rounds."""
    keras.utils.set_random_seed(1)
    layers = keras.layers
    a = keras.Input((8, 8, 3), batch_size=1, name="left")
    b = keras.Input((8, 8, 2), batch_size=1, name="right")
    ha = layers.Conv2D(6, 3, padding="same", activation="relu")(a)
    hb = layers.Conv2D(6, 1, activation="relu")(b)
    h = layers.Add()([ha, hb])
    fmap = layers.Conv2D(4, 3, padding="same", name="fmap")(h)
    vec = layers.Dense(5, name="vec")(layers.Flatten()(layers.MaxPooling2D()(h)))
    data = _to_tflite(keras.Model([a, b], [fmap, vec]))
    return _protect(tmp_path_factory.mktemp("two_by_two"), "two_by_two", data)


@pytest.fixture(scope="session")
def repeated_outputs(keras, tmp_path_factory) -> Protected:
    """Outputs [y, x, y]: one output twice and the input itself, as Keras's Model(x, [y, x, y]) gives them -
    LiteRT names and indexes each tensor once."""
    keras.utils.set_random_seed(2)
    x = keras.Input((8, 8, 3), batch_size=1, name="image")
    y = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(x)
    data = _to_tflite(keras.Model(x, [y, x, y]))
    return _protect(tmp_path_factory.mktemp("repeated_outputs"), "repeated_outputs", data)


@pytest.fixture(scope="session")
def non_float_io(keras, tmp_path_factory) -> Protected:
    """An image and an int32 class label in; a feature map, its argmax's int64 indices and a bool mask of
    it out (converters/non_float.py carries the label and the last two as float32 through the TEE)."""
    import tensorflow as tf

    keras.utils.set_random_seed(3)
    x = keras.Input((8, 8, 3), batch_size=1, name="image")
    label = keras.Input((1,), batch_size=1, dtype="int32", name="label")
    offset = keras.layers.Reshape((1, 1, 6))(keras.layers.Embedding(10, 6)(label))
    h = keras.layers.Add()([keras.layers.Conv2D(6, 3, padding="same")(x), offset])
    y = keras.layers.Conv2D(4, 3, padding="same")(h)
    labels = keras.layers.Lambda(lambda t: tf.argmax(t, -1))(y)
    positive = keras.layers.Lambda(lambda t: t > 0)(y)
    data = _to_tflite(keras.Model([x, label], [y, labels, positive]))
    return _protect(tmp_path_factory.mktemp("non_float_io"), "non_float_io", data)


# The small CNN (small_models) converted three ways for the one-time masks' tests (test_one_time_masks.py,
# test_input_hiding.py), once a session.
@pytest.fixture(scope="session")
def all_rounds(tmp_path_factory) -> str:
    # Round 1 split (the default, auto, would not split this small model's): both kinds of one-time push.
    return protect_small_cnn(tmp_path_factory, "all_rounds", seed=3,
                             scheme="groupmix:exact_split=first,depthwise=offload", mask_rounds="all")


@pytest.fixture(scope="session")
def first_round(tmp_path_factory) -> str:
    # round 1's mask shaped, so split; the deeper rounds unmasked ("auto" would mask every round of a model
    # this small)
    return protect_small_cnn(tmp_path_factory, "first_round", seed=3, scheme="groupmix", mask_rounds="first")


@pytest.fixture(scope="session")
def first_unsplit(tmp_path_factory) -> str:
    # The plain one-time restore of round 1 (its offset rescaled or made again as the mask moves).
    return protect_small_cnn(tmp_path_factory, "first_unsplit", seed=3,
                             scheme="groupmix:exact_split=none", mask_rounds="first")
