"""Random weights that behave like a trained network's.

Keras's defaults (Glorot kernels, batch norm with mean 0 / variance 1) let activations shrink or grow
geometrically with depth, so a random MobileNet's logits end up around 1e-19 and every fidelity check
on it is meaningless. Here, instead:

1. every kernel is He-normal (std ``sqrt(2 / fan_in)``), biases zero;
2. every batch norm gets a random gamma (``U(0.5, 1.5)``) and beta (``N(0, 0.2)``), and moving
   statistics *calibrated* on a small batch of random images: each layer's mean/variance are those of
   the activations it actually sees, layer by layer in execution order, so its output has per-channel
   mean beta and std gamma;
3. the head (classifier or detector output layer) is centred and scaled on the same batch, so that
   outputs vary with the input and are far from uniform (a trained network's logits have std of a few
   units).

Everything is drawn from one ``numpy.random.Generator``, so a seed fixes every weight.
"""

from __future__ import annotations

import numpy as np

from models.backend import require_tensorflow

_, keras = require_tensorflow()

GAMMA_RANGE = (0.5, 1.5)
BETA_STD = 0.2


def random_images(rng: np.random.Generator, count: int, shape: tuple[int, ...]) -> np.ndarray:
    """``count`` float32 NHWC images mixing the kinds of random input users feed a model.

    White noise N(0, 1), U(0, 1), U(-1, 1) and smooth (low-frequency) noise, in turn, so that the
    calibrated statistics hold for any of them, not only for one input distribution.
    """
    h, w, c = shape
    images = np.empty((count, h, w, c), np.float32)
    for i in range(count):
        kind = i % 4
        if kind == 0:
            images[i] = rng.standard_normal((h, w, c))
        elif kind == 1:
            images[i] = rng.uniform(0.0, 1.0, (h, w, c))
        elif kind == 2:
            images[i] = rng.uniform(-1.0, 1.0, (h, w, c))
        else:
            coarse = rng.standard_normal((h // 8 + 1, w // 8 + 1, c))
            images[i] = np.repeat(np.repeat(coarse, 8, axis=0), 8, axis=1)[:h, :w]
    return images


def he_initialize(model: keras.Model, rng: np.random.Generator) -> None:
    """He-normal kernels and zero biases for every convolution, depthwise convolution and dense layer."""
    for layer in model.layers:
        if isinstance(layer, keras.layers.DepthwiseConv2D):
            kh, kw, _, _ = layer.kernel.shape
            fan_in = kh * kw
        elif isinstance(layer, keras.layers.Conv2D):
            kh, kw, cin, _ = layer.kernel.shape
            fan_in = kh * kw * cin
        elif isinstance(layer, keras.layers.Dense):
            fan_in = layer.kernel.shape[0]
        else:
            continue
        shape = tuple(layer.kernel.shape)
        layer.kernel.assign((rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32))
        if layer.bias is not None:
            layer.bias.assign(np.zeros(layer.bias.shape, np.float32))


def randomize_batch_norms(model: keras.Model, rng: np.random.Generator) -> None:
    """A random, non-trivial gamma (``U(0.5, 1.5)``) and beta (``N(0, 0.2)``) for every batch norm."""
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            channels = layer.gamma.shape[0]
            layer.gamma.assign(rng.uniform(*GAMMA_RANGE, channels).astype(np.float32))
            layer.beta.assign((rng.standard_normal(channels) * BETA_STD).astype(np.float32))


def set_batch_norm_statistics(model: keras.Model, images: np.ndarray) -> None:
    """Set every batch norm's moving mean/variance to those of the activations it sees on ``images``.

    One forward pass in training mode normalises every batch norm with the statistics of the batch
    it receives, whose input was itself produced by the already-normalised layers before it: exactly
    a layer-by-layer calibration in execution order. Momentum 0 makes Keras store those batch
    statistics as the moving ones; dropout is switched off for the pass so it does not skew them.
    """
    norms = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    dropouts = [layer for layer in model.layers if isinstance(layer, keras.layers.Dropout)]
    saved_momentum = [layer.momentum for layer in norms]
    saved_rate = [layer.rate for layer in dropouts]
    try:
        for layer in norms:
            layer.momentum = 0.0
        for layer in dropouts:
            layer.rate = 0.0
        model(images, training=True)
    finally:
        for layer, momentum in zip(norms, saved_momentum, strict=True):
            layer.momentum = momentum
        for layer, rate in zip(dropouts, saved_rate, strict=True):
            layer.rate = rate


def calibrate_head(
    model: keras.Model,
    layer_name: str,
    images: np.ndarray,
    *,
    scale: float,
    per_channel: bool,
    offsets: np.ndarray | None = None,
) -> None:
    """Centre each output channel of the (linear) layer ``layer_name`` on ``images``, then scale it.

    ``per_channel=False`` scales all channels by one factor so that the centred outputs have overall
    std ``scale`` (a classifier: classes keep their relative spread); ``per_channel=True`` gives each
    channel std ``scale`` (a detector head, whose channels mean different things). ``offsets`` are
    then added to the bias, per output channel.
    """
    layer = model.get_layer(layer_name)
    probe = keras.Model(model.input, layer.output)
    outputs = np.asarray(probe(images, training=False), np.float64)
    channels = outputs.shape[-1]
    outputs = outputs.reshape(-1, channels)
    mean = outputs.mean(axis=0)
    std = outputs.std(axis=0) if per_channel else np.full(channels, (outputs - mean).std())
    factor = scale / np.maximum(std, 1e-12)
    kernel = np.asarray(layer.kernel, np.float64) * factor
    bias = (np.asarray(layer.bias, np.float64) - mean) * factor
    if offsets is not None:
        bias = bias + offsets
    layer.kernel.assign(kernel.astype(np.float32))
    layer.bias.assign(bias.astype(np.float32))


def randomize(
    model: keras.Model,
    seed: int,
    input_shape: tuple[int, ...],
    *,
    heads: tuple[str, ...],
    head_scale: float = 3.0,
    head_per_channel: bool = False,
    head_offsets: np.ndarray | None = None,
    batch: int = 16,
) -> None:
    """He initialisation, calibrated batch norms and calibrated head layers, all from ``seed``."""
    rng = np.random.default_rng(seed)
    he_initialize(model, rng)
    images = random_images(rng, batch, input_shape)
    randomize_batch_norms(model, rng)
    set_batch_norm_statistics(model, images)
    for head in heads:
        calibrate_head(
            model, head, images, scale=head_scale, per_channel=head_per_channel, offsets=head_offsets
        )
