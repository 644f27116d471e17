"""The paper's scheme (ShadowNet, IEEE S&P 2023), as its authors' code implements it
(../shared/design/SHADOWNET.md).

Conv / dense (dense is a 1x1 conv): ``M = int(N * obf_ratio)`` output channels, the ``M - N`` extra ones
fake filters ``F_r ~ N(0, fake_std^2)``; per real filter a scale ``s_i ~ U(0, 1)`` and a fake partner
``j(i)`` drawn uniformly among the fakes; ``W'_i = (W_i - F_j(i)) / s_i``; all ``M`` channels shuffled by
one secret permutation. Restore: ``y_i = s_i * y'[m0(i)] + y'[m1(i)]``.

Depthwise (no fakes): the TEE permutes the input channels, ``x'_c = x_pi(c)``; the kernel is
``K'_c = K_pi(c) * s_pi(c)``; the TEE un-permutes the output and divides by the scale. With a depth
multiplier ``m``, output channel ``c * m + j`` follows its input channel and has its own scale.

Masks: static, drawn once at conversion (as the paper), but at the scale of the layer's real
activations instead of the authors' near-zero ones: noise of ``mask_scale`` times the activations'
standard deviation, minus their per-channel mean when ``center_masks`` (default). Centering hides the
mean as well and keeps the masked input no larger than the activations' own spread, which matters for
precision: the accelerator's float32 rounding grows with its input, and the N(0, 1) fakes amplify it by
cancellation in every restore (measured on MobileNet: 2.6x the worst error of unmasked inputs with
uncentered RMS-scale masks, about 1x centered).

Known weakness (measured, ../shared/design/SHADOWNET.md): N(0, 1) fakes are ~100x larger than real
weights, so every ``W'_i`` is almost collinear with its partner and the pair gives ``W_i`` back. This
scheme exists to reproduce the paper faithfully, weakness included.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np

from converters.schemes import ActivationStats, LinearLayer, MaskDistribution, ObfuscatedLinear, flag, number
from converters.secret_random import Random

# Fakes this many times the real weights' RMS or more cost the restore's cancellation precision: about
# 4e-7 relative per unit of the ratio (a probe's single conv: weights at 1e-3 of the fakes, 3.6e-4; at 0.1,
# 2e-6), so from 256x the model is likely to miss 1e-4. Trained layers sit at 10-50x.
FAKE_DOMINANCE = 256


class ShadowNetScheme:
    """The paper's transformation. Parameters: ``obf_ratio`` (1.2), ``fake_std`` (1.0), ``mask_scale``
    (1.0, times the activations' standard deviation), ``center_masks`` (True)."""

    name = "shadownet"
    static_masks = True  # drawn once at conversion, as the paper's

    def __init__(self, obf_ratio: float = 1.2, fake_std: float = 1.0, mask_scale: float = 1.0,
                 center_masks: bool = True) -> None:
        # Up to 10x the filters (the paper: 1.2); fakes and masks up to 1e4 (float32 keeps about 3 digits of
        # what they hide, and the fakes cancel in every restore).
        self.obf_ratio = number("obf_ratio", obf_ratio, 1, 10, above_low=True)
        self.fake_std = number("fake_std", fake_std, 0, 1e4, above_low=True)
        self.mask_scale = number("mask_scale", mask_scale, 0, 1e4)
        self.center_masks = flag("center_masks", center_masks)

    def public_params(self) -> dict[str, Any]:
        # fake_std and mask_scale are distribution parameters, not secrets; the paper's values are public too.
        return {"obf_ratio": self.obf_ratio, "fake_std": self.fake_std, "mask_scale": self.mask_scale,
                "center_masks": self.center_masks}

    def fake_count(self, n: int) -> int:
        # The authors' int(N * ratio) gives no fake at all below 5 filters; one fake is the minimum.
        return max(1, int(n * self.obf_ratio + 1e-9) - n)

    def obfuscate(self, layer: LinearLayer, rng: Random,
                  input_of: ObfuscatedLinear | None = None) -> ObfuscatedLinear:
        if layer.kind == "DEPTHWISE_CONV_2D":
            return self._depthwise(layer, rng, input_of)
        return self._filters(layer, rng)  # its input is not transformed: input_of does not apply

    def _filters(self, layer: LinearLayer, rng: Random) -> ObfuscatedLinear:
        w = np.asarray(layer.weights, np.float64)
        rms = math.sqrt(float(np.mean(w * w))) if w.size else 0.0
        if 0 < rms * FAKE_DOMINANCE <= self.fake_std:
            warnings.warn(f"{layer.name or layer.kind}: fakes of std {self.fake_std:g} are "
                          f"{self.fake_std / rms:.0f}x its weights' RMS ({rms:.1e}): each restore cancels "
                          f"them, at a cost in precision (about {4e-7 * self.fake_std / rms:.0e} relative at "
                          "this layer, and up to ~10x that at the model's outputs: a helper's EfficientNetB0 "
                          "reached 1e-3 where its stem's estimate was 1.5e-4); --scheme "
                          f"shadownet:fake_std={rms * 16:.1g} keeps it (one value for the whole model: the "
                          "smallest that such warnings name)", stacklevel=2)
        n = w.shape[0]
        r = self.fake_count(n)
        m = n + r
        fakes = (rng.standard_normal((r, *w.shape[1:])) * self.fake_std).astype(np.float32)
        # s in (0, 1]: numpy's uniform is [0, 1), and s = 0 would divide by zero.
        scales = (1.0 - rng.random(n)).astype(np.float32)
        partner = rng.integers(0, r, n)
        # Computed from the float32 fakes and scales the TEE will use, so s * W' + F is W up to one
        # float32 rounding of W' (the cancellation the paper's N(0, 1) fakes force on every restore).
        per_filter = scales.astype(np.float64).reshape(-1, *[1] * (w.ndim - 1))
        real = (w - fakes[partner].astype(np.float64)) / per_filter
        channels = np.concatenate([real.astype(np.float32), fakes])
        order = rng.permutation(m)  # accelerator output p holds channel order[p]
        position = np.argsort(order)  # position[c]: where channel c lands
        index = np.stack([position[:n], position[n + partner]]).astype(np.int32)
        coef = np.stack([scales, np.ones(n, np.float32)])
        return ObfuscatedLinear(np.ascontiguousarray(channels[order]), None, index, coef)

    def _depthwise(self, layer: LinearLayer, rng: Random,
                   input_of: ObfuscatedLinear | None = None) -> ObfuscatedLinear:
        k = np.asarray(layer.weights, np.float64)
        mult = int(layer.depth_multiplier)
        cm = k.shape[-1]
        if mult < 1 or cm % mult:
            raise ValueError(f"{layer.name}: {cm} depthwise channels with depth multiplier {mult}")
        c = cm // mult
        shared = None if input_of is None else input_of.input_permutation
        # x'_c = x_perm[c]; another depthwise reader's of the same tensor when there is one
        perm = shared.astype(np.int64) if shared is not None and len(shared) == c else rng.permutation(c)
        scales = (1.0 - rng.random(cm)).astype(np.float32)
        # Output channel o = perm[c] * m + j of the original lands at c * m + j.
        source = (perm[:, None] * mult + np.arange(mult)).reshape(-1)
        weights = (k[..., source] * scales[source].astype(np.float64)).astype(np.float32)
        position = np.empty(cm, np.int64)
        position[source] = np.arange(cm)
        index = position.astype(np.int32)[None, :]
        coef = (1.0 / scales.astype(np.float64)).astype(np.float32)[None, :]
        return ObfuscatedLinear(weights, perm.astype(np.int32), index, coef)

    def mask_distribution(self, stats: ActivationStats, shape: tuple[int, ...] | None = None,
                          common: np.ndarray | None = None, deep: bool = False,
                          modular: bool = False, depth: int = 0) -> MaskDistribution:
        return MaskDistribution(self.mask_scale * stats.std,
                                -stats.mean if self.center_masks else np.zeros_like(stats.mean))

    def push_mask(self, shape: tuple[int, ...], stats: ActivationStats,
                  rng: Random) -> np.ndarray:
        noise = rng.standard_normal(shape, dtype=np.float32) * np.float32(self.mask_scale * stats.std)
        if self.center_masks:
            noise -= stats.mean.astype(np.float32)
        return noise
