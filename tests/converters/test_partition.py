"""Rounds and steps on small graphs built with the graph layer."""

import numpy as np
from ai_edge_litert import schema_py_generated as fb

from converters.graph import Graph
from converters.partition import (
    after_input_rounds,
    always_masked,
    layers_from_input,
    narrow_rounds,
    partition,
)


def _conv(g, x, c_in, c_out, name):
    o = fb.Conv2DOptionsT()
    o.padding, o.strideH, o.strideW, o.dilationHFactor, o.dilationWFactor = fb.Padding.SAME, 1, 1, 1, 1
    w = g.add_tensor(f"{name}/w", (c_out, 3, 3, c_in), np.float32, np.ones((c_out, 3, 3, c_in)))
    b = g.add_tensor(f"{name}/b", (c_out,), np.float32, np.zeros(c_out))
    y = g.add_tensor(name, (1, 8, 8, c_out), np.float32)
    return g.add_op("CONV_2D", [x, w, b], [y], o), y


def _unary(g, kind, x, name, shape=(1, 8, 8, 4)):
    y = g.add_tensor(name, shape, np.float32)
    return g.add_op(kind, [x], [y]), y


def resnet_block():
    """stem conv -> relu -> [conv1 -> relu -> conv2] + [shortcut conv] -> add -> relu -> dense."""
    g = Graph()
    x = g.add_tensor("x", (1, 8, 8, 3), np.float32)
    stem, a = _conv(g, x, 3, 4, "stem")
    relu_a, a = _unary(g, "RELU", a, "a")
    c1, h = _conv(g, a, 4, 4, "conv1")
    relu_h, h = _unary(g, "RELU", h, "h")
    c2, h2 = _conv(g, h, 4, 4, "conv2")
    sc, s = _conv(g, a, 4, 4, "shortcut")
    d = g.add_tensor("sum", (1, 8, 8, 4), np.float32)
    add = g.add_op("ADD", [h2, s], [d], fb.AddOptionsT())
    relu_d, d = _unary(g, "RELU", d, "d")
    shape = g.add_tensor("shape", (2,), np.int32, np.array([1, 256]))
    flat = g.add_tensor("flat", (1, 256), np.float32)
    reshape = g.add_op("RESHAPE", [d, shape], [flat])
    w = g.add_tensor("fc/w", (10, 256), np.float32, np.ones((10, 256)))
    out = g.add_tensor("out", (1, 10), np.float32)
    fc = g.add_op("FULLY_CONNECTED", [flat, w, -1], [out], fb.FullyConnectedOptionsT())
    g.inputs, g.outputs = [x], [out]
    return g, dict(stem=stem, relu_a=relu_a, c1=c1, relu_h=relu_h, c2=c2, sc=sc, add=add, relu_d=relu_d,
                   reshape=reshape, fc=fc)


def test_shortcut_and_first_conv_share_a_round():
    g, op = resnet_block()
    p = partition(g)
    assert p.rounds == [[op["stem"]], [op["c1"], op["sc"]], [op["c2"]], [op["fc"]]]
    assert p.steps == [[], [op["relu_a"]], [op["relu_h"]], [op["add"], op["relu_d"], op["reshape"]], []]
    assert len(p.steps) == len(p.rounds) + 1  # R rounds, R + 1 TEE entries
    assert p.round_of(op["sc"]) == 2 and p.offloaded == {op[k] for k in ("stem", "c1", "sc", "c2", "fc")}


def _first_layer_then(kind: str):
    """x -> stem conv -> relu -> ``kind`` (a TEE op without weights, or a depthwise layer) -> conv."""
    g = Graph()
    x = g.add_tensor("x", (1, 8, 8, 3), np.float32)
    stem, a = _conv(g, x, 3, 4, "stem")
    _, a = _unary(g, "RELU", a, "a")
    if kind == "DEPTHWISE_CONV_2D":
        o = fb.DepthwiseConv2DOptionsT()
        o.padding, o.strideH, o.strideW, o.depthMultiplier = fb.Padding.SAME, 1, 1, 1
        o.dilationHFactor = o.dilationWFactor = 1
        w = g.add_tensor("dw/w", (1, 3, 3, 4), np.float32, np.ones((1, 3, 3, 4)))
        m = g.add_tensor("dw", (1, 8, 8, 4), np.float32)
        g.add_op(kind, [a, w, -1], [m], o)
    else:
        _, m = _unary(g, kind, a, "m")
    last, y = _conv(g, m, 4, 4, "last")
    g.inputs, g.outputs = [x], [y]
    return g


def test_the_rounds_one_layer_from_the_input_are_those_a_chosen_input_attack_solves_it_from():
    """``after_input_rounds``: the rounds that read what one layer on the input made, through ops without
    weights (an activation, a pool); not through a second layer (a ResNet block's second conv, the sum of
    its two paths, a depthwise layer kept in the TEE); an offloaded depthwise layer's own round is one."""
    g, op = resnet_block()
    assert after_input_rounds(partition(g)) == [2]  # conv1 and the shortcut read relu(stem(x))
    for kind in ("RELU6", "TANH"):
        assert after_input_rounds(partition(_first_layer_then(kind))) == [2]
    depthwise = _first_layer_then("DEPTHWISE_CONV_2D")
    assert after_input_rounds(partition(depthwise, frozenset({"DEPTHWISE_CONV_2D"}))) == []
    assert after_input_rounds(partition(depthwise)) == [2]  # the depthwise round; not the conv's, round 3


def test_a_round_that_reads_the_first_layers_output_beside_a_deeper_ones_is_one_layer_from_the_input():
    """A DenseNet block: ``concat(relu(stem(x)), relu(conv1(relu(stem(x)))))`` carries the stem's output
    unchanged in its first channels, so the round that reads it counts as one layer from the input (a
    review: unmasked, it gave the chosen-input attack every stem filter); the sum of the two does not."""
    for kind, rounds in (("CONCATENATION", [2, 3]), ("ADD", [2])):
        g = Graph()
        x = g.add_tensor("x", (1, 8, 8, 3), np.float32)
        _, a = _conv(g, x, 3, 4, "stem")
        _, a = _unary(g, "RELU", a, "a")
        _, h = _conv(g, a, 4, 4, "conv1")
        _, h = _unary(g, "RELU", h, "h")
        joined = g.add_tensor("joined", (1, 8, 8, 8 if kind == "CONCATENATION" else 4), np.float32)
        options = fb.ConcatenationOptionsT() if kind == "CONCATENATION" else fb.AddOptionsT()
        if kind == "CONCATENATION":
            options.axis = 3
        g.add_op(kind, [a, h], [joined], options)
        _, y = _conv(g, joined, g.tensors[joined].shape[-1], 4, "last")
        g.inputs, g.outputs = [x], [y]
        assert after_input_rounds(partition(g)) == rounds, kind


def test_layers_from_input_count_the_deepest_path_through_layers_of_weights():
    """What a fit of the crossing must go through: the resnet block's sum holds the stem alone on its
    shortcut path and three layers on the other, and counts three; ops without weights add none; a depthwise
    layer adds one whether the TEE runs it or the accelerator."""
    g, op = resnet_block()
    depth = layers_from_input(partition(g))
    tensor = {name: g.ops[op[name]].outputs[0] for name in op}
    assert depth[g.inputs[0]] == 0 and depth[tensor["stem"]] == depth[tensor["relu_a"]] == 1
    assert depth[tensor["c1"]] == depth[tensor["sc"]] == 2 and depth[tensor["c2"]] == 3
    assert depth[tensor["add"]] == depth[tensor["reshape"]] == 3 and depth[tensor["fc"]] == 4
    for in_tee in (frozenset(), frozenset({"DEPTHWISE_CONV_2D"})):
        g = _first_layer_then("DEPTHWISE_CONV_2D")
        assert layers_from_input(partition(g, in_tee))[g.outputs[0]] == 3, in_tee


def test_rounds_whose_input_is_too_narrow_to_mix_are_always_masked():
    """The resnet block's 4-channel tensors: the rounds that read them (2: conv1 and the shortcut, 3: conv2),
    not the dense layer on 256 values; none where the scheme mixes nothing (None)."""
    g, op = resnet_block()
    p = partition(g)
    assert narrow_rounds(p, 8) == [2, 3] and narrow_rounds(p, 4) == [] and narrow_rounds(p, None) == []
    assert always_masked(p, 8) == [1, 2, 3] and always_masked(p, None) == [1, 2]


def test_back_to_back_convs_take_one_round_each():
    g = Graph()
    x = g.add_tensor("x", (1, 8, 8, 3), np.float32)
    first, y = _conv(g, x, 3, 4, "c1")
    second, z = _conv(g, y, 4, 4, "c2")
    g.inputs, g.outputs = [x], [z]
    p = partition(g)
    assert p.rounds == [[first], [second]] and p.steps == [[], [], []]


def test_tee_ops_before_the_first_round_run_in_step_0_and_constant_inputs_stay_in_the_tee():
    g = Graph()
    x = g.add_tensor("x", (1, 8, 8, 3), np.float32)
    pre, xs = _unary(g, "LOGISTIC", x, "xs", (1, 8, 8, 3))
    c, y = _conv(g, xs, 3, 4, "c")
    const = g.add_tensor("k", (1, 8, 8, 3), np.float32, np.ones((1, 8, 8, 3)))
    folded, yk = _conv(g, const, 3, 4, "const_conv")
    s = g.add_tensor("s", (1, 8, 8, 4), np.float32)
    add = g.add_op("ADD", [y, yk], [s], fb.AddOptionsT())
    g.inputs, g.outputs = [x], [s]
    p = partition(g)
    assert p.rounds == [[c]]
    assert p.steps == [[pre, folded], [add]]


def test_kinds_the_scheme_keeps_in_the_tee_run_in_the_step_between_rounds():
    """``groupmix:depthwise=tee``: a depthwise layer between two convolutions runs in the TEE's step, and
    the two convolutions stay in rounds of their own."""
    g = Graph()
    x = g.add_tensor("x", (1, 8, 8, 3), np.float32)
    first, y = _conv(g, x, 3, 4, "c1")
    o = fb.DepthwiseConv2DOptionsT()
    o.padding, o.strideH, o.strideW, o.depthMultiplier = fb.Padding.SAME, 1, 1, 1
    o.dilationHFactor = o.dilationWFactor = 1
    w = g.add_tensor("dw/w", (1, 3, 3, 4), np.float32, np.ones((1, 3, 3, 4)))
    d = g.add_tensor("dw", (1, 8, 8, 4), np.float32)
    depthwise = g.add_op("DEPTHWISE_CONV_2D", [y, w, -1], [d], o)
    second, z = _conv(g, d, 4, 4, "c2")
    g.inputs, g.outputs = [x], [z]
    assert partition(g).rounds == [[first], [depthwise], [second]]
    kept = partition(g, frozenset({"DEPTHWISE_CONV_2D"}))
    assert kept.rounds == [[first], [second]] and kept.steps == [[], [depthwise], []]


def test_layers_on_the_input_too_long_to_split_run_in_the_tee_and_the_next_one_reads_the_input():
    """With ``long_input_sums_in_tee``: a conv on the input of more than ``MAX_DOT_LENGTH`` terms per output,
    and the next one on what the TEE made of it (still the user's input), run in the TEE; the short conv
    after them is round 1, and a long conv after it, on a computed tensor, is offloaded."""
    from converters.exact_split import MAX_DOT_LENGTH

    def conv(x, kernel, c_out, name):  # SAME, on 8 channels: kernel^2 * 8 terms per output
        o = fb.Conv2DOptionsT()
        o.padding, o.strideH, o.strideW, o.dilationHFactor, o.dilationWFactor = fb.Padding.SAME, 1, 1, 1, 1
        w = g.add_tensor(f"{name}/w", (c_out, kernel, kernel, 8), np.float32,
                         np.ones((c_out, kernel, kernel, 8), np.float32))
        y = g.add_tensor(name, (1, 48, 48, c_out), np.float32)
        return g.add_op("CONV_2D", [x, w, -1], [y], o), y

    assert 33 * 33 * 8 > MAX_DOT_LENGTH >= 32 * 32 * 8
    g = Graph()
    x = g.add_tensor("x", (1, 48, 48, 8), np.float32)
    long1, a = conv(x, 33, 8, "long1")
    relu, a = _unary(g, "RELU", a, "a", (1, 48, 48, 8))
    long2, b = conv(a, 33, 8, "long2")
    short, c = conv(b, 32, 8, "short")
    long3, d = conv(c, 33, 8, "long3")
    g.inputs, g.outputs = [x], [d]
    assert partition(g).rounds == [[long1], [long2], [short], [long3]]
    p = partition(g, long_input_sums_in_tee=True)
    assert p.rounds == [[short], [long3]] and p.steps == [[long1, relu, long2], [], []]
    assert p.long_sums == {long1, long2} and partition(g).long_sums == frozenset()
