"""The layer descriptors the TA's checks and one-time pop masks read: refused at load unless they fit the
shapes of the layer's weights, input and output as LiteRT's kernels would have them."""

import pytest

from tee_sim.freivalds import geometry

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


@pytest.mark.parametrize("layer,weights,x,y", [
    ({**CONV, "kind": "POOL"}, (8, 3, 3, 4), (1, 10, 10, 4), (1, 10, 10, 8)),
    (CONV, (8, 3, 3, 5), (1, 10, 10, 4), (1, 10, 10, 8)),  # input channels
    (CONV, (8, 3, 3, 4), (1, 10, 10, 4), (1, 10, 10, 9)),  # output channels
    (CONV, (8, 3, 3, 4), (1, 10, 10, 4), (1, 9, 10, 8)),  # SAME keeps the size at stride 1
    ({**CONV, "padding": "VALID"}, (8, 3, 3, 4), (1, 10, 10, 4), (1, 10, 10, 8)),
    ({**CONV, "padding": "FULL"}, (8, 3, 3, 4), (1, 10, 10, 4), (1, 10, 10, 8)),
    ({**CONV, "stride": [0, 1]}, (8, 3, 3, 4), (1, 10, 10, 4), (1, 10, 10, 8)),
    ({**CONV, "stride": [True, 1]}, (8, 3, 3, 4), (1, 10, 10, 4), (1, 10, 10, 8)),
    ({**CONV, "dilation": [1 << 31, 1]}, (8, 3, 3, 4), (1, 10, 10, 4), (1, 10, 10, 8)),  # found by fuzzing
    ({**CONV, "dilation": [1]}, (8, 3, 3, 4), (1, 10, 10, 4), (1, 10, 10, 8)),
    ({**CONV, "kind": "DEPTHWISE_CONV_2D"}, (1, 3, 3, 6), (1, 6, 6, 4), (1, 6, 6, 6)),
    ({"kind": "FULLY_CONNECTED"}, (5, 11), (1, 2, 2, 3), (1, 5)),
    (CONV, (8, 3, 3, 4), (1, 10, 10, 4), (1, 10, 10, 0)),
])
def test_a_descriptor_that_does_not_fit_is_refused(layer, weights, x, y):
    with pytest.raises(ValueError):
        geometry(layer, weights, x, y)
