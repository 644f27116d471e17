"""The fits on the crossings (``shadownet.crossing_fits``) on synthetic crossings: the restore rows, the
input mixing."""

from __future__ import annotations

import numpy as np
import pytest

from shadownet import attacks, crossing_fits


def _crossings(rng: np.random.Generator, positions: int = 2000, m: int = 24, c: int = 16):
    """A layer's obfuscated results ``y`` and the restore ``r``: real outputs ``y @ r.T + b``."""
    y = rng.standard_normal((positions, m))
    r = rng.standard_normal((c, m))
    b = rng.standard_normal(c)
    return y, r, y @ r.T + b


def test_restore_rows_are_found_through_a_clipping_activation():
    rng = np.random.default_rng(0)
    y, r, real = _crossings(rng)
    scale = rng.uniform(0.5, 2.0, 16)
    follower = (np.clip(real, 0, 6) * scale)[:, rng.permutation(16)].astype(np.float32)  # relu6, shuffled
    rows, tried = crossing_fits.restore_rows(y.astype(np.float32), follower, rng)
    assert tried == 16 and len(rows) == 16
    assert attacks.best_cosines(rows, r).min() > 0.9999  # each row along a restore row


def test_restore_rows_try_every_channel_of_a_wide_follower():
    """An attacker fits every channel: a follower of 300 channels gives 300 rows (the suite once stopped at
    256, under-reporting MobileNet's 512-wide layers by half)."""
    rng = np.random.default_rng(2)
    y, r, real = _crossings(rng, positions=400, m=6, c=300)
    rows, tried = crossing_fits.restore_rows(y, np.maximum(real, 0), rng)
    assert tried == 300 and len(rows) == 300
    assert attacks.best_cosines(rows, r).min() > 0.9999
    rows, tried = crossing_fits.restore_rows(y, np.maximum(real, 0), rng, channels=8)  # a probe
    assert tried == 8 and len(rows) == 8


@pytest.mark.parametrize("hidden", ["mixed", "masked"])
def test_restore_rows_find_nothing_in_a_mixed_or_masked_follower(hidden):
    rng = np.random.default_rng(1)
    y, r, real = _crossings(rng)
    follower = np.maximum(real, 0)
    if hidden == "mixed":  # the next layer's input mixing: orthogonal blocks over the activations
        follower = follower @ np.linalg.qr(rng.standard_normal((16, 16)))[0]
    else:  # a one-time mask, fresh per inference
        follower = follower + 10 * rng.standard_normal(follower.shape)
    rows, tried = crossing_fits.restore_rows(y, follower, rng)
    assert tried == 16 and len(rows) == 0


def _mixed_block(rng: np.random.Generator, positions: int = 6000, k: int = 16, clip: float = 3.5,
                 extremes: bool = True):
    """A depthwise round's results ``y`` (k channels) and the next layer's input block ``x = B act(a y + b)``
    as the TEE makes it: a ReLU clipped at ``clip`` (activations of unit spread, each clipped on up to
    0.6% of the positions, as ReLU6 clips a MobileNet's), per-channel scales of both signs, one channel
    dead on these positions and one always active (``extremes``); B orthogonal."""
    a = rng.uniform(0.5, 2.0, k) * rng.choice([-1.0, 1.0], k)
    y = rng.standard_normal((positions, k)) / np.abs(a)
    b = rng.uniform(-1.0, 1.0, k)
    if extremes:
        b[3], a[7], b[7] = -100.0, 0.01, 1.5  # channel 3 never active, channel 7 always, never clipped
    activated = np.clip(a * y + b, 0.0, clip)
    mixing = np.linalg.qr(rng.standard_normal((k, k)))[0]
    return y.astype(np.float32), (activated @ mixing.T).astype(np.float32), mixing * np.abs(a)


def test_input_mixing_is_learnt_from_the_earlier_results():
    rng = np.random.default_rng(2)
    y, x, want = _mixed_block(rng)
    got = crossing_fits.input_mixing(x, y, rng)
    assert got is not None
    kinked = [c for c in range(16) if c not in (3, 7)]
    assert np.abs(got[:, kinked] - want[:, kinked]).max() <= 1e-4 * np.abs(want).max()
    assert np.abs(got[:, 3]).max() <= 1e-3 * np.abs(want).max()  # a dead channel: no column to learn
    # A channel always active is linear: its column is learnt up to its sign, which nothing in the
    # crossings tells (act = a y + b and act' = -a y + b' explain them alike).
    assert abs(got[:, 7] @ want[:, 7]) >= (1 - 1e-6) * np.linalg.norm(got[:, 7]) * np.linalg.norm(want[:, 7])


def test_input_mixing_undoes_the_mixing_of_a_layers_filters():
    """What the audit does with it: the accelerator's filters ``W B^-1`` times the learnt mixing, columns
    scaled to unit norm, are the real filters in the real channel order, up to each channel's scale."""
    rng = np.random.default_rng(3)
    y, x, want = _mixed_block(rng, extremes=False)
    real = rng.laplace(size=(32, 16))
    mixing = want / np.linalg.norm(want, axis=0)  # B
    accelerator = real @ mixing.T  # W B^-1 = W B^T
    got = crossing_fits.input_mixing(x, y, rng)
    norms = np.linalg.norm(got, axis=0)
    filters = accelerator @ (got / np.where(norms > 1e-3 * norms.max(), norms, np.inf))
    assert np.abs(filters - real).max() <= 1e-4 * np.abs(real).max()
    assert (attacks.best_cosines(filters, real) >= 0.9).all()


@pytest.mark.parametrize("hidden", ["masked", "another", "half another"])
def test_input_mixing_fits_nothing_without_the_exact_relation(hidden):
    rng = np.random.default_rng(4)
    y, x, _ = _mixed_block(rng)
    if hidden == "masked":  # a one-time mask on the depthwise round's input: its results are noisy
        y = y + 10 * y.std() * rng.standard_normal(y.shape).astype(np.float32)
    elif hidden == "another":
        y = rng.standard_normal(y.shape).astype(np.float32)
    else:  # half the block's channels came from elsewhere (the results' channels cut into other blocks)
        y[:, 8:] = rng.standard_normal((len(y), 8))
    assert crossing_fits.input_mixing(x, y, rng) is None


def test_a_channel_active_on_a_few_positions_is_not_learnt():
    """Its slope rests on a few positions (0.3% of them: it came out at a random fraction of its norm,
    or flipped): its column is left 0, the others exact."""
    from scipy.stats import norm

    rng = np.random.default_rng(5)
    k = 16
    a = rng.uniform(0.5, 2.0, k) * rng.choice([-1.0, 1.0], k)
    y = rng.standard_normal((6000, k)) / np.abs(a)
    b = rng.uniform(-1.0, 1.0, k)
    b[0] = norm.ppf(0.003)  # a y ~ N(0, 1): channel 0 above 0 on 0.3% of the positions
    mixing = np.linalg.qr(rng.standard_normal((k, k)))[0]
    x = np.clip(a * y + b, 0.0, 3.5) @ mixing.T
    got = crossing_fits.input_mixing(x.astype(np.float32), y.astype(np.float32), rng)
    want = mixing * np.abs(a)
    assert not got[:, 0].any()
    assert np.abs(got[:, 1:] - want[:, 1:]).max() <= 1e-4 * np.abs(want).max()


def test_a_column_is_signed_by_the_activation_and_a_wrong_one_dropped():
    """With B orthogonal, x . M_c is the activation times |a_c| at every position: >= 0. A column that
    comes out negated is turned back; one pointing elsewhere (x takes both signs along it) is left 0, even
    when one outlying position is large along it; a channel with no activation keeps the sign it has; a
    channel of small range beside large ones keeps its column when the fits leave 1e-3 errors in it."""
    rng = np.random.default_rng(7)
    k = 16
    mixing = np.linalg.qr(rng.standard_normal((k, k)))[0]
    act = np.maximum(rng.standard_normal((4000, k)) + 0.3, 0.0)
    act[:, 3] -= 0.5  # channel 3 has no activation: both signs
    act[:, 4] *= 0.01  # channel 4: a small range
    x = act @ mixing.T
    fitted = mixing + 1e-3 * rng.standard_normal((k, k)) / np.sqrt(k)  # the exact fits' 1e-3, per column
    fitted[:, 1] *= -1.0  # the wrong sign
    fitted[:, 2] = np.linalg.qr(rng.standard_normal((k, k)))[0][:, 0]  # the wrong direction
    fitted[:, 3] *= -1.0  # no activation: nothing tells its sign
    x[0] = 1e3 * fitted[:, 2]  # one outlying position far along the wrong column
    linear = np.arange(k) == 3
    span = float(np.ptp(x[1:], axis=0).max())
    got = crossing_fits._signed_columns(x, fitted, linear, crossing_fits.RESTORE_RTOL * span)
    want = fitted.copy()
    want[:, 1] *= -1.0
    want[:, 2] = 0.0
    np.testing.assert_array_equal(got, want)
    assert np.abs(got[:, 1] - mixing[:, 1]).max() < 1e-3 and np.abs(got[:, 4] - mixing[:, 4]).max() < 1e-3


def test_a_position_that_is_not_finite_is_left_out():
    rng = np.random.default_rng(6)
    y, x, want = _mixed_block(rng, extremes=False)
    y[5, 2], x[9, 4] = np.nan, np.inf
    got = crossing_fits.input_mixing(x, y, rng)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    assert crossing_fits.input_mixing(x[:0], y[:0], rng) is None
