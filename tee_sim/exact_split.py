"""The ShadowNet TA's side of the exact split (``converters.exact_split`` has the scheme and its proof).

The kernels do the online part (``tee_sim.ta_shadownet_restore_push``): a one-time push whose instruction
carries ``split`` (its grid ``g``) sends ``[x_hi | x_lo]`` of its mask ``r``: ``r_hi = g * rint(r / g)``,
``r_lo = r - r_hi``, ``w = v + r_lo``, ``q = g * rint(w / g)``, ``x_hi = r_hi + q``, ``x_lo = w - q``, as it
stores each pixel. A restore that carries ``pop`` reads the ``2M`` channels ``[y_hi | y_lo]`` and forms
``(y_hi - pop_hi) + (y_lo - pop_lo)`` a tile at a time, after the tile's check on a verified model, then
restores it as usual, its offset the bias. The pool keeps ``r`` and the pop mask ``SplitPop`` makes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

CHUNK = 4096  # output positions per block of a pop mask's computation


def split_mask(mask: np.ndarray, grid: float) -> tuple[np.ndarray, np.ndarray]:
    """``(r_hi, r_lo)`` of a mask ``r``: ``r_hi = g * rint(r / g)``, ``r_lo = r - r_hi``, both exact (``g``
    a power of two), in ``mask``'s dtype; as the push kernel splits it (the numpy border of a split push
    and the pop masks use this)."""
    high = np.rint(mask * mask.dtype.type(1 / grid)) * mask.dtype.type(grid)
    return high, mask - high


@dataclass
class SplitPop:
    """The pop mask of a split layer, ``[pop_hi | pop_lo]`` as the accelerator's ``[y_hi | y_lo]``:
    ``pop_hi = L(r_hi, W'_hi)``, exact (what makes ``y_hi - pop_hi`` exact), and ``pop_lo = L(r, W') -
    pop_hi`` (``= L(r_hi, W'_lo) + L(r_lo, W')``), in float64 from one set of the mask's windows and two
    matrix products; ``W'_hi`` and ``W'`` are blocks of the layer's weights ``[[W'_hi, 0], [W'_lo, W']]``."""

    kind: str
    weights: str
    options: Any
    mask: str
    grid: float

    def compute(self, mask: np.ndarray, weights: np.ndarray, out: np.ndarray) -> None:
        from converters import linear

        if not out.flags.c_contiguous:
            raise ValueError("a pop mask is written in place: it must be contiguous")
        m, c = weights.shape[0] // 2, weights.shape[-1] // 2
        w_hi = weights[:m, ..., :c].reshape(m, -1).T.astype(np.float64)
        w = weights[m:, ..., c:].reshape(m, -1).T.astype(np.float64)
        if self.kind == "FULLY_CONNECTED":
            rows = np.asarray(mask, np.float64).reshape(-1, w.shape[0])
            blocks = [(rows, out.reshape(-1, 2 * m))]
        else:  # a few rows of output positions at a time: small temporaries, no page faults per call
            win = linear.windows(mask, weights.shape[1:3], self.options)
            n, ho, wo = win.shape[:3]
            step = max(1, CHUNK // wo)
            blocks = [(win[b, h:h + step].reshape(-1, w.shape[0]), out[b, h:h + step].reshape(-1, 2 * m))
                      for b in range(n) for h in range(0, ho, step)]
        for cols, dst in blocks:
            pop_hi = split_mask(cols, self.grid)[0] @ w_hi  # r_hi's windows: zero padding stays zero
            dst[:, :m] = pop_hi
            dst[:, m:] = cols @ w - pop_hi
