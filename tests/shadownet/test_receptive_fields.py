"""Receptive fields in the image input (``shadownet.receptive_fields``), as the critical-point attack reads
them, against what LiteRT computes."""

from __future__ import annotations

import numpy as np
from ai_edge_litert import schema_py_generated as fb

from converters.graph import Graph, write_model
from shadownet import receptive_fields
from tests.converters.litert import run
from tests.shadownet.small_models import conv_options


def test_each_position_s_receptive_field_is_the_graph_s():
    """``receptive_fields`` follows a strided SAME first conv, a zero padding, a dilated VALID depthwise conv
    and a pool: each position of what they make depends on exactly the input rows and columns its ``Axis``
    says (clipped to the image), as LiteRT computes it (linear ops only: every dependency shows)."""
    rng = np.random.default_rng(2)
    g = Graph()
    image = g.add_tensor("image", (1, 13, 12, 3), np.float32)
    w = g.add_tensor("w", (4, 3, 3, 3), np.float32, rng.standard_normal((4, 3, 3, 3)))
    first = g.add_tensor("first", (1, 7, 6, 4), np.float32)
    g.add_op("CONV_2D", [image, w, -1], [first],
             conv_options("CONV_2D", fb.Padding.SAME, 2, fb.ActivationFunctionType.NONE))
    pads = g.add_tensor("pads", (4, 2), np.int32, np.array([[0, 0], [1, 0], [0, 2], [0, 0]]))
    padded = g.add_tensor("padded", (1, 8, 8, 4), np.float32)
    g.add_op("PAD", [first, pads], [padded], fb.PadOptionsT())
    options = conv_options("DEPTHWISE_CONV_2D", fb.Padding.VALID, 1, fb.ActivationFunctionType.NONE)
    options.dilationHFactor = options.dilationWFactor = 2
    dw = g.add_tensor("dw", (1, 3, 3, 4), np.float32, rng.standard_normal((1, 3, 3, 4)))
    deep = g.add_tensor("deep", (1, 4, 4, 4), np.float32)
    g.add_op("DEPTHWISE_CONV_2D", [padded, dw, -1], [deep], options)
    pool = fb.Pool2DOptionsT()
    pool.padding, pool.strideH, pool.strideW = fb.Padding.VALID, 1, 1
    pool.filterHeight = pool.filterWidth = 2
    out = g.add_tensor("out", (1, 3, 3, 4), np.float32)
    g.add_op("AVERAGE_POOL_2D", [deep], [out], pool)
    g.inputs, g.outputs = [image], [out]

    op, geometry = receptive_fields.receptive_fields(g)
    assert op is g.ops[0]
    assert geometry[first][:2] == (receptive_fields.Axis(2, 1, 3), receptive_fields.Axis(2, 0, 3))
    rows, cols, after = geometry[out]
    assert after
    base = rng.standard_normal((1, 13, 12, 3)).astype(np.float32)
    model = write_model(g)
    y0 = run(model, [base])[0][0]
    depends = np.zeros((3, 3, 13, 12), bool)
    for y in range(13):
        for x in range(12):
            moved = base.copy()
            moved[0, y, x] += 1.0
            depends[:, :, y, x] = np.abs(run(model, [moved])[0][0] - y0).max(-1) > 1e-4
    for i in range(3):
        for j in range(3):
            ys, xs = np.nonzero(depends[i, j])
            top, left = i * rows.stride - rows.start, j * cols.stride - cols.start
            assert (ys.min(), ys.max()) == (max(top, 0), min(top + rows.span - 1, 12))
            assert (xs.min(), xs.max()) == (max(left, 0), min(left + cols.span - 1, 11))
