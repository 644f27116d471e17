"""Test models for the graph layer, converted once per session with TensorFlow's own TFLite converter."""

import os
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # before TensorFlow is first imported

import numpy as np
import pytest

import tee_sim


@pytest.fixture(scope="session")
def tf():
    tf = pytest.importorskip("tensorflow")
    tf.get_logger().setLevel("ERROR")
    return tf


def _convert(tf, model, **settings) -> bytes:
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    for name, value in settings.items():
        if name in ("supported_types", "supported_ops"):
            setattr(converter.target_spec, name, value)
        else:
            setattr(converter, name, value)
    return converter.convert()


def _randomize_batch_norm(model) -> None:
    """Non-trivial batch-norm statistics, so that folding them into the conv is exercised."""
    rng = np.random.default_rng(0)
    for layer in model.layers:
        if type(layer).__name__ == "BatchNormalization":
            shapes = [w.shape for w in layer.get_weights()]
            layer.set_weights([rng.uniform(0.5, 2, shapes[0]), rng.normal(0, 0.5, shapes[1]),
                               rng.normal(0, 0.5, shapes[2]), rng.uniform(0.5, 2, shapes[3])])


@pytest.fixture(scope="session")
def conv_model(tf) -> bytes:
    """Conv + batch norm + ReLU, depthwise (multiplier 2) + ReLU6, dilated conv + tanh, ADD + ReLU, max pool,
    dense + ReLU, dense: fused activations on CONV_2D, DEPTHWISE_CONV_2D, ADD and FULLY_CONNECTED."""
    import keras
    keras.utils.set_random_seed(0)
    layers = keras.layers
    x = keras.Input((12, 12, 3), batch_size=1, name="image")
    a = layers.ReLU()(layers.BatchNormalization()(layers.Conv2D(8, 3, padding="same")(x)))
    b = layers.DepthwiseConv2D(3, depth_multiplier=2, padding="same", activation="relu6")(a)
    c = layers.Conv2D(16, 3, dilation_rate=2, padding="same", activation="tanh")(a)
    d = layers.ReLU()(layers.Add()([b, c]))
    e = layers.Flatten()(layers.MaxPooling2D()(d))
    y = layers.Dense(4)(layers.Dense(10, activation="relu")(e))
    model = keras.Model(x, y)
    _randomize_batch_norm(model)
    return _convert(tf, model)


@pytest.fixture(scope="session")
def fp16_model(tf) -> bytes:
    """Float16 weights behind DEQUANTIZE, with PAD, PRELU, HARD_SWISH, CONCATENATION, RESIZE_BILINEAR,
    LOGISTIC, MEAN and FULLY_CONNECTED; two outputs."""
    import keras
    keras.utils.set_random_seed(1)
    layers = keras.layers
    x = keras.Input((12, 12, 3), batch_size=1, name="image")
    a = layers.PReLU(shared_axes=[1, 2])(layers.Conv2D(8, 3)(layers.ZeroPadding2D(((2, 0), (0, 2)))(x)))
    b = layers.Conv2D(4, 1, activation="hard_swish")(x)
    c = layers.UpSampling2D(interpolation="bilinear")(layers.Concatenate()([a, b]))
    c = layers.Conv2D(6, 3, activation="sigmoid")(c)
    d = layers.Dense(5)(layers.GlobalAveragePooling2D()(c))
    model = keras.Model(x, [d, c])
    return _convert(tf, model, optimizations=[tf.lite.Optimize.DEFAULT], supported_types=[tf.float16])


@pytest.fixture(scope="session")
def pruned_dense(tf):
    """A Keras dense layer with 80% zero weights and an all-zero bias."""
    import keras
    keras.utils.set_random_seed(2)
    x = keras.Input((64,), batch_size=1, name="features")
    model = keras.Model(x, keras.layers.Dense(32)(x))
    weights, bias = model.layers[1].get_weights()
    weights[np.random.default_rng(2).random(weights.shape) < 0.8] = 0
    model.layers[1].set_weights([weights, bias])
    return model


@pytest.fixture(scope="session")
def sparse_model(tf, pruned_dense) -> bytes:
    """``pruned_dense`` with its weights stored sparse (a DENSIFY op) by the converter."""
    return _convert(tf, pruned_dense, optimizations=[tf.lite.Optimize.EXPERIMENTAL_SPARSITY])


@pytest.fixture(scope="session")
def offset_model(tf, pruned_dense) -> bytes:
    """``pruned_dense`` with its weights stored after the flatbuffer (buffer offset/size), as models over
    2 GB are."""
    return _convert(tf, pruned_dense, _experimental_use_buffer_offset=True)


@pytest.fixture(scope="session")
def int8_model(tf) -> bytes:
    """Full-integer quantization with a representative dataset."""
    import keras
    keras.utils.set_random_seed(3)
    x = keras.Input((8, 8, 3), batch_size=1)
    model = keras.Model(x, keras.layers.Conv2D(4, 3, activation="relu")(x))
    rng = np.random.default_rng(3)

    def representative():
        for _ in range(4):
            yield [rng.normal(size=(1, 8, 8, 3)).astype(np.float32)]

    with warnings.catch_warnings():  # "Statistics for quantized inputs were expected": float inputs are meant
        warnings.simplefilter("ignore", UserWarning)
        return _convert(tf, model, optimizations=[tf.lite.Optimize.DEFAULT],
                        representative_dataset=representative,
                        supported_ops=[tf.lite.OpsSet.TFLITE_BUILTINS_INT8])


@pytest.fixture(scope="session")
def device(tmp_path_factory):
    context = tee_sim.Context("inprocess", home=tmp_path_factory.mktemp("device"), memory_cap=256 << 20)
    yield context
    context.close()


@pytest.fixture(scope="session")
def misc_model(tf) -> bytes:
    """DEPTH_TO_SPACE, LEAKY_RELU, SPLIT, MUL, LOGISTIC, SOFTMAX, a stride-2 conv and a dilated depthwise
    conv with depth multiplier 2."""
    import keras
    keras.utils.set_random_seed(4)
    layers = keras.layers
    x = keras.Input((16, 16, 4), batch_size=1, name="image")
    a = layers.LeakyReLU(0.1)(layers.Conv2D(16, 3, padding="same", strides=2)(x))
    a = layers.Lambda(lambda t: tf.nn.depth_to_space(t, 2))(a)
    a = layers.DepthwiseConv2D(3, depth_multiplier=2, dilation_rate=2, padding="same")(a)
    s1, s2 = layers.Lambda(lambda t: tf.split(t, 2, axis=-1))(a)
    gate = layers.Activation("sigmoid")(layers.Conv2D(5, 1)(s1))
    w = layers.Multiply()([layers.Conv2D(5, 1)(s2), gate])
    y = layers.Softmax()(layers.Dense(7)(layers.Flatten()(layers.MaxPooling2D()(w))))
    return tf.lite.TFLiteConverter.from_keras_model(keras.Model(x, y)).convert()
