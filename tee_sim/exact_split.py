"""The ShadowNet TA's side of the exact split (``converters.exact_split`` has the scheme and its proof).

The kernels do the online part (``tee_sim.ta_shadownet_restore_push``): a one-time push whose instruction
carries ``split`` (its grid ``g``) sends ``[x_hi | x_lo]``, its mask ``r_lo`` and ``r_hi`` the array
``mask/hi``: ``w = v + r_lo`` as any push, then ``q = g * rint(w / g)``, ``x_hi = r_hi + q`` and
``x_lo = w - q`` as it stores each pixel. A restore that carries ``pop`` reads the ``2M`` channels
``[y_hi | y_lo]`` and forms ``(y_hi - pop_hi) + (y_lo - pop_lo)`` a tile at a time, after the tile's
check on a verified model, then restores it as usual, its offset the bias.

``split_mask`` splits a drawn mask ``r`` into ``r_hi`` and ``r_lo`` (the pool keeps both); ``SplitPop``
makes a restore's pop mask ``L([r_hi | r_lo], W2)`` in float64 (its ``hi`` half exact in float32).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


def split_mask(mask: np.ndarray, hi: np.ndarray, grid: float) -> None:
    """``mask`` (r, float32) -> ``hi = g * rint(r / g)`` and ``mask = r - hi`` (both exact), in place."""
    np.multiply(mask, np.float32(1 / grid), out=hi)
    np.rint(hi, out=hi)
    hi *= np.float32(grid)
    mask -= hi


@dataclass
class SplitPop:
    """The pop mask of a split layer: ``L([r_hi | r_lo], W2)``, its ``2M`` channels as the accelerator's."""

    kind: str
    weights: str
    options: Any
    wire_shape: tuple[int, ...]
    mask: str

    def compute(self, lo: np.ndarray, hi: np.ndarray, weights: np.ndarray, out: np.ndarray) -> None:
        from converters import linear

        both = np.concatenate([hi, lo], axis=-1, dtype=np.float64)
        out[...] = linear.apply(self.kind, both, weights, self.options, self.wire_shape)
