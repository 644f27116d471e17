"""The TA's numpy kernels (``tee_sim.ta_shadownet_numpy_ops``): the smooth activations it runs instead of
LiteRT (LOGISTIC, HARD_SWISH, GELU; on strided views, one C call otherwise) against float64, over the whole
float range, without warnings; the rest of its kernels against LiteRT in
``tests/converters/test_tee_numpy.py``."""

import math
import warnings

import numpy as np
import pytest

from tee_sim.ta_shadownet_numpy_ops import activation_into, compile_numpy

EXTREMES = [-np.inf, -3.4e38, -200.0, -88.8, -87.0, -20.0, -3.0, -2.9, -1e-30, 0.0, 1e-30, 2.9, 3.0, 20.0,
            87.0, 88.8, 200.0, 3.4e38, np.inf]


def _inputs() -> np.ndarray:
    rng = np.random.default_rng(0)
    values = np.concatenate([np.array(EXTREMES), rng.normal(0, 4, 2000)])
    return values.astype(np.float32).reshape(1, -1, 1, 1)


@pytest.mark.parametrize("kind, reference", [
    ("LOGISTIC", lambda x: 1 / (1 + np.exp(-x))),
    ("HARD_SWISH", lambda x: x * np.clip(x + 3, 0, 6) / 6),
    ("GELU", lambda x: x * (1 + np.frompyfunc(math.erf, 1, 1)(x / math.sqrt(2)).astype(np.float64)) / 2),
    ("GELU approximate", lambda x: x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3))) / 2),
])
def test_smooth_activations_are_float32_roundings_of_the_exact_result(kind, reference):
    """Within 4 float32 epsilons of the exact result (HARD_SWISH: of its input's magnitude, as XNNPACK's
    x * clip(x / 6 + 1/2, 0, 1) cancels near x = -3)."""
    x = _inputs()
    dst = np.full_like(x, np.nan)
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        want = reference(x.astype(np.float64))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # exp's overflow below -88.7 and -inf's 0 * inf: expected, silent
        compile_numpy({"op": "activation", "activation": kind.split()[0], "alpha": None,
                       "approximate": "approximate" in kind}, [x], [dst])()
    finite = np.isfinite(want)
    assert np.array_equal(np.isnan(dst), np.isnan(want))
    assert np.array_equal(dst[~finite & ~np.isnan(want)], want[~finite & ~np.isnan(want)])
    scale = np.maximum(np.abs(want[finite]), 1e-30)  # denormal results: absolutely within 1e-37
    if kind != "LOGISTIC":  # x times a factor in [0, 1]: within rounding of x's magnitude
        scale = np.maximum(scale, np.abs(x.astype(np.float64)[finite]))
    assert (np.abs(dst[finite] - want[finite]) / scale).max() <= 4 * np.finfo(np.float32).eps
    if kind == "LOGISTIC":
        assert dst.min() >= 0 and dst.max() <= 1 and dst[0, 2, 0, 0] == 0.0  # -200: exactly 0, as LiteRT's


def test_an_unknown_activation_is_refused():
    x = np.zeros((1, 2, 2, 1), np.float32)
    with pytest.raises(ValueError, match="TANH"):
        activation_into("TANH", None, x, x.copy())


def test_a_layer_norms_ops():
    """NEG and RSQRT as LiteRT's kernels bit for bit (RSQRT of 0 is inf, of a negative NaN, silently),
    SQUARED_DIFFERENCE with broadcasting, and a MEAN over the last axis, kept or dropped."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(1, 3, 4, 5)).astype(np.float32)
    x[0, 0, 0, :3] = [0.0, -1.0, np.inf]
    out = np.empty_like(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compile_numpy({"op": "unary", "kind": "RSQRT"}, [x], [out])()
    with np.errstate(all="ignore"):
        assert np.array_equal(out, np.float32(1) / np.sqrt(x), equal_nan=True)
    assert out[0, 0, 0, 0] == np.inf and np.isnan(out[0, 0, 0, 1]) and out[0, 0, 0, 2] == 0
    compile_numpy({"op": "unary", "kind": "NEG"}, [x], [out])()
    assert np.array_equal(out, -x)
    mean = rng.normal(size=(1, 3, 4, 1)).astype(np.float32)
    compile_numpy({"op": "binary", "kind": "SQUARED_DIFFERENCE"}, [x, mean], [out])()
    assert np.array_equal(out, (x - mean) * (x - mean))
    y = rng.normal(size=(2, 3, 7)).astype(np.float32)
    for shape in ((2, 3, 1), (2, 3)):
        dst = np.empty(shape, np.float32)
        compile_numpy({"op": "mean_last"}, [y], [dst])()
        assert np.allclose(dst.reshape(2, 3), y.astype(np.float64).mean(axis=-1), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="last axis"):
        compile_numpy({"op": "mean_last"}, [y], [np.empty((2, 4, 1), np.float32)])
    with pytest.raises(ValueError, match="TANH"):
        compile_numpy({"op": "unary", "kind": "TANH"}, [x], [out])
