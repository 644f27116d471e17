"""The ShadowNet trusted app's small ops as single C calls (``tee_sim/ta_shadownet_small_ops.c``): MEAN over
an image's positions, SOFTMAX over its channels (``converters.plan_numpy``'s ``mean`` and ``softmax``),
LOGISTIC, HARD_SWISH and GELU (its ``activation``s of those kinds), whole-tensor copies (a ``copy``, a
``reshape``) and a dense layer's product (one the TEE computes under ``--verify``: ``compile_dense``).
Through LiteRT or numpy each of them made its step Python's to run; as kernel calls with a ``c_call`` the
step runs on the secure world's fast path (``ShadowNetTA.step_program``): a classifier's last two steps
(MEAN, then SOFTMAX and the output's copy) each cost 80-140 us more than a fast step in the secure world's
Python.
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Callable
from typing import Any

import numpy as np

from tee_sim.ta_shadownet_kernels import LIBRARY

SN_SMALL_OP = ctypes.cast(LIBRARY.sn_small_op, ctypes.c_void_p).value  # for the secure world's fast path
_COPY, _MEAN, _SOFTMAX, _ROWS, _SPREAD, _LOGISTIC, _HARD_SWISH, _GELU, _DENSE = 0, 1, 2, 3, 4, 5, 6, 7, 8
_SMOOTH = {"LOGISTIC": _LOGISTIC, "HARD_SWISH": _HARD_SWISH, "GELU": _GELU}


class _Small(ctypes.Structure):
    _fields_ = [("src", ctypes.c_void_p), ("dst", ctypes.c_void_p), *((f, ctypes.c_int64) for f in
                                                                       ("n", "positions", "c")),
                ("beta", ctypes.c_float), ("kind", ctypes.c_int32), ("dst_stride", ctypes.c_int64),
                ("src_stride", ctypes.c_int64), ("lo", ctypes.c_double), ("hi", ctypes.c_double),
                ("weights", ctypes.c_void_p)]


def _contiguous(array: np.ndarray) -> bool:
    return array.dtype == np.float32 and array.flags.c_contiguous


def _kernel(kind: int, src: np.ndarray, dst: np.ndarray, n: int, positions: int, c: int,
            beta: float = 1.0) -> Callable[[], Any]:
    op = _Small(src.ctypes.data, dst.ctypes.data, n, positions, c, beta, kind)
    run, address = LIBRARY.sn_small_op, ctypes.addressof(op)
    kernel = lambda keep=(op, src, dst): run(address)  # noqa: E731 - a function with an attribute
    kernel.c_call = (SN_SMALL_OP, address)
    return kernel


def compile_copy(src: np.ndarray, dst: np.ndarray) -> Callable[[], Any] | None:
    """``dst = src`` as one call, for two dense float32 arrays of the same size (shapes may differ: a
    reshape); None otherwise (the caller copies with numpy)."""
    if not (_contiguous(src) and _contiguous(dst)) or src.size != dst.size:
        return None
    return _kernel(_COPY, src, dst, 1, 1, src.size)


def compile_dense(x: np.ndarray, weights: np.ndarray, y: np.ndarray) -> Callable[[], Any]:
    """``y = x weights^T`` as one call: ``x`` ``[rows, D]``, ``weights`` ``[M, D]``, ``y`` ``[rows, M]``,
    dense float32 (a dense layer, or a conv laid out as one, that the TEE computes:
    ``tee_sim.freivalds.LayerCheck.computing``; through
    numpy's matrix product its step was Python's, 0.1-0.2 ms more per inference on ResNet-44)."""
    if not (_contiguous(x) and _contiguous(weights) and _contiguous(y)) or x.ndim != 2 or weights.ndim != 2 \
            or y.shape != (x.shape[0], weights.shape[0]) or x.shape[1] != weights.shape[1]:
        raise ValueError(f"dense: {x.dtype} {x.shape} by {weights.dtype} {weights.shape} into {y.shape}")
    op = _Small(x.ctypes.data, y.ctypes.data, x.shape[0], x.shape[1], weights.shape[0], 1.0, _DENSE,
                weights=weights.ctypes.data)
    address = ctypes.addressof(op)
    kernel = lambda keep=(op, x, weights, y): LIBRARY.sn_small_op(address)  # noqa: E731 - with an attribute
    kernel.c_call = (SN_SMALL_OP, address)
    return kernel


def compile_rows(src: np.ndarray | None, dst: np.ndarray) -> Callable[[], Any] | None:
    """``dst[...] = src`` (zeros with no ``src``) as one call, for float32 views of one shape that are rows
    of contiguous floats at a constant stride (a padded push's border slabs); None otherwise (the caller
    copies with numpy)."""
    d = _rows(dst)
    if d is None:
        return None
    s = _rows(src) if src is not None else (d[0], d[1], 0)
    if s is None or s[:2] != d[:2] or (src is not None and src.shape != dst.shape):
        return None
    rows, run = d[:2]
    op = _Small(src.ctypes.data if src is not None else None, dst.ctypes.data, rows, 0, run, 1.0, _ROWS,
                d[2], s[2])
    address = ctypes.addressof(op)
    kernel = lambda keep=(op, src, dst): LIBRARY.sn_small_op(address)  # noqa: E731 - with an attribute
    kernel.c_call = (SN_SMALL_OP, address)
    return kernel


def _rows(view: np.ndarray) -> tuple[int, int, int] | None:
    """``(rows, floats per row, row stride in floats)`` of a float32 view whose trailing axes are
    contiguous and whose leading axes step evenly; None otherwise."""
    if view.dtype != np.float32 or view.size == 0:
        return None
    shape, strides = list(view.shape), [s // 4 for s in view.strides]
    run, k = 1, len(shape)
    while k > 0 and (shape[k - 1] == 1 or strides[k - 1] == run):  # the contiguous tail
        run *= shape[k - 1]
        k -= 1
    lead = [(n, st) for n, st in zip(shape[:k], strides[:k], strict=True) if n > 1]
    if not lead:
        return 1, run, 0
    rows, stride = lead[-1]
    for n, st in reversed(lead[:-1]):  # outer axes must continue the inner one's steps
        if st != stride * rows:
            return None
        rows *= n
    return rows, run, stride


def compile_smooth_activation(kind: str, src: np.ndarray, dst: np.ndarray,
                              approximate: bool = False) -> Callable[[], Any] | None:
    """``dst = LOGISTIC(src)``, ``HARD_SWISH(src)`` or ``GELU(src)`` (``approximate``: its tanh form) as one
    call, for dense float32 arrays of one shape; None otherwise (the caller uses numpy:
    ``tee_sim.ta_shadownet_numpy_ops``). In numpy, four passes and a Python call each, EfficientNetB0's 65
    LOGISTICs at 128x128 cost the TA 5.4-5.8 ms an inference against 4.4-4.5 through LiteRT (which kept an
    arena per op: 31.4 MiB of secure memory against 19.0); in C, 3.9-4.3."""
    if kind not in _SMOOTH or not (_contiguous(src) and _contiguous(dst)) or src.shape != dst.shape:
        return None
    return _kernel(_SMOOTH[kind], src, dst, 1, 1, src.size, 1.0 if approximate else 0.0)


def compile_mean(src: np.ndarray, dst: np.ndarray) -> Callable[[], Any]:
    """``dst = mean(src, axis=(1, 2))`` for a dense NHWC ``src``; ``dst`` [N, 1, 1, C] or [N, C]."""
    if not (_contiguous(src) and _contiguous(dst)) or src.ndim != 4 or src.shape[1] * src.shape[2] < 1 \
            or dst.shape not in ((src.shape[0], 1, 1, src.shape[3]), (src.shape[0], src.shape[3])):
        raise ValueError(f"mean {src.dtype} {src.shape} -> {dst.dtype} {dst.shape}")
    n, h, w, c = src.shape
    return _kernel(_MEAN, src, dst, n, h * w, c)


def compile_softmax(instr: dict[str, Any], src: np.ndarray, dst: np.ndarray) -> Callable[[], Any]:
    """``dst = softmax(beta * src)`` over the last axis, for dense arrays of one shape."""
    if not (_contiguous(src) and _contiguous(dst)) or src.shape != dst.shape or src.ndim < 1 \
            or src.shape[-1] < 1:
        raise ValueError(f"softmax {src.dtype} {src.shape} -> {dst.dtype} {dst.shape}")
    c = src.shape[-1]
    return _kernel(_SOFTMAX, src, dst, 1, src.size // c, c, float(instr["beta"]))


def compile_spread(src: np.ndarray, peak_weight: float = 0.0,
                   scale: np.ndarray | None = None) -> Callable[[], Any] | None:
    """A check, as one call, that the larger of the mean square of a dense float32 ``src`` and
    ``peak_weight`` times its largest square lies in ``(op.lo, op.hi]`` (the kernel's ``op``, set by the
    caller): it returns 0 if so, else 2 (``SPREAD_OUTSIDE``, as a restore's measure: 1 is a failed
    check's), which sends a step on the secure world's fast path back to the TA's Python; None when
    ``src`` is not dense (the caller uses numpy). With ``scale`` (float32, one per channel of the last
    axis), of ``src * scale``, the mean square of its largest channel."""
    if not _contiguous(src) or src.size == 0:
        return None
    weights = None
    if scale is not None:
        if scale.dtype != np.float32 or scale.ndim != 1 or src.ndim < 1 or scale.size != src.shape[-1] \
                or src.size % scale.size:
            raise ValueError(f"spread of {src.shape} scaled by {scale.dtype} {scale.shape}")
        weights = np.ascontiguousarray(scale)
    op = _Small(src.ctypes.data, None, 1, 0 if weights is None else weights.size, src.size,
                float(peak_weight), _SPREAD, weights=None if weights is None else weights.ctypes.data)
    op.lo, op.hi = math.inf, -math.inf  # nothing in the band until the caller sets it
    address = ctypes.addressof(op)
    kernel = lambda keep=(op, src, weights): LIBRARY.sn_small_op(address)  # noqa: E731 - with an attribute
    kernel.c_call = (SN_SMALL_OP, address)
    kernel.op = op
    return kernel
