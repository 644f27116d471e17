"""YOLOv4-tiny (Bochkovskiy et al. 2020), 416x416x3, 80 classes, as darknet's ``yolov4-tiny.cfg``.

Backbone CSPDarknet53-tiny: convolutions with batch norm and leaky ReLU (slope 0.1); two stride-2
3x3 convolutions padded on the top/left only (darknet's padding, ``ZeroPadding2D(((1, 0), (1, 0)))``);
three CSP blocks, each a 3x3 conv whose output is *routed* twice: whole, and its second channel half
(``route groups=2 group_id=1``, a channel split), followed by two 3x3 convs, concatenations and a 2x2
max-pool. Heads: a 1x1/3x3 pair and a linear 1x1 conv to 3 * (5 + 80) = 255 channels at 13x13
(``head_13``), and, through a 1x1 conv, a 2x nearest upsample and a concatenation with the backbone's
26x26 route, a 3x3 conv and another linear 1x1 conv at 26x26 (``head_26``). Outputs, in this order:
(1, 13, 13, 255), (1, 26, 26, 255), raw (decode them with ``models.yolo``).

After TFLite conversion: 21 CONV_2D (batch norm folded, the heads with bias), 19 LEAKY_RELU, 2 PAD,
3 SPLIT, 7 CONCATENATION, 3 MAX_POOL_2D and one RESIZE_NEAREST_NEIGHBOR.
"""

from __future__ import annotations

import numpy as np

from models.backend import require_tensorflow
from models.calibrate import randomize

_, keras = require_tensorflow()
layers = keras.layers

INPUT_SHAPE = (416, 416, 3)
CLASSES = 80
ANCHORS_PER_CELL = 3
HEAD_CHANNELS = ANCHORS_PER_CELL * (5 + CLASSES)
LEAKY_SLOPE = 0.1
# Head biases after calibration (channels standardised on random images): objectness and class logits
# mostly negative, as in a trained detector, so that an N(0, 1) noise image gives a handful of boxes
# (about 15 at the default 0.25 score threshold), not thousands, and U(0, 1) noise none.
OBJECTNESS_OFFSET = -4.5
CLASS_OFFSET = -2.0


class _Namer:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> str:
        self.count += 1
        return f"conv{self.count}"


def _conv(x, filters: int, kernel: int, name: str, downsample: bool = False):
    if downsample:
        x = layers.ZeroPadding2D(((1, 0), (1, 0)), name=f"{name}_pad")(x)
    x = layers.Conv2D(
        filters, kernel, strides=2 if downsample else 1, padding="valid" if downsample else "same",
        use_bias=False, name=name,
    )(x)
    x = layers.BatchNormalization(name=f"{name}_bn")(x)
    return layers.LeakyReLU(negative_slope=LEAKY_SLOPE, name=f"{name}_leaky")(x)


def _csp_block(x, filters: int, name: str, next_name: _Namer):
    """conv3x3 -> [route, second half -> conv -> conv, concat, conv1x1], concat, maxpool."""
    route = _conv(x, filters, 3, next_name())
    half = keras.ops.split(route, 2, axis=-1)[1]
    branch1 = _conv(half, filters // 2, 3, next_name())
    branch2 = _conv(branch1, filters // 2, 3, next_name())
    x = layers.Concatenate(name=f"{name}_concat1")([branch2, branch1])
    feature = _conv(x, filters, 1, next_name())
    x = layers.Concatenate(name=f"{name}_concat2")([route, feature])
    return layers.MaxPooling2D(2, 2, padding="same", name=f"{name}_pool")(x), feature


def build() -> keras.Model:
    """The YOLOv4-tiny architecture with Keras's default weights."""
    next_name = _Namer()
    inputs = keras.Input(INPUT_SHAPE, name="input")
    x = _conv(inputs, 32, 3, next_name(), downsample=True)
    x = _conv(x, 64, 3, next_name(), downsample=True)
    x, _ = _csp_block(x, 64, "csp1", next_name)
    x, _ = _csp_block(x, 128, "csp2", next_name)
    x, route_26 = _csp_block(x, 256, "csp3", next_name)
    x = _conv(x, 512, 3, next_name())

    neck = _conv(x, 256, 1, next_name())
    x = _conv(neck, 512, 3, next_name())
    head_13 = layers.Conv2D(HEAD_CHANNELS, 1, name="head_13")(x)

    x = _conv(neck, 128, 1, next_name())
    # tf.image.resize (RESIZE_NEAREST_NEIGHBOR), as darknet-to-TensorFlow ports do; Keras 3's
    # UpSampling2D would lower to RESHAPE + TILE instead.
    x = keras.ops.image.resize(x, (2 * x.shape[1], 2 * x.shape[2]), interpolation="nearest")
    x = layers.Concatenate(name="neck_concat")([x, route_26])
    x = _conv(x, 256, 3, next_name())
    head_26 = layers.Conv2D(HEAD_CHANNELS, 1, name="head_26")(x)
    return keras.Model(inputs, [head_13, head_26], name="yolov4_tiny")


def head_offsets() -> np.ndarray:
    """Per-channel bias offsets of a head: (tx, ty, tw, th, objectness, 80 classes) per anchor."""
    per_anchor = np.zeros(5 + CLASSES)
    per_anchor[4] = OBJECTNESS_OFFSET
    per_anchor[5:] = CLASS_OFFSET
    return np.tile(per_anchor, ANCHORS_PER_CELL)


def build_random(seed: int) -> keras.Model:
    """YOLOv4-tiny with seeded He weights, calibrated batch norms and heads; outputs: raw heads."""
    model = build()
    randomize(
        model, seed, INPUT_SHAPE, heads=("head_13", "head_26"), head_scale=1.0, head_per_channel=True,
        head_offsets=head_offsets(), batch=8,
    )
    return model
