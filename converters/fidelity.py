"""The fidelity measure every part of ShadowNet reports and tests against: how far a protected model's
outputs are from LiteRT running the original (the issues' target: <= 1e-4)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def relative_error(got: np.ndarray | Sequence[np.ndarray], want: np.ndarray | Sequence[np.ndarray]) -> float:
    """The worst over the outputs (one array, or a sequence of them in the same order) of
    max |got - want| / max |want|, both over the reference's finite values (an all-zero reference
    divides by 1). Infinite where the outputs cannot be compared: another shape or count, a NaN or an
    infinity where the reference has none (or the other way round). An integer or bool output (an
    argmax's indices, a mask) is exact or wrong: 0 where it equals the reference, infinite otherwise."""
    if isinstance(got, np.ndarray) or isinstance(want, np.ndarray):
        got, want = [got], [want]
    if len(got) != len(want):
        return math.inf
    return max((_one(g, w) for g, w in zip(got, want, strict=True)), default=0.0)


def _one(got: np.ndarray, want: np.ndarray) -> float:
    if np.asarray(want).dtype.kind in "biu":
        return 0.0 if np.array_equal(got, want) and np.shape(got) == np.shape(want) else math.inf
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if got.shape != want.shape:
        return math.inf
    finite = np.isfinite(want)
    if not finite.all():
        nan = np.isnan(want)
        if not np.array_equal(np.isnan(got), nan) or not np.array_equal(got[~finite & ~nan],
                                                                         want[~finite & ~nan]):
            return math.inf
        if not finite.any():
            return 0.0
        got, want = got[finite], want[finite]
    if not np.isfinite(got).all():
        return math.inf
    scale = float(np.max(np.abs(want), initial=0.0)) or 1.0
    return float(np.max(np.abs(got - want), initial=0.0)) / scale
