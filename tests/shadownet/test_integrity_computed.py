"""Verified models whose dense layers the TEE computes rather than checks (``LayerCheck.cheaper_computed``):
a head whose check would cost more than the layer, or could not reach the bound. (A depthwise layer of
multiplier 1, computed for the same reason: ``test_integrity.py``.)"""

import warnings

import numpy as np
import pytest
from ai_edge_litert import schema_py_generated as fb

import shadownet
from converters.graph import Graph, write_model
from shadownet.accelerator import AcceleratorWrapper
from shadownet.exceptions import IntegrityError
from tests.shadownet.small_models import conv_options, reference

TOLERANCE = 1e-4
IMAGE = (1, 32, 32, 3)


def flattened_head(outputs: int, one_row: float = 1.0) -> bytes:
    """A ReLU conv on a 32x32 RGB image, flattened (8192 values) into a dense layer of ``outputs``, its
    first row ``one_row`` times the others' size."""
    rng = np.random.default_rng(3)
    g = Graph()
    x = g.add_tensor("image", IMAGE, np.float32)
    w = g.add_tensor("w", (8, 3, 3, 3), np.float32, rng.standard_normal((8, 3, 3, 3)) * 0.5)
    b = g.add_tensor("b", (8,), np.float32, rng.standard_normal(8) * 0.1)
    y = g.add_tensor("y", (1, 32, 32, 8), np.float32)
    g.add_op("CONV_2D", [x, w, b], [y],
             conv_options("CONV_2D", fb.Padding.SAME, 1, fb.ActivationFunctionType.RELU))
    shape = g.add_tensor("shape", (2,), np.int32, np.array([1, 8192]))
    flat = g.add_tensor("flat", (1, 8192), np.float32)
    g.add_op("RESHAPE", [y, shape], [flat], fb.ReshapeOptionsT())
    dense = rng.standard_normal((outputs, 8192)) * 0.015
    dense[0] *= one_row
    fw = g.add_tensor("fc/w", (outputs, 8192), np.float32, dense)
    fc_b = g.add_tensor("fc/b", (outputs,), np.float32, rng.standard_normal(outputs))
    out = g.add_tensor("logits", (1, outputs), np.float32)
    g.add_op("FULLY_CONNECTED", [flat, fw, fc_b], [out], fb.FullyConnectedOptionsT())
    g.inputs, g.outputs = [x], [out]
    return write_model(g)


class Changing(AcceleratorWrapper):
    """Runs each round, then adds 1e-3 of its output's norm to one value of it when armed."""

    def __init__(self, inner):
        super().__init__(inner)
        self.armed, self.ran = False, []

    def run_round(self, r):
        self.inner.run_round(r)
        self.ran.append(r)
        if self.armed:
            for name, y in self.buffers.items():
                if name.startswith(f"round_{r}/out/"):
                    y.reshape(-1)[0] += np.float32(1e-3 * np.linalg.norm(y))


@pytest.mark.parametrize("outputs, one_row, computed", [(2, 1.0, True), (120, 1.0, False), (120, 30.0, True)])
def test_a_dense_head_whose_check_costs_more_than_it_is_computed_by_the_tee(outputs, one_row, computed,
                                                                            tmp_path):
    """2 outputs (8 as groupmix obfuscates them) on 8192 inputs: a check needs about 10 projections, each
    costing what an output does, so the TEE computes the layer, its round is not run, and its result
    matches LiteRT's; 120 outputs: checked (their weights' participation ratio 75, as groupmix mixes them);
    120 whose first is 30x the others (results along about one direction, whose norm the check cannot
    count on: ``freivalds_directions``): computed. Either way a
    changed result of the conv's round is caught."""
    model_bytes = flattened_head(outputs, one_row)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the seed's warning
        # (mask_floor=input: the head's round unmasked; one layer from the input, it is masked and split by
        # default since stop 56, and a split layer is checked on its masked input, not computed)
        shadownet.convert(model_bytes, tmp_path / "out", seed=2, scheme="groupmix:mask_floor=input",
                          mask_rounds="first")
    wrappers = []

    def wrap(inner):
        wrappers.append(Changing(inner))
        return wrappers[-1]

    rng = np.random.default_rng(4)
    xs = [rng.uniform(0, 1, IMAGE).astype(np.float32) for _ in range(6)]
    with shadownet.load(tmp_path / "out", accelerator=wrap, verify=True) as model:
        assert model.num_rounds == 2
        assert model.skipped_rounds == ({2} if computed else frozenset())
        for x in xs[:4]:
            want = reference(model_bytes, x)
            assert np.max(np.abs(model(x) - want)) <= TOLERANCE * np.max(np.abs(want))
        checks = model.stats()["verify"]
        assert (checks["computed"], checks["layers"]) == ((1, 1) if computed else (0, 2))
        changing = wrappers[0]
        assert set(changing.ran) == ({1} if computed else {1, 2})
        changing.armed = True
        for x in xs[4:]:
            with pytest.raises(IntegrityError, match="failed verification"):
                model(x)


def strided_to_one_position() -> bytes:
    """A 3x3 conv of stride 2 on a 16x16 RGB image (8x8x8, ReLU: 64 positions, checked), a 2x2 max pool
    (4x4x8), a 3x3 conv of stride 2 to one position (1x1x16, ReLU), flattened into a dense layer of 64
    outputs."""
    rng = np.random.default_rng(5)
    g = Graph()
    x = g.add_tensor("image", (1, 16, 16, 3), np.float32)
    relu = fb.ActivationFunctionType.RELU

    def conv(x: int, name: str, c_in: int, c_out: int, side: int, padding: int) -> int:
        w = g.add_tensor(f"{name}/w", (c_out, 3, 3, c_in), np.float32,
                         rng.standard_normal((c_out, 3, 3, c_in)) * np.sqrt(2 / (9 * c_in)))
        b = g.add_tensor(f"{name}/b", (c_out,), np.float32, rng.standard_normal(c_out) * 0.1)
        y = g.add_tensor(name, (1, side, side, c_out), np.float32)
        g.add_op("CONV_2D", [x, w, b], [y], conv_options("CONV_2D", padding, 2, relu))
        return y

    a = conv(x, "c1", 3, 8, 8, fb.Padding.SAME)
    pool = fb.Pool2DOptionsT()
    pool.padding, pool.filterHeight, pool.filterWidth = fb.Padding.VALID, 2, 2
    pool.strideH, pool.strideW = 2, 2
    p = g.add_tensor("pool", (1, 4, 4, 8), np.float32)
    g.add_op("MAX_POOL_2D", [a], [p], pool)
    c = conv(p, "c2", 8, 16, 1, fb.Padding.VALID)
    flat = g.add_tensor("flat", (1, 16), np.float32)
    g.add_op("RESHAPE", [c, g.add_tensor("shape", (2,), np.int32, np.array([1, 16]))], [flat],
             fb.ReshapeOptionsT())
    fw = g.add_tensor("fc/w", (64, 16), np.float32, rng.standard_normal((64, 16)) * 0.25)
    out = g.add_tensor("logits", (1, 64), np.float32)
    g.add_op("FULLY_CONNECTED", [flat, fw, -1], [out], fb.FullyConnectedOptionsT())
    g.inputs, g.outputs = [x], [out]
    return write_model(g)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_conv_layer_of_few_directions_is_computed_by_the_tee(seed, tmp_path):
    """Under the paper's scheme a conv of one output position whose obfuscated filters put their energy in
    one or two of them has results along one or two directions: a helper's probe saw such a layer reach
    2^-4.9 on 20 of 40 inputs. The TEE computes it as the dense layer it is on its input (its round not
    run, the model's results LiteRT's within the scheme's error), and a changed result of round 1, checked
    (64 positions), is still caught."""
    model_bytes = strided_to_one_position()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the seed's warning, the scheme's unsplit masks
        shadownet.convert(model_bytes, tmp_path / "out", scheme="shadownet", seed=seed)
    wrappers = []

    def wrap(inner):
        wrappers.append(Changing(inner))
        return wrappers[-1]

    rng = np.random.default_rng(4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the paper scheme's unsplit masked rounds
        model = shadownet.load(tmp_path / "out", accelerator=wrap, verify=True)
    with model:
        assert model.num_rounds == 3 and model.skipped_rounds == {2, 3}  # and the dense head's (16 inputs)
        for _ in range(8):
            x = rng.uniform(0, 1, (1, 16, 16, 3)).astype(np.float32)
            want = reference(model_bytes, x)
            assert np.max(np.abs(model(x) - want)) <= 1e-3 * np.max(np.abs(want))  # the scheme's 1e-3
        checks = model.stats()["verify"]
        assert checks["worst_bound_log2"] <= -20 and checks["capped"] == 0
        wrappers[0].armed = True
        with pytest.raises(IntegrityError, match="failed verification"):
            model(rng.uniform(0, 1, (1, 16, 16, 3)).astype(np.float32))


def batch_of_rows(rows: int, one_row: float) -> bytes:
    """A batch of ``rows`` inputs of 64 values through a dense layer of 96 and one of 80, whose
    first output is ``one_row`` times the others' size."""
    rng = np.random.default_rng(6)
    g = Graph()
    x = g.add_tensor("rows", (rows, 64), np.float32)
    w1 = g.add_tensor("fc1/w", (96, 64), np.float32, rng.standard_normal((96, 64)) / 8)
    h = g.add_tensor("hidden", (rows, 96), np.float32)
    g.add_op("FULLY_CONNECTED", [x, w1, -1], [h], fb.FullyConnectedOptionsT())
    dense = rng.standard_normal((80, 96)) / 10
    dense[0] *= one_row
    w2 = g.add_tensor("fc2/w", (80, 96), np.float32, dense)
    out = g.add_tensor("out", (rows, 80), np.float32)
    g.add_op("FULLY_CONNECTED", [h, w2, -1], [out], fb.FullyConnectedOptionsT())
    g.inputs, g.outputs = [x], [out]
    return write_model(g)


def test_a_batch_of_one_input_counts_for_one_input(tmp_path):
    """A batch's rows are not counted as independent directions (``freivalds_directions.
    independent_rows``; a check of 64 copies of one input fell short: ``tests/tee_sim/test_freivalds.py``).
    The second layer, whose weights put their energy along about one direction, counted for 64 rows and
    was checked; it is computed by the TEE now, its round not run, and the model's results on 64 copies
    of one input are LiteRT's within the bound."""
    model_bytes = batch_of_rows(64, 30.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the seed's warning
        # (mask_floor=input: the head's round unmasked; one layer from the input, it is masked and split by
        # default since stop 56, and a split layer is checked on its masked input, not computed)
        shadownet.convert(model_bytes, tmp_path / "out", seed=2, scheme="groupmix:mask_floor=input",
                          mask_rounds="first")
    rng = np.random.default_rng(7)
    with shadownet.load(tmp_path / "out", verify=True) as model:
        for _ in range(16):
            x = np.repeat(rng.uniform(0, 1, (1, 64)).astype(np.float32), 64, axis=0)
            want = reference(model_bytes, x)
            assert np.max(np.abs(model(x) - want)) <= TOLERANCE * np.max(np.abs(want))
        checks = model.stats()["verify"]
        assert checks["worst_bound_log2"] <= -20
        assert checks["computed"] == 1 and model.skipped_rounds == {2}


def deep_dense(width: int, hidden: int) -> bytes:
    """``hidden`` dense layers of ``width`` (ReLU) on ``width`` inputs, then a head of 10."""
    rng = np.random.default_rng(8)
    g = Graph()
    x = h = g.add_tensor("x", (1, width), np.float32)
    relu = fb.FullyConnectedOptionsT()
    relu.fusedActivationFunction = fb.ActivationFunctionType.RELU
    for i in range(hidden + 1):
        outputs = width if i < hidden else 10
        w = g.add_tensor(f"fc{i}/w", (outputs, width), np.float32,
                         rng.standard_normal((outputs, width)) * np.sqrt(2 / width))
        y = g.add_tensor(f"fc{i}", (1, outputs), np.float32)
        g.add_op("FULLY_CONNECTED", [h, w, -1], [y], relu if i < hidden else fb.FullyConnectedOptionsT())
        h = y
    g.inputs, g.outputs = [x], [h]
    return write_model(g)


def test_computed_layers_share_a_budget_of_secure_memory(tmp_path):
    """Each computed layer's weights stay in secure memory (at most ``COMPUTED_DENSE_BYTES`` each), and six
    1536x1536 dense layers of the paper's scheme, each computed for its few directions, failed the load
    together (a review: 59 MiB used before the sixth). Past ``COMPUTED_TOTAL_BYTES`` the load checks the
    rest and counts them weak (its warning): the model loads, and its results are LiteRT's."""
    model_bytes = deep_dense(1536, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the seed's warning, the scheme's unsplit masks
        shadownet.convert(model_bytes, tmp_path / "out", scheme="shadownet", seed=1)
    with pytest.warns(UserWarning, match="beside the other layers it computes"):
        model = shadownet.load(tmp_path / "out", verify=True)
    rng = np.random.default_rng(9)
    with model:
        for _ in range(3):
            x = rng.uniform(0, 1, (1, 1536)).astype(np.float32)
            want = reference(model_bytes, x)
            assert np.max(np.abs(model(x) - want)) <= 1e-3 * np.max(np.abs(want))  # the scheme's 1e-3
        checks = model.stats()["verify"]
    assert checks["computed"] >= 2 and checks["capped"] >= 1, checks
    assert checks["computed"] + checks["capped"] == 6
