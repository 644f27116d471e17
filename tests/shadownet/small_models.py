"""A small CNN built with the graph layer (no TensorFlow) whose rounds cover every kind of offloaded layer
the one-time masks and the integrity checks handle: a 3x3 SAME conv, a strided depthwise conv with a
depth multiplier, a 1x1 conv feeding a residual ADD, a 3x3 VALID conv and a dense layer; and an accelerator
that records what it is sent (``recording``), with what an attacker makes of it (``attacker_view``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from ai_edge_litert import schema_py_generated as fb

import shadownet
from converters.graph import Graph, write_model
from shadownet.accelerator import AcceleratorWrapper
from shadownet.audit_layers import join_halves, split_names

INPUT_SHAPE = (1, 16, 16, 3)


# The default keeps depthwise layers in the TEE (groupmix's ``depthwise="tee"``); tests of the offloaded
# depthwise rounds (their obfuscation, checks, masks and attacks) convert with this scheme.
DEPTHWISE_OFFLOADED = "groupmix:depthwise=offload"


def protect_small_cnn(tmp_path_factory, name: str, seed: int, multiplier: int = 2, **kw) -> str:
    """``small_cnn(multiplier=multiplier)`` converted into a fresh directory ``name`` with the reproducible
    (INSECURE, tests only) secrets of ``seed``; ``kw`` as ``shadownet.convert`` takes them. Returns the
    directory."""
    import warnings

    import shadownet

    out = tmp_path_factory.mktemp(name) / "out"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # seeded conversion warns that it is insecure
        shadownet.convert(small_cnn(multiplier=multiplier), str(out), seed=seed, **kw)
    return str(out)


def conv_options(kind: str, padding: int, stride: int, activation: int, multiplier: int = 1) -> object:
    """LiteRT's options of a CONV_2D or DEPTHWISE_CONV_2D (no dilation)."""
    o = fb.Conv2DOptionsT() if kind == "CONV_2D" else fb.DepthwiseConv2DOptionsT()
    if kind == "DEPTHWISE_CONV_2D":
        o.depthMultiplier = multiplier
    o.padding, o.strideH, o.strideW, o.dilationHFactor, o.dilationWFactor = padding, stride, stride, 1, 1
    o.fusedActivationFunction = activation
    return o


def relu_conv_chain(g: Graph, x: int, count: int, shape: tuple[int, int, int, int], kernel: int, scale: float,
                    rng: np.random.Generator) -> list[int]:
    """``count`` SAME stride-1 ReLU convolutions one after the other from ``x`` (``shape``, NHWC, in and
    out), weights N(0, ``scale``^2): their outputs."""
    c = shape[-1]
    outputs = []
    for i in range(count):
        w = g.add_tensor(f"w{i}", (c, kernel, kernel, c), np.float32,
                         rng.standard_normal((c, kernel, kernel, c)) * scale)
        b = g.add_tensor(f"b{i}", (c,), np.float32, rng.standard_normal(c) * 0.1)
        y = g.add_tensor(f"y{i}", shape, np.float32)
        g.add_op("CONV_2D", [x, w, b], [y],
                 conv_options("CONV_2D", fb.Padding.SAME, 1, fb.ActivationFunctionType.RELU))
        outputs.append(y)
        x = y
    return outputs


def pooled_dense_head(g: Graph, x: int, rng: np.random.Generator, classes: int = 5) -> int:
    """A classifier head on ``x`` [1, h, w, c]: the MEAN over its positions, then a FULLY_CONNECTED of
    ``classes`` outputs without bias (weights drawn from ``rng``); returns the logits tensor."""
    c = g.tensors[x].shape[-1]
    axes = g.add_tensor("axes", (2,), np.int32, np.array([1, 2]))
    mean = g.add_tensor("mean", (1, c), np.float32)
    g.add_op("MEAN", [x, axes], [mean], fb.ReducerOptionsT())
    w = g.add_tensor("fc/w", (classes, c), np.float32, rng.standard_normal((classes, c)) * 0.3)
    out = g.add_tensor("logits", (1, classes), np.float32)
    g.add_op("FULLY_CONNECTED", [mean, w, -1], [out], fb.FullyConnectedOptionsT())
    return out


def small_cnn(seed: int = 0, side: int = 16, multiplier: int = 2, bias_scale: float = 0.1) -> bytes:
    """The model on ``side`` x ``side`` images (16: ``INPUT_SHAPE``); its depthwise layer has depth
    ``multiplier`` (1 or 2; 16 output channels either way)."""
    rng = np.random.default_rng(seed)
    half = side // 2
    g = Graph()
    act = fb.ActivationFunctionType

    def conv(x, c_in, c_out, out_hw, kind="CONV_2D", k=3, padding=fb.Padding.SAME, stride=1,
             activation=act.NONE):
        if kind == "CONV_2D":
            w = rng.standard_normal((c_out, k, k, c_in)) * np.sqrt(2 / (k * k * c_in))
        else:
            w = rng.standard_normal((1, k, k, c_out)) * np.sqrt(2 / (k * k))
        wt = g.add_tensor(f"w{len(g.ops)}", w.shape, np.float32, w)
        b = g.add_tensor(f"b{len(g.ops)}", (c_out,), np.float32, rng.standard_normal(c_out) * bias_scale)
        y = g.add_tensor(f"y{len(g.ops)}", (1, out_hw, out_hw, c_out), np.float32)
        g.add_op(kind, [x, wt, b], [y], conv_options(kind, padding, stride, activation, c_out // c_in))
        return y

    x = g.add_tensor("image", (1, side, side, 3), np.float32)
    a = conv(x, 3, 16 // multiplier, side, activation=act.RELU)
    d = conv(a, 16 // multiplier, 16, half, "DEPTHWISE_CONV_2D", stride=2, activation=act.RELU6)
    p = conv(d, 16, 16, half, k=1)
    s = g.add_tensor("sum", (1, half, half, 16), np.float32)
    add = fb.AddOptionsT()
    add.fusedActivationFunction = act.RELU
    g.add_op("ADD", [d, p], [s], add)
    v = conv(s, 16, 12, half - 2, padding=fb.Padding.VALID, activation=act.RELU)
    g.inputs, g.outputs = [x], [pooled_dense_head(g, v, rng)]
    return write_model(g)


def reference(model: bytes, x: np.ndarray) -> np.ndarray:
    """LiteRT's output on the original model."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=model, num_threads=1)
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
    interpreter.invoke()
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])


def images(count: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.uniform(0, 1, INPUT_SHAPE).astype(np.float32) for _ in range(count)]


class Recorder(AcceleratorWrapper):
    """Keeps a copy of every round input; ``fail_at``: raise in that round (an abandoned inference)."""

    fail_at: int | None = None

    def __init__(self, inner):
        super().__init__(inner)
        self.seen: dict[str, list[np.ndarray]] = {}

    def run_round(self, r):
        for name, view in self.buffers.items():
            if name.startswith(f"round_{r}/in/"):
                self.seen.setdefault(name, []).append(np.array(view))
        if r == self.fail_at:
            raise RuntimeError("accelerator lost")
        self.inner.run_round(r)


def recording(out: str, **kw):
    recorders = []

    def wrap(inner):
        recorders.append(Recorder(inner))
        return recorders[-1]

    return shadownet.load(out, accelerator=wrap, **kw), recorders


def attacker_view(out: str, seen: dict[str, list[np.ndarray]]) -> dict[str, np.ndarray]:
    """The recorded round inputs, stacked, each exactly split one's halves added back (what the attacker
    works on: ``x_hi`` alone sits on a coarse grid, where two masks' values meet by chance)."""
    split = split_names(json.loads((Path(out) / "manifest.json").read_text()))[1]
    return join_halves({name: np.stack(values) for name, values in seen.items()}, split)
