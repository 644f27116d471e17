"""The tolerance of Freivalds' check (``tee_sim.freivalds``) and the bound it achieves: how many secret
projections a layer's check takes, and how likely a changed result passes it.

The check accepts a result only if ``|u_j . y'_p - z_jp| <= tau_p = TOLERANCE * eps32 * S * n_p`` at every
output position ``p`` and for every projection ``j`` (``n_p``: the norm of the input window position ``p``
reads).
``S`` is the layer's filter scale (conv / dense: ``||W'||_F``; depthwise: the largest norm of the filters
that read one input channel), so ``tau`` bounds the float32 rounding of an honest accelerator (a dot
product of a window with a filter of norm ``w`` is off by about ``eps32 * w * n_p``; projecting ``M`` such
errors with a Gaussian ``u`` adds them in quadrature) and of the check itself. ``TOLERANCE`` is set from
measurement: the largest ``|u . y' - z| / (eps32 S n_p)`` seen on clean inferences of the zoo models is
1.4 (MiniVGG) to 2.6 (ResNet-404) (the bench's worst ratio, 0.085-0.164 of the tolerance), so 16 leaves a
margin of 6x against false alarms; it assumes a float32 accelerator (a GPU delegate that computes in
float16 would be reported as tampering).

Long sums. ``tau_p`` bounds rounding that adds up like a random walk, about ``eps32 w n_p`` whatever the
length ``D`` of each output's sum (``taps * C``). Where the partial sums grow with the result - a trained
layer's filters aligned with their inputs, a blank image whose every window is the same - an honest sum's
rounding grows as ``eps32 sqrt(D) |y|`` instead (each of ``D`` additions rounds a partial sum of about the
result's size): a red team's trained model, a conv of 64-256 channels flattened into a dense layer of 10
outputs (``D`` = 65,536 - 262,144), failed up to 55% of blank images and 22% of its test digits on honest
XNNPACK results, at 1.0-1.4 tolerances. The check's own ``u . y'`` is such a sum too, of ``M / G`` products
in each lane (``G`` output channels to a vector): a 1x1 conv from one channel to 4096 (``tau_p`` then just
``16 eps32 |y_p|``) failed 38 of 100 honest checks (a helper's ASan probe). So a check's tolerance is
``sqrt(tau_p^2 + coherent ||y'_p||^2)``, ``coherent = (COHERENT eps32)^2 (D + M / G)``, from the result as
it came: a change moves that term by at most
``COHERENT eps32 sqrt(D)`` of itself (1.7e-4 at ``D`` = 131,072), far below the 1e-3 the bound is stated
for, which counts the term in ``||tau||``. ``COHERENT`` = 4 from measurement: ``||y' - y|| / (eps32 sqrt(D)
||y||)`` on that model's dense layer (LiteRT against float64, blank images and 200 digits, ``D`` = 65,536
and 131,072) was 0.06-0.25, and ``u . (y' - y)`` is Gaussian of that norm: 16x the worst, as
``TOLERANCE``. On isotropic inputs (``||y'_p|| ~ S n_p / sqrt(D)``) the term is a quarter of the first
(more where ``M / G`` is large against ``D``); its ``D`` part raises the estimate of ``||tau|| / ||y'||``
below by 3%.

The bound. Let the accelerator return ``y' + E``, ``E`` (``[P, M]``) chosen without knowing ``u`` (the
projections are secret and fresh for every inference, so a rejected attempt teaches nothing about the
next one). With ``D = E + delta`` (``delta``: the honest rounding, also independent of ``u``),
``u_j . D_p ~ N(0, ||D_p||^2)``, so the check at one position misses with probability at most
``2 tau_p / (sqrt(2 pi) ||D_p||)`` (the Gaussian density is at most ``1 / sqrt(2 pi)``; the TEE's own
rounding is inside ``tau``). Some position has ``||D_p|| / tau_p >= ||D|| / ||tau||`` (else
``||D||^2 = sum (||D_p|| / tau_p)^2 tau_p^2 < ||D||^2``), and missing every position implies missing
that one, for each of the ``k`` independent projections::

    P(miss) <= beta^k,   beta = sqrt(2 / pi) * ||tau|| / ||D||.

For a change of norm ``||E|| >= RELATIVE_CHANGE * ||y'||`` (1e-3, the requirement), ``||D|| >=
||E|| - ||delta||`` and ``beta <= sqrt(2 / pi) ||tau|| / ((1e-3 - ||delta|| / ||y'||) ||y'||)``. With
inputs that look isotropic (the masks dominate them) ``||tau|| / ||y'|| ~ TOLERANCE eps32 S sqrt(T C) /
||W'||_F`` (``T`` taps, ``C`` input channels), which picks ``k`` per layer at load so that ``beta^k <=
2^-26`` (6 bits of margin for inputs less isotropic than the estimate assumes; 3.5 bits for conv and
dense layers with at least ``SMALL_OUTPUT`` output values, whose norms concentrate; ``MIN_PROJECTIONS`` at
least), the estimate first multiplied by the layer's ``anisotropy``: how far from isotropic the converter
measured its inputs on calibration samples (``converters.anisotropy``; 1 when absent). A check can also
compute the bound it actually achieved from ``||tau||`` and ``||y'||`` (``LayerCheck.check`` returns
``log2 beta^k``); the tests assert it is at most -20 for every layer of every
zoo model. A change is per round: if ``||E||^2 >= 1e-6 sum_l ||y'_l||^2`` over the round's layers, some
layer has ``||E_l|| >= 1e-3 ||y'_l||``, so the per-layer bound holds for the round.
"""

from __future__ import annotations

import math

import numpy as np

from tee_sim.ta_shadownet_kernels import LANES

EPS32 = float(np.finfo(np.float32).eps)
TOLERANCE = 16.0
COHERENT = 4.0  # the long sums' term (module docstring)
RELATIVE_CHANGE = 1e-3
TARGET_LOG2 = -20.0
# k is picked for 2^(-20 - margin) on the isotropic estimate: real inputs vary around it, the more so
# the fewer output values a layer has (a small dense layer's achieved bound was 2^-18 with no margin).
# Large layers had 2 bits until a blank image (all zeros: every activation after the first round the same
# at each position) left ResNet-404's 16-channel layers at 2^-19.7 with their k = 4 (0.84 bits per
# projection under the estimate). With 3.5 those layers take k = 5 (2^-24.7 on a blank image): the zoo's
# projections ResNet-44 226 -> 240, ResNet-404 2026 -> 2160, MobileNet 72 -> 74, yolov4-tiny 111 -> 115,
# MiniVGG 33 as before.
MARGIN_LOG2, SMALL_MARGIN_LOG2, SMALL_OUTPUT = 6.0, 3.5, 1 << 14
MIN_PROJECTIONS, MAX_PROJECTIONS = 2, 16
_DENSITY = math.sqrt(2 / math.pi)


def lane_group(k: int) -> int:
    """``G``: the output channels to a vector of the kernels with ``k`` projections (``kp`` lanes each,
    ``k`` rounded up to a power of two)."""
    return LANES // (1 << (k - 1).bit_length())


def coherent(sum_length: int, outputs: int, group: int) -> float:
    """The long sums' factor (module docstring): a check's tolerance is ``sqrt(tau_p^2 + coherent
    ||y'_p||^2)``, for one output's sum of ``sum_length`` terms (``D``) and each lane of the check's
    ``u . y'`` adding ``outputs / group`` products (``M / G``)."""
    return (COHERENT * EPS32) ** 2 * (sum_length + -(-outputs // group))


def projections_needed(rho: float, sum_length: int, outputs: int, concentrated: bool) -> tuple[int, bool]:
    """``(k, capped)``: the fewest projections with ``beta^k <= 2^(-20 - margin)`` for the estimate
    ``rho`` of ``||tau|| / ||y'||`` (module docstring; the small margin where the layer's norms
    ``concentrated``), and whether the bound wanted more than ``MAX_PROJECTIONS`` (then ``k`` is that)."""
    margin = SMALL_MARGIN_LOG2 if concentrated else MARGIN_LOG2
    # The long sums' term, relative to ||y'|| as it is, grows with k: more projections to a vector leave
    # fewer output channels to it (G), and each lane of u . y' sums M / G products.
    for k in range(MIN_PROJECTIONS, MAX_PROJECTIONS + 1):
        beta = _DENSITY * math.sqrt(rho ** 2 + coherent(sum_length, outputs, lane_group(k))) / RELATIVE_CHANGE
        if beta >= 0.5:  # and so for every larger k
            break
        if k * math.log2(beta) <= TARGET_LOG2 - margin:
            return k, False
    return MAX_PROJECTIONS, True


def bound_log2(k: int, tau_norm: float, coherent_factor: float, y_norm: float) -> float:
    """``log2 beta^k`` that a check of ``k`` projections achieved against a change of ``RELATIVE_CHANGE *
    y_norm``, from its ``||tau||`` and its ``coherent`` factor (module docstring)."""
    if not (math.isfinite(y_norm) and math.isfinite(tau_norm)):
        return 0.0  # a norm past float32's range: no bound is claimed (the check fails closed)
    # ||tau|| with the long sums' term, and ||delta|| <= ||tau|| / TOLERANCE + that term / COHERENT
    full = math.sqrt(tau_norm ** 2 + coherent_factor * y_norm ** 2)
    margin = (RELATIVE_CHANGE - math.sqrt(coherent_factor) / COHERENT) * y_norm - tau_norm / TOLERANCE
    if margin <= 0:
        return 0.0
    beta = _DENSITY * full / margin
    return k * min(0.0, math.log2(beta)) if beta > 0 else -math.inf
