"""The ops the ShadowNet trusted app runs itself, in numpy, rather than through LiteRT: which graph ops
qualify and their instruction forms (the TA's kernels: ``tee_sim.ta_shadownet_numpy_ops``; ``max_pool``
runs as a C kernel instead, ``tee_sim.ta_shadownet_max_pool``, with the same results, and so do ``mean``
over an image's positions and ``softmax``, ``tee_sim.ta_shadownet_small_ops``, within float32 rounding of
LiteRT's, and ``depthwise``, a depthwise convolution the scheme keeps in the TEE,
``tee_sim.ta_shadownet_depthwise``, likewise). The activations
among them are also fused into the restore of the offloaded op they follow (``converters.plan_rounds``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from ai_edge_litert import schema_py_generated as schema_fb

from converters import linear
from converters.graph import Graph, fused_activation

# Activations the TEE applies in place right after a restore (same float32 results as LiteRT's kernels).
NUMPY_ACTIVATIONS = frozenset({"RELU", "RELU6", "RELU_N1_TO_1", "LEAKY_RELU"})


def numpy_activation(op: Any) -> bool:
    if op.kind == "LEAKY_RELU":  # max(x, alpha * x) is LiteRT's x > 0 ? x : alpha * x only for alpha <= 1
        return 0 <= float(getattr(op.options, "alpha", -1)) <= 1
    return op.kind in NUMPY_ACTIVATIONS and len(op.inputs) == 1


def activation_fields(op: Any) -> dict[str, Any]:
    if op is None:
        return {"activation": None, "alpha": None}
    alpha = float(np.float32(op.options.alpha)) if op.kind == "LEAKY_RELU" else None
    return {"activation": op.kind, "alpha": alpha}


# Activations the TA runs itself but does not fuse into a restore (whose kernel has no exp): EfficientNet's
# swish and squeeze-excite gates (LOGISTIC), MobileNetV3's HARD_SWISH, ConvNeXt's GELU, each one C call
# (``tee_sim.ta_shadownet_small_ops``; numpy for a strided view). Through LiteRT each was a signature with an
# arena of its own: EfficientNetB0 at 224x224 needed 66 MiB of secure memory, above the default cap (29.1
# now; at 128x128 31.4 -> 19.0 MiB, the TA's time 4.3-4.6 -> 3.9-4.3 ms). Within float32 rounding of
# LiteRT's kernels, not bit for bit.
SMOOTH_ACTIVATIONS = frozenset({"LOGISTIC", "HARD_SWISH", "GELU"})

# Ops the TA runs itself, in numpy, on its liveness-planned arena: each is an IEEE add / multiply / max or a
# copy, so the result is LiteRT's bit for bit (but MEAN and SOFTMAX, C kernels: a sum, a division, expf; a
# MEAN over the channels, numpy's pairwise sum; and the SMOOTH_ACTIVATIONS).
# Through LiteRT every signature would keep an arena of its own
# (yolov4-tiny: 41 MiB of secure memory, most of it for SPLIT / CONCATENATION / MAX_POOL_2D copies;
# ResNet-404: 29 MiB for 201 ADD + RELU signatures), and each crossing into it costs a copy.
NUMPY_BINARY = frozenset({"ADD", "SUB", "MUL", "MAXIMUM", "MINIMUM", "SQUARED_DIFFERENCE"})
# A layer norm's other ops (ConvNeXt's, with SQUARED_DIFFERENCE and a MEAN over the channels): through LiteRT
# they kept 115 units' arenas in ConvNeXtTiny's TEE. NEG is exact; RSQRT is 1 / sqrt(x), two roundings, as
# LiteRT's reference kernel.
NUMPY_UNARY = frozenset({"NEG", "RSQRT"})


# Forms whose TA kernels read (or write) whole dense arrays only, so that a split's slice cannot be their
# input (a concatenation's slice their output: ``converters.plan_tee``'s views). The C kernels of MEAN over
# positions and SOFTMAX take contiguous floats, a reshape reads its input as one, an upsample writes its
# output as blocks of one (a review found a SOFTMAX, and a MEAN over the channels, feeding a concatenation
# refused at load). None: an op the TA does not run in numpy (LiteRT's output).
READ_DENSE = frozenset({"reshape", "mean", "softmax"})
WRITE_DENSE = frozenset({None, "upsample", "mean", "softmax"})


def numpy_form(g: Graph, i: int) -> tuple[dict[str, Any], list[int]] | None:
    """The TA's numpy instruction for op ``i`` (without its tensor references) and the positions of its
    data inputs, or None when LiteRT must run it."""
    op = g.ops[i]
    if fused_activation(op) is not None or any(t < 0 for t in op.outputs):
        return None
    outs = [g.tensors[t] for t in op.outputs]
    if any(t.dtype != np.float32 or t.data is not None for t in outs):
        return None

    def const(j: int) -> np.ndarray | None:
        return g.tensors[op.inputs[j]].data if j < len(op.inputs) and op.inputs[j] >= 0 else None

    def floats(*positions: int) -> bool:
        return all(j < len(op.inputs) and op.inputs[j] >= 0 and g.tensors[op.inputs[j]].dtype == np.float32
                   for j in positions)

    kind, out = op.kind, outs[0].shape
    if kind in NUMPY_BINARY and len(op.inputs) == 2 and floats(0, 1):
        shapes = [g.tensors[t].shape for t in op.inputs]
        if any(g.tensors[t].data is None for t in op.inputs) and _broadcast(shapes) == out:
            return {"op": "binary", "kind": kind}, [0, 1]
    elif kind in NUMPY_UNARY and len(op.inputs) == 1 and floats(0) and g.tensors[op.inputs[0]].data is None \
            and tuple(out) == tuple(g.tensors[op.inputs[0]].shape):
        return {"op": "unary", "kind": kind}, [0]
    elif numpy_activation(op) and floats(0) and g.tensors[op.inputs[0]].data is None:
        return {"op": "activation", **activation_fields(op)}, [0]
    elif kind in SMOOTH_ACTIVATIONS and len(op.inputs) == 1 and floats(0) \
            and g.tensors[op.inputs[0]].data is None:
        form = {"op": "activation", "activation": kind, "alpha": None}
        if kind == "GELU":  # LiteRT's exact GELU, or its tanh approximation
            form["approximate"] = bool(getattr(op.options, "approximate", False))
        return form, [0]
    elif kind == "MAX_POOL_2D" and floats(0) and len(out) == 4:
        o = op.options
        _, h, w, _ = g.tensors[op.inputs[0]].shape
        window, stride = (o.filterHeight, o.filterWidth), (o.strideH, o.strideW)
        pad = [_pool_padding(n, f, s, o.padding, m) for n, f, s, m in zip((h, w), window, stride, out[1:3],
                                                                           strict=True)]
        if None not in pad and min(*window, *stride) >= 1:
            return {"op": "max_pool", "window": list(window), "stride": list(stride), "pad": pad}, [0]
    elif kind == "DEPTHWISE_CONV_2D" and floats(0, 1, 2) and len(out) == 4 \
            and g.tensors[op.inputs[0]].data is None and len(g.tensors[op.inputs[0]].shape) == 4 \
            and const(1) is not None and const(2) is not None:
        o, (_, h, w, c), weights = op.options, g.tensors[op.inputs[0]].shape, const(1)
        stride = (o.strideH, o.strideW)
        dilation = (getattr(o, "dilationHFactor", 1) or 1, getattr(o, "dilationWFactor", 1) or 1)
        if weights.ndim == 4 and weights.shape[0] == 1 and weights.shape[3] == c == out[3] \
                and const(2).shape == (c,) and dilation == (1, 1) and min(stride) >= 1:
            pad = [_pool_padding(size, k, s_, o.padding, m) for size, k, s_, m in
                   zip((h, w), weights.shape[1:3], stride, out[1:3], strict=True)]
            if None not in pad:
                return {"op": "depthwise", "stride": list(stride), "pad": pad}, [0, 1, 2]
    elif kind == "CONCATENATION" and floats(*range(len(op.inputs))):
        axis = op.options.axis % len(out)
        return {"op": "concat", "axis": axis}, list(range(len(op.inputs)))
    elif kind in ("SPLIT", "SPLIT_V"):
        data, axis_at = (1, 0) if kind == "SPLIT" else (0, 2)
        axis = const(axis_at)
        if axis is not None and axis.size == 1 and floats(data):
            rank = len(g.tensors[op.inputs[data]].shape)
            return {"op": "split", "axis": int(axis.reshape(-1)[0]) % rank}, [data]
    elif kind == "MEAN" and floats(0) and g.tensors[op.inputs[0]].data is None:
        axes, shape = const(1), g.tensors[op.inputs[0]].shape
        if axes is not None and len(shape) == 4 and sorted({int(a) % 4 for a in axes.reshape(-1)}) == [1, 2] \
                and tuple(out) in ((shape[0], 1, 1, shape[3]), (shape[0], shape[3])):
            return {"op": "mean"}, [0]
        if axes is not None and len(shape) >= 1 and {int(a) % len(shape) for a in axes.reshape(-1)} \
                == {len(shape) - 1} and tuple(out) in ((*shape[:-1], 1), tuple(shape[:-1])):
            return {"op": "mean_last"}, [0]  # a layer norm's, over the channels
    elif kind == "SOFTMAX" and floats(0) and g.tensors[op.inputs[0]].data is None \
            and tuple(out) == tuple(g.tensors[op.inputs[0]].shape) and len(out) >= 1 \
            and np.isfinite(getattr(op.options, "beta", np.nan)):  # no options: LiteRT decides
        return {"op": "softmax", "beta": float(np.float32(op.options.beta))}, [0]
    elif kind in ("RESHAPE", "SQUEEZE", "EXPAND_DIMS") and floats(0) and g.tensors[op.inputs[0]].data is None:
        if all(const(j) is not None for j in range(1, len(op.inputs))):
            return {"op": "reshape"}, [0]
    elif kind in ("PAD", "PADV2") and floats(0) and g.tensors[op.inputs[0]].data is None:
        paddings = const(1)
        value = const(2) if kind == "PADV2" and len(op.inputs) > 2 else np.zeros(1, np.float32)
        shape = g.tensors[op.inputs[0]].shape
        if (paddings is not None and value is not None and value.size == 1
                and paddings.shape == (len(shape), 2) and np.all(paddings >= 0)):
            return {"op": "pad", "pad": paddings.astype(int).tolist(),
                    "value": float(np.float32(value.reshape(-1)[0]))}, [0]
    elif kind == "RESIZE_NEAREST_NEIGHBOR" and floats(0) and len(out) == 4 and not op.options.alignCorners:
        _, h, w, c = g.tensors[op.inputs[0]].shape
        factor = (out[1] // h, out[2] // w)
        # Power-of-two factors only: LiteRT maps output row y to floor(y * h / H) (or with half-pixel
        # centers floor((y + 0.5) * h / H)), which is y // factor exactly when h / H is exact in float.
        if (out[1] == h * factor[0] and out[2] == w * factor[1] and out[3] == c
                and all(f in (1, 2, 4, 8) for f in factor)):
            return {"op": "upsample", "factor": list(factor)}, [0]
    return None


def _broadcast(shapes: list[tuple[int, ...]]) -> tuple[int, ...] | None:
    try:
        return tuple(np.broadcast_shapes(*shapes))
    except ValueError:
        return None


def _pool_padding(n: int, window: int, stride: int, padding: int, out: int) -> list[int] | None:
    """[before, after] padding of one spatial axis of a pool as LiteRT computes it (``linear.padding``), or
    None when ``out`` is not what LiteRT would produce."""
    expected, before, after = linear.padding(n, window, stride, 1, padding == schema_fb.Padding.SAME)
    return [before, after] if expected == out and out >= 1 else None
