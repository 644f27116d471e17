"""The TA's restore / push kernel (``tee_sim.ta_shadownet_restore_push``, its linear maps
``tee_sim.ta_shadownet_linears`` and its C ``sn_run``), instruction by instruction, against a float64
numpy reference: every form of the restore (gather, scale, dense matrix, blocks of any width, with a
permutation), every activation, the input mixings, masks, padded and strided destinations."""

from types import SimpleNamespace

import numpy as np
import pytest

from tee_sim import ta_shadownet_linears as linears
from tee_sim import ta_shadownet_restore_push as rp
from tee_sim.ta_shadownet_kernels import runnable

BUILDS = runnable()

ACTIVATIONS = {None: lambda v: v, "RELU": lambda v: np.maximum(v, 0), "RELU6": lambda v: np.clip(v, 0, 6),
               "RELU_N1_TO_1": lambda v: np.clip(v, -1, 1),
               "LEAKY_RELU": lambda v: np.where(v > 0, v, 0.2 * v)}


@pytest.fixture(autouse=True, params=list(BUILDS))
def kernels(request, monkeypatch):
    """Every test on each build of the kernels this CPU runs (setup.py builds one per vector width)."""
    monkeypatch.setattr(rp, "LIBRARY", BUILDS[request.param])


def _alloc(shape, dtype):
    return np.zeros(shape, dtype)


def _model(arrays: dict, steps: list, shapes: dict):
    """A loaded model as the TA makes it: scratch sized and linears prepared for ``steps``."""
    model = SimpleNamespace(arrays=arrays, restores={}, mixings={})
    model.stride, model.tile, size = rp.scratch_size([steps], arrays, lambda ref: shapes[ref])
    model.scratch = np.zeros(size, np.float32)
    shared = {name[4:]: {"shape": list(shape)} for name, shape in shapes.items() if name.startswith("shm:")}
    linears.prepare_linears(model, [steps], shared, _alloc)
    return model


def _gather(rng, k: int, m: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    return rng.integers(0, m, (k, n)).astype(np.int32), rng.standard_normal((k, n)).astype(np.float32)


def _blocks(rng, widths_in: list[int], widths_out: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """A block-diagonal restore as the schemes write it: output block b reads only source block b."""
    k = max(widths_in)
    n = sum(widths_out)
    index, coef = np.zeros((k, n), np.int32), np.zeros((k, n), np.float32)
    src, dst = 0, 0
    for wi, wo in zip(widths_in, widths_out, strict=True):
        index[:wi, dst:dst + wo] = np.arange(src, src + wi)[:, None]
        index[wi:, dst:dst + wo] = src  # padding terms with coefficient 0
        coef[:wi, dst:dst + wo] = rng.standard_normal((wi, wo))
        src, dst = src + wi, dst + wo
    return index, coef


def _apply(x: np.ndarray, index: np.ndarray, coef: np.ndarray) -> np.ndarray:
    return sum(coef[j].astype(np.float64) * x[..., index[j]].astype(np.float64) for j in range(len(index)))


RESTORES = {
    "gather": lambda rng: (_gather(rng, 2, 80, 64), 80),  # the paper's scheme: two terms
    "scale": lambda rng: ((np.arange(48, dtype=np.int32)[None], rng.standard_normal((1, 48)).astype(
        np.float32)), 48),  # a depthwise layer's scales
    "scale_odd": lambda rng: ((np.arange(37, dtype=np.int32)[None], rng.standard_normal((1, 37)).astype(
        np.float32)), 37),  # two vectors and five channels one by one
    "dense": lambda rng: (_gather(rng, 3, 19, 16), 19),  # small: one matrix
    "blocks16": lambda rng: (_blocks(rng, [16] * 4, [16] * 4), 64),
    "blocks_odd": lambda rng: (_blocks(rng, [15, 15, 16, 20, 40], [15, 15, 16, 20, 40]), 106),
    "blocks_fakes": lambda rng: (_blocks(rng, [16, 16, 12] * 2, [12, 16, 8] * 2), 88),  # more sources
}
# The form prepare_linears must choose for each (so that every path of the kernel is run).
KINDS = {"gather": linears.SN_GATHER, "scale": linears.SN_SCALE, "scale_odd": linears.SN_SCALE,
         "dense": linears.SN_BLOCKS, "blocks16": linears.SN_BLOCKS, "blocks_odd": linears.SN_BLOCKS,
         "blocks_fakes": linears.SN_BLOCKS}
BLOCKS = {"dense": 1, "blocks16": 4, "blocks_odd": 5, "blocks_fakes": 6}


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("form", list(RESTORES))
def test_restore_matches_the_reference(form, activation):
    rng = np.random.default_rng(len(form) * 7 + len(str(activation)))
    (index, coef), m = RESTORES[form](rng)
    n = index.shape[1]
    shape = (1, 5, 7)
    y = rng.standard_normal((*shape, m)).astype(np.float32)
    # A residual block's shortcut, added before the activation: a slice of a wider tensor (strided).
    shortcut = rng.standard_normal((*shape, n + 5)).astype(np.float32)[..., 3:3 + n]
    for per_channel, addend in ((True, None), (False, None), (True, shortcut), (False, shortcut)):
        offset = rng.standard_normal(n if per_channel else (*shape, n)).astype(np.float32)
        arrays = {"i": index, "c": coef, "o": offset}
        instr = {"op": "restore", "src": "shm:y", "dst": "slot:out", "index": "i", "coef": "c", "offset": "o",
                 "activation": activation, "alpha": 0.2 if activation == "LEAKY_RELU" else None}
        shapes = {"shm:y": y.shape, "slot:out": (*shape, n)}
        model = _model(arrays, [instr], shapes)
        assert model.restores["o"].kind == KINDS[form]
        if form in BLOCKS:
            assert len(model.restores["o"].blocks) == BLOCKS[form]
        out = np.full((*shape, n), np.nan, np.float32)
        rp.compile_restore(model, instr, y, out, addend=addend)()
        want = ACTIVATIONS[activation](_apply(y, index, coef) + offset + (0 if addend is None else addend))
        assert np.abs(out - want).max() <= 1e-5 * max(1.0, np.abs(want).max()), (form, per_channel)


@pytest.mark.parametrize("mixing", ["blocks", "scattered", "gather", "none", "permutation"])
@pytest.mark.parametrize("masked", [True, False])
def test_restore_fused_with_the_next_push(mixing, masked):
    """Restored, activated, mixed (or permuted), masked and zero-padded into the next round's buffer."""
    rng = np.random.default_rng(3)
    (index, coef), m = RESTORES["blocks_odd"](rng)
    n = index.shape[1]
    arrays = {"i": index, "c": coef, "o": rng.standard_normal(n).astype(np.float32)}
    instr = {"op": "restore", "src": "shm:y", "dst": "shm:x", "index": "i", "coef": "c", "offset": "o",
             "activation": "RELU", "alpha": None, "mask": "mask" if masked else None,
             "pad": [[0, 0], [1, 1], [2, 0], [0, 0]], "permutation": None}
    if mixing == "blocks":
        arrays["ii"], arrays["ic"] = _blocks(rng, [16] * 6 + [10], [16] * 6 + [10])
    elif mixing == "scattered":  # each block's sources spread over the channels: one gather first
        order = rng.permutation(n).astype(np.int32)
        bi, bc = _blocks(rng, [16] * 6 + [10], [16] * 6 + [10])
        arrays["ii"], arrays["ic"] = order[bi], bc
    elif mixing == "gather":  # no block structure
        arrays["ii"], arrays["ic"] = _gather(rng, 3, n, n)
    elif mixing == "permutation":  # the paper's scheme before a depthwise layer
        arrays["p"] = rng.permutation(n).astype(np.int32)
        instr["permutation"] = "p"
    if mixing in ("blocks", "scattered", "gather"):
        instr["input_index"], instr["input_coef"] = "ii", "ic"
    y = rng.standard_normal((1, 6, 5, m)).astype(np.float32)
    x_shape = (1, 8, 7, n)
    arrays["mask"] = rng.standard_normal(x_shape).astype(np.float32)
    model = _model(arrays, [instr], {"shm:y": y.shape, "shm:x": x_shape})
    if "input_index" in instr:
        mix = model.mixings["ii"]
        want_form = {"blocks": (linears.SN_BLOCKS, False), "gather": (linears.SN_GATHER, False),
                     "scattered": (linears.SN_BLOCKS, True)}[mixing]
        assert (mix.kind, mix.order is not None) == want_form
    x = np.full(x_shape, np.nan, np.float32)
    rp.compile_restore(model, instr, y, x)()
    if instr["permutation"]:
        restored = _apply(y, index[:, arrays["p"]], coef[:, arrays["p"]]) + arrays["o"]
    else:
        restored = _apply(y, index, coef) + arrays["o"]
    pushed = np.maximum(restored, 0)
    if "input_index" in instr:
        pushed = _apply(pushed, arrays["ii"], arrays["ic"])
    want = np.zeros(x_shape)
    want[:, 1:7, 2:] = pushed
    if masked:
        want += arrays["mask"]
    assert np.abs(x - want).max() <= 1e-5 * np.abs(want).max()


@pytest.mark.parametrize("form", ["blocks_odd", "gather", "scale_odd"])
def test_a_restore_measures_the_spread_its_fused_push_follows(form):
    """A restore whose fused push's mask follows its input (``tee_sim.mask_spread``) measures the restored
    tensor's squared spread - the larger of its mean square and its largest square over PEAK_RATIO^2 - as
    it makes it, and answers SPREAD_OUTSIDE when that leaves the mask's band; it writes the masked tensor
    either way, and an input it cannot measure (NaN) is outside every band."""
    from tee_sim.mask_spread import PEAK_RATIO

    rng = np.random.default_rng(5)
    (index, coef), m = RESTORES[form](rng)
    n = index.shape[1]
    arrays = {"i": index, "c": coef, "o": rng.standard_normal(n).astype(np.float32),
              "mask": rng.standard_normal((1, 6, 5, n)).astype(np.float32)}
    instr = {"op": "restore", "src": "shm:y", "dst": "shm:x", "index": "i", "coef": "c", "offset": "o",
             "activation": None, "alpha": None, "mask": "mask", "pad": None, "permutation": None}
    model = _model(arrays, [instr], {"shm:y": (1, 6, 5, m), "shm:x": (1, 6, 5, n)})
    for case in ("dense", "peaked", "nan"):
        y = rng.standard_normal((1, 6, 5, m)).astype(np.float32)
        if case == "peaked":  # one channel far above the rest: its peak decides
            y *= np.float32(1e-3)
            arrays["o"][:] = 0
            arrays["o"][n // 2] = 50.0
        if case == "nan":  # (a fused RELU would make it 0)
            y[0, 2, 3, :] = np.nan
        restored = _apply(y, index, coef) + arrays["o"]
        want = max(float(np.mean(restored ** 2)), float(np.max(restored ** 2)) / PEAK_RATIO ** 2)
        measure = np.array([0.0, np.inf, PEAK_RATIO ** -2, -1.0])
        x = np.full((1, 6, 5, n), np.nan, np.float32)
        kernel = rp.compile_restore(model, instr, y, x, spread=measure)
        if case == "nan":
            assert kernel() == rp.SPREAD_OUTSIDE and np.isnan(measure[3])
            continue
        assert kernel() == rp.DONE and measure[3] == pytest.approx(want, rel=1e-5)
        assert np.abs(x - (restored + arrays["mask"])).max() <= 1e-5 * np.abs(restored).max()
        for lo, hi in ((want * 1.01, np.inf), (0.0, want * 0.99)):  # just below, just above the band
            measure[:2] = lo, hi
            x[:] = np.nan
            assert kernel() == rp.SPREAD_OUTSIDE
            assert np.abs(x - (restored + arrays["mask"])).max() <= 1e-5 * np.abs(restored).max()


def test_a_residual_restore_fused_with_a_mixing_push():
    """Restored, the shortcut added, activated, mixed and masked into the next round's buffer; with a
    permutation instead (its channel order is not the shortcut's) the restore is refused."""
    rng = np.random.default_rng(11)
    (index, coef), m = RESTORES["blocks16"](rng)
    n = index.shape[1]
    arrays = {"i": index, "c": coef, "o": rng.standard_normal(n).astype(np.float32), "p": rng.permutation(n)}
    arrays["ii"], arrays["ic"] = _blocks(rng, [16] * 4, [16] * 4)
    instr = {"op": "restore", "src": "shm:y", "dst": "shm:x", "index": "i", "coef": "c", "offset": "o",
             "activation": "RELU", "alpha": None, "mask": "mask", "pad": None, "permutation": None,
             "input_index": "ii", "input_coef": "ic"}
    y = rng.standard_normal((1, 6, 5, m)).astype(np.float32)
    shortcut = rng.standard_normal((1, 6, 5, n)).astype(np.float32)
    arrays["mask"] = rng.standard_normal((1, 6, 5, n)).astype(np.float32)
    model = _model(arrays, [instr], {"shm:y": y.shape, "shm:x": (1, 6, 5, n)})
    x = np.full((1, 6, 5, n), np.nan, np.float32)
    rp.compile_restore(model, instr, y, x, addend=shortcut)()
    want = _apply(np.maximum(_apply(y, index, coef) + arrays["o"] + shortcut, 0), arrays["ii"], arrays["ic"])
    want += arrays["mask"]
    assert np.abs(x - want).max() <= 1e-5 * np.abs(want).max()
    with pytest.raises(ValueError, match="addend"):
        rp.compile_restore(model, {**instr, "permutation": "p", "input_index": None}, y, x, addend=shortcut)
    with pytest.raises(ValueError, match="addend"):
        rp.compile_restore(model, instr, y, x, addend=shortcut[..., :-1])


@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("transform", ["plain", "permutation", "mixing"])
def test_push_into_a_padded_buffer(transform, masked):
    """Unmasked, the mixing's blocks store straight into the buffer's pixels (no tile copy)."""
    rng = np.random.default_rng(4)
    c = 32
    src = rng.standard_normal((1, 4, 6, c)).astype(np.float32)
    dst_shape = (1, 6, 8, c)
    arrays = {"mask": rng.standard_normal(dst_shape).astype(np.float32)}
    instr = {"op": "push", "src": "slot:x", "dst": "shm:x", "mask": "mask" if masked else None,
             "pad": [[0, 0], [1, 1], [1, 1], [0, 0]], "permutation": None}
    want = src.astype(np.float64)
    if transform == "permutation":
        arrays["p"] = rng.permutation(c).astype(np.int32)
        instr["permutation"] = "p"
        want = want[..., arrays["p"]]
    elif transform == "mixing":
        arrays["ii"], arrays["ic"] = _blocks(rng, [16, 16], [16, 16])
        instr["input_index"], instr["input_coef"] = "ii", "ic"
        want = _apply(src, arrays["ii"], arrays["ic"])
    model = _model(arrays, [instr], {"slot:x": src.shape, "shm:x": dst_shape})
    dst = np.full(dst_shape, np.nan, np.float32)
    rp.compile_push(model, instr, src, dst)()
    full = np.zeros(dst_shape)
    full[:, 1:5, 1:7] = want
    if masked:
        full += arrays["mask"]
    assert np.abs(dst - full).max() <= 1e-5 * np.abs(full).max()


@pytest.mark.parametrize("form", ["blocks16", "blocks_odd", "blocks_fakes", "scale_odd", "dense"])
def test_restore_into_a_concatenation_slice_and_a_dense_output(form):
    """A strided destination (a slice of the channels of a concatenation) and a [1, N] dense output. The
    forms that write exactly their channels store straight into the slice; those whose last block's
    vector spills past it go through a tile: either way nothing outside the slice changes."""
    rng = np.random.default_rng(5)
    (index, coef), m = RESTORES[form](rng)
    n = index.shape[1]
    arrays = {"i": index, "c": coef, "o": rng.standard_normal(n).astype(np.float32)}
    instr = {"op": "restore", "src": "shm:y", "dst": f"slot:cat@3:16:{16 + n}", "index": "i", "coef": "c",
             "offset": "o", "activation": "RELU6", "alpha": None}
    y = rng.standard_normal((1, 3, 4, m)).astype(np.float32)
    model = _model(arrays, [instr], {"shm:y": y.shape, f"slot:cat@3:16:{16 + n}": (1, 3, 4, n)})
    concat = np.full((1, 3, 4, n + 32), 7.0, np.float32)
    rp.compile_restore(model, instr, y, concat[..., 16:16 + n])()
    want = np.clip(_apply(y, index, coef) + arrays["o"], 0, 6)
    assert np.abs(concat[..., 16:16 + n] - want).max() <= 1e-5 * max(1.0, np.abs(want).max())
    assert np.all(concat[..., :16] == 7) and np.all(concat[..., 16 + n:] == 7)  # nothing outside the slice
    (index, coef), m = RESTORES["gather"](rng)
    n = index.shape[1]
    arrays = {"i": index, "c": coef, "o": rng.standard_normal(n).astype(np.float32)}
    instr.update(dst="slot:logits", activation=None)
    y = rng.standard_normal((1, m)).astype(np.float32)
    model = _model(arrays, [instr], {"shm:y": y.shape, "slot:logits": (1, n)})
    out = np.zeros((1, n), np.float32)
    rp.compile_restore(model, instr, y, out)()
    assert np.abs(out - (_apply(y, index, coef) + arrays["o"])).max() <= 1e-5 * np.abs(out).max()


def test_inconsistent_instructions_are_refused():
    rng = np.random.default_rng(6)
    (index, coef), m = RESTORES["blocks16"](rng)
    arrays = {"i": index, "c": coef, "o": np.zeros(64, np.float32)}
    instr = {"op": "restore", "src": "shm:y", "dst": "slot:out", "index": "i", "coef": "c", "offset": "o",
             "activation": "TANH", "alpha": None}
    model = _model(arrays, [instr], {"shm:y": (1, 2, 2, m), "slot:out": (1, 2, 2, 64)})
    y, out = np.zeros((1, 2, 2, m), np.float32), np.zeros((1, 2, 2, 64), np.float32)
    with pytest.raises(ValueError, match="cannot be fused"):
        rp.compile_restore(model, instr, y, out)
    instr["activation"] = "RELU"
    with pytest.raises(ValueError, match="inconsistent"):
        rp.compile_restore(model, instr, y, np.zeros((1, 2, 3, 64), np.float32))  # other pixels
    with pytest.raises(ValueError, match="inconsistent"):
        rp.compile_restore(model, instr, np.zeros((1, 2, 2, m + 1), np.float32), out)  # other channels
    with pytest.raises(ValueError):
        linears.gather_linear(np.array([[0, 70]], np.int32), np.ones((1, 2), np.float32), 64, _alloc)


def test_a_verified_restore_checks_each_tile_before_using_it():
    """The check of an accelerator's result made inside the restore's pass (tee_sim.freivalds): an honest
    result is restored; a changed one fails before any value of the changed tile reaches the output."""
    from tee_sim.freivalds import LayerCheck

    rng = np.random.default_rng(7)
    layer = {"kind": "CONV_2D", "padding": "SAME", "stride": [1, 1], "dilation": [1, 1]}
    w = rng.standard_normal((16, 1, 1, 16)).astype(np.float32)
    x = (10 * rng.standard_normal((1, 6, 40, 16))).astype(np.float32)
    y = (x.astype(np.float64) @ w[:, 0, 0, :].T.astype(np.float64)).astype(np.float32)  # the honest result
    check = LayerCheck(layer, w, x.shape, y.shape, _alloc, projections=4)
    check.bind_scratch(np.zeros(check.scratch_elements, np.float32))
    u, f = (np.zeros(shape, np.float32) for shape in check.projection_shapes())
    check.draw(rng, u, f, w)
    check.prepare(x, u, f)
    (index, coef), m = RESTORES["blocks16"](rng)
    arrays = {"i": index[:, :16], "c": coef[:, :16], "o": np.zeros(16, np.float32)}
    instr = {"op": "restore", "src": "shm:y", "dst": "slot:out", "index": "i", "coef": "c", "offset": "o",
             "activation": None, "alpha": None}
    model = _model(arrays, [instr], {"shm:y": y.shape, "slot:out": y.shape})
    failures = []
    fused = check.fused(u)
    out = np.full(y.shape, np.nan, np.float32)
    run = rp.compile_restore(model, instr, y, out, check=fused, on_fail=lambda: failures.append(1))
    run()
    worst, _ = check.outcome(fused)
    assert not failures and worst < 0.5
    assert np.abs(out - _apply(y, arrays["i"], arrays["c"])).max() <= 1e-4 * np.abs(out).max()
    changed = y.copy()
    changed[0, 5, 39, 3] += np.float32(1e-3 * np.linalg.norm(y))  # the last pixel: the last tile
    out[...] = np.nan
    fused = check.fused(u)
    rp.compile_restore(model, instr, changed, out, check=fused, on_fail=lambda: failures.append(1))()
    assert failures == [1] and check.outcome(fused)[0] > 1
    tile = model.tile
    assert np.isnan(out[0, 5, 40 - (40 % tile or tile):]).all()  # the failing tile: nothing written
    assert not np.isnan(out[0, :5]).any()  # the tiles before it, checked, were restored


def test_a_push_writes_its_secure_copy_with_the_shared_buffer():
    rng = np.random.default_rng(8)
    src = rng.standard_normal((1, 4, 6, 32)).astype(np.float32)
    dst_shape = (1, 6, 8, 32)
    arrays = {"mask": rng.standard_normal(dst_shape).astype(np.float32)}
    arrays["ii"], arrays["ic"] = _blocks(rng, [16, 16], [16, 16])
    instr = {"op": "push", "src": "slot:x", "dst": "shm:x", "mask": "mask", "input_index": "ii",
             "input_coef": "ic", "pad": [[0, 0], [1, 1], [1, 1], [0, 0]], "permutation": None}
    model = _model(arrays, [instr], {"slot:x": src.shape, "shm:x": dst_shape})
    shared, secure = np.full(dst_shape, np.nan, np.float32), np.full(dst_shape, np.nan, np.float32)
    rp.compile_push(model, instr, src, shared, secure_dst=secure)()
    assert not np.isnan(shared).any() and np.array_equal(secure, shared)


def test_a_restore_wider_than_the_stacked_bias_takes_the_unfused_path():
    """Per-channel offsets of more than 16384 channels are not copied to the kernel's stack: the restore
    adds them in a pass of its own, with the same result."""
    rng = np.random.default_rng(8)
    index, coef = _blocks(rng, [16] * 1030, [16] * 1030)
    n = index.shape[1]
    assert n > 16384
    arrays = {"i": index, "c": coef, "o": rng.standard_normal(n).astype(np.float32)}
    instr = {"op": "restore", "src": "shm:y", "dst": "slot:out", "index": "i", "coef": "c", "offset": "o",
             "activation": "RELU", "alpha": None}
    y = rng.standard_normal((1, 1, 2, n)).astype(np.float32)
    model = _model(arrays, [instr], {"shm:y": y.shape, "slot:out": (1, 1, 2, n)})
    out = np.full((1, 1, 2, n), np.nan, np.float32)
    rp.compile_restore(model, instr, y, out)()
    want = np.maximum(_apply(y, index, coef) + arrays["o"], 0)
    assert np.abs(out - want).max() <= 1e-5 * np.abs(want).max()


def test_a_narrow_step_takes_longer_tiles_than_the_models_widest():
    """Each step's tiles are as wide as its own channels need: beside a 1024-channel step (7 pixels a tile),
    a 64-channel restore runs tiles of ~90 pixels within the same scratch, and still matches."""
    rng = np.random.default_rng(11)
    (index, coef), m = RESTORES["blocks16"](rng)
    n = index.shape[1]
    shape = (1, 9, 100)
    y = rng.standard_normal((*shape, m)).astype(np.float32)
    offset = rng.standard_normal(n).astype(np.float32)
    wide = 1024
    arrays = {"i": index, "c": coef, "o": offset, "wi": np.arange(wide, dtype=np.int32)[None],
              "wc": np.ones((1, wide), np.float32), "wo": np.zeros(wide, np.float32)}
    narrow = {"op": "restore", "src": "shm:y", "dst": "slot:out", "index": "i", "coef": "c", "offset": "o",
              "activation": "RELU6", "alpha": None}
    widest = {"op": "restore", "src": "shm:w", "dst": "slot:wout", "index": "wi", "coef": "wc",
              "offset": "wo", "activation": None, "alpha": None}
    shapes = {"shm:y": y.shape, "slot:out": (*shape, n), "shm:w": (1, 2, 2, wide),
              "slot:wout": (1, 2, 2, wide)}
    model = _model(arrays, [narrow, widest], shapes)
    assert model.tile <= 8
    out = np.full((*shape, n), np.nan, np.float32)
    kernel = rp.compile_restore(model, narrow, y, out)
    step = kernel.__defaults__[0][0]  # the kernel's prepared sn_step
    assert step.tile > 10 * model.tile and 4 * step.tile * step.stride <= model.scratch.size
    kernel()
    want = ACTIVATIONS["RELU6"](_apply(y, index, coef) + offset)
    assert np.abs(out - want).max() <= 1e-5 * max(1.0, np.abs(want).max())
