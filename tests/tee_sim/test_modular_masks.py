"""Modular one-time masks (``tee_sim.modular_masks``): the mask a key draws, the push that sends its input
modulo the period (``sn_run``'s ``send_modular``) and the unwrap that corrects the restore's offset
(``sn_unwrap``), each against a float64 numpy reference, on every build of the kernels."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tee_sim import modular_masks
from tee_sim import ta_shadownet_restore_push as rp
from tee_sim.layer_geometry import Geometry
from tee_sim.modular_masks import Unwrap
from tee_sim.one_time_masks import MaskStream
from tee_sim.program import modular_period, modular_std
from tee_sim.ta_shadownet_kernels import runnable
from tests.tee_sim.test_restore_push import _blocks, _model

BUILDS = runnable()


@pytest.fixture(autouse=True, params=list(BUILDS))
def kernels(request, monkeypatch):
    """Every test on each build of the kernels this CPU runs."""
    monkeypatch.setattr(rp, "LIBRARY", BUILDS[request.param])
    monkeypatch.setattr(modular_masks, "LIBRARY", BUILDS[request.param])


def _alloc(shape, dtype):
    return np.zeros(shape, dtype)


@pytest.mark.parametrize("spread", [1e-3, 0.7, 1.0, 5.5, 300.0])
def test_a_modular_mask_is_uniform_over_a_power_of_two_period(spread):
    std = modular_std(spread)
    p = modular_period(std)
    assert p == 2.0 ** round(math.log2(p)) and 2 ** -0.5 <= p / math.sqrt(12) / spread <= 2 ** 0.5
    shape = (1, 128, 128, 4)
    stream = MaskStream({"buffer": "b", "shape": list(shape), "std": std, "modular": True},
                        np.zeros(4, np.float32), _alloc)
    assert stream.modular and stream.period == p
    mask = np.empty(shape, np.float32)
    stream.draw(b"m" * 32, mask)
    assert mask.min() >= -p / 2 and mask.max() < p / 2
    assert np.all(mask / p * 2.0 ** 24 == np.rint(mask / p * 2.0 ** 24))  # 24 bits each, exact
    assert abs(mask.mean()) < 0.01 * p and abs(mask.std() - p / math.sqrt(12)) < 0.01 * p
    again = np.empty(shape, np.float32)
    stream.draw(b"m" * 32, again)
    assert np.array_equal(mask, again)  # the key's mask
    stream.draw(b"n" * 32, again)
    assert abs(np.corrcoef(mask.ravel(), again.ravel())[0, 1]) < 0.02


def test_a_modular_mask_takes_no_mean_or_shape_and_a_split_grid_that_divides_its_period():
    spec = {"buffer": "b", "shape": [1, 8, 8, 2], "std": 1.0, "modular": True}
    split = MaskStream({**spec, "std": 4 / math.sqrt(12), "split": {"grid": 0.5}}, np.zeros(2, np.float32),
                       _alloc)
    assert split.modular and split.period == 4.0  # a grid that divides the period
    for bad_spec, mean in (({**spec, "split": {"grid": 0.75}}, np.zeros(2)),
                           ({**spec, "bands": 3}, np.zeros(2)), (spec, np.ones(2)),
                           ({**spec, "modular": "yes"}, np.zeros(2)), ({**spec, "std": 0.0}, np.zeros(2))):
        with pytest.raises(ValueError, match="modular"):
            MaskStream(bad_spec, mean.astype(np.float32), _alloc)


@pytest.mark.parametrize("fused", [False, True])
def test_a_modular_push_sends_its_input_modulo_the_period_and_keeps_the_periods(fused):
    """Into a padded buffer, mixed: the interior gets ``x + r - k P`` within ``[-P/2, P/2]``, ``k`` kept
    (several periods where the input is large); the border, where the input is 0, the mask itself."""
    rng = np.random.default_rng(5)
    c, p = 32, 8.0
    src = (rng.standard_normal((1, 5, 7, c)) * np.linspace(0.1, 12, c)).astype(np.float32)
    dst_shape = (1, 7, 9, c)
    stream = MaskStream({"buffer": "b", "shape": list(dst_shape), "std": p / math.sqrt(12), "modular": True},
                        np.zeros(c, np.float32), _alloc)
    arrays = {"mask": np.empty(dst_shape, np.float32)}
    stream.draw(b"p" * 32, arrays["mask"])
    arrays["ii"], arrays["ic"] = _blocks(rng, [16, 16], [16, 16])
    pad = [[0, 0], [1, 1], [1, 1], [0, 0]]
    instr = {"op": "push", "src": "slot:x", "dst": "shm:x", "mask": "mask", "pad": pad, "permutation": None,
             "input_index": "ii", "input_coef": "ic"}
    mixed = sum(arrays["ic"][j].astype(np.float64) * src[..., arrays["ii"][j]] for j in range(16))
    if fused:  # a restore (a scale of 1, no bias) fused with the push
        arrays.update(index=np.arange(c, dtype=np.int32)[None], coef=np.ones((1, c), np.float32),
                      offset=np.zeros(c, np.float32))
        instr.update(op="restore", src="shm:y", index="index", coef="coef", offset="offset", activation=None,
                     alpha=0.0)
    model = _model(arrays, [instr], {instr["src"]: src.shape, "shm:x": dst_shape})
    wraps = np.zeros(dst_shape, np.int8)
    now = np.array([p], np.float32)
    dst = np.full(dst_shape, np.nan, np.float32)
    compile_ = rp.compile_restore if fused else rp.compile_push
    assert compile_(model, instr, src, dst, wraps=wraps, period=now)() == rp.DONE
    inner = (slice(None), slice(1, 6), slice(1, 8))
    assert np.all(np.abs(dst) <= p / 2)
    sent = dst.astype(np.float64) + p * wraps
    want = arrays["mask"].astype(np.float64)
    want[inner] += mixed
    assert np.abs(sent - want).max() <= 1e-5 * np.abs(want).max()
    assert np.abs(wraps).max() >= 2 and np.count_nonzero(wraps[inner]) > 0.1 * wraps[inner].size
    border = np.ones(dst_shape, bool)
    border[inner] = False
    assert np.array_equal(dst[border], arrays["mask"][border]) and not wraps[border].any()
    with pytest.raises(ValueError, match="wraps"):
        compile_(model, instr, src, dst, wraps=wraps[..., :-1], period=now)
    with pytest.raises(ValueError, match="wraps"):
        compile_(model, instr, src, dst, wraps=wraps.astype(np.int16), period=now)


def _reference(k: np.ndarray, geo: Geometry, composed: np.ndarray) -> np.ndarray:
    """``restore(L(k))`` in float64: each output position's window of ``k`` (zero outside) times the composed
    weights."""
    n, h, w, c = geo.x_shape
    (kh, kw), (sh, sw), (dh, dw), (top, left) = geo.kernel, geo.stride, geo.dilation, geo.before
    _, ho, wo, m = geo.y_shape
    e = composed.astype(np.float64).reshape(kh, kw, c, m)
    out = np.zeros((n, ho, wo, m))
    for oy in range(ho):
        for ox in range(wo):
            for i in range(kh):
                for j in range(kw):
                    iy, ix = oy * sh - top + i * dh, ox * sw - left + j * dw
                    if 0 <= iy < h and 0 <= ix < w:
                        out[:, oy, ox] += k[:, iy, ix].astype(np.float64) @ e[i, j]
    return out


GEOMETRIES = {  # x_shape, y_shape, kernel, stride, dilation, before
    "3x3 same": ((1, 9, 11, 20), (1, 9, 11, 24), (3, 3), (1, 1), (1, 1), (1, 1)),
    "3x3 stride 2": ((2, 10, 9, 8), (2, 5, 5, 16), (3, 3), (2, 2), (1, 1), (0, 1)),
    "dilated valid": ((1, 12, 12, 5), (1, 8, 6, 7), (3, 2), (1, 2), (2, 3), (0, 0)),
    "1x1": ((1, 6, 6, 33), (1, 6, 6, 40), (1, 1), (1, 1), (1, 1), (0, 0)),
    # more channels than the kernel gathers a pixel's wraps of at a time, more outputs than it sums at once
    "wide": ((1, 3, 4, 1100), (1, 3, 4, 75), (3, 3), (1, 1), (1, 1), (1, 1)),
}


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_the_unwrap_adds_the_periods_through_the_layer(name):
    x_shape, y_shape, kernel, stride, dilation, before = GEOMETRIES[name]
    geo = Geometry("CONV_2D", x_shape, y_shape, kernel, stride, dilation, before)
    rng = np.random.default_rng(7)
    k = (rng.random(x_shape) < 0.05) * rng.choice([-2, -1, 1, 3], x_shape)
    k = k.astype(np.int8)
    composed = rng.standard_normal((geo.taps * x_shape[-1], y_shape[-1])).astype(np.float32)
    offset = rng.standard_normal(y_shape).astype(np.float32)
    want = offset + 4.0 * _reference(k, geo, composed)
    now = np.array([4.0], np.float32)
    assert Unwrap(geo, composed).compile(k, now, offset)() == 0
    assert np.abs(offset - want).max() <= 1e-5 * np.abs(want).max()


def test_a_dense_layers_unwrap_reads_its_flattened_input():
    rng = np.random.default_rng(8)
    for shape, outputs in (((1, 4, 4, 6), 10), ((1, 1, 1, 1300), 70)):  # the second: 3 gathers of its wraps
        geo = Geometry("FULLY_CONNECTED", shape, (1, outputs))
        k = ((rng.random(shape) < 0.2) * rng.choice([-1, 1], shape)).astype(np.int8)
        rows = int(np.prod(shape))
        composed = rng.standard_normal((rows, outputs)).astype(np.float32)
        offset = np.zeros((1, outputs), np.float32)
        Unwrap(geo, composed).compile(k, np.array([0.5], np.float32), offset)()
        want = 0.5 * k.reshape(1, rows).astype(np.float64) @ composed
        assert np.allclose(offset, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    with pytest.raises(ValueError, match="DEPTHWISE"):
        Unwrap(Geometry("DEPTHWISE_CONV_2D", (1, 4, 4, 6), (1, 4, 4, 6), (3, 3)), composed)
    with pytest.raises(ValueError, match="unwrap"):
        Unwrap(geo, composed).compile(k, np.array([0.5], np.float32), offset[:, :-1])


@pytest.mark.parametrize("v", [0.0, 0.3, -0.3, 0.5, 1.0, -1.0, 2.7, -3.1, 7.9])
def test_a_split_modular_push_sends_every_high_value_equally_often_whatever_its_input(v):
    """The high half of an exact split under a modular mask: over the mask's ``P / g`` equally likely values
    of ``r_hi`` (one per channel here, with one ``r_lo``), ``x_hi`` takes every value of ``[-P/2, P/2)`` on
    the grid exactly once, whatever the input - a boundary value sent as either end would say which side the
    input lay on (1 in ``P / g`` of them: a fit over 1,600 inferences took 5 of ResNet-44's 16 first-layer
    filters from it);
    ``x_lo`` lies in ``[-g/2, g/2)``, and the halves and the periods taken off add up to ``v + r``."""
    g, p = 0.25, 4.0
    c = int(p / g)
    rng = np.random.default_rng(11)
    # every r_hi once, with one r_lo (independent of r_hi for a uniform r)
    mask = (np.arange(c) * g - p / 2 + rng.uniform(-g / 2, g / 2)).astype(np.float32)[None, None, None]
    src = np.full((1, 1, 1, c), v, np.float32)
    arrays = {"mask": mask}
    instr = {"op": "push", "src": "slot:x", "dst": "shm:x", "mask": "mask", "pad": None, "permutation": None,
             "split": {"grid": g}}
    model = _model(arrays, [instr], {"slot:x": src.shape, "shm:x": (1, 1, 1, 2 * c)})
    dst = np.full((1, 1, 1, 2 * c), np.nan, np.float32)
    wraps = np.zeros(mask.shape, np.int8)
    rp.compile_push(model, instr, src, dst, wraps=wraps, period=np.array([p], np.float32))()
    high, low = dst[..., :c].ravel(), dst[..., c:].ravel()
    assert sorted(high.tolist()) == [k * g - p / 2 for k in range(c)]
    assert np.all((low >= -g / 2) & (low < g / 2))
    assert np.allclose(high + low + p * wraps.ravel(), v + mask.ravel(), atol=1e-6)


def test_a_modular_push_sends_within_a_half_open_period():
    """Inputs put exactly on the boundary go to its lower end, ``-P/2``, never ``+P/2``."""
    p, c = 8.0, 16
    src = np.array([4.0, -4.0, 12.0, -12.0, 3.99, 0.0, 20.0, -20.0] * 2, np.float32)[None, None, None]
    arrays = {"mask": np.zeros((1, 1, 1, c), np.float32)}
    instr = {"op": "push", "src": "slot:x", "dst": "shm:x", "mask": "mask", "pad": None, "permutation": None}
    model = _model(arrays, [instr], {"slot:x": src.shape, "shm:x": src.shape})
    dst = np.empty_like(src)
    wraps = np.zeros(src.shape, np.int8)
    rp.compile_push(model, instr, src, dst, wraps=wraps, period=np.array([p], np.float32))()
    assert dst.ravel()[:8].tolist() == [-4.0, -4.0, -4.0, -4.0, np.float32(3.99), 0.0, -4.0, -4.0]
    assert np.array_equal(dst + p * wraps, src)


def test_the_unwrap_of_a_padded_push_reads_its_interior_only():
    """The wraps live in memory other calls share: outside a padded push's interior they hold anything."""
    geo = Geometry("CONV_2D", (1, 8, 8, 4), (1, 6, 6, 5), (3, 3), (1, 1), (1, 1), (0, 0))
    rng = np.random.default_rng(9)
    k = np.zeros((1, 8, 8, 4), np.int8)
    k[:, 1:7, 1:7] = (rng.random((1, 6, 6, 4)) < 0.2) * rng.choice([-1, 1], (1, 6, 6, 4))
    composed = rng.standard_normal((36, 5)).astype(np.float32)
    want = 2.0 * _reference(k, geo, composed)
    k[:, 0], k[:, 7], k[:, :, 0], k[:, :, 7] = 5, -3, 7, 1  # stale: another call's
    offset = np.zeros((1, 6, 6, 5), np.float32)
    Unwrap(geo, composed).compile(k, np.array([2.0], np.float32), offset, [[0, 0], [1, 1], [1, 1], [0, 0]])()
    assert np.allclose(offset, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="padded"):
        Unwrap(geo, composed).compile(k, np.array([2.0], np.float32), offset,
                                      [[0, 0], [1, 1], [1, 1], [0, 1]])
