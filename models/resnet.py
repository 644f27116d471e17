"""The CIFAR-10 ResNets of He et al. (2016, section 4.2): 6n+2 layers, 32x32x3 input, 10 classes.

A 3x3 stem with 16 filters, then three stages of n basic blocks (16, 32, 64 filters; the first block
of stages 2 and 3 has stride 2), global average pooling and a 10-way dense softmax. Each block is
conv3x3-BN-ReLU-conv3x3-BN, added to its shortcut, then ReLU. Shortcuts are identities except where
the shape changes, where they are projections (option B: 1x1 convolution with stride 2, then batch
norm), as in most Keras reproductions. ResNet-44 is n = 7, ResNet-404 is n = 67.

After TFLite conversion: 6n + 3 CONV_2D (stem, 6n in the blocks, 2 projections), n*3 ADD with the
ReLU fused into the ADD, MEAN, one FULLY_CONNECTED and SOFTMAX.
"""

from __future__ import annotations

from models.backend import require_tensorflow
from models.calibrate import randomize

_, keras = require_tensorflow()
layers = keras.layers

INPUT_SHAPE = (32, 32, 3)
CLASSES = 10
STAGE_FILTERS = (16, 32, 64)


def _conv_bn(x, filters: int, kernel: int, stride: int, name: str):
    x = layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False, name=name)(x)
    return layers.BatchNormalization(name=f"{name}_bn")(x)


def build(depth: int) -> keras.Model:
    """The architecture (Keras default weights) of the CIFAR ResNet with ``depth`` = 6n + 2 layers."""
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"a CIFAR ResNet has 6n+2 layers, not {depth}")
    blocks = (depth - 2) // 6
    inputs = keras.Input(INPUT_SHAPE, name="input")
    x = layers.ReLU(name="stem_relu")(_conv_bn(inputs, STAGE_FILTERS[0], 3, 1, "stem"))
    for stage, filters in enumerate(STAGE_FILTERS, start=1):
        for block in range(1, blocks + 1):
            stride = 2 if stage > 1 and block == 1 else 1
            name = f"s{stage}b{block}"
            y = layers.ReLU(name=f"{name}_relu1")(_conv_bn(x, filters, 3, stride, f"{name}_conv1"))
            y = _conv_bn(y, filters, 3, 1, f"{name}_conv2")
            shortcut = x
            if stride != 1 or x.shape[-1] != filters:
                shortcut = _conv_bn(x, filters, 1, stride, f"{name}_proj")
            x = layers.ReLU(name=f"{name}_relu2")(layers.Add(name=f"{name}_add")([shortcut, y]))
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    x = layers.Dense(CLASSES, name="logits")(x)
    outputs = layers.Softmax(name="probabilities")(x)
    return keras.Model(inputs, outputs, name=f"resnet{depth}")


def build_random(depth: int, seed: int) -> keras.Model:
    """ResNet-``depth`` with seeded He weights and calibrated batch norms; output: softmax probabilities."""
    model = build(depth)
    randomize(model, seed, INPUT_SHAPE, heads=("logits",), batch=32)
    return model
