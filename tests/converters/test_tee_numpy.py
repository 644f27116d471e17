"""The ops the TA runs itself instead of LiteRT (SPLIT, binary ops with broadcasting, LEAKY_RELU,
CONCATENATION, PADV2, MAX_POOL_2D with SAME padding and VALID, RESIZE_NEAREST_NEIGHBOR, RESHAPE, MEAN,
SOFTMAX, LOGISTIC, HARD_SWISH, GELU, a layer norm's MEAN over the channels, SQUARED_DIFFERENCE, RSQRT and
NEG) give LiteRT's results; what only LiteRT can run (TANH) still goes through a TEE-side signature."""

import warnings

import numpy as np
from ai_edge_litert import schema_py_generated as fb

import tee_sim
from converters import convert
from converters.fidelity import relative_error
from converters.graph import Graph, write_model
from tests.converters.driver import Driver, litert


def _model() -> bytes:
    rng = np.random.default_rng(3)
    g = Graph()

    def tensor(name, shape, data=None, dtype=np.float32):
        return g.add_tensor(name, shape, dtype, data)

    def conv(x, c_in, c_out, name):
        o = fb.Conv2DOptionsT()
        o.padding, o.strideH, o.strideW, o.dilationHFactor, o.dilationWFactor = fb.Padding.SAME, 1, 1, 1, 1
        w = tensor(f"{name}/w", (c_out, 3, 3, c_in), rng.standard_normal((c_out, 3, 3, c_in)) * 0.3)
        b = tensor(f"{name}/b", (c_out,), rng.standard_normal(c_out) * 0.1)
        y = tensor(name, (1, 8, 8, c_out))
        g.add_op("CONV_2D", [x, w, b], [y], o)
        return y

    def pool(x, shape, padding, size, stride, name):
        o = fb.Pool2DOptionsT()
        o.padding, o.filterHeight, o.filterWidth, o.strideH, o.strideW = padding, size, size, stride, stride
        y = tensor(name, shape)
        g.add_op("MAX_POOL_2D", [x], [y], o)
        return y

    x = tensor("input", (1, 8, 8, 4))
    y1 = conv(x, 4, 8, "conv1")
    halves = [tensor("s0", (1, 8, 8, 4)), tensor("s1", (1, 8, 8, 4))]
    split = fb.SplitOptionsT()
    split.numSplits = 2
    g.add_op("SPLIT", [tensor("axis", (), 3, np.int32), y1], halves, split)
    a = tensor("a", (1, 8, 8, 4))
    g.add_op("ADD", [halves[0], tensor("c", (4,), rng.standard_normal(4))], [a], fb.AddOptionsT())
    b = tensor("b", (1, 8, 8, 4))
    g.add_op("MUL", [halves[1], halves[0]], [b], fb.MulOptionsT())
    leaky = fb.LeakyReluOptionsT()
    leaky.alpha = 0.2
    la = tensor("leaky", (1, 8, 8, 4))
    g.add_op("LEAKY_RELU", [a], [la], leaky)
    cat = tensor("cat", (1, 8, 8, 8))
    concat = fb.ConcatenationOptionsT()
    concat.axis = -1
    g.add_op("CONCATENATION", [la, b], [cat], concat)
    padded = tensor("padded", (1, 10, 9, 8))
    g.add_op("PADV2", [cat, tensor("paddings", (4, 2), [[0, 0], [1, 1], [0, 1], [0, 0]], np.int32),
                       tensor("value", (), 0.5)], [padded], fb.PadV2OptionsT())
    same = pool(padded, (1, 5, 5, 8), fb.Padding.SAME, 3, 2, "same_pool")
    valid = pool(cat, (1, 4, 4, 8), fb.Padding.VALID, 2, 2, "valid_pool")
    resize = fb.ResizeNearestNeighborOptionsT()
    resize.halfPixelCenters = True
    up = tensor("up", (1, 8, 8, 8))
    g.add_op("RESIZE_NEAREST_NEIGHBOR", [valid, tensor("size", (2,), [8, 8], np.int32)], [up], resize)
    y2 = conv(up, 8, 6, "conv2")
    flat = tensor("flat", (1, 200))
    g.add_op("RESHAPE", [same, tensor("shape", (2,), [1, 200], np.int32)], [flat], fb.ReshapeOptionsT())
    logits = tensor("logits", (1, 5))
    g.add_op("FULLY_CONNECTED", [flat, tensor("fc/w", (5, 200), rng.standard_normal((5, 200)) * 0.1), -1],
             [logits], fb.FullyConnectedOptionsT())
    smooth = tensor("gelu", (1, 8, 8, 6))
    g.add_op("GELU", [y2], [smooth], fb.GeluOptionsT())
    swished = tensor("swished", (1, 8, 8, 6))
    g.add_op("HARD_SWISH", [smooth], [swished])
    # a layer norm over the channels, as TensorFlow writes ConvNeXt's
    keep = fb.ReducerOptionsT()
    keep.keepDims = True
    channel = tensor("channel_axis", (1,), [3], np.int32)
    mean = tensor("ln/mean", (1, 8, 8, 1))
    g.add_op("MEAN", [swished, channel], [mean], keep)
    square = tensor("ln/square", (1, 8, 8, 6))
    g.add_op("SQUARED_DIFFERENCE", [swished, mean], [square], fb.SquaredDifferenceOptionsT())
    variance = tensor("ln/variance", (1, 8, 8, 1))
    g.add_op("MEAN", [square, channel], [variance], keep)
    shifted = tensor("ln/shifted", (1, 8, 8, 1))
    g.add_op("ADD", [variance, tensor("ln/epsilon", (), 1e-6)], [shifted], fb.AddOptionsT())
    inverse = tensor("ln/inverse", (1, 8, 8, 1))
    g.add_op("RSQRT", [shifted], [inverse])
    negated = tensor("ln/negated", (1, 8, 8, 1))
    g.add_op("NEG", [mean], [negated])
    centered = tensor("ln/centered", (1, 8, 8, 6))
    g.add_op("ADD", [swished, negated], [centered], fb.AddOptionsT())
    normed = tensor("ln/normed", (1, 8, 8, 6))
    g.add_op("MUL", [centered, inverse], [normed], fb.MulOptionsT())
    pooled = tensor("pooled", (1, 6))
    g.add_op("MEAN", [normed, tensor("axes", (2,), [1, 2], np.int32)], [pooled], fb.ReducerOptionsT())
    squashed = tensor("squashed", (1, 6))
    g.add_op("LOGISTIC", [pooled], [squashed])
    bent = tensor("bent", (1, 6))
    g.add_op("TANH", [squashed], [bent])
    softmax = fb.SoftmaxOptionsT()
    softmax.beta = 0.5
    probabilities = tensor("probabilities", (1, 5))
    g.add_op("SOFTMAX", [logits], [probabilities], softmax)
    g.inputs, g.outputs = [x], [probabilities, squashed, bent]
    return write_model(g)


def _converted_and_compared(model: bytes, tmp_path, shape: tuple[int, ...], inputs: int = 1,
                            seed: int = 0) -> dict:
    """``model`` converted for an in-process device and run on ``inputs`` normal inputs of ``shape``, each
    within 1e-4 of LiteRT running the original; its manifest."""
    with tee_sim.Context("inprocess", home=tmp_path / "device") as device:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            manifest = convert(model, tmp_path / "out", seed=0, device=device)
        rng = np.random.default_rng(seed)
        with Driver(device, tmp_path / "out") as run:
            for _ in range(inputs):
                x = rng.standard_normal(shape).astype(np.float32)
                assert relative_error(run(x), litert(model, x)) <= 1e-4
    return manifest


def test_numpy_ops_match_litert(tmp_path):
    manifest = _converted_and_compared(_model(), tmp_path, (1, 8, 8, 4), inputs=2)
    assert manifest["summary"]["tee_numpy_ops"] == 23
    assert manifest["summary"]["tee_litert_ops"] == 1  # TANH


def _concat_of_restores() -> bytes:
    """Two convolutions of one round concatenated: the restores write straight into the slices."""
    rng = np.random.default_rng(5)
    g = Graph()
    x = g.add_tensor("input", (1, 6, 6, 3), np.float32)
    parts = []
    for j, act in enumerate((fb.ActivationFunctionType.RELU, fb.ActivationFunctionType.NONE)):
        o = fb.Conv2DOptionsT()
        o.padding, o.strideH, o.strideW, o.dilationHFactor, o.dilationWFactor = fb.Padding.SAME, 1, 1, 1, 1
        o.fusedActivationFunction = act
        w = g.add_tensor(f"w{j}", (5, 3, 3, 3), np.float32, rng.standard_normal((5, 3, 3, 3)) * 0.3)
        parts.append(g.add_tensor(f"conv{j}", (1, 6, 6, 5), np.float32))
        g.add_op("CONV_2D", [x, w, -1], [parts[-1]], o)
    cat = g.add_tensor("cat", (1, 6, 6, 10), np.float32)
    concat = fb.ConcatenationOptionsT()
    concat.axis = 3
    g.add_op("CONCATENATION", parts, [cat], concat)
    pool = fb.Pool2DOptionsT()
    pool.padding, pool.filterHeight, pool.filterWidth = fb.Padding.VALID, 2, 2
    pool.strideH, pool.strideW = 2, 2
    pooled = g.add_tensor("pooled", (1, 3, 3, 10), np.float32)
    g.add_op("MAX_POOL_2D", [cat], [pooled], pool)
    g.inputs, g.outputs = [x], [pooled]
    return write_model(g)


def test_restores_write_into_a_concatenation(tmp_path):
    _converted_and_compared(_concat_of_restores(), tmp_path, (1, 6, 6, 3), seed=1)


def _split_into_a_mixed_conv() -> bytes:
    """yolov4-tiny's route: a convolution's channels split, the second half the input of the next
    convolution, whose push mixes its 16 channels (the default scheme's input mixing)."""
    rng = np.random.default_rng(6)
    g = Graph()
    x = g.add_tensor("input", (1, 6, 6, 3), np.float32)
    o = fb.Conv2DOptionsT()
    o.padding, o.strideH, o.strideW, o.dilationHFactor, o.dilationWFactor = fb.Padding.SAME, 1, 1, 1, 1
    o.fusedActivationFunction = fb.ActivationFunctionType.RELU
    y = g.add_tensor("conv1", (1, 6, 6, 32), np.float32)
    g.add_op("CONV_2D", [x, g.add_tensor("w1", (32, 3, 3, 3), np.float32,
                                         rng.standard_normal((32, 3, 3, 3)) * 0.3), -1], [y], o)
    halves = [g.add_tensor(f"half{j}", (1, 6, 6, 16), np.float32) for j in range(2)]
    split = fb.SplitOptionsT()
    split.numSplits = 2
    g.add_op("SPLIT", [g.add_tensor("axis", (), np.int32, 3), y], halves, split)
    z = g.add_tensor("conv2", (1, 6, 6, 8), np.float32)
    g.add_op("CONV_2D", [halves[1], g.add_tensor("w2", (8, 3, 3, 16), np.float32,
                                                 rng.standard_normal((8, 3, 3, 16)) * 0.3), -1], [z], o)
    g.inputs, g.outputs = [x], [z]
    return write_model(g)


def _converted_program(model: bytes, x_shape: tuple, tmp_path, monkeypatch) -> list[dict]:
    """Convert ``model`` with the default scheme, check the protected model against LiteRT on two inputs
    of ``x_shape``, and return the TEE program's instructions (from the plan, before it is sealed)."""
    from converters import pipeline

    plans, build = [], pipeline.build

    def keep(*args, **kwargs):
        plans.append(build(*args, **kwargs))
        return plans[-1]

    monkeypatch.setattr(pipeline, "build", keep)
    with tee_sim.Context("inprocess", home=tmp_path / "device") as device:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            convert(model, tmp_path / "out", seed=0, device=device)
        with Driver(device, tmp_path / "out") as run:
            for seed in range(2):
                x = np.random.default_rng(seed).standard_normal(x_shape).astype(np.float32)
                assert relative_error(run(x), litert(model, x)) <= 1e-4
    return [i for step in plans[0].program["steps"] for i in step]


def test_a_split_is_read_in_place_by_a_mixing_push(tmp_path, monkeypatch):
    instrs = _converted_program(_split_into_a_mixed_conv(), (1, 6, 6, 3), tmp_path, monkeypatch)
    assert not any(i["op"] == "split" for i in instrs)  # no copy: the push reads the slice
    (push,) = [i for i in instrs if i["op"] == "push" and i.get("input_index")]
    assert "@3:16:32" in push["src"]


def _residual_blocks() -> bytes:
    """A residual block (conv, conv, ADD of the block's input, RELU) and, after it, two convolutions of
    one round added (a shortcut the TEE does not have before that round's restores)."""
    rng = np.random.default_rng(8)
    g = Graph()

    def conv(x, name, act, c_in=16, c_out=16):
        o = fb.Conv2DOptionsT()
        o.padding, o.strideH, o.strideW, o.dilationHFactor, o.dilationWFactor = fb.Padding.SAME, 1, 1, 1, 1
        o.fusedActivationFunction = act
        w = g.add_tensor(f"{name}/w", (c_out, 3, 3, c_in), np.float32,
                         rng.standard_normal((c_out, 3, 3, c_in)) * 0.2)
        b = g.add_tensor(f"{name}/b", (c_out,), np.float32, rng.standard_normal(c_out) * 0.1)
        y = g.add_tensor(name, (1, 6, 6, c_out), np.float32)
        g.add_op("CONV_2D", [x, w, b], [y], o)
        return y

    def add(a, b, name):
        y = g.add_tensor(name, (1, 6, 6, 16), np.float32)
        g.add_op("ADD", [a, b], [y], fb.AddOptionsT())
        return y

    relu, none = fb.ActivationFunctionType.RELU, fb.ActivationFunctionType.NONE
    x = g.add_tensor("input", (1, 6, 6, 3), np.float32)
    stem = conv(x, "stem", relu, c_in=3)
    total = add(conv(conv(stem, "c1", relu), "c2", none), stem, "sum")  # the shortcut: stem
    block = g.add_tensor("block", (1, 6, 6, 16), np.float32)
    g.add_op("RELU", [total], [block])
    pair = add(conv(block, "a", none), conv(block, "b", none), "pair")  # both restored in one step
    g.inputs, g.outputs = [x], [pair]
    return write_model(g)


def test_a_residual_add_and_its_activation_are_done_by_the_restore(tmp_path, monkeypatch):
    instrs = _converted_program(_residual_blocks(), (1, 6, 6, 3), tmp_path, monkeypatch)
    residual = [i for i in instrs if i.get("addend")]
    assert len(residual) == 1 and residual[0]["activation"] == "RELU"
    assert not any(i["op"] == "activation" for i in instrs)
    assert [i["kind"] for i in instrs if i["op"] == "binary"] == ["ADD"]  # the pair's, in numpy


def _depthwise_model() -> bytes:
    """Depthwise layers as the default scheme keeps them in the TEE: stride 1 SAME with ReLU6, stride 2
    VALID after a PAD (Keras's), no activation, and two the TA's kernel does not take (depth multiplier 2,
    dilation 2), which LiteRT runs; a 1x1 conv between them on the accelerator."""
    rng = np.random.default_rng(7)
    g = Graph()
    act = fb.ActivationFunctionType

    def depthwise(x, shape, c_out, padding, stride, activation, multiplier=1, dilation=1):
        o = fb.DepthwiseConv2DOptionsT()
        o.padding, o.strideH, o.strideW, o.depthMultiplier = padding, stride, stride, multiplier
        o.dilationHFactor = o.dilationWFactor = dilation
        o.fusedActivationFunction = activation
        w = g.add_tensor(f"w{len(g.ops)}", (1, 3, 3, c_out), np.float32,
                         rng.standard_normal((1, 3, 3, c_out)))
        b = g.add_tensor(f"b{len(g.ops)}", (c_out,), np.float32, rng.standard_normal(c_out) * 0.1)
        y = g.add_tensor(f"y{len(g.ops)}", shape, np.float32)
        g.add_op("DEPTHWISE_CONV_2D", [x, w, b], [y], o)
        return y

    x = g.add_tensor("input", (1, 12, 12, 16), np.float32)
    a = depthwise(x, (1, 12, 12, 16), 16, fb.Padding.SAME, 1, act.RELU6)
    padded = g.add_tensor("padded", (1, 13, 13, 16), np.float32)
    g.add_op("PAD", [a, g.add_tensor("paddings", (4, 2), np.int32, [[0, 0], [0, 1], [0, 1], [0, 0]])],
             [padded], fb.PadOptionsT())
    b = depthwise(padded, (1, 6, 6, 16), 16, fb.Padding.VALID, 2, act.NONE)
    o = fb.Conv2DOptionsT()
    o.padding, o.strideH, o.strideW, o.dilationHFactor, o.dilationWFactor = fb.Padding.SAME, 1, 1, 1, 1
    c = g.add_tensor("c", (1, 6, 6, 16), np.float32)
    cw = g.add_tensor("cw", (16, 1, 1, 16), np.float32, rng.standard_normal((16, 1, 1, 16)) * 0.3)
    g.add_op("CONV_2D", [b, cw, g.add_tensor("cb", (16,), np.float32, np.zeros(16))], [c], o)
    d = depthwise(c, (1, 6, 6, 32), 32, fb.Padding.SAME, 1, act.RELU, multiplier=2)
    e = depthwise(d, (1, 6, 6, 32), 32, fb.Padding.SAME, 1, act.NONE, dilation=2)
    g.inputs, g.outputs = [x], [e]
    return write_model(g)


def test_depthwise_layers_in_the_tee_run_in_its_kernel(tmp_path):
    """The default keeps depthwise layers in the TEE: those of multiplier 1 without dilation run in the
    TA's kernel on its arena (no LiteRT arena of their own), the ReLU6 after one fused into it, the others
    through LiteRT; LiteRT's results."""
    from converters.calibration import activation_stats, calibration_inputs
    from converters.normalize import normalize
    from converters.partition import partition
    from converters.plan import build
    from converters.schemes import get_scheme
    from converters.tflite_reader import read_model

    model = _depthwise_model()
    graph, scheme = normalize(read_model(model)), get_scheme(None)
    part = partition(graph, scheme.in_tee)
    needed = {graph.ops[i].inputs[0] for r in part.rounds for i in r} | set(graph.inputs)
    stats = activation_stats(graph, needed, calibration_inputs(graph, None))
    steps = build(graph, part, scheme, np.random.default_rng(0), stats, [1]).program["steps"]
    depthwise = [instr for step in steps for instr in step if instr["op"] == "depthwise"]
    assert [d.get("activation") for d in depthwise] == ["RELU6", None]
    assert not [instr for step in steps for instr in step if instr["op"] == "activation"
                and instr["activation"] == "RELU6"]  # fused, not a pass of its own
    with tee_sim.Context("inprocess", home=tmp_path / "device") as device:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            manifest = convert(model, tmp_path / "out", seed=0, device=device)
        summary = manifest["summary"]
        assert summary["offloaded_ops"] == 1 and summary["tee_linear_kinds"] == ["DEPTHWISE_CONV_2D"]
        # Two depthwise layers, the PAD, and the RELU6 and RELU the converter splits off the fused ones
        assert summary["tee_numpy_ops"] == 5
        assert summary["tee_litert_ops"] == 2  # multiplier 2, dilation 2
        rng = np.random.default_rng(0)
        with Driver(device, tmp_path / "out") as run:
            for _ in range(3):
                x = rng.standard_normal((1, 12, 12, 16)).astype(np.float32)
                got, want = run(x), litert(model, x)
                assert relative_error(got, want) <= 1e-5


def _dense_kernels_beside_views() -> bytes:
    """Ops whose TA kernels need whole dense arrays next to a concatenation and a split, whose slices the
    planner makes other ops write and read in place: a MEAN over the channels and a SOFTMAX concatenated,
    a MEAN over the positions of a split's half."""
    rng = np.random.default_rng(9)
    g = Graph()

    def conv(x, c_in, c_out, name):
        o = fb.Conv2DOptionsT()
        o.padding, o.strideH, o.strideW, o.dilationHFactor, o.dilationWFactor = fb.Padding.SAME, 1, 1, 1, 1
        weights = rng.standard_normal((c_out, 3, 3, c_in)) * 0.3
        w = g.add_tensor(f"{name}/w", weights.shape, np.float32, weights)
        y = g.add_tensor(name, (1, 8, 8, c_out), np.float32)
        g.add_op("CONV_2D", [x, w, -1], [y], o)
        return y

    x = g.add_tensor("input", (1, 8, 8, 4), np.float32)
    h = conv(x, 4, 16, "h")
    keep = fb.ReducerOptionsT()
    keep.keepDims = True
    mean = g.add_tensor("mean", (1, 8, 8, 1), np.float32)
    g.add_op("MEAN", [h, g.add_tensor("channel", (1,), np.int32, np.array([3]))], [mean], keep)
    negated = g.add_tensor("negated", (1, 8, 8, 16), np.float32)
    g.add_op("NEG", [h], [negated])
    soft = g.add_tensor("soft", (1, 8, 8, 16), np.float32)
    softmax = fb.SoftmaxOptionsT()
    softmax.beta = 1.0
    g.add_op("SOFTMAX", [h], [soft], softmax)
    cat = g.add_tensor("cat", (1, 8, 8, 33), np.float32)
    concat = fb.ConcatenationOptionsT()
    concat.axis = 3
    g.add_op("CONCATENATION", [mean, negated, soft], [cat], concat)
    y = conv(cat, 33, 8, "y")
    halves = [g.add_tensor(f"half{k}", (1, 8, 8, 4), np.float32) for k in range(2)]
    split = fb.SplitOptionsT()
    split.numSplits = 2
    g.add_op("SPLIT", [g.add_tensor("axis", (), np.int32, np.array(3)), y], halves, split)
    pooled = g.add_tensor("pooled", (1, 4), np.float32)
    g.add_op("MEAN", [halves[0], g.add_tensor("axes", (2,), np.int32, np.array([1, 2]))], [pooled],
             fb.ReducerOptionsT())
    summed = g.add_tensor("summed", (1, 8, 8, 4), np.float32)
    g.add_op("ADD", [halves[1], halves[1]], [summed], fb.AddOptionsT())
    g.inputs, g.outputs = [x], [pooled, summed]
    return write_model(g)


def test_kernels_that_need_dense_arrays_are_not_given_a_concatenation_s_or_a_split_s_slice(tmp_path):
    """A review found a MEAN over the channels (and, before it, a SOFTMAX) feeding a concatenation converted
    but refused at load: their kernels need dense arrays, and the planner had made their outputs slices of
    the concatenation's slot. They keep slots of their own; the MEAN over the channels also writes a slice."""
    manifest = _converted_and_compared(_dense_kernels_beside_views(), tmp_path, (1, 8, 8, 4))
    assert manifest["summary"]["tee_litert_ops"] == 0
