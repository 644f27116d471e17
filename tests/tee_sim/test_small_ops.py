"""The TA's small ops (``tee_sim.ta_shadownet_small_ops`` and its C ``sn_small_op``) on every build of the
kernels this CPU runs: MEAN over an image's positions, SOFTMAX over its channels and a dense layer's
product against float64 numpy, copies bit for bit, each a single kernel call for the fast path."""

import math

import numpy as np
import pytest

from tee_sim import ta_shadownet_small_ops as ops
from tee_sim.ta_shadownet_kernels import runnable

BUILDS = runnable()


@pytest.fixture(autouse=True, params=list(BUILDS))
def kernels(request, monkeypatch):
    monkeypatch.setattr(ops, "LIBRARY", BUILDS[request.param])


@pytest.mark.parametrize("shape", [(1, 7, 7, 1024), (2, 3, 5, 13), (1, 1, 1, 3)])
@pytest.mark.parametrize("keep_dims", [True, False])
def test_mean_over_positions(shape, keep_dims):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np.float32)
    n, _, _, c = shape
    out = np.full((n, 1, 1, c) if keep_dims else (n, c), np.nan, np.float32)
    kernel = ops.compile_mean(x, out)
    assert kernel.c_call[1]
    kernel()
    want = x.astype(np.float64).mean(axis=(1, 2)).reshape(out.shape)
    assert np.allclose(out, want, rtol=1e-5, atol=1e-6 * np.abs(x).max())


@pytest.mark.parametrize("shape, beta", [((1, 1000), 1.0), ((2, 3, 17), 0.5), ((4, 1), 2.0)])
def test_softmax_over_channels(shape, beta):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(shape) * 20).astype(np.float32)  # large logits: the max is subtracted first
    out = np.empty_like(x)
    ops.compile_softmax({"beta": beta}, x, out)()
    z = beta * x.astype(np.float64)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    assert np.allclose(out, e / e.sum(axis=-1, keepdims=True), rtol=1e-5, atol=1e-7)
    assert np.allclose(out.sum(axis=-1), 1, atol=1e-5)


def test_copy_and_reshape_bit_for_bit():
    x = np.random.default_rng(2).standard_normal((1, 2, 2, 50)).astype(np.float32)
    x.reshape(-1)[3] = np.nan
    out = np.zeros((1, 200), np.float32)
    kernel = ops.compile_copy(x, out)
    kernel()
    assert np.array_equal(out.view(np.int32), x.reshape(1, 200).view(np.int32))
    assert ops.compile_copy(x[..., ::2], np.zeros((1, 100), np.float32)) is None  # strided: numpy's copy
    assert ops.compile_copy(x, np.zeros((1, 199), np.float32)) is None


def test_refuses_what_does_not_fit():
    x = np.zeros((1, 4, 4, 8), np.float32)
    for bad in (np.zeros((1, 8, 1, 1), np.float32), np.zeros((1, 9), np.float32),
                np.zeros((1, 8), np.float64)):
        with pytest.raises(ValueError, match="mean"):
            ops.compile_mean(x, bad)
    with pytest.raises(ValueError, match="softmax"):
        ops.compile_softmax({"beta": 1.0}, x, np.zeros((1, 4, 4, 9), np.float32))


@pytest.mark.parametrize("pad", [[[0, 0], [1, 0], [1, 0], [0, 0]], [[0, 0], [1, 2], [2, 1], [0, 0]],
                                 [[0, 0], [0, 0], [0, 0], [1, 2]], [[0, 0], [0, 1], [0, 0], [0, 0]]])
def test_a_padded_pushs_border_rows_copy_as_numpy(pad):
    """``compile_rows``: each border slab of a padded push (``_masked_destination``'s), from the mask or
    zeros, one kernel call apiece, bit for bit what numpy's copy writes; what is not rows at a stride is
    refused (None), for numpy to copy."""
    from tee_sim.ta_shadownet_restore_push import _masked_destination

    rng = np.random.default_rng(2)
    shape = (1, 9, 8, 5)
    mask = rng.standard_normal(shape).astype(np.float32)
    for source in (mask, None):
        got, want = np.full(shape, np.nan, np.float32), np.full(shape, np.nan, np.float32)
        _, _, border = _masked_destination(got, source, pad)
        _, _, expected = _masked_destination(want, source, pad)
        assert border
        for (d, m), (e, _) in zip(border, expected, strict=True):
            kernel = ops.compile_rows(m, d)
            assert kernel is not None and kernel.c_call[1]
            kernel()
            np.copyto(e, 0 if m is None else m)
        np.testing.assert_array_equal(got, want)  # the interior untouched (NaN) in both
    x = np.zeros((4, 6, 3), np.float32)
    assert ops.compile_rows(None, x[::2, ::2]) is None  # neither rows of contiguous floats nor even steps
    two = np.zeros((2, 9, 8, 5), np.float32)
    assert ops.compile_rows(None, two[:, 1:, :1]) is None  # two images' rows: a gap between them
    assert ops.compile_rows(x[:, :, 0], x[:, :, 1].copy()) is None  # the source is not the shape's rows


@pytest.mark.parametrize("size", [3, 4099, 150528])  # a remainder only; blocks and a tail; MobileNet's input
def test_spread_check_holds_the_band_of_round_1s_mask_exponent(size):
    """``SN_SPREAD``, the fast path's test that round 1's one-time mask is at the power of two its input's
    spread calls for (``tee_sim.mask_spread.exponent``): 0 inside the band that keeps the mask at its power
    of two, 1 outside it or for an input that is not finite (the step then goes back to the TA's Python,
    which moves the mask)."""
    from tee_sim.mask_spread import MAX_EXPONENT, MIN_EXPONENT, band, exponent

    rng = np.random.default_rng(size)
    spread = 1.7
    for scale in (255.0, 1.0, 0.3, 1e-6):
        x = (scale * rng.uniform(0, 1, size)).astype(np.float32)
        check = ops.compile_spread(x)
        rms = float(np.sqrt(np.mean(x.astype(np.float64) ** 2)))
        k = exponent(rms, spread, MIN_EXPONENT if scale > 1e-3 else MAX_EXPONENT)  # moved: the tightest
        assert rms <= spread * 2.0 ** k < 2 * rms  # the mask at its intended ratio to the input, under 2x
        # Kept at k + 1 too (under 4x), moved from further: the check says the same as ``exponent``.
        for other, want in ((k, 0), (k + 1, 0), (k - 1, 2), (k + 2, 2)):  # 2 outside: 1 is a failed check
            check.op.lo, check.op.hi = band(spread, other)
            assert check() == want, (scale, other)
            assert exponent(rms, spread, other) == (other if want == 0 else k)
        x[size // 2] = np.nan
        check.op.lo, check.op.hi = band(spread, k)
        assert check() == 2 and exponent(float("nan"), spread, 3) == 3
        assert exponent(float("inf"), spread, 3) == MAX_EXPONENT  # squares over float32's range
    zeros = np.zeros(size, np.float32)
    check = ops.compile_spread(zeros)
    check.op.lo, check.op.hi = band(spread, exponent(0.0, spread, 0))
    assert exponent(0.0, spread, 0) == MIN_EXPONENT and check() == 0
    assert ops.compile_spread(np.zeros((4, 4), np.float32)[:, :2]) is None  # not dense: numpy's


def test_spread_check_follows_a_sparse_inputs_peak():
    """A few lit elements among many stand far above their RMS: the spread a mask follows is the larger of
    the RMS and the peak over ``PEAK_RATIO`` (``tee_sim.mask_spread.spread_of``), in C as in numpy."""
    from tee_sim.mask_spread import PEAK_RATIO, band, exponent, spread_of

    x = np.zeros(64 * 64 * 3, np.float32)
    x[[5, 700, 9000, 12000]] = [1.0, -2.0, 0.5, 1.5]
    rms = float(np.sqrt(np.mean(x.astype(np.float64) ** 2)))
    assert spread_of(x) == pytest.approx(2.0 / PEAK_RATIO) and spread_of(x) > 10 * rms
    check = ops.compile_spread(x, PEAK_RATIO ** -2)
    for measure, want in ((spread_of(x), 0), (rms, 2)):  # the band the peak calls for, not the RMS's
        check.op.lo, check.op.hi = band(1.0, exponent(measure, 1.0, 0))
        assert check() == want, measure
    image = np.random.default_rng(0).uniform(0, 1, 4099).astype(np.float32)  # an image's peak: its RMS
    assert spread_of(image) == pytest.approx(float(np.sqrt(np.mean(image.astype(np.float64) ** 2))), rel=1e-5)


@pytest.mark.parametrize("channels", [4, 30, 300])  # RGB-D; tabular features; past the kernel's 256 at once
def test_spread_check_of_a_scaled_input_follows_its_largest_scaled_channel(channels):
    """A raw input whose channels the mixing scales (``converters.schemes.groupmix.input_scales``): its mask
    follows the RMS of the largest channel of ``x * scale`` (or its peak over ``PEAK_RATIO``), in C as in
    numpy - not the input's own spread, its largest raw channel's."""
    from tee_sim.mask_spread import PEAK_RATIO, band, exponent, spread_of

    rng = np.random.default_rng(channels)
    sigma = 10.0 ** rng.uniform(-3, 3, channels)
    scale = (2.0 ** -np.rint(np.log2(sigma / sigma.min()))).astype(np.float32)
    x = (sigma * rng.standard_normal((1, 37, channels))).astype(np.float32)
    x[..., 1] *= 30  # one scaled channel 30x the others: the one the mask must hide
    scaled = x.astype(np.float64) * scale
    largest = float(np.sqrt(np.max(np.mean(scaled ** 2, axis=(0, 1)))))
    assert spread_of(x, scale) == pytest.approx(max(largest, np.abs(scaled).max() / PEAK_RATIO), rel=1e-6)
    assert spread_of(x) > 30 * spread_of(x, scale)  # unscaled: sized for the largest raw channel
    check = ops.compile_spread(x, PEAK_RATIO ** -2, scale)
    mean = float(np.sqrt(np.mean(scaled ** 2)))  # over all the channels
    answers = []
    for measure in (spread_of(x, scale), spread_of(x), mean, largest / 3, largest * 3):
        lo, hi = band(1.0, exponent(measure, 1.0, 0))
        check.op.lo, check.op.hi = lo, hi
        answers.append(check())
        assert answers[-1] == (0 if lo < spread_of(x, scale) ** 2 <= hi else 2), measure
    assert answers[:2] == [0, 2] and (channels < 30 or answers[2] == 2)  # 30: the mean 5.5x under
    x[0, 5, channels - 1] = np.nan
    check.op.lo, check.op.hi = -np.inf, np.inf
    assert check() == 2
    with pytest.raises(ValueError):
        ops.compile_spread(x, PEAK_RATIO ** -2, scale[:-1])


@pytest.mark.parametrize("kind", ["LOGISTIC", "HARD_SWISH", "GELU", "GELU approximate"])
@pytest.mark.parametrize("size", [1, 15, 16, 17, 2019])
def test_smooth_activations_in_c_against_float64(kind, size):
    """LOGISTIC and HARD_SWISH as one call (a tail shorter than a vector too): within a few float32 epsilons
    of the exact result over the whole float range, infinities and NaN included; nothing written past."""
    rng = np.random.default_rng(size)
    extremes = [*EXTREMES, np.nan]
    values = np.concatenate([extremes, rng.normal(0, 4, size)])[-size:] if size < 20 else \
        np.concatenate([extremes, rng.normal(0, 4, size - len(extremes))])
    x = values.astype(np.float32)
    out = np.full(size + 3, 7.0, np.float32)
    kernel = ops.compile_smooth_activation(kind.split()[0], x, out[:size], approximate="approximate" in kind)
    assert kernel.c_call[1]
    kernel()
    got = out[:size].astype(np.float64)
    assert (out[size:] == 7.0).all()
    assert_smooth_result(kind, x, got)
    if kind == "LOGISTIC":  # below -88 exactly 0, as LiteRT's and the numpy form's (a review)
        assert (got[x < -88] == 0).all()


def test_the_vector_exp_reaches_its_subnormal_results():
    """exp's results down to 2^-149 through LOGISTIC's and GELU's tails: logistic(x) ~ exp(x) near -87.5
    (2^-126.2), where 2^n had no exponent bits for n = -127 and came out 0 (a review)."""
    x = np.linspace(-88.0, -87.0, 4001, dtype=np.float32)
    out = np.empty_like(x)
    ops.compile_smooth_activation("LOGISTIC", x, out)()
    want = 1 / (1 + np.exp(-x.astype(np.float64)))
    assert (out > 0).all()
    assert np.abs(out - want).max() <= 2 ** -149 * 4  # a few subnormal steps


EXTREMES = [-np.inf, -3.4e38, -200.0, -88.8, -87.0, -20.0, -3.0, -2.9, -1e-30, 0.0, 1e-30, 2.9, 3.0, 20.0,
            87.0, 88.8, 200.0, 3.4e38, np.inf]


def assert_smooth_result(kind: str, x: np.ndarray, got: np.ndarray) -> None:
    """``got``, the TA's ``kind`` ("LOGISTIC", "HARD_SWISH", "GELU", "GELU approximate") of the float32
    ``x``, is the exact result's float32 rounding: NaN and the infinities where it has them, else within 4
    float32 epsilons of it (of x's magnitude where the activation is x times a factor in [0, 1]: XNNPACK's
    HARD_SWISH cancels near x = -3, GELU's tail, near 0 far below -3, has its exponent's rounding)."""
    x, got = x.astype(np.float64).reshape(-1), np.asarray(got, np.float64).reshape(-1)
    want = _smooth(kind, x)
    assert np.array_equal(np.isnan(got), np.isnan(want))
    finite = np.isfinite(want)
    assert np.array_equal(got[~finite & ~np.isnan(want)], want[~finite & ~np.isnan(want)])
    scale = np.maximum(np.abs(want[finite]), 1e-30)  # a denormal result: absolutely within 1e-37
    if kind != "LOGISTIC":
        scale = np.maximum(scale, np.abs(x[finite]))
    assert (np.abs(got[finite] - want[finite]) / scale).max() <= 4 * np.finfo(np.float32).eps


def _smooth(kind: str, x: np.ndarray) -> np.ndarray:
    """The exact activation in float64."""
    with np.errstate(all="ignore"):
        if kind == "LOGISTIC":
            return 1 / (1 + np.exp(-x))
        if kind == "HARD_SWISH":
            return x * np.clip(x + 3, 0, 6) / 6
        if kind == "GELU":
            return x * (1 + np.frompyfunc(math.erf, 1, 1)(x / math.sqrt(2)).astype(np.float64)) / 2
        return x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3))) / 2


def test_smooth_activations_of_strided_views_are_left_to_numpy():
    x = np.zeros((4, 6), np.float32)
    assert ops.compile_smooth_activation("LOGISTIC", x[:, :3], np.zeros((4, 3), np.float32)) is None
    assert ops.compile_smooth_activation("TANH", x, np.zeros((4, 6), np.float32)) is None


@pytest.mark.parametrize("rows, d, m", [(1, 64, 10), (3, 37, 5), (2, 4096, 614), (1, 1, 1)])
def test_dense_against_float64(rows, d, m):
    """A dense layer the TEE computes (``LayerCheck.computing``): one kernel call, float32 lanes within the
    rounding of a float32 dot product of its length of float64's."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((rows, d)).astype(np.float32)
    w = rng.standard_normal((m, d)).astype(np.float32)
    y = np.full((rows, m), np.nan, np.float32)
    kernel = ops.compile_dense(x, w, y)
    assert kernel.c_call[1]
    kernel()
    want = x.astype(np.float64) @ w.astype(np.float64).T
    bound = 4 * d * np.finfo(np.float32).eps * (np.abs(x).astype(np.float64) @ np.abs(w).T.astype(np.float64))
    assert np.all(np.abs(y - want) <= bound)
    with pytest.raises(ValueError, match="dense"):
        ops.compile_dense(x, w.T.copy() if m != d else w[:, :-1], y)
