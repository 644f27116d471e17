"""The ShadowNet trusted app's ``max_pool`` (MAX_POOL_2D; ``converters.plan_numpy``): one call of the C
kernel ``sn_max_pool`` (``tee_sim/ta_shadownet_max_pool.c``, which says how it matches numpy's and LiteRT's
results), its parameters packed into a ``ctypes`` structure once, when the program is bound. As a single
kernel call it also runs on the secure world's fast path (``ShadowNetTA.step_program``).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import Any

import numpy as np

from tee_sim.ta_shadownet_kernels import LIBRARY, nhwc_strides, window_geometry, windows_fit

SN_MAX_POOL = ctypes.cast(LIBRARY.sn_max_pool, ctypes.c_void_p).value  # for the secure world's fast path


class _Pool(ctypes.Structure):
    _fields_ = [("src", ctypes.c_void_p), *((f, ctypes.c_int64) for f in
                                            ("n", "h", "w", "c", "src_img", "src_row", "src_pix")),
                ("dst", ctypes.c_void_p), *((f, ctypes.c_int64) for f in
                                            ("oh", "ow", "dst_img", "dst_row", "dst_pix")),
                *((f, ctypes.c_int32) for f in ("fh", "fw", "sh", "sw", "top", "left"))]


def compile_max_pool(instr: dict[str, Any], src: np.ndarray, dst: np.ndarray) -> Callable[[], Any]:
    """``dst = max_pool(src)`` with the instruction's ``window``, ``stride`` and ``pad`` (``[[top,
    bottom], [left, right]]``; positions in the padding never win), in place on both arrays."""
    stride, pad, (fh, fw) = window_geometry(instr, "window")
    (sh, sw), ((top, _), (left, _)) = stride, pad
    if not dst.flags.writeable:
        raise ValueError("max pool: its output is read-only")
    n, h, w, c = src.shape
    oh, ow = dst.shape[1:3] if dst.ndim == 4 else (0, 0)
    if not windows_fit(src, dst, (fh, fw), stride, pad):
        raise ValueError(f"max pool {src.shape} -> {dst.shape}: window {fh}x{fw}, stride {sh}x{sw}, "
                         f"pad {instr['pad']}")
    pool = _Pool(src.ctypes.data, n, h, w, c, *nhwc_strides(src, "max pool input"),
                 dst.ctypes.data, oh, ow, *nhwc_strides(dst, "max pool output"), fh, fw, sh, sw, top, left)
    run, address = LIBRARY.sn_max_pool, ctypes.addressof(pool)
    kernel = lambda keep=(pool, src, dst): run(address)  # noqa: E731 - a function with an attribute
    kernel.c_call = (SN_MAX_POOL, address)
    return kernel
