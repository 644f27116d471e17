"""The zoo's MobileNet and ResNets executed in float64, as a reference that float32 rounding does not touch.

LiteRT's two float32 engines (XNNPACK and its builtin kernels) disagree by up to ~1e-4 of the output on
ResNet-404 and MobileNet, whose depth amplifies rounding: against one of them, a protected model's error
mixes its own rounding with the engine's. Against this reference each engine's own error can be measured,
and the protected model's compared with it. Only the ops these models use (``SUPPORTED``); anything else
raises ``NotImplementedError``.
"""

from __future__ import annotations

import numpy as np
from ai_edge_litert import schema_py_generated as fb

from converters.tflite_reader import read_model

_A = fb.ActivationFunctionType
ACTIVATIONS = {_A.NONE: lambda v: v, _A.RELU: lambda v: np.maximum(v, 0.0),
               _A.RELU6: lambda v: np.clip(v, 0.0, 6.0)}
SUPPORTED = frozenset({"CONV_2D", "DEPTHWISE_CONV_2D", "ADD", "MEAN", "FULLY_CONNECTED", "RESHAPE",
                       "SOFTMAX"})


def _windows(x: np.ndarray, kh: int, kw: int, options) -> np.ndarray:
    """``[N, Ho, Wo, kh * kw, C]``: each output position's input window, zero-padded as LiteRT pads."""
    (sh, sw) = options.strideH, options.strideW
    (dh, dw) = options.dilationHFactor or 1, options.dilationWFactor or 1
    _, h, w, _ = x.shape
    eh, ew = (kh - 1) * dh + 1, (kw - 1) * dw + 1
    if options.padding == fb.Padding.SAME:
        ho, wo = -(-h // sh), -(-w // sw)
        ph, pw = max(0, (ho - 1) * sh + eh - h), max(0, (wo - 1) * sw + ew - w)
        x = np.pad(x, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))
    else:
        ho, wo = (h - eh) // sh + 1, (w - ew) // sw + 1
    return np.stack([x[:, i * dh:i * dh + (ho - 1) * sh + 1:sh, j * dw:j * dw + (wo - 1) * sw + 1:sw, :]
                     for i in range(kh) for j in range(kw)], axis=3)


def _op(kind: str, options, a: list) -> np.ndarray:
    x = a[0]
    if kind == "CONV_2D":
        m, kh, kw, c = a[1].shape
        y = np.einsum("nhwtc,mtc->nhwm", _windows(x, kh, kw, options), a[1].reshape(m, kh * kw, c))
    elif kind == "DEPTHWISE_CONV_2D":
        _, kh, kw, m = a[1].shape
        cols = _windows(x, kh, kw, options)
        cols = np.repeat(cols, m // x.shape[-1], axis=-1)  # depth multiplier: output o reads input o // mult
        y = np.einsum("nhwtc,tc->nhwc", cols, a[1].reshape(kh * kw, m))
    elif kind == "FULLY_CONNECTED":
        y = x.reshape(-1, a[1].shape[1]) @ a[1].T
    elif kind == "ADD":
        y = x + a[1]
    elif kind == "MEAN":
        return x.mean(axis=tuple(int(v) for v in np.atleast_1d(a[1])), keepdims=bool(options.keepDims))
    elif kind == "RESHAPE":
        shape = a[1] if len(a) > 1 and a[1] is not None else options.newShape
        return x.reshape([int(v) for v in np.atleast_1d(shape)])
    elif kind == "SOFTMAX":
        z = np.exp(options.beta * (x - x.max(axis=-1, keepdims=True)))
        return z / z.sum(axis=-1, keepdims=True)
    else:
        raise AssertionError(kind)  # run() refuses what is not in SUPPORTED
    if kind != "ADD" and len(a) > 2 and a[2] is not None:
        y = y + a[2]
    return ACTIVATIONS[options.fusedActivationFunction](y)


def run(model: bytes | str, *inputs: np.ndarray) -> list[np.ndarray]:
    """The model's outputs, computed in float64 from its float32 weights and ``inputs``."""
    graph = read_model(model)
    values = {i: np.asarray(t.data, np.float64) for i, t in enumerate(graph.tensors) if t.data is not None}
    values.update({i: np.asarray(x, np.float64) for i, x in zip(graph.inputs, inputs, strict=True)})
    for op in graph.ops:
        if op.kind not in SUPPORTED:
            raise NotImplementedError(f"the float64 reference does not run {op.kind}")
        args = [values[i] if i >= 0 else None for i in op.inputs]
        values[op.outputs[0]] = _op(op.kind, op.options, args)
    return [values[i] for i in graph.outputs]
