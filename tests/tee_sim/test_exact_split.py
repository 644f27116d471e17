"""The TA's side of the exact split (``tee_sim.exact_split``): the mask's halves, the push's halves and the
restore's combination, each exact where the scheme needs it."""

import numpy as np
import pytest

from converters import exact_split as converter_split
from converters import linear
from tee_sim import exact_split, one_time_masks
from tee_sim import ta_shadownet_restore_push as rp
from tee_sim.layer_geometry import geometry
from tee_sim.one_time_masks import MaskStream, PopMask, linear64
from tee_sim.ta_shadownet_kernels import runnable
from tests.tee_sim.test_restore_push import _model

GRID = 2.0 ** -4


def _mask(shape=(1, 6, 6, 3), std=10.0) -> np.ndarray:
    stream = MaskStream({"buffer": "b", "shape": list(shape), "std": std, "split": {"grid": GRID}},
                        np.array([0.5, -1.0, 2.0], np.float32), lambda s, d: np.zeros(s, d))
    r = np.empty(shape, np.float32)
    stream.draw(b"k" * 32, r)
    return r


def test_split_mask_keeps_every_bit():
    r = _mask()
    hi, lo = exact_split.split_mask(r, GRID)
    assert hi.dtype == lo.dtype == np.float32
    assert np.array_equal(hi.astype(np.float64) + lo, r.astype(np.float64))
    assert np.array_equal(hi / GRID, np.rint(hi / GRID)) and np.abs(lo).max() <= GRID / 2
    with pytest.raises(ValueError):  # a grid that is not a positive finite number is refused at load
        MaskStream({"buffer": "b", "shape": [1, 2, 2, 3], "std": 1.0, "split": {"grid": -1.0}},
                   np.zeros(3, np.float32), lambda s, d: np.zeros(s, d))


def _geometry(kind, x_shape, w_shape, same=True, stride=1, dilation=1):
    """The TA's geometry (``tee_sim.layer_geometry.Geometry``) of a layer, its output's size as LiteRT's."""
    if kind == "FULLY_CONNECTED":
        layer, y_shape = {"kind": kind}, (int(np.prod(x_shape)) // w_shape[1], w_shape[0])
    else:
        layer = {"kind": kind, "stride": [stride] * 2, "dilation": [dilation] * 2,
                 "padding": "SAME" if same else "VALID"}
        m = w_shape[0] if kind == "CONV_2D" else w_shape[3]
        y_shape = (x_shape[0], *(linear.padding(x_shape[1 + i], w_shape[1 + i], stride, dilation, same)[0]
                                 for i in range(2)), m)
    return geometry(layer, w_shape, x_shape, y_shape)


def _options():
    from types import SimpleNamespace

    from ai_edge_litert import schema_py_generated as fb
    return SimpleNamespace(padding=fb.Padding.SAME, strideH=1, strideW=1, dilationHFactor=1,
                           dilationWFactor=1)


@pytest.mark.parametrize("pad", [None, [[0, 0], [1, 1], [2, 0], [0, 0]]])
def test_push_sends_halves_that_add_up_to_the_masked_input(pad):
    """The push kernel's split: [x_hi | x_lo] into shared memory and its secure copy, the border (v = 0)
    included; x_hi on the grid, x_lo within half a step, and x_hi + x_lo = v + r up to one rounding of
    v + r_lo, at v's magnitude (not at the mask's)."""
    rng = np.random.default_rng(0)
    inner = (1, 6, 6, 3)
    shape = inner if pad is None else (1, 8, 8, 3)
    r = _mask(shape)
    hi, lo = exact_split.split_mask(r, GRID)
    v = rng.standard_normal(inner).astype(np.float32)
    arrays = {"m": r}
    instr = {"op": "push", "src": "slot:v", "dst": "shm:x", "mask": "m", "pad": pad, "permutation": None,
             "split": {"grid": GRID}}
    wire = (*shape[:-1], 6)
    model = _model(arrays, [instr], {"slot:v": inner, "shm:x": wire})
    dst, secure = np.full(wire, np.nan, np.float32), np.full(wire, np.nan, np.float32)
    rp.compile_push(model, instr, v, dst, secure_dst=secure)()
    assert np.array_equal(dst, secure)  # what was sent is what the check is prepared from
    x_hi, x_lo = dst[..., :3].astype(np.float64), dst[..., 3:].astype(np.float64)
    assert np.array_equal(x_hi / GRID, np.rint(x_hi / GRID)) and np.abs(x_lo).max() <= GRID / 2
    padded = np.zeros(shape)
    if pad:
        padded[:, 1:7, 2:8] = v
    else:
        padded[...] = v
    np.testing.assert_allclose(x_hi + x_lo, padded + r, rtol=0,
                               atol=2 * np.finfo(np.float32).eps * (np.abs(v).max() + GRID))
    if pad:  # the border carries the mask's halves exactly
        assert np.array_equal(dst[:, 0, :, :3], hi[:, 0]) and np.array_equal(dst[:, 0, :, 3:], lo[:, 0])
    # Inside, bit for bit the float32 arithmetic the kernel states.
    inside = dst[:, 1:7, 2:8] if pad else dst
    ri = r[:, 1:7, 2:8] if pad else r
    step, inverse = np.float32(GRID), np.float32(1 / GRID)
    high = np.rint(ri * inverse) * step
    w = v + (ri - high)
    q = np.rint(w * inverse) * step
    assert np.array_equal(inside[..., :3], high + q) and np.array_equal(inside[..., 3:], w - q)


def test_restore_pops_the_halves_before_restoring():
    """The restore kernel forms (y_hi - pop_hi) + (y_lo - pop_lo) before the scheme's restore: its result
    is L(v, W') restored, to float32's precision at v's magnitude (the mask's is 10x larger)."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((16, 3, 3, 3)).astype(np.float32)
    r = _mask()
    hi, lo = exact_split.split_mask(r, GRID)
    w2 = converter_split.split_weights("CONV_2D", w, converter_split.Split(GRID, 10))
    pop = np.empty((1, 6, 6, 32), np.float32)
    exact_split.SplitPop("w", _geometry("CONV_2D", (1, 6, 6, 6), w2.shape), "m", GRID).compute(r, w2, pop)
    # [pop_hi | pop_lo] = L([r_hi | r_lo], W2): the first half exact, the second to float32's rounding.
    both = np.concatenate([hi, lo], axis=-1).astype(np.float64)
    want_pop = linear.apply("CONV_2D", both, w2, _options(), (1, 6, 6, 32))
    np.testing.assert_array_equal(pop[..., :16], want_pop[..., :16])
    np.testing.assert_array_equal(pop[..., 16:], want_pop[..., 16:].astype(np.float32))
    # The accelerator's exact result for the halves of an input v (what LiteRT computes: y_hi exactly).
    v = rng.standard_normal(r.shape)
    x2 = np.concatenate([hi, v + lo], axis=-1).astype(np.float32)
    y2 = linear.apply("CONV_2D", x2.astype(np.float64), w2, _options(), (1, 6, 6, 32)).astype(np.float32)
    restore = rng.standard_normal((16, 16)).astype(np.float32)  # one dense 16 x 16 block
    arrays = {"i": np.repeat(np.arange(16, dtype=np.int32)[:, None], 16, axis=1), "c": restore,
              "o": np.zeros(16, np.float32), "p": pop}
    instr = {"op": "restore", "src": "shm:y", "dst": "slot:out", "index": "i", "coef": "c", "offset": "o",
             "pop": "p", "activation": None, "alpha": None}
    model = _model(arrays, [instr], {"shm:y": y2.shape, "slot:out": (1, 6, 6, 16)})
    out = np.full((1, 6, 6, 16), np.nan, np.float32)
    rp.compile_restore(model, instr, y2, out)()
    masked_input = x2[..., :3].astype(np.float64) - hi + x2[..., 3:] - lo  # v, as float32 carried it
    want = linear.apply("CONV_2D", masked_input, w, _options(), (1, 6, 6, 16)) @ restore.astype(np.float64)
    assert np.abs(out - want).max() <= 1e-6 * np.abs(want).max()
    with pytest.raises(ValueError, match="pop mask"):
        rp.compile_restore(model, instr, y2[..., :30], out[..., :15])


@pytest.mark.parametrize("build", list(runnable()))
@pytest.mark.parametrize("x_shape,w_shape,same,stride,dilation", [
    ((1, 17, 15, 3), (32, 3, 3, 3), True, 2, 1),  # MobileNet's first layer, smaller: 2 blocks of outputs
    ((2, 9, 9, 5), (13, 3, 3, 5), False, 1, 2),  # a tail of outputs, VALID, dilated, two images
    ((1, 8, 8, 16), (24, 5, 5, 16), True, 3, 1),
    ((1, 6, 6, 1), (40, 1, 1, 1), True, 1, 1),
    ((1, 2, 2, 4), (8, 7, 7, 4), True, 1, 1),  # taps more than twice the map apart
])
def test_pop_mask_of_a_split_conv_is_exact_on_every_build(x_shape, w_shape, same, stride, dilation, build,
                                                          monkeypatch):
    """``sn_pop`` against numpy in float64: pop_hi = L(r_hi, W'_hi) bit for bit, pop_lo = L(r, W') -
    pop_hi rounded once to float32; zero padding as LiteRT's."""
    from types import SimpleNamespace

    from ai_edge_litert import schema_py_generated as fb

    monkeypatch.setattr(one_time_masks, "LIBRARY", runnable()[build])
    rng = np.random.default_rng(w_shape[0])
    w = rng.standard_normal(w_shape).astype(np.float32)
    r = _mask(x_shape) if x_shape[-1] == 3 else (10 * rng.standard_normal(x_shape)).astype(np.float32)
    w2 = converter_split.split_weights("CONV_2D", w, converter_split.Split(GRID, 10))
    options = SimpleNamespace(padding=fb.Padding.SAME if same else fb.Padding.VALID, strideH=stride,
                              strideW=stride, dilationHFactor=dilation, dilationWFactor=dilation)
    hi, lo = exact_split.split_mask(r, GRID)
    both = np.concatenate([hi, lo], axis=-1).astype(np.float64)
    m = w_shape[0]
    probe = linear.conv2d(both, w2, options)
    want_hi = probe[..., :m]
    want_lo = (linear.conv2d(r.astype(np.float64), w, options) - want_hi).astype(np.float32)
    pop = np.full(probe.shape, np.nan, np.float32)
    geo = _geometry("CONV_2D", (*x_shape[:3], 2 * x_shape[3]), w2.shape, same, stride, dilation)
    exact_split.SplitPop("w", geo, "m", GRID).compute(r, w2, pop)
    np.testing.assert_array_equal(pop[..., :m], want_hi)
    np.testing.assert_allclose(pop[..., m:], want_lo, rtol=0, atol=2 * np.spacing(np.abs(want_lo).max()))
    with pytest.raises(ValueError, match="pop mask"):
        exact_split.SplitPop("w", geo, "m", GRID).compute(r, w2, pop[..., :-1].copy())


@pytest.mark.parametrize("build", list(runnable()))
@pytest.mark.parametrize("x_shape,w_shape,same,stride,dilation,permuted", [
    ((1, 17, 15, 3), (32, 3, 3, 3), True, 2, 1, False),  # yolov4-tiny's first layer, smaller
    ((2, 9, 9, 5), (13, 3, 3, 5), False, 1, 2, True),
    ((1, 6, 6, 1), (40, 1, 1, 1), True, 1, 1, True),
    ((1, 3, 3, 4), (8, 3, 3, 4), True, 1, 6, False),  # dilated as far as the TA takes (2 x 3)
])
@pytest.mark.parametrize("dense", [False, True])
def test_pop_mask_of_a_plain_one_time_conv_in_c(x_shape, w_shape, same, stride, dilation, permuted, build,
                                                dense, monkeypatch):
    """A plain (unsplit) one-time round's offset, ``bias - restore(L(r, W'))``, by ``sn_pop`` on the filters
    composed with the restore (term by term, or by the dense restore matrix a small layer has), against
    numpy's float64 (the path dense and depthwise layers take): both rounded once to float32 from double
    sums, so within two ulps of the largest offset."""
    from types import SimpleNamespace

    from ai_edge_litert import schema_py_generated as fb

    monkeypatch.setattr(one_time_masks, "LIBRARY", runnable()[build])
    rng = np.random.default_rng(w_shape[0] + 1)
    m = w_shape[0]
    w = rng.standard_normal(w_shape).astype(np.float32)
    r = (10 * rng.standard_normal(x_shape)).astype(np.float32)
    options = SimpleNamespace(padding=fb.Padding.SAME if same else fb.Padding.VALID, strideH=stride,
                              strideW=stride, dilationHFactor=dilation, dilationWFactor=dilation)
    y = linear.conv2d(r.astype(np.float64), w, options)
    n = m - 2  # the restore: two terms per output, from channels of the obfuscated output
    index = np.stack([rng.permutation(m)[:n], rng.permutation(m)[:n]]).astype(np.int32)
    coef = rng.standard_normal((2, n)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    permutation = rng.permutation(n).astype(np.int32) if permuted else None
    pop = PopMask("w", _geometry("CONV_2D", x_shape, w_shape, same, stride, dilation), "m", bias, index, coef,
                  permutation)
    restored = y[..., index[0]] * coef[0].astype(np.float64) + y[..., index[1]] * coef[1].astype(np.float64)
    want = bias.astype(np.float64) - restored
    if permuted:
        want = want[..., permutation]
    if dense:
        pop.dense(m, np.empty)
        assert pop.matrix is not None
    got = np.full((*y.shape[:-1], n), np.nan, np.float32)
    pop.compute(r, w, got)
    np.testing.assert_allclose(got, want.astype(np.float32), rtol=0,
                               atol=2 * np.spacing(np.float32(np.abs(want).max())))


@pytest.mark.parametrize("kind,x_shape,w_shape,same,stride,dilation", [
    ("DEPTHWISE_CONV_2D", (1, 9, 7, 4), (1, 3, 3, 4), True, 1, 1),
    ("DEPTHWISE_CONV_2D", (2, 10, 10, 3), (1, 3, 3, 6), True, 2, 1),  # multiplier 2, stride 2
    ("DEPTHWISE_CONV_2D", (1, 11, 9, 2), (1, 3, 5, 6), False, 1, 2),  # multiplier 3, VALID, dilated
    ("DEPTHWISE_CONV_2D", (1, 4, 4, 5), (1, 5, 5, 5), True, 3, 1),  # a kernel wider than the map
    ("DEPTHWISE_CONV_2D", (1, 2, 3, 4), (1, 7, 7, 8), True, 1, 1),  # taps more than twice the map apart
    ("FULLY_CONNECTED", (3, 20), (7, 20), True, 1, 1),
    ("FULLY_CONNECTED", (1, 2, 2, 5), (4, 20), True, 1, 1),  # a map flattened into the layer
])
def test_the_tees_float64_layers_agree_with_the_converters(kind, x_shape, w_shape, same, stride, dilation):
    """``linear64``, the TA's own float64 depthwise and dense layers (the pop masks of those one-time
    rounds), against the converter's independent ``converters.linear`` to float64 rounding."""
    from types import SimpleNamespace

    from ai_edge_litert import schema_py_generated as fb

    rng = np.random.default_rng(sum(x_shape) + sum(w_shape))
    x = (10 * rng.standard_normal(x_shape)).astype(np.float32)
    w = rng.standard_normal(w_shape).astype(np.float32)
    geo = _geometry(kind, x_shape, w_shape, same, stride, dilation)
    options = SimpleNamespace(padding=fb.Padding.SAME if same else fb.Padding.VALID, strideH=stride,
                              strideW=stride, dilationHFactor=dilation, dilationWFactor=dilation)
    want = linear.apply(kind, x.astype(np.float64), w, options, geo.y_shape)
    got = linear64(geo, x, w)
    assert got.dtype == np.float64 and got.shape == want.shape == geo.y_shape
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12 * np.abs(want).max())
    with pytest.raises(ValueError, match="input"):
        linear64(geo, x[..., :-1], w)


def test_an_unsplit_dense_layers_float64_product_widens_a_slice_of_its_weights_at_a_time(monkeypatch):
    """``linear64`` on a dense layer (an unsplit one-time round's pop mask: MiniVGG's 4096 x 512 layer under
    the default since stop 58) widens its weights to float64 ``DENSE_SLICE`` bytes at a time: whole, they
    took 16 MB outside the secure world's account at every pop mask. The same product, in one slice or many;
    the peak of what it allocates (numpy reports to tracemalloc) well under the whole copy."""
    import tracemalloc

    from tee_sim import one_time_masks

    m, k = 64, 20_000
    rng = np.random.default_rng(5)
    w = rng.standard_normal((m, k)).astype(np.float32)
    x = (10 * rng.standard_normal((2, k))).astype(np.float32)
    want = x.astype(np.float64) @ w.T.astype(np.float64)
    geo = _geometry("FULLY_CONNECTED", x.shape, w.shape)
    for slice_bytes in (one_time_masks.DENSE_SLICE, 8 * m * 7):
        monkeypatch.setattr(one_time_masks, "DENSE_SLICE", slice_bytes)
        tracemalloc.start()
        try:
            got = linear64(geo, x, w)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12 * np.abs(want).max())
        assert peak < 8 * m * k / 4, peak  # the whole copy: 10 MB


@pytest.mark.parametrize("rows", [1, 3])
def test_pop_mask_of_a_split_dense_layer_a_slice_of_its_weights_at_a_time(rows, monkeypatch):
    """A dense layer's pop mask is made widening its weights to float64 a slice at a time (whole, they took
    4x the layer's weights of uncounted memory at each refill): pop_hi = L(r_hi, W'_hi) bit for bit,
    pop_lo = L(r, W') - pop_hi rounded once to float32, in one slice or in many."""
    k, m = 1000, 24
    rng = np.random.default_rng(rows)
    w = (rng.standard_normal((m, k)) * 0.05).astype(np.float32)
    r = (10 * rng.standard_normal((rows, k))).astype(np.float32)
    w2 = converter_split.split_weights("FULLY_CONNECTED", w, converter_split.Split(GRID, 10))
    hi, _ = exact_split.split_mask(r, GRID)
    want_hi = hi.astype(np.float64) @ w2[:m, :k].T.astype(np.float64)
    want_lo = (r.astype(np.float64) @ w.T.astype(np.float64) - want_hi).astype(np.float32)
    geo = _geometry("FULLY_CONNECTED", (rows, 2 * k), w2.shape)
    for slice_bytes in (one_time_masks.DENSE_SLICE, 8 * m * 7):  # one slice; slices of 7 rows of the weights
        monkeypatch.setattr(one_time_masks, "DENSE_SLICE", slice_bytes)
        pop = np.full((rows, 2 * m), np.nan, np.float32)
        exact_split.SplitPop("w", geo, "m", GRID).compute(r, w2, pop)
        np.testing.assert_array_equal(pop[:, :m], want_hi)
        np.testing.assert_allclose(pop[:, m:], want_lo, rtol=0, atol=2 * np.spacing(np.abs(want_lo).max()))


@pytest.mark.parametrize("delta", [7, -3])
def test_a_split_pop_mask_scales_bit_for_bit_with_its_mask_and_grid(delta):
    """Round 1's mask follows its input's spread by a power of two (``tee_sim.per_inference``), scaling an
    entry's split pop mask in place: the same bits as the pop mask made for the scaled mask on the scaled
    grid."""
    x_shape, w_shape = (1, 9, 9, 3), (8, 3, 3, 3)
    rng = np.random.default_rng(5)
    w = rng.standard_normal(w_shape).astype(np.float32)
    r = _mask(x_shape)
    w2 = converter_split.split_weights("CONV_2D", w, converter_split.Split(GRID, 10))
    geo = _geometry("CONV_2D", (*x_shape[:3], 6), w2.shape, True, 1, 1)
    pop = exact_split.SplitPop("w", geo, "m", GRID)
    made, scaled = (np.empty((1, 9, 9, 16), np.float32) for _ in range(2))
    pop.compute(r, w2, made)
    factor = np.float32(2.0 ** delta)
    pop.compute(r * factor, w2, scaled, grid=GRID * 2.0 ** delta)
    np.testing.assert_array_equal(made * factor, scaled)


@pytest.mark.parametrize("kind,x_shape,w_shape", [
    ("CONV_2D", (1, 9, 9, 3), (10, 3, 3, 3)),
    ("DEPTHWISE_CONV_2D", (1, 9, 9, 3), (1, 3, 3, 6)),
    ("FULLY_CONNECTED", (1, 20), (10, 20)),
])
@pytest.mark.parametrize("delta", [-7, -3])
def test_a_plain_offset_rescaled_in_place_is_the_scaled_masks(kind, x_shape, w_shape, delta):
    """``PopMask.rescale``: an unsplit round's offset ``bias - L(r)`` moved down to ``bias - 2**delta L(r)``
    in place, within two ulps of the largest offset of the one made for the scaled mask. Up it refuses: the
    offset's rounding would grow with it (``tee_sim.mask_spread`` makes such an offset again)."""
    rng = np.random.default_rng(len(w_shape) - delta)
    w = rng.standard_normal(w_shape).astype(np.float32)
    r = (10 * rng.standard_normal(x_shape)).astype(np.float32)
    m = w_shape[0] if kind != "DEPTHWISE_CONV_2D" else w_shape[-1]
    n = m - 2
    index = np.stack([rng.permutation(m)[:n], rng.permutation(m)[:n]]).astype(np.int32)
    coef = rng.standard_normal((2, n)).astype(np.float32)
    bias = (100 * rng.standard_normal(n)).astype(np.float32)  # large: the bias must not be scaled
    geo = _geometry(kind, x_shape, w_shape)
    y_shape = geo.y_shape
    pop = PopMask("w", geo, "m", bias, index, coef, rng.permutation(n).astype(np.int32))
    offset, want = (np.empty((*y_shape[:-1], n), np.float32) for _ in range(2))
    pop.compute(r, w, offset)
    factor = 2.0 ** delta
    pop.rescale(offset, factor)
    pop.compute(r * np.float32(factor), w, want)
    np.testing.assert_allclose(offset, want, rtol=0, atol=2 * np.spacing(np.abs(want).max()))
    with pytest.raises(ValueError, match="down only"):
        pop.rescale(offset, 2.0)


@pytest.mark.parametrize("runs", [1, 2])
@pytest.mark.parametrize("split", [False, True])
def test_a_refills_batch_of_dense_pop_masks_is_each_masks_own(split, runs, monkeypatch):
    """``compute_many``: a refill makes a dense layer's pop masks for its whole batch of entries in one pass
    over the weights (each widened once, not once per entry: MiniVGG's 4096 x 512 layer). Each entry's pop
    mask as numpy's float64 and ``compute`` alone make it - a split's ``pop_hi`` bit for bit on each entry's
    own grid (its mask's power of two), the rest within two ulps - and a mask of the wrong shape refused;
    in one product per block of weights, or in runs of masks where they would stack past ``DENSE_SLICE``."""
    from tee_sim import one_time_masks

    k, m, n = 300, 24, 22
    products = []
    widened = one_time_masks.widened_product
    monkeypatch.setattr(exact_split, "widened_product", lambda *a: products.append(1) or widened(*a))
    monkeypatch.setattr(one_time_masks, "widened_product", lambda *a: products.append(1) or widened(*a))
    if runs > 1:
        monkeypatch.setattr(one_time_masks, "DENSE_SLICE", 2 * 8 * k)  # two masks' rows a run
    rng = np.random.default_rng(11 + split)
    w = (rng.standard_normal((m, k)) * 0.05).astype(np.float32)
    exponents = [0, 3, -2]
    masks = [(10 * 2.0 ** e * rng.standard_normal((1, k))).astype(np.float32) for e in exponents]
    if split:
        w2 = converter_split.split_weights("FULLY_CONNECTED", w, converter_split.Split(GRID, 10))
        pop = exact_split.SplitPop("w", _geometry("FULLY_CONNECTED", (1, 2 * k), w2.shape), "m", GRID)
        grids = [GRID * 2.0 ** e for e in exponents]
        together = [np.full((1, 2 * m), np.nan, np.float32) for _ in masks]
        pop.compute_many(masks, w2, together, pop.prepare(w2), grids)
        assert len(products) == 2 * runs  # W'_hi's and W''s, once a run
        for r, many, grid in zip(masks, together, grids, strict=True):
            want_hi = exact_split.split_mask(r, grid)[0].astype(np.float64) @ w2[:m, :k].T.astype(np.float64)
            want_lo = (r.astype(np.float64) @ w.T.astype(np.float64) - want_hi).astype(np.float32)
            np.testing.assert_array_equal(many[:, :m], want_hi)
            np.testing.assert_allclose(many[:, m:], want_lo, rtol=0,
                                       atol=2 * np.spacing(np.abs(want_lo).max()))
            alone = np.empty((1, 2 * m), np.float32)
            pop.compute(r, w2, alone, grid=grid)
            np.testing.assert_array_equal(alone[:, :m], many[:, :m])
        return
    index = np.stack([rng.permutation(m)[:n], rng.permutation(m)[:n]]).astype(np.int32)
    coef = rng.standard_normal((2, n)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    pop = PopMask("w", _geometry("FULLY_CONNECTED", (1, k), w.shape), "m", bias, index, coef,
                  rng.permutation(n).astype(np.int32))
    alone = [np.empty((1, n), np.float32) for _ in masks]
    for r, out in zip(masks, alone, strict=True):
        pop.compute(r, w, out)
    together = [np.full((1, n), np.nan, np.float32) for _ in masks]
    products.clear()
    pop.compute_many(masks, w, together)
    assert len(products) == runs
    for one, many in zip(alone, together, strict=True):
        np.testing.assert_allclose(many, one, rtol=0, atol=2 * np.spacing(np.abs(one).max()))
    with pytest.raises(ValueError, match="FULLY_CONNECTED: input"):
        pop.compute_many([masks[0], masks[1][:, :-1]], w, together)
