"""The exact split of one-time-masked inputs (``converters.exact_split``): the split weights, the grid, and
end to end that the accelerator computes the mask's half exactly and the result is as precise as an
unmasked one's."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

import shadownet
from converters import exact_split, linear
from converters.tflite_reader import read_signatures
from shadownet.accelerator import AcceleratorWrapper
from tests.converters.litert import run
from tests.shadownet.small_models import images, protect_small_cnn, reference, small_cnn


def _converted(model: bytes, out, **kw) -> tuple[dict, list[str]]:
    """``shadownet.convert`` with every warning it gives kept (a seeded conversion's among them): the
    manifest and the warnings' messages."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        manifest = shadownet.convert(model, str(out), **kw)
    return manifest, [str(w.message) for w in caught]


def test_split_weights_hold_w_whole_and_its_rounding_on_a_coarse_grid():
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((8, 3, 3, 5)) * np.logspace(-3, 1, 8)[:, None, None, None]).astype(np.float32)
    split = exact_split.Split(grid=2.0 ** -6, weight_bits=10)
    w2 = exact_split.split_weights("CONV_2D", w, split)
    assert w2.shape == (16, 3, 3, 10) and w2.dtype == np.float32
    hi, zero, lo, whole = w2[:8, ..., :5], w2[:8, ..., 5:], w2[8:, ..., :5], w2[8:, ..., 5:]
    assert np.array_equal(whole, w) and not np.any(zero)
    assert np.array_equal(hi.astype(np.float64) + lo, w.astype(np.float64))  # the split loses nothing
    for o in range(8):  # each channel's hi: integers times a power of two, at most 2^10 of them
        grid = 2.0 ** (math.ceil(math.log2(np.abs(w[o]).max())) - 10)
        units = hi[o].astype(np.float64) / grid
        assert np.array_equal(units, np.rint(units)) and np.abs(units).max() <= 2 ** 10
        assert np.abs(lo[o]).max() <= grid / 2
    dense = exact_split.split_weights("FULLY_CONNECTED", w.reshape(8, -1), split)
    assert dense.shape == (16, 90)
    with pytest.raises(ValueError, match="cannot be split"):
        exact_split.split_weights("DEPTHWISE_CONV_2D", w, split)


def test_plan_leaves_24_bits_to_a_dot_product():
    split = exact_split.plan(10.0, np.zeros(3), 1.0, 27)  # a 3x3 conv on an RGB image
    assert split is not None and split.weight_bits == 10
    x_bits = exact_split.FLOAT32_BITS - math.ceil(math.log2(27)) - split.weight_bits
    assert x_bits + split.weight_bits + math.ceil(math.log2(27)) == 24
    assert math.log2(split.grid) == round(math.log2(split.grid))  # a power of two
    # The grid covers the mask's tails and the input: 2^x_bits steps reach past them.
    assert split.grid * 2 ** x_bits >= exact_split.TAIL * 10 + exact_split.INPUT_SPREADS
    assert exact_split.plan(0.0, np.zeros(3), 1.0, 27) is None  # no mask, nothing to split
    assert exact_split.plan(10.0, np.zeros(3), 1.0, 1 << 15) is None  # too few bits left


class Recorder(AcceleratorWrapper):
    """Keeps round 1's inputs and outputs as the accelerator left them."""

    def __init__(self, inner):
        super().__init__(inner)
        self.seen: dict[str, np.ndarray] = {}

    def run_round(self, r):
        self.inner.run_round(r)
        if r == 1:
            self.seen = {n: np.array(v) for n, v in self.buffers.items() if n.startswith("round_1/")}


SPLIT = "groupmix:exact_split=first"  # round 1 split whatever it costs (the default, auto, weighs it)


@pytest.fixture(scope="module")
def split_cnn(tmp_path_factory) -> str:
    return protect_small_cnn(tmp_path_factory, "split", seed=5, scheme=SPLIT)


def test_the_accelerator_computes_the_masks_half_exactly(split_cnn):
    out = Path(split_cnn)
    manifest = json.loads((out / "manifest.json").read_text())
    first = manifest["rounds"][0]
    assert [t.get("split") for t in first["inputs"] + first["outputs"]] == [True, True]
    graph = next(g for g in read_signatures((out / "untrusted.tflite").read_bytes())
                 if g.signature.key == "round_1")
    op = graph.ops[0]
    w2 = graph.tensors[op.inputs[1]].data
    recorders = []

    def wrap(inner):
        recorders.append(Recorder(inner))
        return recorders[-1]

    model_bytes = small_cnn()
    with shadownet.load(out, accelerator=wrap) as model:
        for x in images(3, seed=4):
            got = model(x)
            seen = recorders[0].seen
            xs, ys = seen["round_1/in/x0"], seen["round_1/out/y0"]
            c, m = xs.shape[-1] // 2, ys.shape[-1] // 2
            assert (c, m) == (3, w2.shape[0] // 2)
            # x_lo is within half a grid step; x_hi is on the grid (its values far coarser than x_lo's).
            x_hi, x_lo = xs[..., :c].astype(np.float64), xs[..., c:].astype(np.float64)
            grid = 2.0 ** np.ceil(np.log2(2 * np.abs(x_lo).max()))  # |x_lo| <= g / 2, and reaches near it
            assert np.array_equal(x_hi / grid, np.rint(x_hi / grid))
            assert np.abs(x_hi).max() > 100 * np.abs(x_lo).max()  # the mask's magnitude is all in x_hi
            exact = linear.apply(op.kind, xs.astype(np.float64), w2, op.options, ys.shape)
            assert np.array_equal(ys[..., :m], exact[..., :m])  # float32 LiteRT, not one bit off
            assert np.abs(ys[..., m:] - exact[..., m:]).max() <= 1e-6 * np.abs(exact[..., :m]).max()
            want = reference(model_bytes, x)
            assert np.abs(got - want).max() <= 2e-6 * np.abs(want).max()


def test_a_split_layer_is_as_precise_as_an_unmasked_one(tmp_path_factory):
    """Against the plain one-time mask, on the model's first layer: the split removes the mask's cost. The
    masks are the TEE's own draws, not the seed's: over 16 images the plain mask's worst error measured
    3.5-5x the split's (over 4, 1.8-5.4x: one run of the suite failed)."""
    errors = {}
    x = images(16, seed=6)
    want = [reference(small_cnn(), xi) for xi in x]
    for name, scheme in (("split", SPLIT), ("plain", "groupmix:exact_split=none"),
                         ("unmasked", "groupmix:mask_scale=0")):
        out = protect_small_cnn(tmp_path_factory, name, seed=5, scheme=scheme)
        with shadownet.load(out) as model:
            errors[name] = max(float(np.abs(model(xi) - w).max() / np.abs(w).max())
                               for xi, w in zip(x, want, strict=True))
    assert errors["split"] <= 2 * errors["unmasked"] + 1e-7, errors
    assert errors["plain"] >= 2 * errors["split"], errors


def test_policy_all_splits_every_masked_conv_and_dense_input(tmp_path_factory):
    """exact_split=all with one-time masks on every round: each round whose readers are conv or dense
    layers is split (the depthwise round keeps the plain mask), and the result stays at the target."""
    out = protect_small_cnn(tmp_path_factory, "split_all", seed=5, scheme="groupmix:exact_split=all",
                            mask_rounds="all")
    manifest = json.loads((Path(out) / "manifest.json").read_text())
    graphs = {g.signature.key: g for g in read_signatures((Path(out) / "untrusted.tflite").read_bytes())}
    split = {r["signature"]: bool(r["inputs"][0].get("split")) for r in manifest["rounds"]}
    for key, graph in graphs.items():
        kinds = {op.kind for op in graph.ops}
        assert split[key] == ("DEPTHWISE_CONV_2D" not in kinds), (key, kinds)
    assert sum(split.values()) >= 3
    first = json.loads((Path(protect_small_cnn(tmp_path_factory, "split_first", seed=5, scheme=SPLIT,
                                               mask_rounds="all")) / "manifest.json").read_text())
    assert [bool(r["inputs"][0].get("split")) for r in first["rounds"]] == \
        [True] + [False] * (len(first["rounds"]) - 1)  # round 1 only
    with shadownet.load(out) as model:
        for x in images(3, seed=8):
            want = reference(small_cnn(), x)
            assert np.abs(model(x) - want).max() <= 1e-5 * np.abs(want).max()


def test_auto_splits_where_the_mask_costs_precision_or_the_split_is_cheap(tmp_path_factory, monkeypatch):
    """exact_split=auto, the default: round 1 is split where its mask is shaped (the default's: always),
    where calibration measured that a white mask's float32 rounding costs the outputs more than
    NEEDED_ABOVE, or where the split costs under CHEAP_BELOW of the model's multiply-adds; with a white
    mask the small CNN (its first layer a third of its work) is neither."""
    def round_1_split(name: str, scheme: str = "groupmix:shaped_masks=false") -> bool:
        out = protect_small_cnn(tmp_path_factory, name, seed=5, scheme=scheme)
        manifest = json.loads((Path(out) / "manifest.json").read_text())
        return bool(manifest["rounds"][0]["inputs"][0].get("split"))

    assert round_1_split("shaped", "groupmix")
    assert not round_1_split("auto")
    monkeypatch.setattr(exact_split, "NEEDED_ABOVE", 0.0)
    assert round_1_split("auto_needed")
    monkeypatch.setattr(exact_split, "NEEDED_ABOVE", 1.0)
    monkeypatch.setattr(exact_split, "CHEAP_BELOW", 10.0)  # any split's 3x more of its layer is cheap
    assert round_1_split("auto_cheap")


def test_the_masks_cost_is_measured_from_its_rounding(monkeypatch):
    """calibration.split_needed runs the original on fl(x + r) - r: a white mask of 10x the input's spread
    moves the outputs; with no mask at all (no scale, not centred) nothing is rounded and the cost is zero.
    A shaped mask is always split (its coherent sums are not what this measures)."""
    from converters.calibration import activation_stats, calibration_inputs, split_needed
    from converters.normalize import normalize
    from converters.schemes import get_scheme
    from converters.tflite_reader import read_model

    graph = normalize(read_model(small_cnn()))
    samples = calibration_inputs(graph, None)
    stats = activation_stats(graph, set(graph.inputs), samples)
    monkeypatch.setattr(exact_split, "NEEDED_ABOVE", 1e-12)
    (t,) = graph.inputs
    white = get_scheme("groupmix:shaped_masks=false")
    assert split_needed(graph, samples, stats, white) == {t: True}
    none = get_scheme("groupmix:mask_scale=0,center_masks=false,shaped_masks=false")
    assert split_needed(graph, samples, stats, none) == {t: False}
    monkeypatch.setattr(exact_split, "NEEDED_ABOVE", 1e-3)  # far above what 10x costs this small model
    assert split_needed(graph, samples, stats, white) == {t: False}
    assert split_needed(graph, samples, stats, get_scheme("groupmix")) == {t: True}


def _channel_padded_conv() -> bytes:
    """A PAD of rows, columns and channels (3 -> 5) before a VALID 3x3 conv, then a second conv."""
    from ai_edge_litert import schema_py_generated as fb

    from converters.graph import Graph, write_model

    rng = np.random.default_rng(0)
    g = Graph()
    x = g.add_tensor("x", (1, 12, 12, 3), np.float32)
    pads = g.add_tensor("pads", (4, 2), np.int32, np.array([[0, 0], [1, 2], [2, 1], [0, 2]]))
    xp = g.add_tensor("xp", (1, 15, 15, 5), np.float32)
    g.add_op("PAD", [x, pads], [xp], fb.PadOptionsT())
    act = fb.ActivationFunctionType
    y = _random_conv(g, rng, xp, "y", (1, 13, 13, 8), 0.3, fb.Padding.VALID, 1, act.RELU)
    z = _random_conv(g, rng, y, "z", (1, 6, 6, 6), 0.2, fb.Padding.VALID, 2, act.NONE)
    g.inputs, g.outputs = [x], [z]
    return write_model(g)


def _random_conv(g, rng: np.random.Generator, x: int, name: str, out_shape: tuple[int, ...], scale: float,
                 padding: int, stride: int, activation: int) -> int:
    """A 3x3 CONV_2D from ``x`` into a new tensor ``name`` of ``out_shape``: weights N(0, ``scale``^2),
    bias N(0, 0.01), drawn in that order; its output."""
    from tests.shadownet.small_models import conv_options

    m, c = out_shape[-1], g.tensors[x].shape[-1]
    w = g.add_tensor(f"{name}/w", (m, 3, 3, c), np.float32, rng.standard_normal((m, 3, 3, c)) * scale)
    b = g.add_tensor(f"{name}/b", (m,), np.float32, rng.standard_normal(m) * 0.1)
    y = g.add_tensor(name, out_shape, np.float32)
    g.add_op("CONV_2D", [x, w, b], [y], conv_options("CONV_2D", padding, stride, activation))
    return y


@pytest.mark.parametrize("scheme", [None, "groupmix:exact_split=all"])
def test_a_pad_of_channels_before_a_split_input_runs_in_the_tee(tmp_path, scheme):
    """A push pads rows and columns for the PAD it replaces, but not the channels of an exact split's
    doubled input: that PAD runs in the TEE (the push padded the doubled channels, and the TA refused the
    program of a valid model under the default scheme: a review)."""
    import warnings

    model = _channel_padded_conv()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # seeded
        shadownet.convert(model, str(tmp_path / "out"), seed=3, mask_rounds="all",
                          **({"scheme": scheme} if scheme else {}))
    rng = np.random.default_rng(4)
    with shadownet.load(tmp_path / "out", verify=True) as protected:
        assert protected.stats()["verify"]["popped"] >= 1  # round 1 split
        for _ in range(4):
            x = rng.uniform(0, 1, (1, 12, 12, 3)).astype(np.float32)
            want = reference(model, x)
            assert np.max(np.abs(protected(x) - want)) <= 1e-4 * np.max(np.abs(want))


def _channel_padded_features() -> bytes:
    """A conv, then a PAD of rows, columns and channels (8 -> 12) of its ReLU'd features, then a 3x3 conv:
    the padded tensor is pushed by the first conv's restore."""
    from ai_edge_litert import schema_py_generated as fb

    from converters.graph import Graph, write_model

    rng = np.random.default_rng(1)
    g = Graph()
    x = g.add_tensor("x", (1, 8, 8, 3), np.float32)
    y = _random_conv(g, rng, x, "y", (1, 8, 8, 8), 0.3, fb.Padding.SAME, 1, fb.ActivationFunctionType.RELU)
    pads = g.add_tensor("pads", (4, 2), np.int32, np.array([[0, 0], [1, 1], [1, 1], [0, 4]]))
    yp = g.add_tensor("yp", (1, 10, 10, 12), np.float32)
    g.add_op("PAD", [y, pads], [yp], fb.PadOptionsT())
    z = _random_conv(g, rng, yp, "z", (1, 8, 8, 4), 0.2, fb.Padding.VALID, 1, fb.ActivationFunctionType.NONE)
    g.inputs, g.outputs = [x], [z]
    return write_model(g)


@pytest.mark.parametrize("model,scheme", [("input", "groupmix:exact_split=none"), ("features", None),
                                          ("features", "shadownet")])
def test_a_pad_of_channels_runs_in_the_tee_before_any_push(tmp_path, model, scheme):
    """Folded into the push that replaced it, a PAD of channels met groupmix's input mixing, which is of
    the padded channels: the TA refused the program of a valid model at load, unsplit round 1 or a deeper
    round's fused restore and push (a review). It runs in the TEE."""
    import warnings

    original = {"input": _channel_padded_conv, "features": _channel_padded_features}[model]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # seeded
        shadownet.convert(original, str(tmp_path / "out"), seed=3, **({"scheme": scheme} if scheme else {}))
    rng = np.random.default_rng(5)
    shape = (1, 12, 12, 3) if model == "input" else (1, 8, 8, 3)
    for verify in (False, True):
        with shadownet.load(tmp_path / "out", verify=verify) as protected:
            for _ in range(3):
                x = rng.uniform(0, 1, shape).astype(np.float32)
                want = reference(original, x)
                tolerance = 1e-3 if scheme == "shadownet" else 1e-4
                assert np.max(np.abs(protected(x) - want)) <= tolerance * np.max(np.abs(want))


def test_a_padded_tensor_split_for_one_reader_and_not_another_converts(tmp_path, monkeypatch):
    """One PAD of channels, read by an offloaded depthwise layer (pushed first, cheap: split by policy but
    not splittable) and by a large conv (not split): its PAD runs where each push needs it (a review: a
    push that gave the PAD to the TEE and a later one that took it back left the tensor uncomputed)."""
    import warnings

    from ai_edge_litert import schema_py_generated as fb

    from converters.graph import Graph, write_model
    from tests.shadownet.small_models import conv_options

    monkeypatch.setattr(exact_split, "NEEDED_ABOVE", 1e9)  # calibration: round 1 needs no split
    rng = np.random.default_rng(1)
    g = Graph()
    act = fb.ActivationFunctionType
    x = g.add_tensor("x", (1, 14, 14, 3), np.float32)
    pads = g.add_tensor("pads", (4, 2), np.int32, np.array([[0, 0], [1, 1], [1, 1], [0, 2]]))
    xp = g.add_tensor("xp", (1, 16, 16, 5), np.float32)
    g.add_op("PAD", [x, pads], [xp], fb.PadOptionsT())
    wd = g.add_tensor("wd", (1, 3, 3, 5), np.float32, rng.standard_normal((1, 3, 3, 5)) * 0.3)
    a = g.add_tensor("a", (1, 14, 14, 5), np.float32)
    g.add_op("DEPTHWISE_CONV_2D", [xp, wd, g.add_tensor("bd", (5,), np.float32, np.zeros(5))], [a],
             conv_options("DEPTHWISE_CONV_2D", fb.Padding.VALID, 1, act.NONE, 1))
    w1 = g.add_tensor("w1", (64, 3, 3, 5), np.float32, rng.standard_normal((64, 3, 3, 5)) * 0.2)
    b1 = g.add_tensor("b1", (64,), np.float32, np.zeros(64))
    y1 = g.add_tensor("y1", (1, 14, 14, 64), np.float32)
    g.add_op("CONV_2D", [xp, w1, b1], [y1], conv_options("CONV_2D", fb.Padding.VALID, 1, act.RELU))
    w2 = g.add_tensor("w2", (64, 3, 3, 64), np.float32, rng.standard_normal((64, 3, 3, 64)) * 0.05)
    y2 = g.add_tensor("y2", (1, 14, 14, 64), np.float32)
    g.add_op("CONV_2D", [y1, w2, g.add_tensor("b2", (64,), np.float32, np.zeros(64))], [y2],
             conv_options("CONV_2D", fb.Padding.SAME, 1, act.NONE))
    g.inputs, g.outputs = [x], [a, y2]
    model = write_model(g)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # seeded
        shadownet.convert(model, str(tmp_path / "out"), seed=2,
                          scheme="groupmix:shaped_masks=false,depthwise=offload")
    from ai_edge_litert.interpreter import Interpreter

    litert = Interpreter(model_content=model)
    litert.allocate_tensors()
    x0 = rng.uniform(0, 1, (1, 14, 14, 3)).astype(np.float32)
    litert.set_tensor(litert.get_input_details()[0]["index"], x0)
    litert.invoke()
    with shadownet.load(tmp_path / "out") as protected:
        got = protected(x0)
    for detail in litert.get_output_details():
        want = litert.get_tensor(detail["index"])
        assert np.max(np.abs(got[detail["name"]] - want)) <= 1e-4 * np.max(np.abs(want))


def _flattened_image(head: bool, first: str = "long", seed: int = 0, window: bool = False) -> bytes:
    """A 96x96x3 image flattened (27,648 values) into a dense layer ``first`` of 16 outputs - or, with
    ``first="short"``, a 1x1 conv to 2 channels and then the long dense layer - then, with ``head``,
    RELU and a dense layer of 4; weights drawn with ``seed``. With ``window``, the long layer is the same
    sums as a conv over the whole image: a window of 9,216 taps, more than a chunk of an exact split may
    sum (``converters.normalize.chunked``)."""
    from ai_edge_litert import schema_py_generated as fb

    from converters.graph import Graph, write_model

    rng = np.random.default_rng(seed)
    g = Graph()
    x = image = g.add_tensor("image", (1, 96, 96, 3), np.float32)
    if first == "short":
        o = fb.Conv2DOptionsT()
        o.padding, o.strideH, o.strideW, o.dilationHFactor, o.dilationWFactor = fb.Padding.VALID, 1, 1, 1, 1
        o.fusedActivationFunction = fb.ActivationFunctionType.RELU
        c = g.add_tensor("conv", (1, 96, 96, 2), np.float32)
        w = g.add_tensor("conv/w", (2, 1, 1, 3), np.float32, rng.standard_normal((2, 1, 1, 3)))
        g.add_op("CONV_2D", [x, w, g.add_tensor("conv/b", (2,), np.float32, np.zeros(2))], [c], o)
        x = c
    shape = g.tensors[x].shape
    n = int(np.prod(shape))
    # Weights of one sign on a [0, 1] image: partial sums grow with the result, the case that cancels most.
    weights = rng.uniform(0, 2 / n, (16, n))
    name = "hidden" if head else "logits"
    if window:
        o = fb.Conv2DOptionsT()
        o.padding, o.strideH, o.strideW, o.dilationHFactor, o.dilationWFactor = fb.Padding.VALID, 1, 1, 1, 1
        w = g.add_tensor("w", (16, *shape[1:]), np.float32, weights.reshape(16, *shape[1:]))
        y = g.add_tensor(name, (1, 1, 1, 16), np.float32)
        g.add_op("CONV_2D", [x, w, -1], [y], o)
    else:
        flat = g.add_tensor("flat", (1, n), np.float32)
        g.add_op("RESHAPE", [x, g.add_tensor("shape", (2,), np.int32, [1, n])], [flat], fb.ReshapeOptionsT())
        w = g.add_tensor("w", (16, n), np.float32, weights)
        y = g.add_tensor(name, (1, 16), np.float32)
        g.add_op("FULLY_CONNECTED", [flat, w, -1], [y], fb.FullyConnectedOptionsT())
    if head:
        h = g.add_tensor("relu", g.tensors[y].shape, np.float32)
        g.add_op("RELU", [y], [h])
        w2 = g.add_tensor("w2", (4, 16), np.float32, rng.standard_normal((4, 16)))
        y = g.add_tensor("logits", (1, 4), np.float32)
        g.add_op("FULLY_CONNECTED", [h, w2, -1], [y], fb.FullyConnectedOptionsT())
    g.inputs, g.outputs = [image], [y]
    return write_model(g)


def _worst_error(model: bytes, protected, count: int) -> float:
    """The largest relative error (max |diff| / max |output|) of ``protected`` against LiteRT on the original
    ``model`` over ``count`` random [0, 1] 96x96x3 images."""
    rng = np.random.default_rng(3)
    worst = 0.0
    for _ in range(count):
        x = rng.uniform(0, 1, (1, 96, 96, 3)).astype(np.float32)
        want = run(model, [x])[0]
        worst = max(worst, float(np.max(np.abs(protected(x) - want)) / np.max(np.abs(want))))
    return worst


def test_a_layer_on_the_input_too_long_to_split_runs_in_the_tee(tmp_path):
    """A conv over a whole 96x96x3 image (27,648 terms per output, a window of 9,216 taps: no chunk of it
    sums few enough) cannot take its one-time mask as an exact split: offloaded, the same sums as a dense
    layer crossed at the mask's magnitude, its outputs 1.3e-4 - 8.9e-4 off and its honest checks failing on
    some models (a helper's probe). It runs in the TEE, said at conversion, and the layer after it is round
    1; the results are LiteRT's to float32's rounding (2.5e-7 measured; offloaded with the mask, 4.7e-5 on
    this model), checked."""

    from converters.exact_split import MAX_DOT_LENGTH

    assert 96 * 96 > MAX_DOT_LENGTH
    model = _flattened_image(head=True, window=True)
    manifest, messages = _converted(model, tmp_path / "out", seed=1)
    said = [m for m in messages if "run in the TEE, not offloaded" in m]
    assert len(said) == 1 and "'hidden'" in said[0], messages
    assert manifest["summary"]["offloaded_ops"] == 1 and manifest["summary"]["tee_linear_ops"] == 1
    with shadownet.load(tmp_path / "out", verify=True) as protected:
        assert _worst_error(model, protected, 4) <= 1e-5
        assert protected.stats()["verify"]["checked"] == 4


def test_a_dense_layer_on_the_input_too_long_to_split_is_offloaded_in_chunks(tmp_path):
    """The 96x96x3 image flattened into a dense layer (27,648 terms per output) runs as four chunks of
    6,912 terms (``converters.normalize.chunked``), each taking its part of the image's one-time mask as an
    exact split: offloaded, not said to be kept in the TEE, and its results LiteRT's to float32's rounding,
    checked. (Before, this layer ran in the TEE, its weights in secure memory; one of 12,289 - 16,384 terms
    was split unchunked, at the two bits fewer a long sum leaves: up to 1.1e-4 off on such a model.)"""


    model = _flattened_image(head=True)
    manifest, messages = _converted(model, tmp_path / "out", seed=1)
    assert not [m for m in messages if "run in the TEE" in m], messages
    summary = manifest["summary"]
    assert summary["long_sums"] == [] and summary["tee_linear_ops"] == 0 and summary["offloaded_ops"] == 5
    assert [i.get("split") for i in manifest["rounds"][0]["inputs"]] == [True] * 4
    with shadownet.load(tmp_path / "out", verify=True) as protected:
        worst = _worst_error(model, protected, 6)
        # each chunk and the head (round 2, one layer from the input: masked, split, so checked), each call
        assert protected.stats()["verify"]["checked"] == 6 * 5
    assert worst <= 2e-5, worst


def test_a_long_layer_one_layer_from_the_input_is_cut_into_chunks_too(tmp_path):
    """Round 2 - a dense layer on a flattened 32x32x16 conv output, 16,384 terms - is masked whatever the
    policy since stop 56 (one layer from the input): it is cut into two chunks that can take the mask as an
    exact split, as a long layer on the input is (a review: it crossed masked, too long to split)."""

    from ai_edge_litert import schema_py_generated as fb

    from converters.graph import Graph, write_model
    from tests.shadownet.small_models import conv_options

    rng = np.random.default_rng(0)
    g = Graph()
    x = g.add_tensor("image", (1, 32, 32, 3), np.float32)
    c = g.add_tensor("conv", (1, 32, 32, 16), np.float32)
    g.add_op("CONV_2D", [x, g.add_tensor("cw", (16, 3, 3, 3), np.float32, rng.standard_normal((16, 3, 3, 3))),
                         g.add_tensor("cb", (16,), np.float32, rng.uniform(0, 0.2, 16))], [c],
             conv_options("CONV_2D", fb.Padding.SAME, 1, fb.ActivationFunctionType.RELU))
    flat = g.add_tensor("flat", (1, 16384), np.float32)
    g.add_op("RESHAPE", [c, g.add_tensor("s", (2,), np.int32, [1, 16384])], [flat], fb.ReshapeOptionsT())
    y = g.add_tensor("logits", (1, 10), np.float32)
    w = g.add_tensor("w", (10, 16384), np.float32, rng.uniform(0, 2 / 16384, (10, 16384)))
    g.add_op("FULLY_CONNECTED", [flat, w, -1], [y], fb.FullyConnectedOptionsT())
    g.inputs, g.outputs = [x], [y]
    manifest, messages = _converted(write_model(g), tmp_path / "out", seed=1)
    assert not [m for m in messages if "too many for the exact split" in m], messages
    assert manifest["masks"]["one_time_rounds"] == [1, 2]
    assert [i.get("split") for i in manifest["rounds"][1]["inputs"]] == [True, True]


def test_a_model_of_only_layers_too_long_to_split_is_refused_saying_why(tmp_path):
    from shadownet.exceptions import UnsupportedOpError

    with pytest.raises(UnsupportedOpError, match="too many terms per output.*exact_split=none"):
        shadownet.convert(_flattened_image(head=False, window=True), str(tmp_path / "out"), seed=1)


def test_a_deeper_masked_layer_too_long_to_split_is_said_at_conversion(tmp_path):
    """Past round 1 (--mask-rounds all, exact_split=all) such a layer stays offloaded, with its one-time
    mask unsplit: said. (``mask_floor=input``: one layer from the input, as here, it is cut into chunks by
    default since stop 56.)"""
    _, messages = _converted(_flattened_image(head=False, first="short"), tmp_path / "out", seed=1,
                             scheme="groupmix:exact_split=all,mask_floor=input", mask_rounds="all")
    said = [m for m in messages if "too many for the exact split" in m]
    assert len(said) == 1 and "sums 18432 terms per output" in said[0], messages


def test_a_long_layer_without_a_mask_is_offloaded_without_a_word(tmp_path):
    """``groupmix:mask_scale=0``: nothing is masked, so nothing is kept in the TEE for its long sums, and no
    warning speaks of a one-time mask (it did: a review)."""
    manifest, messages = _converted(_flattened_image(head=True), tmp_path / "out", seed=1,
                                    scheme="groupmix:mask_scale=0")
    assert manifest["summary"]["long_sums"] == [] and manifest["summary"]["offloaded_ops"] == 2
    assert not [m for m in messages if "one-time mask" in m or "run in the TEE" in m]


def _wide_mlp(hidden: int = 4096) -> tuple[bytes, list[np.ndarray]]:
    """Features of scales 1e-2 to 1e2, standardized in a first dense ReLU layer of ``hidden`` units (the
    standardization folded into it), then a dense ReLU layer of 256 that sums all of them (round 2, one
    layer from the input) and a head of 4; and 40 inputs."""

    from converters.graph import Graph, write_model

    rng = np.random.default_rng(5)
    sigma = 10.0 ** rng.uniform(-2, 2, 30)
    g = Graph()
    x = g.add_tensor("features", (1, 30), np.float32)
    g.inputs, g.outputs = [x], [_dense_layers(g, x, (30, hidden, 256, 4), rng, first_scale=sigma)]
    return write_model(g), [(sigma * rng.standard_normal(30))[None].astype(np.float32) for _ in range(40)]


def _dense_layers(g, x: int, widths: tuple[int, ...], rng: np.random.Generator,
                  first_scale: np.ndarray | None = None) -> int:
    """Dense layers of ``widths`` (``widths[0]`` the terms the first reads of ``x``) on ``x`` in ``g``, ReLU
    but the last, He weights and biases of 0.1 from ``rng`` (the first layer's columns divided by
    ``first_scale``: a folded standardization); returns the last one's output."""
    from ai_edge_litert import schema_py_generated as fb

    h = x
    for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        w = rng.standard_normal((n_out, n_in)) * np.sqrt(2 / n_in)
        if i == 0 and first_scale is not None:
            w = w / first_scale
        b = rng.standard_normal(n_out) * 0.1
        options = fb.FullyConnectedOptionsT()
        options.fusedActivationFunction = fb.ActivationFunctionType.RELU if i < len(widths) - 2 else 0
        y = g.add_tensor(f"y{i}", (1, n_out), np.float32)
        g.add_op("FULLY_CONNECTED", [h, g.add_tensor(f"w{i}", w.shape, np.float32, w),
                                     g.add_tensor(f"b{i}", (n_out,), np.float32, b)], [y], options)
        h = y
    return h


def test_a_masked_round_that_sums_many_terms_crosses_as_an_exact_split(tmp_path, monkeypatch):
    """Round 2 of a wide MLP reads what one layer made of the input (masked whatever the policy) and sums
    4,096 terms per output: unsplit for its cost until now, a review measured 5-8 of 200 rows over the
    1e-4 target (up to 2.3e-4). ``auto`` splits such a round past ``LATER_LONG_TERMS`` terms where its split
    weights fit ``LATER_SPLIT_BYTES``; past them it crosses unsplit, said at conversion."""
    original, xs = _wide_mlp()
    for limit, split in ((exact_split.LATER_SPLIT_BYTES, True), (1 << 20, False)):
        monkeypatch.setattr(exact_split, "LATER_SPLIT_BYTES", limit)
        out = str(tmp_path / f"out{limit}")
        manifest, messages = _converted(original, out, seed=2, mask_rounds="first")  # auto: every round
        assert manifest["masks"]["one_time_rounds"] == [1, 2]
        assert [bool(r["inputs"][0].get("split")) for r in manifest["rounds"]] == [True, split, False]
        said = [m for m in messages if "its readers sum 4096 terms per output" in m]
        assert len(said) == (not split), messages
        if split:
            with shadownet.load(out) as model:
                worst = max(float(np.abs(model(x) - run(original, [x])[0]).max()
                                  / np.abs(run(original, [x])[0]).max()) for x in xs)
            assert worst <= 3e-5, worst


def test_a_masked_conv_round_of_long_sums_is_split_only_where_cheap(tmp_path):
    """The long-sum rule is a dense layer's: a 3x3 conv of 64 channels (576 terms) one layer from the input
    loses little unsplit (6.5e-7 on a review's 192x192 map), and split it took 9.5 MiB more in each pool
    entry there, and its verified model no longer loaded; it crosses unsplit unless cheap, as before."""
    from ai_edge_litert import schema_py_generated as fb

    from converters.graph import Graph, write_model
    from tests.shadownet.small_models import conv_options, pooled_dense_head

    rng = np.random.default_rng(3)
    g = Graph()
    h = x = g.add_tensor("image", (1, 16, 16, 3), np.float32)
    for i, c_in in enumerate((3, 64)):
        w = rng.standard_normal((64, 3, 3, c_in)) * np.sqrt(2 / (9 * c_in))
        y = g.add_tensor(f"y{i}", (1, 16, 16, 64), np.float32)
        g.add_op("CONV_2D", [h, g.add_tensor(f"w{i}", w.shape, np.float32, w),
                             g.add_tensor(f"b{i}", (64,), np.float32, np.full(64, 0.1))], [y],
                 conv_options("CONV_2D", fb.Padding.SAME, 1, fb.ActivationFunctionType.RELU))
        h = y
    g.inputs, g.outputs = [x], [pooled_dense_head(g, h, rng)]
    manifest, _ = _converted(write_model(g), tmp_path / "out", seed=2, mask_rounds="first")
    assert manifest["masks"]["one_time_rounds"] == [1, 2]
    assert [bool(r["inputs"][0].get("split")) for r in manifest["rounds"]][:2] == [True, False]


def _dense_on_image(side: int = 32, units: int = 128, conv: int = 0) -> bytes:
    """A ``side`` x ``side`` RGB image read whole by a dense ReLU layer of ``units`` (FULLY_CONNECTED on the
    4-D tensor, no RESHAPE), then a dense head of 10; with ``conv``, the dense layer reads what a 3x3 ReLU
    conv of ``conv`` channels, stride 2, made of the image instead (round 2, one layer from the input)."""
    from ai_edge_litert import schema_py_generated as fb

    from converters.graph import Graph, write_model
    from tests.shadownet.small_models import conv_options

    rng = np.random.default_rng(7)
    g = Graph()
    h = x = g.add_tensor("image", (1, side, side, 3), np.float32)
    size = side * side * 3
    if conv:
        w = rng.standard_normal((conv, 3, 3, 3)) * np.sqrt(2 / 27)
        h = g.add_tensor("c0", (1, side // 2, side // 2, conv), np.float32)
        g.add_op("CONV_2D", [x, g.add_tensor("c0/w", w.shape, np.float32, w),
                             g.add_tensor("c0/b", (conv,), np.float32, np.full(conv, 0.1))], [h],
                 conv_options("CONV_2D", fb.Padding.SAME, 2, fb.ActivationFunctionType.RELU))
        size = (side // 2) ** 2 * conv
    g.inputs, g.outputs = [x], [_dense_layers(g, h, (size, units, 10), rng)]
    return write_model(g)


def test_a_dense_layer_on_the_users_image_crosses_as_an_exact_split(tmp_path):
    """A dense layer reading the image whole, no flattening op before it: its weights are for the flattened
    tensor, which the exact split (on the channel axis) does not serve, so round 1 crossed under its shaped
    mask (~35-42x the image) unsplit, up to 1.1e-4 of the outputs off (a review; 2.5e-4 on 52x52). It is
    planned as the convolution it is (``converters.normalize.as_convolutions``): split, at LiteRT's floor;
    the audit plans the reference alike, and an older artifact's (no ``plan_revision``) as it was."""
    from shadownet import audit
    from shadownet.audit_layers import planned_as

    original = _dense_on_image()
    out = tmp_path / "out"
    manifest, _ = _converted(original, out, seed=3)
    assert manifest["summary"]["plan_revision"] == 1
    assert [bool(r["inputs"][0].get("split")) for r in manifest["rounds"]][0]
    rng = np.random.default_rng(2)
    with shadownet.load(out) as model:
        worst = 0.0
        for _ in range(20):
            x = rng.uniform(0, 1, (1, 32, 32, 3)).astype(np.float32)
            want = run(original, [x])[0]
            worst = max(worst, float(np.abs(model(x) - want).max() / np.abs(want).max()))
    assert worst <= 3e-5, worst
    (tmp_path / "model.tflite").write_bytes(original)
    report = audit.audit(out, tmp_path / "model.tflite", inferences=0)
    assert [layer["name"] for layer in report["layers"]] == ["y0/pre_activation/conv", "y1"]
    assert not report["unmatched_reference"] and not report["unmatched_obfuscated"]
    del manifest["summary"]["plan_revision"]
    graph = audit.reference_graph(original, audit._manifest_scheme(manifest), planning=planned_as(manifest))
    assert [op.kind for op in graph.ops].count("FULLY_CONNECTED") == 2
    # This stop's first commits rewrote the layer and wrote ``dense_as_conv``, not ``plan_revision``: planned
    # by the marker they wrote, or, with none, by the plan whose layers pair (a review: unmatched, unaudited).
    for marker in ({"dense_as_conv": True}, {}):
        summary = {**manifest["summary"], **marker}
        (out / "manifest.json").write_text(json.dumps({**manifest, "summary": summary}))
        report = audit.audit(out, tmp_path / "model.tflite", inferences=0)
        assert [layer["name"] for layer in report["layers"]] == ["y0/pre_activation/conv", "y1"], marker
        assert not report["unmatched_reference"] and not report["unmatched_obfuscated"]


def test_a_long_dense_layer_on_a_narrow_map_is_cut_into_chunks(tmp_path):
    """A 48x48 map of 4 channels (too narrow to mix, so its round is masked whatever the policy) read whole
    by a dense layer: 9,216 terms per output, too many for the exact split, so it crossed under its mask
    unsplit, up to 1.1e-4 of the outputs off (a review). Such a layer is cut into chunks of its sum as on
    the user's input (``converters.schemes.long_sums_after_input``); each chunk's input, the flattened map's
    part, is wide enough to mix."""
    from ai_edge_litert import schema_py_generated as fb

    from converters.graph import Graph, write_model
    from tests.shadownet.small_models import conv_options

    rng = np.random.default_rng(8)
    g = Graph()
    h = x = g.add_tensor("image", (1, 48, 48, 3), np.float32)
    for i, (k, c_in, c_out) in enumerate(((3, 3, 16), (1, 16, 4))):
        w = rng.standard_normal((c_out, k, k, c_in)) * np.sqrt(2 / (k * k * c_in))
        y = g.add_tensor(f"conv{i}", (1, 48, 48, c_out), np.float32)
        g.add_op("CONV_2D", [h, g.add_tensor(f"conv{i}/w", w.shape, np.float32, w),
                             g.add_tensor(f"conv{i}/b", (c_out,), np.float32, np.full(c_out, 0.1))], [y],
                 conv_options("CONV_2D", fb.Padding.SAME, 1, fb.ActivationFunctionType.RELU))
        h = y
    w = rng.uniform(0, 2 / 9216, (8, 9216))
    y = g.add_tensor("dense", (1, 8), np.float32)
    g.add_op("FULLY_CONNECTED", [h, g.add_tensor("dense/w", w.shape, np.float32, w), -1], [y],
             fb.FullyConnectedOptionsT())
    g.inputs, g.outputs = [x], [y]
    original = write_model(g)
    manifest, _ = _converted(original, tmp_path / "out", seed=4)
    assert [len(r["inputs"]) for r in manifest["rounds"]] == [1, 1, 2]  # the dense layer in two chunks
    xs = [np.random.default_rng(k).uniform(0, 1, (1, 48, 48, 3)).astype(np.float32) for k in range(8)]
    with shadownet.load(tmp_path / "out") as model:
        wants = [run(original, [x])[0] for x in xs]
        worst = max(float(np.abs(model(x) - want).max() / np.abs(want).max())
                    for x, want in zip(xs, wants, strict=True))
    assert worst <= 3e-5, worst
    # The audit plans an artifact of the plan before (no ``plan_revision``) without these chunks (a review:
    # it planned them, and the layer paired with nothing)
    from shadownet import audit
    from shadownet.audit_layers import Planning

    scheme = audit._manifest_scheme(manifest)
    for revision, layers in ((1, 2), (0, 1)):
        graph = audit.reference_graph(original, scheme, planning=Planning(None, revision))
        assert [op.kind for op in graph.ops].count("FULLY_CONNECTED") == layers


def test_a_dense_layer_on_a_map_one_layer_from_the_input_is_split_as_a_dense_layer_is(tmp_path):
    """Planned as a conv, a dense layer on the 8x8x64 map a first conv made (4,096 terms, round 2) is still a
    layer of one output position, which the long-sum rule splits (``plan_rounds._one_position``; a review:
    the rule asked for FULLY_CONNECTED, and it crossed unsplit, 10x further from LiteRT)."""
    original = _dense_on_image(side=16, units=256, conv=64)
    manifest, _ = _converted(original, tmp_path / "out", seed=3, mask_rounds="first")
    assert manifest["masks"]["one_time_rounds"] == [1, 2]
    assert [bool(r["inputs"][0].get("split")) for r in manifest["rounds"]] == [True, True, False]


def test_a_dense_layer_on_the_image_whose_split_would_not_fit_stays_a_dense_layer():
    """Planned as a convolution, such a layer on the user's image is split, and the trusted app reads its
    split weights (4x its own) into secure memory at every refill: 1,280 units on a 32x32x3 image (63 MB
    split) no longer loaded under the 64 MiB cap (a review). Past ``exact_split.LATER_SPLIT_BYTES`` it
    stays a dense layer, unsplit, as before (the conversion says what its precision costs)."""
    from converters.normalize import as_convolutions
    from converters.tflite_reader import read_model

    for units, kinds in ((512, ["CONV_2D", "RESHAPE", "FULLY_CONNECTED"]),
                         (1280, ["FULLY_CONNECTED", "FULLY_CONNECTED"])):
        graph = as_convolutions(read_model(_dense_on_image(units=units)))
        assert [op.kind for op in graph.ops] == kinds, units


def _image_joining_deeper_features() -> bytes:
    """A U-Net's skip from the raw image: conv, pool, upsampling (TEE ops, so the image joins round 2),
    then the features concatenated to the image into a second conv."""
    keras = pytest.importorskip("keras")
    import tensorflow as tf

    keras.utils.set_random_seed(0)
    image = keras.Input((16, 16, 3), batch_size=1)
    f = keras.layers.Conv2D(16, 3, padding="same", activation="relu")(image)
    f = keras.layers.UpSampling2D()(keras.layers.MaxPooling2D()(f))
    y = keras.layers.Conv2D(8, 3, padding="same")(keras.layers.Concatenate()([f, image]))
    return bytes(tf.lite.TFLiteConverter.from_keras_model(keras.Model(image, y)).convert())


def test_a_user_input_joining_a_later_round_crosses_as_an_exact_split(tmp_path):
    """Round 2 carries the raw image too, under a one-time mask ~10x it: by default only round 1 was split,
    and round 2's conv computed at the mask's magnitude (a helper's probe: up to 2.1e-3 from LiteRT on
    0-255 images). The default splits every round that carries a user input; unsplit measures the cost."""
    original = _image_joining_deeper_features()
    rng = np.random.default_rng(4)
    x = [rng.uniform(0, 255, (1, 16, 16, 3)).astype(np.float32) for _ in range(4)]
    errors = {}
    for name, scheme in (("default", None), ("unsplit", "groupmix:exact_split=none")):
        out = str(tmp_path / name)
        manifest, messages = _converted(original, out, scheme=scheme, seed=2)
        assert manifest["masks"]["input_rounds"] == [1, 2]
        split = [bool(r["inputs"][0].get("split")) for r in manifest["rounds"]]
        said = [m for m in messages if "round(s) [2] carry a user input" in m]
        if name == "default":
            assert split == [True, True] and "each crossing as an exact split" in said[0]
        else:
            assert split == [False, False] and "round(s) [2] cross unsplit" in said[0]
        with shadownet.load(out) as model:
            errors[name] = max(float(np.abs(model(xi) - reference(original, xi)).max()
                                     / np.abs(reference(original, xi)).max()) for xi in x)
    assert errors["default"] <= 1e-4 and errors["unsplit"] >= 5 * errors["default"], errors


def test_a_late_round_whose_split_weights_would_not_fit_crosses_unsplit(tmp_path, monkeypatch):
    """A vector joined to flattened image features before a dense head: split, its weights (4x the layer's,
    read whole into secure memory at every refill) stopped a 16 MiB head from loading (a review). The auto
    policy splits such a round only up to LATE_SPLIT_BYTES, and says what the rest costs."""
    keras = pytest.importorskip("keras")
    import tensorflow as tf

    keras.utils.set_random_seed(1)
    image, meta = keras.Input((16, 16, 3), batch_size=1), keras.Input((10,), batch_size=1)
    h = keras.layers.Flatten()(keras.layers.Conv2D(8, 3, padding="same", activation="relu")(image))
    y = keras.layers.Dense(300)(keras.layers.Concatenate()([h, meta]))  # 2058 x 300: 9.9 MB split
    original = bytes(tf.lite.TFLiteConverter.from_keras_model(keras.Model([image, meta], y)).convert())
    for limit, split in ((exact_split.LATE_SPLIT_BYTES, False), (16 << 20, True)):
        monkeypatch.setattr(exact_split, "LATE_SPLIT_BYTES", limit)
        out = str(tmp_path / f"out{limit}")
        manifest, messages = _converted(original, out, seed=2)
        assert manifest["masks"]["input_rounds"] == [1, 2]
        assert [bool(r["inputs"][0].get("split")) for r in manifest["rounds"]] == [True, split]
        said = [m for m in messages if "round(s) [2] carry a user input" in m]
        assert len(said) == 1 and (("each crossing as an exact split" in said[0]) == split), said
        if not split:
            assert "round(s) [2] cross unsplit" in said[0] and "fit 8 MiB of secure memory" in said[0]
        with shadownet.load(out) as model:
            # (in LiteRT's order, which follows the Keras tensors' names: the image first or not)
            assert np.all(np.isfinite(model(*(np.zeros(spec.shape, np.float32) for spec in model.inputs))))
