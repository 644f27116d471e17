"""The ShadowNet TA's side of the exact split (``converters.exact_split`` has the scheme and its proof).

The kernels do the online part (``tee_sim.ta_shadownet_restore_push``): a one-time push whose instruction
carries ``split`` (its grid ``g``) sends ``[x_hi | x_lo]`` of its mask ``r``: ``r_hi = g * rint(r / g)``,
``r_lo = r - r_hi``, ``w = v + r_lo``, ``q = g * rint(w / g)``, ``x_hi = r_hi + q``, ``x_lo = w - q``, as it
stores each pixel. A restore that carries ``pop`` reads the ``2M`` channels ``[y_hi | y_lo]`` and forms
``(y_hi - pop_hi) + (y_lo - pop_lo)`` a tile at a time, after the tile's check on a verified model, then
restores it as usual, its offset the bias. The pool keeps ``r`` and the pop mask ``SplitPop`` makes.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Any

import numpy as np
from ai_edge_litert import schema_py_generated as schema_fb

from tee_sim.ta_shadownet_kernels import LIBRARY


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
    pop_hi`` (``= L(r_hi, W'_lo) + L(r_lo, W')``), in float64 (a conv in C, ``sn_split_pop``; a dense layer
    as two matrix products); ``W'_hi`` and ``W'`` are blocks of the layer's weights
    ``[[W'_hi, 0], [W'_lo, W']]``."""

    kind: str
    weights: str
    options: Any
    mask: str
    grid: float

    def compute(self, mask: np.ndarray, weights: np.ndarray, out: np.ndarray) -> None:
        if not out.flags.c_contiguous:
            raise ValueError("a pop mask is written in place: it must be contiguous")
        m, c = weights.shape[0] // 2, weights.shape[-1] // 2
        # The two blocks as [taps * C, M] float64, rows tap-major then channel (a window's order).
        w_hi = np.ascontiguousarray(weights[:m, ..., :c].reshape(m, -1).T, np.float64)
        w = np.ascontiguousarray(weights[m:, ..., c:].reshape(m, -1).T, np.float64)
        if self.kind == "CONV_2D":
            self._conv(np.ascontiguousarray(mask, np.float32), weights.shape[1:3], w_hi, w, out)
            return
        rows = np.asarray(mask, np.float64).reshape(-1, w.shape[0])  # FULLY_CONNECTED
        dst = out.reshape(-1, 2 * m)
        pop_hi = split_mask(rows, self.grid)[0] @ w_hi
        dst[:, :m] = pop_hi
        dst[:, m:] = rows @ w - pop_hi

    def _conv(self, mask: np.ndarray, kernel: tuple[int, int], w_hi: np.ndarray, w: np.ndarray,
              out: np.ndarray) -> None:
        """A conv's pop mask by ``sn_split_pop`` (``ta_shadownet_pool.c``): the same sums as the
        windows times the blocks, in double, each window split once in place."""
        from converters import linear

        n, h, wd, c = mask.shape
        o = self.options
        same = o.padding == schema_fb.Padding.SAME
        stride, dilation = (o.strideH, o.strideW), (o.dilationHFactor or 1, o.dilationWFactor or 1)
        (ho, top, _), (wo, left, _) = (linear.padding(size, kernel[i], stride[i], dilation[i], same)
                                      for i, size in enumerate((h, wd)))
        m = w.shape[1]
        if w.shape[0] != kernel[0] * kernel[1] * c:
            raise ValueError(f"weights of {w.shape[0]} rows for a {kernel} kernel on {c} channels")
        if out.shape != (n, ho, wo, 2 * m) or out.dtype != np.float32:
            raise ValueError(f"pop mask {out.shape} {out.dtype}: {(n, ho, wo, 2 * m)} float32 expected")
        window = np.empty(2 * w.shape[0])
        call = _SplitPop(mask.ctypes.data, n, h, wd, c, ho, wo, *kernel, *stride, *dilation, top, left,
                         w_hi.ctypes.data, w.ctypes.data, m, self.grid, out.ctypes.data, window.ctypes.data)
        LIBRARY.sn_split_pop(ctypes.byref(call))


class _SplitPop(ctypes.Structure):  # sn_split_pop_t
    _fields_ = [("r", ctypes.c_void_p),
                *((name, ctypes.c_int64) for name in ("n", "h", "w", "c", "ho", "wo")),
                *((name, ctypes.c_int32) for name in ("kh", "kw", "sh", "sw", "dh", "dw", "top", "left")),
                ("w_hi", ctypes.c_void_p), ("w_full", ctypes.c_void_p), ("m", ctypes.c_int64),
                ("grid", ctypes.c_double), ("out", ctypes.c_void_p), ("window", ctypes.c_void_p)]
