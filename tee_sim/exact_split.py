"""The ShadowNet TA's side of the exact split (``converters.exact_split`` has the scheme and its proof).

The kernels do the online part (``tee_sim.ta_shadownet_restore_push``): a one-time push whose instruction
carries ``split`` (its grid ``g``) sends ``[x_hi | x_lo]`` of its mask ``r``: ``r_hi = g * rint(r / g)``,
``r_lo = r - r_hi``, ``w = v + r_lo``, ``q = g * rint(w / g)``, ``x_hi = r_hi + q``, ``x_lo = w - q``, as it
stores each pixel. A restore that carries ``pop`` reads the ``2M`` channels ``[y_hi | y_lo]`` and forms
``(y_hi - pop_hi) + (y_lo - pop_lo)`` a tile at a time, after the tile's check on a verified model, then
restores it as usual, its offset the bias. The pool keeps ``r`` and the pop mask ``SplitPop`` makes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tee_sim.layer_geometry import Geometry
from tee_sim.one_time_masks import conv_pop, dense_batches, stacked_rows, widened_product


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
    pop_hi`` (``= L(r_hi, W'_lo) + L(r_lo, W')``), in float64 (a conv in C, ``conv_pop``; a dense layer
    as two matrix products); ``W'_hi`` and ``W'`` are blocks of the layer's weights
    ``[[W'_hi, 0], [W'_lo, W']]``."""

    weights: str
    geometry: Geometry
    mask: str
    grid: float

    def prepare(self, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """What ``compute`` needs of the weights, the same for every mask: the two blocks as
        [taps * C, M], rows tap-major then channel (a window's order) - a conv's in float64 (its C kernel's),
        a dense layer's as views of ``weights``, which ``compute`` widens a slice at a time: whole in
        float64 they took 4x the layer's weights of memory the secure world does not count (a dense layer of
        8 MiB split: 32 MiB at each refill; a review). A refill prepares them once for all the entries it
        makes."""
        m, c = weights.shape[0] // 2, weights.shape[-1] // 2
        blocks = (weights[:m, ..., :c].reshape(m, -1).T, weights[m:, ..., c:].reshape(m, -1).T)
        if self.geometry.kind != "CONV_2D":
            return blocks
        return tuple(np.ascontiguousarray(b, np.float64) for b in blocks)  # type: ignore[return-value]

    def compute(self, mask: np.ndarray, weights: np.ndarray, out: np.ndarray,
                prepared: tuple[np.ndarray, np.ndarray] | None = None, grid: float = 0.0) -> None:
        """The pop mask of ``mask`` into ``out``; ``prepared``: ``prepare(weights)``, if made already;
        ``grid``: the push's grid when it is not the program's (a mask scaled by a power of two with it)."""
        grid = grid or self.grid
        if not out.flags.c_contiguous:
            raise ValueError("a pop mask is written in place: it must be contiguous")
        w_hi, w = prepared if prepared is not None else self.prepare(weights)
        if self.geometry.kind == "CONV_2D":
            conv_pop(np.ascontiguousarray(mask, np.float32), self.geometry, w, out, w_hi=w_hi, grid=grid)
            return
        self.compute_many([mask], weights, [out], (w_hi, w), [grid])

    def compute_many(self, masks: Sequence[np.ndarray], weights: np.ndarray, outs: Sequence[np.ndarray],
                     prepared: tuple[np.ndarray, np.ndarray] | None = None,
                     grids: Sequence[float] | None = None) -> None:
        """``compute`` for each of ``masks`` into ``outs`` (``grids``: each one's, as ``compute`` takes it),
        a refill's batch: a dense layer's two blocks widened once for all of them (as ``PopMask``'s)."""
        grids = list(grids) if grids is not None else [0.0] * len(masks)
        if self.geometry.kind == "CONV_2D":
            for mask, out, grid in zip(masks, outs, grids, strict=True):
                self.compute(mask, weights, out, prepared, grid)
            return
        for out in outs:
            if not out.flags.c_contiguous:
                raise ValueError("a pop mask is written in place: it must be contiguous")
        m = weights.shape[0] // 2
        w_hi, w = prepared if prepared is not None else self.prepare(weights)
        batches = dense_batches(masks)  # FULLY_CONNECTED
        if len(batches) > 1:
            for part in batches:
                self.compute_many(masks[part], weights, outs[part], (w_hi, w), grids[part])
            return
        rows = stacked_rows(masks, w.shape[0])
        per_mask = len(rows) // len(masks)
        high = np.concatenate([split_mask(rows[i * per_mask:(i + 1) * per_mask], grid or self.grid)[0]
                               for i, grid in enumerate(grids)])
        pop_hi = widened_product(high, w_hi)
        full = widened_product(rows, w)
        for i, out in enumerate(outs):
            part = slice(i * per_mask, (i + 1) * per_mask)
            dst = out.reshape(-1, 2 * m)
            dst[:, :m] = pop_hi[part]
            dst[:, m:] = full[part] - pop_hi[part]
