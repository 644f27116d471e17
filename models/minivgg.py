"""MiniVGG for CIFAR-10-sized input (32x32x3), 10 classes.

conv32-conv32-maxpool-conv64-conv64-maxpool-dense512-dense10: every 3x3 convolution and the 512-wide
dense layer followed by batch norm and ReLU, dropout (0.25 after each pool, 0.5 after dense512) at
training time only. Batch norm sits before the ReLU so TensorFlow's converter folds it into the
preceding layer, as the paper's models were.

After TFLite conversion: 4 CONV_2D (ReLU fused), 2 MAX_POOL_2D, RESHAPE (flatten), 2
FULLY_CONNECTED (ReLU fused into the first) and SOFTMAX.
"""

from __future__ import annotations

from models.backend import require_tensorflow
from models.calibrate import randomize

_, keras = require_tensorflow()
layers = keras.layers

INPUT_SHAPE = (32, 32, 3)
CLASSES = 10


def build() -> keras.Model:
    """The MiniVGG architecture with Keras's default weights."""
    inputs = keras.Input(INPUT_SHAPE, name="input")
    x = inputs
    for stage, filters in enumerate((32, 64), start=1):
        for conv in (1, 2):
            name = f"conv{stage}_{conv}"
            x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=name)(x)
            x = layers.BatchNormalization(name=f"{name}_bn")(x)
            x = layers.ReLU(name=f"{name}_relu")(x)
        x = layers.MaxPooling2D(2, name=f"pool{stage}")(x)
        x = layers.Dropout(0.25, name=f"dropout{stage}")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(512, use_bias=False, name="fc1")(x)
    x = layers.BatchNormalization(name="fc1_bn")(x)
    x = layers.ReLU(name="fc1_relu")(x)
    x = layers.Dropout(0.5, name="dropout3")(x)
    x = layers.Dense(CLASSES, name="logits")(x)
    outputs = layers.Softmax(name="probabilities")(x)
    return keras.Model(inputs, outputs, name="minivgg")


def build_random(seed: int) -> keras.Model:
    """MiniVGG with seeded He weights and calibrated batch norms; output: softmax probabilities."""
    model = build()
    randomize(model, seed, INPUT_SHAPE, heads=("logits",), batch=32)
    return model
