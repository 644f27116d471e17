"""The TA's numpy kernels (``tee_sim.ta_shadownet_numpy_ops``): the smooth activations it runs instead of
LiteRT (LOGISTIC, HARD_SWISH, GELU; on strided views, one C call otherwise) against float64, over the whole
float range, without warnings; the rest of its kernels against LiteRT in
``tests/converters/test_tee_numpy.py``."""

import warnings

import numpy as np
import pytest

from tee_sim.ta_shadownet_numpy_ops import activation_into, compile_numpy
from tests.tee_sim.test_small_ops import EXTREMES, assert_smooth_result


def _inputs() -> np.ndarray:
    rng = np.random.default_rng(0)
    values = np.concatenate([np.array(EXTREMES), rng.normal(0, 4, 2000)])
    return values.astype(np.float32).reshape(1, -1, 1, 1)


@pytest.mark.parametrize("kind", ["LOGISTIC", "HARD_SWISH", "GELU", "GELU approximate"])
def test_smooth_activations_are_float32_roundings_of_the_exact_result(kind):
    """As the C kernels' (``assert_smooth_result``), without warnings."""
    x = _inputs()
    dst = np.full_like(x, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # exp's overflow below -88.7 and -inf's 0 * inf: expected, silent
        compile_numpy({"op": "activation", "activation": kind.split()[0], "alpha": None,
                       "approximate": "approximate" in kind}, [x], [dst])()
    assert_smooth_result(kind, x, dst)
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
