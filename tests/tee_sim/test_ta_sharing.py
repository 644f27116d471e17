"""Sessions that load the same secrets share the decrypted program (two frames in flight cost one copy of
the masks and offsets), and each keeps working when the other closes."""

import warnings

import numpy as np
from ai_edge_litert import schema_py_generated as fb

import tee_sim
from converters import convert
from converters.graph import Graph, write_model
from tests.converters.driver import Driver
from tests.tee_sim.test_ta_shadownet import _model, _x


def test_sessions_share_one_program(tmp_path):
    with tee_sim.Context("inprocess", home=tmp_path / "device") as device:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # The paper's scheme: static masks and offsets, shared; deterministic results to compare.
            convert(_model(0), tmp_path / "out", scheme="shadownet", seed=0, device=device)
        first = Driver(device, tmp_path / "out")
        alone = first.memory()[0]
        second = Driver(device, tmp_path / "out")
        both = second.memory()[0]
        program = (tmp_path / "out" / "secrets.sealed").stat().st_size
        # alone = program + one session's buffers, both = program + two sessions' buffers
        assert 2 * alone - both >= 0.9 * program
        want = first(_x())
        assert all(np.array_equal(a, b) for a, b in zip(second(_x()), want, strict=True))
        first.close()
        assert second.memory()[0] == alone  # the program stays for the second session
        assert all(np.array_equal(a, b) for a, b in zip(second(_x()), want, strict=True))
        second.close()
        assert device.memory_stats()["used"] == 0


def _depthwise_model() -> bytes:
    """conv 3 -> 32, a 3x3 depthwise layer of multiplier 1 (the default scheme keeps it in the TEE, in its
    C kernel), conv 32 -> 8, mean, dense."""
    rng = np.random.default_rng(5)
    g = Graph()

    def layer(x, kind, weights, act, options):
        options.padding, options.strideH, options.strideW = fb.Padding.SAME, 1, 1
        options.dilationHFactor = options.dilationWFactor = 1
        options.fusedActivationFunction = act
        n = len(g.ops)
        c_out = weights.shape[0] if kind == "CONV_2D" else weights.shape[3]
        w = g.add_tensor(f"w{n}", weights.shape, np.float32, weights)
        b = g.add_tensor(f"b{n}", (c_out,), np.float32, rng.standard_normal(c_out) * 0.1)
        y = g.add_tensor(f"y{n}", (1, 8, 8, c_out), np.float32)
        g.add_op(kind, [x, w, b], [y], options)
        return y

    x = g.add_tensor("input", (1, 8, 8, 3), np.float32)
    a = layer(x, "CONV_2D", rng.standard_normal((32, 3, 3, 3)) * 0.5, fb.ActivationFunctionType.RELU,
              fb.Conv2DOptionsT())
    depthwise = fb.DepthwiseConv2DOptionsT()
    depthwise.depthMultiplier = 1
    d = layer(a, "DEPTHWISE_CONV_2D", rng.standard_normal((1, 3, 3, 32)) * 0.5,
              fb.ActivationFunctionType.RELU6, depthwise)
    h = layer(d, "CONV_2D", rng.standard_normal((8, 3, 3, 32)) * 0.1, fb.ActivationFunctionType.NONE,
              fb.Conv2DOptionsT())
    axes = g.add_tensor("axes", (2,), np.int32, np.array([1, 2]))
    m = g.add_tensor("mean", (1, 8), np.float32)
    g.add_op("MEAN", [h, axes], [m], fb.ReducerOptionsT())
    w = g.add_tensor("fc/w", (5, 8), np.float32, rng.standard_normal((5, 8)) * 0.3)
    out = g.add_tensor("logits", (1, 5), np.float32)
    g.add_op("FULLY_CONNECTED", [m, w, -1], [out], fb.FullyConnectedOptionsT())
    g.inputs, g.outputs = [x], [out]
    return write_model(g)


def test_sessions_share_the_packed_depthwise_weights(tmp_path):
    """The TA's depthwise kernel reads a 3x3 layer's weights packed (``pack_weights``): made once per
    program, counted with it, and freed with it."""
    with tee_sim.Context("inprocess", home=tmp_path / "device") as device:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            convert(_depthwise_model(), tmp_path / "out", seed=0, device=device)
        first = Driver(device, tmp_path / "out")
        alone = first.memory()[0]
        second = Driver(device, tmp_path / "out")
        models = [s.context["model"] for s in device._transport._os._sessions.values()]
        assert len(models) == 2
        (packed,) = models[0].depthwise.values()  # one 3x3 layer, as the kernel reads it
        assert packed.shape == (2, 9, 16) and models[1].depthwise == models[0].depthwise
        assert all(a is b for a, b in zip(models[0].depthwise.values(), models[1].depthwise.values(),
                                           strict=True))
        want = first(_x())  # one-time masks: equal within rounding, not bit for bit
        assert all(np.allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())
                   for a, b in zip(second(_x()), want, strict=True))
        first.close()
        assert second.memory()[0] == alone  # the program and its packed weights stay for the second one
        second.close()
        assert device.memory_stats()["used"] == 0
