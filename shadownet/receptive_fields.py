"""Receptive fields in a model's image input, for the critical-point attack (``shadownet.critical_points``):
which input rows and columns each position of each tensor depends on, through convolutions, pools,
piecewise-linear activations, sums, concatenations of channels and zero paddings, and whether the first
conv layer's output is in it. Read from the reference graph (the attacker's public architecture); an op
it does not follow (a reshape, a mean, a dense layer, a smooth activation) leaves a string saying why.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np


class Axis(NamedTuple):
    """One spatial axis of a tensor's receptive fields in the model input: position ``i`` reads input
    rows (or columns) ``i * stride - start`` to ``i * stride - start + span - 1``."""

    stride: int
    start: int
    span: int

    def window(self, kernel: int, stride: int, dilation: int, before: int) -> Axis:
        """The axis after a window op (conv, pool) of this geometry, padded by ``before``."""
        return Axis(self.stride * stride, self.start + before * self.stride,
                    self.span + dilation * (kernel - 1) * self.stride)

    def union(self, other: Axis) -> Axis | None:
        """Both fields at once (an elementwise op of two tensors); None for other strides."""
        if self.stride != other.stride:
            return None
        start = max(self.start, other.start)
        end = max(self.span - self.start, other.span - other.start)
        return Axis(self.stride, start, start + end)


class Geometry(NamedTuple):
    """A tensor's receptive fields in the model input (``rows``, ``cols``) and whether the first layer's
    output is in it (``after_first``)."""

    rows: Axis
    cols: Axis
    after_first: bool


# Elementwise ops that keep a crossing piecewise linear in the input (MUL: by a constant only).
_ELEMENTWISE = {"RELU", "RELU6", "RELU_N1_TO_1", "LEAKY_RELU", "PRELU", "ABS", "ADD", "SUB", "MAXIMUM",
                "MINIMUM", "MUL", "CONCATENATION"}
_WINDOWED = {"CONV_2D", "DEPTHWISE_CONV_2D", "MAX_POOL_2D", "AVERAGE_POOL_2D"}
_PIECEWISE_FUSED = {0, 1, 2, 3}  # ActivationFunctionType NONE, RELU, RELU_N1_TO_1, RELU6


def receptive_fields(graph: Any) -> tuple[Any, dict[int, Geometry | str]]:
    """The first layer's op (a CONV_2D of constant weights on the image, or on a zero padding of it) and
    every tensor's receptive fields in the image (``Geometry``), or why they are not followed (a string);
    the first element is a string when there is no such first layer."""
    image = graph.inputs[0]
    geometry: dict[int, Geometry | str] = {image: Geometry(Axis(1, 0, 1), Axis(1, 0, 1), False)}
    first = None
    for op in graph.ops:
        reached = [t for t in op.inputs if t in geometry]
        if not reached:
            continue
        if first is None and op.kind not in ("PAD", "PADV2"):  # the first layer: on the image itself
            source = geometry.get(op.inputs[0])
            if (op.kind != "CONV_2D" or reached != [op.inputs[0]] or graph.tensors[op.inputs[1]].data is None
                    or not isinstance(source, Geometry) or (source.rows.span, source.cols.span) != (1, 1)):
                return (f"the first op on the image is {op.kind}, not a conv (the attack solves a CONV_2D "
                        "that reads the model input, or a zero padding of it)"), geometry
            first = op
        broken = [geometry[t] for t in reached if isinstance(geometry[t], str)]
        found = broken[0] if broken else _follow(graph, op, reached, geometry, op is first)
        for t in op.outputs:
            geometry[t] = found
    if first is None:
        return "no conv reads the model input", geometry
    return first, geometry


def _follow(graph: Any, op: Any, reached: list[int], geometry: dict, is_first: bool) -> Geometry | str:
    """The output geometry of ``op`` from its reached inputs' (all ``Geometry``), or why not followed."""
    from ai_edge_litert import schema_py_generated as schema_fb

    from converters import linear

    fields = [geometry[t] for t in reached]
    after = is_first or any(g.after_first for g in fields)
    options = op.options
    if getattr(options, "fusedActivationFunction", 0) not in _PIECEWISE_FUSED:
        return f"{op.kind} with a fused activation that is not piecewise linear"
    if op.kind in _WINDOWED:
        if reached != [op.inputs[0]]:
            return f"{op.kind} of variable weights"
        g, shape = fields[0], graph.tensors[op.inputs[0]].shape
        if op.kind.endswith("POOL_2D"):
            kh, kw, dh, dw = options.filterHeight, options.filterWidth, 1, 1
        else:
            _, kh, kw, _ = graph.tensors[op.inputs[1]].shape
            dh = int(getattr(options, "dilationHFactor", 1) or 1)
            dw = int(getattr(options, "dilationWFactor", 1) or 1)
        same = options.padding == schema_fb.Padding.SAME
        top = linear.padding(shape[1], kh, options.strideH, dh, same)[1]
        left = linear.padding(shape[2], kw, options.strideW, dw, same)[1]
        return Geometry(g.rows.window(kh, options.strideH, dh, top),
                        g.cols.window(kw, options.strideW, dw, left), after)
    if op.kind in ("PAD", "PADV2"):
        pads = graph.tensors[op.inputs[1]].data if len(op.inputs) > 1 else None
        if pads is None or reached != [op.inputs[0]] or np.size(pads) != 8:
            return f"{op.kind} of variable paddings"
        pads = np.asarray(pads).reshape(-1, 2)
        g = fields[0]
        return Geometry(g.rows.window(1, 1, 1, int(pads[1, 0])), g.cols.window(1, 1, 1, int(pads[2, 0])),
                        after)
    if op.kind in _ELEMENTWISE:
        if op.kind == "CONCATENATION":
            rank = len(graph.tensors[op.outputs[0]].shape)
            if options.axis not in (-1, rank - 1):
                return "CONCATENATION along a spatial axis"
        elif op.kind == "MUL" and len(reached) > 1:
            return "MUL of two tensors (not piecewise linear)"
        for t in op.inputs:
            if t >= 0 and t not in geometry and graph.tensors[t].data is None:
                return f"{op.kind} of a tensor made from no input"
        rows, cols = fields[0].rows, fields[0].cols
        for g in fields[1:]:
            rows, cols = rows.union(g.rows), cols.union(g.cols)
            if rows is None or cols is None:
                return f"{op.kind} of tensors of other strides"
        return Geometry(rows, cols, after)
    return f"{op.kind} (the attack follows convolutions, pools, piecewise-linear activations, sums and pads)"
