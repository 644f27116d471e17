"""Which layers the TA computes rather than checks for the few directions of their results
(``tee_sim.freivalds.LayerCheck.cheaper_computed``), and how it computes a conv layer as a dense one.

The number of projections a check takes is chosen for a result ``y'`` whose norm is near its mean, with a
margin of 6 bits over ``k`` projections: with 8, ``||y'||^2`` may fall to a third of its mean. How far it
falls from input to input depends on how many independent directions the results have: the participation
ratio of the layer's weights' singular values, ``(sum s^2)^2 / sum s^4``, times a conv layer's output
positions in one image (``count``, ``independent_rows``; a chi-square of that many degrees of freedom for
``||y'||^2`` on isotropic inputs; a batch's images and a dense layer's rows are not counted: they may all
be one input). With 64 it falls below a third of its mean once in 10^7 inputs, with 2 once in 4.
Under the paper's scheme a dense layer's weights put nearly all their energy in one to four rows (a fake
over a scale near 0): the zoo MiniVGG's 4096x614 and 512x12 layers had ratios of 1.0 to 3.7, and their
checks achieved 2^-18 on 13 of 40 images and no bound at all on 2 of 40 (seeds 7 and 2), where groupmix's
4096x512 layer, at 293, held 2^-25 on every image. A conv layer's count takes its positions as
independent, which neighbouring windows are not, so its threshold is measured instead: the layers that
fell short in a helper's probe (192 conv layers, both schemes) all counted 4.01 or less (a one-position
3x3 conv of stride 2 on a 4x4 map reached 2^-4.9 on 20 of 40 inputs), and MobileNet's 7x7 pointwise
layers under the paper's scheme counted 48-60 and held 2^-23.3 (a review).

The TA computes such a layer from its secure copy of what it sent - a dense layer as it is, a conv as the
dense layer it is on each image's whole input (``as_dense``) - with at most ``COMPUTED_DENSE_BYTES`` of
weights kept in secure memory.
"""

from __future__ import annotations

import math

import numpy as np

from tee_sim.layer_geometry import Geometry

FEW_DIRECTIONS, FEW_CONV_DIRECTIONS = 64, 16  # a dense layer's threshold, a conv layer's (module docstring)
# The largest weights (bytes; a conv's laid out as ``as_dense``) of a layer computed for its few
# directions or its capped projections: a quarter of the simulated secure world's 64 MiB cap (the rest:
# the weights' authenticated read, masks, checks, the TEE's model). A 2457x4096 layer of the paper's
# scheme, 38 MiB, failed the load beside its authenticated read (a review).
COMPUTED_DENSE_BYTES = 16 << 20
# And the most of them all together (half the cap): six 1536x1536 dense layers of the paper's scheme, each
# under the limit, failed the load together (a review; 59 MiB used before the sixth). Past it the load
# checks such layers, and counts them weak (``tee_sim.per_inference``).
COMPUTED_TOTAL_BYTES = 32 << 20
EXACT_GRAM_MACS, DIRECTION_PROBES = 1 << 27, 32  # ``count``: exact up to that, then estimated


def count(weights: np.ndarray, rows: int, threshold: float) -> float:
    """The directions of a layer's results: ``rows`` (``independent_rows``) times the participation
    ratio of ``weights`` (``[M, D]``, a conv's filters as rows). ``sum s^4`` is the squared Frobenius
    norm of the smaller Gram matrix, or, where that costs more than ``EXACT_GRAM_MACS`` (a 25088x4096
    layer: 4e11, ~10 s at load), its unbiased estimate from ``DIRECTION_PROBES`` Gaussian probes,
    ``E ||W^T W g||^2`` (``2 M D`` each; relative error about ``sqrt(2 / (ratio x probes))``: 3% near 64;
    0.4 s for that layer). Any number at or above ``threshold`` when that is clear without the sum, or
    where the weights' squares overflow (``inf``)."""
    m, c = weights.shape
    if rows * min(m, c) < threshold:  # the ratio is at most min(m, c)
        return float(rows * min(m, c))
    if rows >= threshold:  # and at least 1
        return math.inf
    with np.errstate(over="ignore", invalid="ignore"):  # weights past float32's square root: inf
        second = float(np.einsum("ij,ij->", weights, weights, dtype=np.float64))
        if min(m, c) ** 2 * max(m, c) <= EXACT_GRAM_MACS:
            gram = weights @ weights.T if m <= c else weights.T @ weights  # its Frobenius norm^2: sum s^4
            fourth = float(np.einsum("ij,ij->", gram, gram, dtype=np.float64))
        else:
            probes = np.random.default_rng(0).standard_normal((c, DIRECTION_PROBES)).astype(np.float32)
            images = weights.T @ (weights @ probes)  # W^T W g, one column per probe
            fourth = float(np.einsum("ij,ij->", images, images, dtype=np.float64)) / DIRECTION_PROBES
    if not (math.isfinite(second) and math.isfinite(fourth)) or fourth <= 0:
        return math.inf
    return rows * second ** 2 / fourth


def independent_rows(kind: str, y_shape: tuple[int, ...]) -> int:
    """The rows ``count`` takes as independent: a conv layer's output positions in one image, none of a
    dense layer's rows. A batch may be one image several times (a burst of frames), and a dense layer's
    rows one input each: 64 such rows of a paper-scheme layer counted for 64 directions and reached no
    bound (a review's construction), where the rows of one are one direction's worth."""
    return math.prod(y_shape[1:-1]) if kind == "CONV_2D" else 1


def dense_shape(geo: Geometry) -> tuple[int, int]:
    """A conv layer as a dense one on each image: ``[positions x M, H x W x C]``."""
    _, h, w, c = geo.x_shape
    _, ho, wo, m = geo.y_shape
    return ho * wo * m, h * w * c


def as_dense(weights: np.ndarray, geo: Geometry, out: np.ndarray) -> None:
    """A conv layer's weights ``[M, kh, kw, C]`` written into ``out`` (float32 of ``dense_shape``, secure
    memory) as the dense layer they are on each image's whole input (rows in the output's order: position,
    then channel), zero where a window does not read, the taps in the zero padding dropped (they read
    zeros): for a layer of few output positions (a one-position conv is a dense layer on its window)."""
    _, h, w, c = geo.x_shape
    _, ho, wo, m = geo.y_shape
    (kh, kw), (sh, sw), (dh, dw), (top, left) = geo.kernel, geo.stride, geo.dilation, geo.before
    if out.dtype != np.float32 or out.shape != dense_shape(geo) or not out.flags.c_contiguous:
        raise ValueError(f"as_dense: {out.dtype} {out.shape} for {dense_shape(geo)}")
    taps = np.asarray(weights, np.float32).reshape(m, kh, kw, c)
    dense = out.reshape(ho, wo, m, h, w, c)  # contiguous: a view, written in place
    dense[...] = 0.0
    for py in range(ho):
        for px in range(wo):
            for i in range(kh):
                y = py * sh - top + i * dh
                if not 0 <= y < h:
                    continue
                for j in range(kw):
                    x = px * sw - left + j * dw
                    if 0 <= x < w:
                        dense[py, px, :, y, x, :] = taps[:, i, j, :]
