"""MobileNet v1 (Howard et al. 2017), alpha 1.0, 224x224x3, 1000 classes: Keras's own definition.

After TFLite conversion: 15 CONV_2D (the stem, 13 pointwise, the 1x1 classifier ``conv_preds``) and
13 DEPTHWISE_CONV_2D, ReLU6 fused into each, batch norm folded; then MEAN (global average pooling),
RESHAPE and SOFTMAX. Keras's stride-2 ``ZeroPadding2D(((0, 1), (0, 1)))`` is what SAME padding does,
so the converter folds it into the depthwise convolutions (no PAD op).
"""

from __future__ import annotations

from models.backend import require_tensorflow
from models.calibrate import randomize

_, keras = require_tensorflow()

INPUT_SHAPE = (224, 224, 3)
CLASSES = 1000


def build_random(seed: int) -> keras.Model:
    """MobileNet v1 with seeded He weights and calibrated batch norms; output: softmax probabilities."""
    model = keras.applications.MobileNet(
        input_shape=INPUT_SHAPE, alpha=1.0, weights=None, classes=CLASSES, classifier_activation="softmax"
    )
    randomize(model, seed, INPUT_SHAPE, heads=("conv_preds",), batch=8)
    return model
