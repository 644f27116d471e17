"""MiniVGG trained on scikit-learn's handwritten digits: the zoo's real-data accuracy check.

The 1797 8x8 grey images (values 0..16) that ship with scikit-learn are upsampled to 32x32 (each pixel
a 4x4 block), repeated over 3 channels and scaled to [-1, 1]; a stratified quarter is held out as the
test split. Nothing is downloaded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import keras

TEST_FRACTION = 0.25
EPOCHS = 4
BATCH_SIZE = 32
LEARNING_RATE = 1e-3
STATISTICS_IMAGES = 512


@dataclass(frozen=True)
class TrainedModel:
    model: keras.Model
    x_test: np.ndarray      # float32 (N, 32, 32, 3), already scaled: feed it to the model as is
    y_test: np.ndarray      # int64 (N,) labels 0..9
    accuracy: float         # of the Keras model on the test split


def to_images(pixels: np.ndarray) -> np.ndarray:
    """8x8 digit images (N, 8, 8), values 0..16, to float32 model input (N, 32, 32, 3) in [-1, 1]."""
    images = np.repeat(np.repeat(np.asarray(pixels, np.float32), 4, axis=1), 4, axis=2)
    return np.repeat((images / 8.0 - 1.0)[..., None], 3, axis=3)


def load_split(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(x_train, y_train, x_test, y_test)``: model-ready images and int64 labels, split by ``seed``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = to_images(digits.images)
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=TEST_FRACTION, random_state=seed, stratify=y
    )
    return x_train, y_train, x_test, y_test


def train_minivgg(seed: int = 0, epochs: int = EPOCHS) -> TrainedModel:
    """Train MiniVGG (He initialisation from ``seed``) with Adam; under a minute on 2 idle CPU cores.

    After training, the batch norms' moving statistics are replaced by exact ones over a batch of
    training images: a few hundred steps are too few for Keras's momentum-0.99 running averages to
    settle, and the exact statistics are worth a point or two of test accuracy.
    """
    from models.backend import quiet, require_tensorflow
    from models.calibrate import he_initialize, set_batch_norm_statistics
    from models.minivgg import build

    _, keras_module = require_tensorflow()
    keras_module.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    x_train, y_train, x_test, y_test = load_split(seed)
    model = build()
    he_initialize(model, rng)
    model.compile(
        optimizer=keras_module.optimizers.Adam(LEARNING_RATE),
        loss="sparse_categorical_crossentropy",
        # XLA compilation costs more than it saves on a model this small.
        jit_compile=False,
    )
    with quiet():
        model.fit(x_train, y_train, batch_size=BATCH_SIZE, epochs=epochs, shuffle=True, verbose=0)
    subset = rng.choice(len(x_train), size=min(STATISTICS_IMAGES, len(x_train)), replace=False)
    set_batch_norm_statistics(model, x_train[np.sort(subset)])
    probabilities = np.concatenate(
        [np.asarray(model(x_test[i : i + 256], training=False)) for i in range(0, len(x_test), 256)]
    )
    accuracy = float(np.mean(probabilities.argmax(axis=1) == y_test))
    return TrainedModel(model, x_test, y_test, accuracy)


def tflite_accuracy(model: bytes, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy of a ``.tflite`` classifier (batch size 1) on images ``x`` with labels ``y``."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=model, num_threads=2)
    interpreter.allocate_tensors()
    input_index = interpreter.get_input_details()[0]["index"]
    output_index = interpreter.get_output_details()[0]["index"]
    correct = 0
    for image, label in zip(x, y, strict=True):
        interpreter.set_tensor(input_index, image[None].astype(np.float32))
        interpreter.invoke()
        correct += int(interpreter.get_tensor(output_index)[0].argmax() == label)
    return correct / len(y)


def save_testset(path: str | os.PathLike, x: np.ndarray, y: np.ndarray) -> None:
    """Write a test split as compressed ``.npz`` (atomically): ``x`` float32 NHWC model input,
    ``y`` int64 labels.

    Load it with ``data = np.load(path); data["x"], data["y"]``; ``x[i:i+1]`` is one input of the
    exported ``.tflite`` (batch size 1).
    """
    import io

    from shadownet.files import write_atomically

    buffer = io.BytesIO()
    np.savez_compressed(buffer, x=np.asarray(x, np.float32), y=np.asarray(y, np.int64))
    write_atomically(path, buffer.getvalue())
