"""The TA's max pool (``tee_sim.ta_shadownet_max_pool`` and its C ``sn_max_pool``) on every build of the
kernels this CPU runs, against numpy: np.maximum over the window's positions in row-major order, the padding
filled with -inf (what the TA computed before the C kernel), bit for bit - NaNs and signed zeros included."""

import numpy as np
import pytest

from tee_sim import ta_shadownet_max_pool as mp
from tee_sim.ta_shadownet_kernels import runnable

BUILDS = runnable()


@pytest.fixture(autouse=True, params=list(BUILDS))
def kernels(request, monkeypatch):
    monkeypatch.setattr(mp, "LIBRARY", BUILDS[request.param])


def _reference(x, window, stride, pad):
    (fh, fw), (sh, sw), ((top, bottom), (left, right)) = window, stride, pad
    n, h, w, c = x.shape
    padded = np.full((n, h + top + bottom, w + left + right, c), -np.inf, np.float32)
    padded[:, top:top + h, left:left + w] = x
    oh, ow = (padded.shape[1] - fh) // sh + 1, (padded.shape[2] - fw) // sw + 1
    out = None
    for i in range(fh):
        for j in range(fw):
            view = padded[:, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw]
            out = view.copy() if out is None else np.maximum(out, view)
    return out


def _same(a, b):
    return a.shape == b.shape and np.array_equal(a.view(np.int32), b.view(np.int32))


CASES = [  # (input shape, window, stride, pad)
    ((1, 8, 8, 16), (2, 2), (2, 2), ((0, 0), (0, 0))),        # yolov4-tiny's and MiniVGG's
    ((1, 13, 13, 37), (2, 2), (1, 1), ((0, 1), (0, 1))),      # yolov4-tiny's last: SAME, stride 1
    ((2, 9, 7, 5), (3, 3), (2, 2), ((1, 1), (1, 1))),         # fewer channels than a vector
    ((1, 7, 10, 24), (3, 2), (2, 3), ((1, 1), (0, 1))),       # uneven window, stride and pad
    ((1, 5, 5, 3), (5, 5), (1, 1), ((2, 2), (2, 2))),         # windows mostly in the padding
]


@pytest.mark.parametrize("shape, window, stride, pad", CASES)
def test_matches_numpy_bit_for_bit(shape, window, stride, pad):
    rng = np.random.default_rng(sum(shape))
    x = rng.normal(size=shape).astype(np.float32)
    x.flat[rng.choice(x.size, 6, replace=False)] = [np.nan, -np.nan, np.inf, -np.inf, 0.0, -0.0]
    x[..., -1] = np.where(rng.random(x.shape[:-1]) < 0.5, 0.0, -0.0)  # ties between signed zeros
    want = _reference(x, window, stride, pad)
    got = np.full(want.shape, 7.0, np.float32)
    instr = {"window": list(window), "stride": list(stride), "pad": [list(p) for p in pad]}
    mp.compile_max_pool(instr, x, got)()
    assert _same(got, want), np.argwhere(got.view(np.int32) != want.view(np.int32))[:5]


def test_reads_and_writes_channel_slices_in_place():
    """A concatenation's slot: the pool reads one channel range of it and writes into another's."""
    rng = np.random.default_rng(1)
    slot = rng.normal(size=(1, 12, 12, 40)).astype(np.float32)
    out = np.zeros((1, 6, 6, 60), np.float32)
    src, dst = slot[..., 8:29], out[..., 30:51]
    instr = {"window": [2, 2], "stride": [2, 2], "pad": [[0, 0], [0, 0]]}
    mp.compile_max_pool(instr, src, dst)()
    want = _reference(np.ascontiguousarray(src), (2, 2), (2, 2), instr["pad"])
    assert _same(np.ascontiguousarray(dst), want)
    assert not out[..., :30].any() and not out[..., 51:].any()  # nothing written beside its channels


def test_refuses_what_does_not_fit():
    x = np.zeros((1, 8, 8, 4), np.float32)
    good = {"window": [2, 2], "stride": [2, 2], "pad": [[0, 0], [0, 0]]}
    with pytest.raises(ValueError, match="max pool"):
        mp.compile_max_pool(good, x, np.zeros((1, 5, 4, 4), np.float32))  # the windows run past the input
    with pytest.raises(ValueError, match="max pool"):
        mp.compile_max_pool(good, x, np.zeros((1, 4, 4, 3), np.float32))  # other channels
    with pytest.raises(ValueError, match="max pool"):
        mp.compile_max_pool(good, x.astype(np.float64), np.zeros((1, 4, 4, 4), np.float64))
    with pytest.raises(ValueError, match="max pool"):
        mp.compile_max_pool(good, x[..., ::2], np.zeros((1, 4, 4, 2), np.float32))  # strided channels
