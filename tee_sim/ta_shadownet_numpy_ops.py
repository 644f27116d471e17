"""The ShadowNet trusted app's numpy kernels: the ops it runs itself rather than through LiteRT.

The converter emits one instruction ``{"op", "srcs", "dsts", ...}`` per such op (``binary``, ``unary``,
``activation``, ``mean_last``, ``reshape``, ``concat``, ``split``, ``pad``, ``upsample``; see
``converters.plan_numpy``); ``compile_numpy`` turns it into a closure over the preallocated arrays that the
TA resolved, so running it allocates nothing (GELU on a strided view aside). Each kernel is an IEEE add /
multiply / max or a copy: the results are LiteRT's float kernels' bit for bit, but LOGISTIC's, HARD_SWISH's
and GELU's (``converters.plan_numpy.SMOOTH_ACTIVATIONS``) and a MEAN over the last axis (numpy sums
pairwise), within float32 rounding of them. (Activations that follow a restore are fused into it:
``tee_sim.ta_shadownet_restore_push``; ``max_pool`` is a C kernel: ``tee_sim.ta_shadownet_max_pool``.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

BINARY_UFUNCS = {"ADD": np.add, "SUB": np.subtract, "MUL": np.multiply, "MAXIMUM": np.maximum,
                 "MINIMUM": np.minimum}


def activation_into(kind: str, alpha: Any, src: np.ndarray, dst: np.ndarray,
                    approximate: bool = False) -> Callable[[], Any]:
    """``dst = activation(src)``, one pass (LOGISTIC and HARD_SWISH: four, in place on ``dst``, which is never
    ``src``: an op's input and output are live together, so the arena never shares their bytes)."""
    if kind == "RELU":
        return lambda: np.maximum(src, 0, out=dst)
    if kind == "RELU6":
        return lambda: np.clip(src, 0, 6, out=dst)
    if kind == "RELU_N1_TO_1":
        return lambda: np.clip(src, -1, 1, out=dst)
    if kind == "LEAKY_RELU" and isinstance(alpha, float) and 0 <= alpha <= 1:
        a = np.float32(alpha)

        def leaky() -> None:
            np.multiply(src, a, out=dst)
            np.maximum(dst, src, out=dst)
        return leaky
    if kind == "LOGISTIC":  # 1 / (1 + exp(-x)), within float32 rounding of LiteRT's (not bit for bit)
        def logistic() -> None:
            with np.errstate(over="ignore"):  # exp(-x) is inf below x = -88.7: the result 0, as LiteRT's
                np.negative(src, out=dst)
                np.exp(dst, out=dst)
            np.add(dst, 1, out=dst)
            np.reciprocal(dst, out=dst)
        return logistic
    if kind == "HARD_SWISH":  # x * clip(x / 6 + 1/2, 0, 1), as XNNPACK's (x * relu6(x + 3) / 6 overflows)
        sixth, half = np.float32(1 / 6), np.float32(0.5)

        def hard_swish() -> None:
            with np.errstate(invalid="ignore"):  # -inf: 0 * -inf is NaN, as LiteRT's
                np.multiply(src, sixth, out=dst)
                np.add(dst, half, out=dst)
                np.clip(dst, 0, 1, out=dst)
                np.multiply(dst, src, out=dst)
        return hard_swish
    if kind == "GELU":  # a strided view's (one C call otherwise), in temporaries
        def gelu() -> None:
            with np.errstate(all="ignore"):  # x^3 overflows (tanh: 1); -inf * 0 is NaN, as LiteRT's
                if approximate:
                    u = np.float32(0.7978845608) * (src + np.float32(0.044715) * src * src * src)
                    phi = (1 + np.tanh(u)) / 2
                else:  # erfc(-x / sqrt 2) / 2: no cancellation in the far negative tail
                    phi = _erfc(src.astype(np.float64) * -np.sqrt(0.5)) / 2
                np.multiply(src, phi, out=dst, casting="unsafe")
        return gelu
    raise ValueError(f"activation {kind!r} (alpha {alpha!r}) is not one the TA runs")


def _erfc(z: np.ndarray) -> np.ndarray:
    """erfc of float64 values, as the C kernel's (Numerical Recipes' erfcc, relative error below 1.2e-7; erfc
    a float at a time through ``math`` took a 56x56x384 view 0.17 s, a review)."""
    a = np.abs(z)
    t = 1 / (1 + 0.5 * a)
    p = -1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 + t * (-0.18628806 + t * (
        0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (-0.82215223 + t * 0.17087277))))))))
    tail = t * np.exp(p - a * a)
    return np.where(z >= 0, tail, 2 - tail)


def slice_along(array: np.ndarray, axis: int, start: int, stop: int) -> np.ndarray:
    """The view ``array[..., start:stop, ...]`` with the slice on ``axis``."""
    index = [slice(None)] * array.ndim
    index[axis] = slice(start, stop)
    return array[tuple(index)]


def _tiles(whole: np.ndarray, axis: int, parts: list[np.ndarray]) -> list[np.ndarray] | None:
    """Consecutive slices of ``whole`` along ``axis``, each as long as its part: None unless they cover
    ``whole`` and each has its part's shape (a concatenation's inputs, a split's outputs)."""
    views = []
    at = 0
    for part in parts:
        views.append(slice_along(whole, axis, at, at + part.shape[axis]))
        at += part.shape[axis]
    if at != whole.shape[axis] or any(v.shape != p.shape for v, p in zip(views, parts, strict=True)):
        return None
    return views


def interior(pad: Any, shape: tuple[int, ...]) -> tuple[slice, ...]:
    """The index of what is inside the border ``pad`` (``[[before, after], ...]`` per axis) of ``shape``."""
    return tuple(slice(b, n - a) for (b, a), n in zip(pad, shape, strict=True))


def compile_numpy(instr: dict[str, Any], srcs: list[np.ndarray], dsts: list[np.ndarray]) -> Callable[[], Any]:
    """One op the TA runs in numpy (``converters.plan_numpy.numpy_form``) over its resolved ``srcs`` and
    ``dsts``: as LiteRT's float kernels (module docstring: bit for bit, or within float32 rounding)."""
    op = instr["op"]
    if any(a.dtype != np.float32 for a in (*srcs, *dsts)):
        raise ValueError(f"{op}: only float32 tensors")
    dst = dsts[0]
    if op == "binary":
        a, b = srcs
        if np.broadcast_shapes(a.shape, b.shape) != dst.shape:
            raise ValueError(f"{instr['kind']}: {a.shape} and {b.shape} do not make {dst.shape}")
        if instr["kind"] == "SQUARED_DIFFERENCE":  # (a - b) * (a - b), as LiteRT's kernel

            def squared_difference() -> None:
                np.subtract(a, b, out=dst)
                np.multiply(dst, dst, out=dst)
            return squared_difference
        ufunc = BINARY_UFUNCS[instr["kind"]]
        return lambda: ufunc(a, b, out=dst)
    if op == "unary":
        (src,) = srcs
        if src.shape != dst.shape or instr["kind"] not in ("NEG", "RSQRT"):
            raise ValueError(f"{instr['kind']}: {src.shape} -> {dst.shape}")
        if instr["kind"] == "NEG":
            return lambda: np.negative(src, out=dst)

        def rsqrt() -> None:  # 1 / sqrt(x), as LiteRT's kernel: 0 gives inf, a negative NaN
            with np.errstate(divide="ignore", invalid="ignore"):
                np.sqrt(src, out=dst)
                np.reciprocal(dst, out=dst)
        return rsqrt
    if op == "mean_last":  # over the last axis, in float32 (numpy's pairwise sum, then a division)
        (src,) = srcs
        n, keep = (src.shape[-1] if src.ndim else 0), dst.ndim == src.ndim  # the axis kept (as 1) or dropped
        if n < 1 or dst.shape != ((*src.shape[:-1], 1) if keep else src.shape[:-1]):
            raise ValueError(f"mean over the last axis of {src.shape} into {dst.shape}")
        count = np.float32(n)

        def mean_last() -> None:  # into dst in place, a concatenation's slice included
            np.sum(src, axis=-1, keepdims=keep, out=dst)
            np.divide(dst, count, out=dst)
        return mean_last
    if op == "activation":
        (src,) = srcs
        if src.shape != dst.shape:
            raise ValueError(f"{instr['activation']}: {src.shape} -> {dst.shape}")
        approximate = instr.get("approximate") is True  # GELU's tanh form
        return activation_into(instr["activation"], instr["alpha"], src, dst, approximate)
    if op == "reshape":
        (src,) = srcs
        if src.size != dst.size:
            raise ValueError(f"reshape {src.shape} -> {dst.shape}")
        if not src.flags.c_contiguous:
            raise ValueError(f"reshape of a strided {src.shape}")
        flat = src.reshape(dst.shape)
        return lambda: np.copyto(dst, flat)
    if op == "concat":
        views = _tiles(dst, instr["axis"], srcs)
        if views is None:
            raise ValueError(f"concat of {[s.shape for s in srcs]} into {dst.shape}")
        parts = list(zip(views, srcs, strict=True))
        return lambda: [np.copyto(d, s) for d, s in parts]
    if op == "split":
        (src,) = srcs
        views = _tiles(src, instr["axis"], dsts)
        if views is None:
            raise ValueError(f"split of {src.shape} into {[d.shape for d in dsts]}")
        parts = list(zip(dsts, views, strict=True))
        return lambda: [np.copyto(d, s) for d, s in parts]
    if op == "pad":
        (src,) = srcs
        pad, value = instr["pad"], np.float32(instr["value"])
        inner = interior(pad, dst.shape)
        if dst[inner].shape != src.shape:
            raise ValueError(f"pad {src.shape} by {pad} into {dst.shape}")

        def pad_() -> None:
            dst.fill(value)  # the slot is shared with other tensors: the border is rewritten
            np.copyto(dst[inner], src)
        return pad_
    if op == "upsample":
        (src,) = srcs
        fh, fw = instr["factor"]
        n, h, w, c = src.shape
        if dst.shape != (n, h * fh, w * fw, c):
            raise ValueError(f"upsample {src.shape} by {fh}x{fw} into {dst.shape}")
        if not dst.flags.c_contiguous:
            raise ValueError(f"upsample into a strided {dst.shape}")
        blocks = dst.reshape(n, h, fh, w, fw, c)
        spread = src[:, :, None, :, None, :]
        return lambda: np.copyto(blocks, spread)
    raise ValueError(f"unknown instruction {op!r}")
