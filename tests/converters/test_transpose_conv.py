"""TRANSPOSE_CONV written as the convolutions of its stride's phases (``converters/transpose_conv.py``,
through ``converters.normalize``), against LiteRT running the original."""

import dataclasses

import numpy as np
import pytest
from ai_edge_litert import schema_py_generated as schema_fb

from converters.graph import Graph, write_model
from converters.normalize import normalize


def _transpose_conv(height: int, width: int, filters: int, kernel: tuple[int, int], strides: tuple[int, int],
                    padding: int, out_hw: tuple[int, int], bias: bool, activation: int) -> Graph:
    rng = np.random.default_rng(kernel[0] * 7 + strides[0])
    g = Graph()
    x = g.add_tensor("x", (1, height, width, 3), np.float32)
    inputs = [g.add_tensor("shape", (4,), np.int32, [1, *out_hw, filters]),
              g.add_tensor("w", (filters, *kernel, 3), np.float32, rng.normal(size=(filters, *kernel, 3))), x]
    if bias:
        inputs.append(g.add_tensor("b", (filters,), np.float32, rng.normal(size=filters)))
    y = g.add_tensor("y", (1, *out_hw, filters), np.float32)
    options = schema_fb.TransposeConvOptionsT()
    options.padding, (options.strideH, options.strideW) = padding, strides
    options.fusedActivationFunction = activation
    g.add_op("TRANSPOSE_CONV", inputs, [y], options, version=4 if activation else 3)
    g.inputs, g.outputs = [x], [y]
    return g


TRANSPOSE_CASES = [  # (kernel, strides, padding, extra output rows / columns beyond the least)
    ((1, 1), (1, 1), schema_fb.Padding.SAME, 0), ((2, 2), (2, 2), schema_fb.Padding.VALID, 0),
    ((3, 3), (2, 2), schema_fb.Padding.SAME, 0), ((3, 3), (2, 2), schema_fb.Padding.VALID, 1),
    ((4, 4), (2, 2), schema_fb.Padding.SAME, 0), ((5, 3), (3, 3), schema_fb.Padding.SAME, 0),
    ((5, 3), (3, 3), schema_fb.Padding.VALID, 2), ((3, 2), (1, 1), schema_fb.Padding.VALID, 0),
    ((2, 2), (3, 3), schema_fb.Padding.VALID, 1), ((3, 3), (1, 1), schema_fb.Padding.SAME, 0),
    ((3, 3), (2, 1), schema_fb.Padding.SAME, 0), ((4, 3), (2, 3), schema_fb.Padding.VALID, 1),
    ((1, 3), (1, 2), schema_fb.Padding.SAME, 0), ((1, 1), (2, 2), schema_fb.Padding.SAME, 0),
]


@pytest.mark.parametrize("kernel, strides, padding, extra", TRANSPOSE_CASES)
@pytest.mark.parametrize("bias, activation", [(True, schema_fb.ActivationFunctionType.RELU), (False, 0)])
def test_a_transposed_convolution_becomes_the_convolutions_it_computes(kernel, strides, padding, extra, bias,
                                                                       activation):
    """TRANSPOSE_CONV ran in the TEE: normalize() writes it as the convolutions of its stride's phases (one
    CONV_2D of them all when each has every tap, else one per phase of its own taps), then their
    interleaving and a SLICE (converters/transpose_conv.py), which compute what LiteRT's own kernels do,
    on either set. No filter has a tap that is zero for all of them: such zeros, where one CONV_2D padded
    the shorter phases, gave those phases' filters away."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    (height, width), (sh, sw) = (5, 4), strides
    if padding == schema_fb.Padding.SAME:
        out_hw = (height * sh, width * sw)
    else:
        out_hw = (sh * (height - 1) + kernel[0] + extra, sw * (width - 1) + kernel[1] + extra)
    graph = _transpose_conv(height, width, 6, kernel, strides, padding, out_hw, bias, activation)
    normalized = normalize(graph)
    kinds = [op.kind for op in normalized.ops]
    assert "TRANSPOSE_CONV" not in kinds
    convs = [op for op in normalized.ops if op.kind == "CONV_2D"]
    if kernel[0] % sh == 0 and kernel[1] % sw == 0:  # every phase has every tap: one conv of them all
        shapes = [(6 * sh * sw, kernel[0] // sh, kernel[1] // sw, 3)]
    else:
        shapes = [(6, len(range(rh, kernel[0], sh)), len(range(rw, kernel[1], sw)), 3)
                  for rh in range(sh) for rw in range(sw) if rh < kernel[0] and rw < kernel[1]]
    assert [normalized.tensors[conv.inputs[1]].shape for conv in convs] == shapes
    for conv in convs:
        assert np.abs(normalized.tensors[conv.inputs[1]].data).max(axis=(0, 3)).min() > 0  # no empty tap
    x = np.random.default_rng(1).normal(size=(1, height, width, 3)).astype(np.float32)
    for resolver in (OpResolverType.AUTO, OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES):
        results = []
        for model in (write_model(graph), write_model(normalized)):
            interpreter = Interpreter(model_content=model, experimental_op_resolver_type=resolver)
            interpreter.allocate_tensors()
            interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
            interpreter.invoke()
            results.append(interpreter.get_tensor(interpreter.get_output_details()[0]["index"]))
        want, got = results
        assert got.shape == want.shape == (1, *out_hw, 6)
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
        if activation:
            assert want.min() == 0.0 and got.min() >= 0.0


def test_a_transposed_convolution_of_computed_weights_is_kept():
    """Weights the model computes: left as TRANSPOSE_CONV, which the TEE runs."""
    graph = _transpose_conv(4, 4, 2, (3, 3), (2, 2), schema_fb.Padding.SAME, (8, 8), False, 0)
    assert "TRANSPOSE_CONV" not in [op.kind for op in normalize(graph).ops]
    weights = graph.ops[0].inputs[1]
    graph.tensors[weights] = dataclasses.replace(graph.tensors[weights], data=None)
    graph.inputs.append(weights)
    assert [op.kind for op in normalize(graph).ops] == ["TRANSPOSE_CONV"]
