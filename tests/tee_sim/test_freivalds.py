"""The layer descriptors the TA's checks and one-time pop masks read: refused at load unless they fit the
shapes of the layer's weights, input and output as LiteRT's kernels would have them; and the projections
a check's pool entry draws (``fv_draw``). (The checks themselves: ``tests/shadownet/test_integrity.py``.)"""

import re

import numpy as np
import pytest

from tee_sim import freivalds
from tee_sim.freivalds import LayerCheck
from tee_sim.layer_geometry import geometry
from tee_sim.ta_shadownet_kernels import runnable

CONV = {"kind": "CONV_2D", "padding": "SAME", "stride": [1, 1], "dilation": [1, 1]}


def test_a_descriptor_that_fits_gives_its_geometry():
    geo = geometry(CONV, (8, 3, 3, 4), (1, 10, 10, 4), (1, 10, 10, 8))
    assert geo.kernel == (3, 3) and geo.before == (1, 1)
    strided = geometry({**CONV, "padding": "VALID", "stride": [2, 2], "dilation": [2, 1]}, (8, 3, 3, 4),
                       (1, 10, 10, 4), (1, 3, 4, 8))
    assert strided.stride == (2, 2) and strided.before == (0, 0)
    assert geometry({"kind": "FULLY_CONNECTED"}, (5, 12), (1, 2, 2, 3), (1, 5)).kind == "FULLY_CONNECTED"
    dw = geometry({**CONV, "kind": "DEPTHWISE_CONV_2D"}, (1, 3, 3, 8), (1, 6, 6, 4), (1, 6, 6, 8))
    assert dw.taps == 9


@pytest.mark.parametrize("layer,weights,x,y,refusal", [
    ({**CONV, "kind": "POOL"}, (8, 3, 3, 4), (1, 10, 10, 4), (1, 10, 10, 8), "not a linear layer"),
    (CONV, (8, 3, 3, 5), (1, 10, 10, 4), (1, 10, 10, 8), "do not take"),  # input channels
    (CONV, (8, 3, 3, 4), (1, 10, 10, 4), (1, 10, 10, 9), "do not take"),  # output channels
    (CONV, (8, 3, 3, 4), (1, 10, 10, 4), (1, 9, 10, 8), "takes 10 to 10, not 9"),  # SAME at stride 1
    ({**CONV, "padding": "VALID"}, (8, 3, 3, 4), (1, 10, 10, 4), (1, 10, 10, 8), "takes 10 to 8, not 10"),
    ({**CONV, "padding": "FULL"}, (8, 3, 3, 4), (1, 10, 10, 4), (1, 10, 10, 8), "padding 'FULL'"),
    ({**CONV, "stride": [0, 1]}, (8, 3, 3, 4), (1, 10, 10, 4), (1, 10, 10, 8), "0 is not a positive"),
    ({**CONV, "stride": [True, 1]}, (8, 3, 3, 4), (1, 10, 10, 4), (1, 10, 10, 8), "True is not a positive"),
    ({**CONV, "dilation": [1 << 31, 1]}, (8, 3, 3, 4), (1, 10, 10, 4), (1, 10, 10, 8),
     "further apart than twice"),  # found by fuzzing
    ({**CONV, "dilation": [1]}, (8, 3, 3, 4), (1, 10, 10, 4), (1, 10, 10, 8), "must be pairs"),
    ({**CONV, "kind": "DEPTHWISE_CONV_2D"}, (1, 3, 3, 6), (1, 6, 6, 4), (1, 6, 6, 6), "depthwise weights"),
    ({"kind": "FULLY_CONNECTED"}, (5, 11), (1, 2, 2, 3), (1, 5), "dense weights"),
    (CONV, (8, 3, 3, 4), (1, 10, 10, 4), (1, 10, 10, 0), "shape: 0 is not a positive"),
])
def test_a_descriptor_that_does_not_fit_is_refused(layer, weights, x, y, refusal):
    with pytest.raises(ValueError, match=re.escape(refusal)):
        geometry(layer, weights, x, y)


@pytest.mark.parametrize("build", list(runnable()))
@pytest.mark.parametrize("kind,weights,x,y", [
    ("CONV_2D", (24, 3, 3, 16), (1, 8, 8, 16), (1, 8, 8, 24)),
    ("CONV_2D", (7, 3, 3, 3), (1, 8, 8, 3), (1, 8, 8, 7)),  # d = 27: a tail of three weights
    ("CONV_2D", (33, 1, 1, 40), (1, 4, 4, 40), (1, 4, 4, 33)),
    ("FULLY_CONNECTED", (10, 41), (2, 41), (2, 10)),
    ("DEPTHWISE_CONV_2D", (1, 3, 3, 12), (1, 6, 6, 12), (1, 6, 6, 12)),  # the TEE computes it: u only
])
@pytest.mark.parametrize("k", [1, 3, 4, 6, 9, 16])
def test_draw_projects_the_weights_and_packs_both(kind, weights, x, y, k, build, monkeypatch):
    """``draw`` (``fv_draw``) against numpy: ``u`` drawn as ``rng.standard_normal((M, k))``, the filters
    ``F[t, c, j] = sum_m W'[m, t, c] u[m, j]`` in float64, lane ``j * G + r`` of a packed vector holding
    projection ``j`` of channel ``r`` of its group, zero past ``k`` projections and the channels."""
    monkeypatch.setattr(freivalds, "LIBRARY", runnable()[build])
    rng = np.random.default_rng(k)
    w = rng.standard_normal(weights).astype(np.float32)
    check = LayerCheck({**CONV, "kind": kind}, w, x, y, lambda s, d: np.zeros(s, d), projections=k)
    u_shape, f_shape = check.projection_shapes()
    u, f = np.full(u_shape, np.nan, np.float32), np.full(f_shape, np.nan, np.float32)
    check.draw(np.random.default_rng(1), u, f, w)
    m, g = weights[0] if kind != "DEPTHWISE_CONV_2D" else weights[-1], 16 // check.kp
    projections = np.random.default_rng(1).standard_normal((m, k))

    def packed(values):  # [T, rows, k] -> [T, ceil(rows / G), 16]
        t, rows, _ = values.shape
        out = np.zeros((t, -(-rows // g), check.kp, g))
        for r in range(rows):
            out[:, r // g, :k, r % g] = values[:, r]
        return out.reshape(t, -1, 16).astype(np.float32)

    assert np.array_equal(u, packed(projections[None])[0])
    if kind == "DEPTHWISE_CONV_2D":
        assert f.size == 0
        return
    taps = w.reshape(m, -1, weights[-1]).astype(np.float64)  # [M, T, C]
    expected = packed(np.einsum("mtc,mj->tcj", taps, projections))
    np.testing.assert_allclose(f, expected, rtol=1e-6, atol=1e-6 * np.abs(expected).max())


def test_draw_refuses_arrays_of_another_shape():
    w = np.ones((8, 3, 3, 4), np.float32)
    check = LayerCheck(CONV, w, (1, 6, 6, 4), (1, 6, 6, 8), lambda s, d: np.zeros(s, d), projections=4)
    u_shape, f_shape = check.projection_shapes()
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="filters"):
        check.draw(rng, np.zeros(u_shape, np.float32), np.zeros((1, *f_shape), np.float32), w)
    with pytest.raises(ValueError, match="projections"):
        check.draw(rng, np.zeros(u_shape, np.float64), np.zeros(f_shape, np.float32), w)
    with pytest.raises(ValueError, match="weights"):
        check.draw(rng, np.zeros(u_shape, np.float32), np.zeros(f_shape, np.float32), w[:4])


def test_a_layers_anisotropy_raises_its_projections_and_is_checked():
    """The converter's measure of how far the calibration inputs were from isotropic (``anisotropy``,
    ``converters.anisotropy``) multiplies the estimate of ``||tau|| / ||y'||``: more projections; a value
    that is not a number in [1, 2^20] is refused at load."""
    weights = np.random.default_rng(0).standard_normal((8, 3, 3, 4)).astype(np.float32)

    def check(**extra):
        return LayerCheck({**CONV, **extra}, weights, (1, 10, 10, 4), (1, 10, 10, 8),
                          lambda shape, dtype: np.zeros(shape, dtype))

    def projections(**extra):
        return check(**extra).k

    plain = projections()
    assert projections(anisotropy=1.0) == plain < projections(anisotropy=8.0) < projections(anisotropy=1e4)
    # Past what MAX_PROJECTIONS achieves, the check says so (the runtime warns at load).
    assert not check(anisotropy=8.0).capped and check(anisotropy=1e4).capped
    for bad in (0.5, True, "2", float("nan"), 2.0 ** 21):
        with pytest.raises(ValueError, match="anisotropy"):
            projections(anisotropy=bad)
