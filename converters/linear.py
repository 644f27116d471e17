"""LiteRT's float linear ops in numpy (float64): CONV_2D, DEPTHWISE_CONV_2D, FULLY_CONNECTED.

The converter needs them offline to push the static masks through the obfuscated layers (pop masks)
without LiteRT's float32 rounding; tests use them to check the schemes. Same layouts and padding rule
as LiteRT: NHWC activations, CONV_2D filters ``[O, kh, kw, I]``, DEPTHWISE_CONV_2D filters
``[1, kh, kw, I * multiplier]`` (output channel ``c * m + j`` reads input channel ``c``),
FULLY_CONNECTED weights ``[N, K]`` on the input flattened to ``[-1, K]``. Padding is zero, so every op
here is exactly linear in its input.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from ai_edge_litert import schema_py_generated as schema_fb


def macs(kind: str, out_shape: tuple[int, ...], weights_shape: tuple[int, ...]) -> int:
    """Multiply-adds of a CONV_2D, DEPTHWISE_CONV_2D or FULLY_CONNECTED: per output element, a
    convolution's ``kh * kw * C_in`` (depthwise ``kh * kw``), a dense layer's input width."""
    per_output = weights_shape[1:3] if kind == "DEPTHWISE_CONV_2D" else weights_shape[1:]
    return int(np.prod(out_shape, dtype=np.int64)) * int(np.prod(per_output, dtype=np.int64))


def padding(size: int, kernel: int, stride: int, dilation: int, same: bool) -> tuple[int, int, int]:
    """(output size, padding before, padding after) as LiteRT's ComputePaddingHeightWidth."""
    effective = (kernel - 1) * dilation + 1
    out = (size + stride - 1) // stride if same else (size + stride - effective) // stride
    total = max(0, (out - 1) * stride + effective - size) if same else 0
    return out, total // 2, total - total // 2


def windows(x: np.ndarray, kh: int, kw: int, options: Any) -> np.ndarray:
    """[N, Ho, Wo, kh, kw, C] view of the zero-padded input, one window per output pixel (a CONV_2D's or
    DEPTHWISE_CONV_2D's ``options``: padding, strides, dilations)."""
    same = options.padding == schema_fb.Padding.SAME
    sh, sw = options.strideH, options.strideW
    dh, dw = getattr(options, "dilationHFactor", 1) or 1, getattr(options, "dilationWFactor", 1) or 1
    n, h, w, c = x.shape
    ho, top, bottom = padding(h, kh, sh, dh, same)
    wo, left, right = padding(w, kw, sw, dw, same)
    xp = np.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    s = xp.strides
    return np.lib.stride_tricks.as_strided(
        xp, (n, ho, wo, kh, kw, c), (s[0], s[1] * sh, s[2] * sw, s[1] * dh, s[2] * dw, s[3]), writeable=False)


def conv2d(x: np.ndarray, filters: np.ndarray, options: Any) -> np.ndarray:
    """CONV_2D without bias or activation: ``x`` [N, H, W, C], ``filters`` [O, kh, kw, C]."""
    o, kh, kw, c = filters.shape
    if x.shape[-1] != c:
        raise ValueError(f"CONV_2D: input has {x.shape[-1]} channels, filters expect {c}")
    win = windows(np.asarray(x, np.float64), kh, kw, options)
    n, ho, wo = win.shape[:3]
    cols = win.reshape(n * ho * wo, kh * kw * c)
    return (cols @ filters.reshape(o, -1).astype(np.float64).T).reshape(n, ho, wo, o)


def depthwise_conv2d(x: np.ndarray, filters: np.ndarray, options: Any) -> np.ndarray:
    """DEPTHWISE_CONV_2D without bias or activation: ``filters`` [1, kh, kw, C * multiplier]."""
    _, kh, kw, cm = filters.shape
    c = x.shape[-1]
    if cm % c:
        raise ValueError(f"DEPTHWISE_CONV_2D: {cm} filter channels for {c} input channels")
    m = cm // c
    win = windows(np.asarray(x, np.float64), kh, kw, options)
    k = filters[0].astype(np.float64).reshape(kh, kw, c, m)
    # One multiply-add per kernel tap over the whole map (an einsum over the windows is ~5x slower).
    out = np.zeros((*win.shape[:3], c, m))
    for i in range(kh):
        for j in range(kw):
            out += win[:, :, :, i, j, :, None] * k[i, j]
    return out.reshape(*win.shape[:3], cm)


def fully_connected(x: np.ndarray, weights: np.ndarray, out_shape: tuple[int, ...]) -> np.ndarray:
    """FULLY_CONNECTED without bias or activation: ``weights`` [N, K], result reshaped to ``out_shape``."""
    flat = np.asarray(x, np.float64).reshape(-1, weights.shape[1])
    return (flat @ weights.astype(np.float64).T).reshape(out_shape)


def apply(kind: str, x: np.ndarray, weights: np.ndarray, options: Any,
          out_shape: tuple[int, ...]) -> np.ndarray:
    """Run the linear op ``kind`` (no bias, no activation) in float64."""
    if kind == "CONV_2D":
        y = conv2d(x, weights, options)
    elif kind == "DEPTHWISE_CONV_2D":
        y = depthwise_conv2d(x, weights, options)
    elif kind == "FULLY_CONNECTED":
        return fully_connected(x, weights, out_shape)
    else:
        raise ValueError(f"not a linear op: {kind}")
    if y.shape != tuple(out_shape):
        raise ValueError(f"{kind}: computed shape {y.shape}, the model says {tuple(out_shape)}")
    return y
