"""The ShadowNet trusted app's ``depthwise`` (DEPTHWISE_CONV_2D of depth multiplier 1, no dilation, kept in
the TEE by the default scheme; ``converters.plan_numpy``): one call of the C kernel ``sn_depthwise``
(``tee_sim/ta_shadownet_depthwise.c``, which says why and how close to LiteRT), its parameters packed into a
``ctypes`` structure once, when the program is bound. As a single kernel call it also runs on the secure
world's fast path (``ShadowNetTA.step_program``).
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Callable
from typing import Any

import numpy as np

from tee_sim.ta_shadownet_kernels import LANES, LIBRARY, nhwc_strides, window_geometry, windows_fit

SN_DEPTHWISE = ctypes.cast(LIBRARY.sn_depthwise, ctypes.c_void_p).value  # for the secure world's fast path


# The activation fused into the layer (``converters.plan_tee``), as the clamp it is; None: none.
CLAMPS = {None: (-math.inf, math.inf), "RELU": (0.0, math.inf), "RELU6": (0.0, 6.0),
          "RELU_N1_TO_1": (-1.0, 1.0)}


class _Depthwise(ctypes.Structure):
    _fields_ = [("src", ctypes.c_void_p), *((f, ctypes.c_int64) for f in
                                            ("n", "h", "w", "c", "src_img", "src_row", "src_pix")),
                ("weights", ctypes.c_void_p), ("bias", ctypes.c_void_p),
                ("dst", ctypes.c_void_p), *((f, ctypes.c_int64) for f in
                                            ("oh", "ow", "dst_img", "dst_row", "dst_pix")),
                *((f, ctypes.c_int32) for f in ("kh", "kw", "sh", "sw", "top", "left")),
                ("lo", ctypes.c_float), ("hi", ctypes.c_float), ("packed", ctypes.c_void_p)]


def pack_weights(weights: np.ndarray) -> np.ndarray | None:
    """A layer's weights (LiteRT's ``[1, kh, kw, C]``) as the C kernel reads them, ``[ceil(C / LANES), kh *
    kw, LANES]`` (zeros past ``C``): a vector's taps in one run. In LiteRT's layout they lie ``C`` floats
    apart, on 1024 channels all in the same set of the L1 cache, which held fewer than nine lines of it
    (MobileNet's 7x7x1024 layer: 104 -> 45 us). None for weights of another shape."""
    if weights.ndim != 4 or weights.shape[0] != 1 or weights.dtype != np.float32:
        return None
    _, kh, kw, c = weights.shape
    chunks = -(-c // LANES)
    taps = np.zeros((chunks * LANES, kh * kw), np.float32)
    taps[:c] = weights.reshape(kh * kw, c).T
    return np.ascontiguousarray(taps.reshape(chunks, LANES, kh * kw).transpose(0, 2, 1))


def compile_depthwise(instr: dict[str, Any], src: np.ndarray, weights: np.ndarray, bias: np.ndarray,
                      dst: np.ndarray, packed: np.ndarray | None = None) -> Callable[[], Any]:
    """``dst = act(depthwise(src, weights) + bias)`` with the instruction's ``stride``, ``pad`` (``[[top,
    bottom], [left, right]]``, zeros) and ``activation`` (``CLAMPS``), in place on ``dst``; ``weights``
    LiteRT's ``[1, kh, kw, C]``, ``bias`` ``[C]``; ``packed``: ``pack_weights(weights)``
    (made here if None)."""
    stride, pad = window_geometry(instr)
    (sh, sw), ((top, _), (left, _)) = stride, pad
    if not isinstance(instr.get("activation"), str | None) or instr.get("activation") not in CLAMPS:
        raise ValueError(f"depthwise: activation {instr.get('activation')!r}")
    lo, hi = CLAMPS[instr.get("activation")]
    n, h, w, c = src.shape
    if not dst.flags.writeable:
        raise ValueError("depthwise: its output is read-only")
    if weights.ndim != 4 or weights.shape[0] != 1 or weights.shape[3] != c or not weights.flags.c_contiguous \
            or bias.shape != (c,) or not bias.flags.c_contiguous or weights.dtype != np.float32 \
            or bias.dtype != np.float32:
        raise ValueError(f"depthwise of {src.shape}: weights {weights.shape}, bias {bias.shape}")
    kh, kw = weights.shape[1:3]
    oh, ow = dst.shape[1:3] if dst.ndim == 4 else (0, 0)
    if min(oh, ow) < 1 or not windows_fit(src, dst, (kh, kw), stride, pad):
        raise ValueError(f"depthwise {src.shape} -> {dst.shape}: kernel {kh}x{kw}, stride {sh}x{sw}, "
                         f"pad {instr['pad']}")
    params = _Depthwise(src.ctypes.data, n, h, w, c, *nhwc_strides(src, "depthwise input"),
                        weights.ctypes.data, bias.ctypes.data, dst.ctypes.data, oh, ow,
                        *nhwc_strides(dst, "depthwise output"),
                        kh, kw, sh, sw, top, left, lo, hi)
    packed = pack_weights(weights) if packed is None else packed
    if packed is None or packed.shape != (-(-c // LANES), kh * kw, LANES) or packed.dtype != np.float32 \
            or not packed.flags.c_contiguous:
        raise ValueError(f"depthwise of {src.shape}: packed weights "
                         f"{None if packed is None else packed.shape}")
    params.packed = packed.ctypes.data
    run, address = LIBRARY.sn_depthwise, ctypes.addressof(params)
    kernel = lambda keep=(params, src, weights, bias, dst, packed): run(address)  # noqa: E731 - has an attribute
    kernel.c_call = (SN_DEPTHWISE, address)
    return kernel
