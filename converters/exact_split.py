"""Exact split: a one-time-masked input crosses in two parts, so that the mask costs no precision.

A one-time mask is ~10x the input's spread (input leakage <= 0.1 needs it; round 1's shaped mask 10x per
frequency band, 35-42x per element on the zoo's images), so a float32 accelerator
computing ``L(v + r, W')`` rounds its products, its sums and its result at 10x the magnitude of the
``L(v, W')`` the TEE keeps after popping ``L(r, W')``: about 10x float32's error on the masked layer,
which MobileNet's and ResNet-404's depth amplify to 2-8e-4 of their outputs (1e-4 is the target;
without any mask they sit at 1e-5 - 1e-4, ResNet-404 up to 2e-4). The split keeps everything of mask
magnitude exact:

- ``W'_hi``: each output channel's obfuscated filter rounded to ``b_w`` significant bits (a power-of-two
  grid per channel), ``W'_lo = W' - W'_hi`` (exact in float32).
- The mask ``r = r_hi + r_lo``: ``r_hi`` on a power-of-two grid ``g`` (``b_x`` bits across the masked
  input's range), ``r_lo`` the remainder, within ``g / 2``. The TEE sends, for the input ``v``::

      w = v + r_lo,  q = g * rint(w / g),  x_hi = r_hi + q,  x_lo = w - q        (all exact but w)

  as one tensor of ``2C`` channels ``[x_hi | x_lo]`` (``x_hi + x_lo = v + r``: the accelerator learns
  nothing it did not learn from ``v + r``; ``x_lo`` is ``v + r_lo`` modulo ``g``, spread evenly over
  ``[-g/2, g/2]`` whatever ``v``, as ``r_lo`` is: ``g`` is ~1/100 of the mask's spread).
- The layer runs as one op of ``2M`` outputs on it: weights ``[[W'_hi, 0], [W'_lo, W']]`` (input
  channels ``[x_hi | x_lo]``), so ``y_hi = L(x_hi, W'_hi)`` and ``y_lo = L(x_hi, W'_lo) + L(x_lo, W')``.
  Every product in ``y_hi`` is an integer multiple of ``g * grid(W'_hi)`` below ``2^(b_x + b_w)``, and a
  dot product of ``D`` of them stays below ``2^24`` such units when ``b_x + b_w + log2 D <= 24``: any
  float32 summation order computes ``y_hi`` exactly. ``y_lo`` is small (``~2^-b`` of ``y_hi``), so its
  rounding is too.
- The pop mask likewise: ``pop = L([r_hi | r_lo], W2)`` in float64, whose first half ``L(r_hi, W'_hi)``
  is exact in float32; the TEE restores ``(y_hi - pop_hi) + (y_lo - pop_lo)`` - the first difference
  exact - before the scheme's restore, so nothing of the mask's magnitude is ever rounded.

It costs the masked layer 4x its multiply-adds (MobileNet's first layer, reading the user's 3-channel
image: 5.7% more for the model) and the TEE a restore that reads twice the layer's output and pop mask.
Conv and dense layers of at most ``MAX_DOT_LENGTH`` terms per output only (longer ones on the user's input
are cut into chunks of their sum that are: ``converters.normalize.chunked``): a depthwise layer cannot read
both halves of a channel in one op, and keeps the plain one-time mask. Where the mask's rounding costs the
model little, the split is not worth its cost: ``groupmix``'s default policy (``exact_split=auto``) splits
round 1 where its mask is shaped (the default's: ``converters.calibration.split_needed``), and a white mask
only where calibration measured that cost or the split is cheap (``NEEDED_ABOVE``, ``CHEAP_BELOW``); a
round a user input joins later where its split weights are small enough for secure memory
(``LATE_SPLIT_BYTES``).
A modular mask's split (``tee_sim.modular_masks``) sends its high half modulo the mask's period ``P`` (a
multiple of the grid ``P / 2^(x_bits - 1)``: exact), and the TEE takes ``P k`` through ``[W'_hi | W'_lo]``
off the pop mask where it wrapped; ``x_lo`` is uniform over a cell and ``x_hi`` over the period, whatever
``v``.
This module is the converter's side; the TEE's is ``tee_sim.exact_split``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from tee_sim.program import modular_period

# The ``auto`` policy splits round 1 where the mask's float32 rounding alone costs the outputs more than
# NEEDED_ABOVE (``converters.calibration.split_needed``; a tenth of the 1e-4 fidelity target: the protected
# model's error without the split measured up to 9x that cost, MobileNet), or where the split costs less
# than CHEAP_BELOW of the model's offloaded multiply-adds (the precision is then worth its price: ResNet-44,
# whose error without it is 7.7x LiteRT's own engines' against float64, 4.7e-6, under the target still).
# The zoo on the default calibration, cost and the split's share, with white masks (before stop 39):
# MobileNet 1.2e-4, 5.7%, and ResNet-404 2.0e-4 (split: needed); ResNet-44 7.5e-6, 1.4% (split: cheap);
# yolov4-tiny 5.6e-6, 3.3% and MiniVGG 4.0e-6 (not split: their protected errors without it at worst
# 1.3e-5 and 2.7e-5 over 2 conversions x 3 inputs x 3 inferences on [0, 1] and on [-1, 1], against 6.9e-6
# and 7.7e-6 with it). Round 1's shaped masks (sqrt(2 * bands) times as large per element) are always
# split: this measure put MiniVGG's at 2.9e-6, and unsplit its outputs were up to 1.2e-4 off (a review).
NEEDED_ABOVE, CHEAP_BELOW = 1e-5, 0.02
# A round every policy masks for what one layer made of the user's input, or for its narrow input (stop 56:
# ``converters.partition.always_masked``), is split by ``auto`` where that costs less than LATER_CHEAP_BELOW
# of the offloaded multiply-adds or fewer than LATER_CHEAP_MACS (a small model's: a folded-standardization
# MLP's second layer, unsplit, put some of its outputs 3.5e-4 off, 10x LiteRT's engines' distance):
# ResNet-44's round 2 (+7%) then keeps the model at LiteRT's float32 floor
# (unsplit, 9x its engines' distance from float64, 6.3e-6), and ResNet-404's (+0.8%); YOLOv4-tiny's (+17%,
# and 25% of its latency and 11 MB in each pool entry, which put its verified model past the 64 MiB cap)
# and MiniVGG's (+70%) cross unsplit (MiniVGG's outputs then at most 4.5e-5 off LiteRT's over 32 inputs).
LATER_CHEAP_BELOW, LATER_CHEAP_MACS = 0.1, 1 << 20
# Such a round whose layers compute one output position (dense layers, convs of a 1x1 output: a dense layer
# on a 4-D tensor as planned) is split by ``auto`` whatever it costs where they sum more than
# LATER_LONG_TERMS terms per output and their split weights total at most LATER_SPLIT_BYTES: the mask's
# rounding grows with the sum's length (a review: a folded-standardization MLP's second layer, 4,096 terms,
# unsplit, had 5-8 of 200 rows over the 1e-4 target, up to 2.3e-4; split, 1.2e-5), and such a split costs a
# pool entry little. Not a conv's over a map: MiniVGG's and YOLOv4-tiny's round 2 (288 terms) stay within the
# target unsplit, and the split of a 3x3 conv of 64 channels on a 192x192 map (576 terms, 6.5e-7 unsplit)
# took 9.5 MiB more in each pool entry, and its verified model no longer loaded (a review). Past the bytes,
# the conversion warns of the precision the round loses.
LATER_LONG_TERMS, LATER_SPLIT_BYTES = 512, 32 << 20
# A round that a user input joins after round 1 (a U-Net's skip from the image: a helper's probe measured its
# outputs up to 2e-3 off unsplit) is split by ``auto`` where its readers' split weights, four times theirs,
# total at most LATE_SPLIT_BYTES: the trusted app reads them whole into secure memory at each refill of its
# one-time masks, and a dense head on a vector joined to flattened features (16 MiB, split 64 MiB) no longer
# loaded under the default cap (a review). Past it the conversion warns of the precision the round loses.
LATE_SPLIT_BYTES = 8 << 20

FLOAT32_BITS = 24
# The fewest bits for b_x + b_w: a sum of 8,193-16,384 terms left 10, and a dense layer of them on the user's
# input measured 3-10x LiteRT's own error (up to 1.1e-4 of its outputs on 0-255 inputs); in chunks of at most
# 8,192 (``converters.normalize.chunked``) 2.6e-5 at worst.
MIN_BITS = 11
MAX_DOT_LENGTH = 1 << (FLOAT32_BITS - MIN_BITS)  # the longest sum per output a split layer may have
TAIL = 4.4  # one-time masks are normal with tails cut at 4.3 standard deviations (tee_sim.one_time_masks)
INPUT_SPREADS = 8.0  # the masked input itself is allowed this many of its spreads from its mean


@dataclass(frozen=True)
class Split:
    """The split of one masked input: its grid ``g`` and the significant bits ``b_w`` of ``W'_hi``."""

    grid: float
    weight_bits: int


def plan(mask_std: float, mask_mean: np.ndarray, spread: float, dot_length: int,
         modular: bool = False) -> Split | None:
    """The split of an input masked by ``mask_std * N(0, 1) + mask_mean`` whose own values lie around
    ``-mask_mean`` with ``spread``, read by layers of ``dot_length`` terms per output; ``None`` when there
    is no mask or too few bits are left. The grid is sized for the worst magnitude expected: a value
    beyond it only makes its outputs round as they did without the split. ``modular``: a modular mask's
    (``tee_sim.modular_masks``; its period ``P`` from ``mask_std``), whose high half crosses modulo ``P``
    (within ``P / 2``) and whose pop mask takes ``P k`` off it where it wrapped (within ``1.5 P`` for
    ``|k| <= 1``): the grid ``P / 2^(x_bits - 1)``, which keeps both exact."""
    if not (mask_std > 0 and math.isfinite(mask_std)) or dot_length < 1:
        return None
    if dot_length > MAX_DOT_LENGTH:
        return None
    bits = FLOAT32_BITS - math.ceil(math.log2(dot_length))
    x_bits = (bits - 1) // 2  # balances the two halves' rounding: g / 2 * |W'| against 2^-b_w |x| |W'|
    if modular:
        return Split(grid=modular_period(mask_std) / 2.0 ** (x_bits - 1), weight_bits=bits - x_bits)
    bound = TAIL * mask_std + INPUT_SPREADS * spread + float(np.max(np.abs(mask_mean), initial=0.0))
    return Split(grid=2.0 ** math.ceil(math.log2(bound / 2 ** x_bits)), weight_bits=bits - x_bits)


def split_weights(kind: str, weights: np.ndarray, split: Split) -> np.ndarray:
    """``[[W'_hi, 0], [W'_lo, W']]``: a CONV_2D's ``[M, kh, kw, C]`` or a FULLY_CONNECTED's ``[M, C]``
    obfuscated weights as the ``[2M, ..., 2C]`` weights of the split layer (float32)."""
    if kind not in ("CONV_2D", "FULLY_CONNECTED"):
        raise ValueError(f"{kind} cannot be split")
    w = np.asarray(weights, np.float32)
    m = w.shape[0]
    largest = np.max(np.abs(w.reshape(m, -1)), axis=1).astype(np.float64)
    # Per output channel, a power-of-two grid that leaves weight_bits bits below the largest magnitude.
    exponent = np.where(largest > 0, np.ceil(np.log2(np.where(largest > 0, largest, 1.0))), 0.0)
    grid = (2.0 ** (exponent - split.weight_bits)).reshape((m,) + (1,) * (w.ndim - 1))
    hi = (np.rint(w / grid) * grid).astype(np.float32)
    lo = w - hi  # exact: the bits of w below hi's grid
    return np.concatenate([np.concatenate([hi, np.zeros_like(w)], axis=-1),
                           np.concatenate([lo, w], axis=-1)], axis=0)


def dot_length(weights: np.ndarray) -> int:
    """Terms per output of a CONV_2D (``[M, kh, kw, C]``) or FULLY_CONNECTED (``[M, C]``) layer: taps x
    input channels."""
    return int(np.prod(weights.shape[1:]))
