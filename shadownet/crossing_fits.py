"""What the crossings give away of a layer's secrets, learnt by fitting exact relations between tensors
the normal world sees cross the boundary (``shadownet.boundary`` records them and searches for the pairs):

- ``restore_rows``: the rows of a layer's secret restore, from its results and a later tensor the TEE made
  from them (the restore regression);
- ``input_mixing``: the secret input mixing ``B`` of a block of a layer's input channels, from an earlier
  round's results that the TEE activated and mixed into that input (the input unmixing).

No reference weight is used: the attacks of ``shadownet.attacks`` then compare what comes out with the real
filters.
"""

from __future__ import annotations

import math

import numpy as np

from shadownet.attacks import unit_rows

RESTORE_RTOL = 1e-3  # an exact affine relation, up to float32 rounding (honest ones fit to ~1e-6)
RESTORE_SAMPLES = 4  # positions per unknown used in a fit
# Positions per unknown an attacker observes for the fits to find (nearly) every row a follower gives away:
# a channel fits where it is strictly inside its range (not cut by its activation) on twice as many
# positions as unknowns, and a ReLU6 channel is there on a third to a half of them. MobileNet's pw6-pw11
# (513 unknowns, depthwise layers offloaded): 6.1 per unknown (16 inferences) gave rows for 76-87% of their
# channels, 12.2 (32) for 93-99% (``shadownet.boundary.inferences_needed``).
RESTORE_OBSERVED = 8


def restore_positions(channels: int) -> int:
    """Positions of a layer's results (``channels`` of them each) that ``restore_rows`` wants observed."""
    return RESTORE_OBSERVED * (channels + 1)


def restore_rows(results: np.ndarray, follower: np.ndarray, rng: np.random.Generator | None = None,
                 channels: int | None = None) -> tuple[np.ndarray, int]:
    """The restore of one layer, learnt from the crossings alone (no reference): ``results`` (positions,
    M) the accelerator's results of the layer, ``follower`` (positions, C) a tensor the TEE made from them
    that the normal world sees too (a later round's input, the model's output), position by position.

    A follower channel that the TEE computed as an activation of one restored output channel, and sent
    without a mask and without mixing it with others (a depthwise layer's input is only permuted and
    scaled), is an exact affine function of the layer's results wherever the activation passes it through
    (samples strictly inside the channel's range: not clipped at 0 or 6). A least-squares fit there
    returning residuals at float32 rounding (``RESTORE_RTOL`` of the channel's range) gives that output
    channel's row of the restore, ``c`` with ``follower_j = c . y' + b`` (and its bias, scaled): then
    ``c @ W'`` is the real filter (times a scale) in the coordinates of the layer's input as the
    accelerator receives it. A masked or clipped follower fits nothing; one made of several restored
    channels with no activation between (or of the layer's input, when the results span it) fits a
    combination of rows, which only the comparison with real filters tells apart. Returns the relations
    found ``(k, M)`` and how many follower channels were tried (all, or ``channels`` drawn at random;
    ``RESTORE_SAMPLES`` positions per unknown each, so that a wide layer costs seconds)."""
    rng = rng if rng is not None else np.random.default_rng(0)
    y = np.asarray(results, np.float64).reshape(len(results), -1)
    x = np.asarray(follower).reshape(len(follower), -1)
    unknowns = y.shape[1] + 1
    tried = rng.permutation(x.shape[1])[:channels]
    rows = []
    for j in tried:
        xj = x[:, j].astype(np.float64)
        lo, hi = float(xj.min()), float(xj.max())
        span = hi - lo
        if not (span > 0 and math.isfinite(span)):
            continue
        inside = np.flatnonzero((xj > lo + 1e-6 * span) & (xj < hi - 1e-6 * span))
        if len(inside) < 2 * unknowns:
            continue
        if len(inside) > RESTORE_SAMPLES * unknowns:
            inside = rng.choice(inside, RESTORE_SAMPLES * unknowns, replace=False)
        a = np.hstack([y[inside], np.ones((len(inside), 1))])
        if not np.isfinite(a).all():
            continue
        coef, *_ = np.linalg.lstsq(a, xj[inside], rcond=None)
        if np.abs(a @ coef - xj[inside]).max() <= RESTORE_RTOL * span and np.any(coef[:-1]):
            rows.append(coef[:-1])
    return (np.array(rows) if rows else np.zeros((0, y.shape[1]))), len(tried)


def rank(rows: np.ndarray, rtol: float = 1e-6) -> int:
    """The number of independent rows in ``rows`` (relations found twice, or combinations of others,
    count once)."""
    if len(rows) == 0:
        return 0
    s = np.linalg.svd(unit_rows(rows), compute_uv=False)
    return int((s > rtol * s[0]).sum())


# ---------------------------------------------------------------------------------------------
# The input mixing, learnt from an earlier round's results
# ---------------------------------------------------------------------------------------------

MIXING_POSITIONS = 4000  # positions in the search for thresholds; four times as many in the exact fit
MIXING_KNOTS = 24  # knots per channel of the piecewise-linear first fit (at quantiles 2% .. 98%)
MIXING_REFITS = 8  # exact fits, each moving every threshold to where its two sides meet
MIXING_MARGIN = 0.01  # positions this many standard deviations from a threshold sit out of the exact fit
MIXING_CLIP = 0.2  # an opposite slope change this large against the largest one is a clip (ReLU6's 6)
MIXING_MIN_ACTIVE = 64  # fitted positions a channel must be active on for its column to count
# x . M_c counts as below 0 where it is under -MIXING_SIGN_RTOL of its size (``_signed_columns``); a column
# with more than MIXING_SIGN_SHARE of the positions on each side is wrong.
MIXING_SIGN_RTOL, MIXING_SIGN_SHARE = 1e-2, 0.01


def input_mixing(mixed: np.ndarray, earlier: np.ndarray, rng: np.random.Generator | None = None,
                 rtol: float = RESTORE_RTOL) -> np.ndarray | None:
    """The mixing of one block of a layer's input channels, learnt from the crossings alone: ``mixed``
    (positions, k) the block as the accelerator receives it, ``earlier`` (positions, k) an earlier round's
    results at the same positions, channel ``c`` the one the TEE restored, activated and sent on as the
    block's ``c``-th input (a depthwise layer's results: one channel each, only scaled, not mixed).

    The TEE computes ``mixed = B act(a * earlier + b)`` (per channel ``a``, ``b``: the restore's scale and the
    bias), so with a piecewise-linear activation (ReLU, ReLU6, none) ``mixed`` is a sum of hinges in the
    ``earlier`` channels: ``sum_c M_c |earlier_c - t_c|`` on each channel's active side, ``M = B diag(|a|)``.
    A piecewise-linear least-squares fit with knots at each channel's quantiles shows where each channel
    kinks; exact fits on positions away from the kinks (``MIXING_MARGIN``) then move each threshold to where
    its two sides meet, and drop positions a clip (ReLU6 at 6) bends, until residuals reach float32
    rounding (``rtol`` of the block's range) on at least a quarter of the positions. The clip is not
    modelled: a block where most positions have some channel clipped fits nothing (a few tenths of a
    percent per channel fit, as on the zoo's MobileNet; 2% per channel did not). Each column's sign comes
    from the activation being >= 0 (``B`` orthogonal: ``B^T mixed`` is the activation).

    Returns ``M`` (k, k): ``W' @ M`` (the accelerator's filters ``W B^-1`` times it) is ``W diag(|a|)``, the
    real filters in the real channel order, each column scaled; a column is 0 for a channel active on fewer
    than ``MIXING_MIN_ACTIVE`` of the positions fitted, and one always active with no activation has its
    sign unknown.
    None when no exact relation fits (another tensor, a masked one, another activation)."""
    rng = rng if rng is not None else np.random.default_rng(0)
    x_all, y_all = np.asarray(mixed), np.asarray(earlier)
    if x_all.shape != y_all.shape or x_all.ndim != 2:
        raise ValueError(f"a block of {x_all.shape} and earlier results of {y_all.shape}: "
                         "not the same positions")
    finite = np.isfinite(x_all).all(axis=1) & np.isfinite(y_all).all(axis=1)  # a position, not a channel
    x_all, y_all = x_all[finite], y_all[finite]
    k = x_all.shape[1]
    if len(x_all) < 2:
        return None
    live = y_all.std(axis=0) > 0  # a constant channel adds a constant: nothing to learn, folded in the bias
    mixing = np.zeros((k, k))
    if not live.any():
        return None
    found = _hinge_fit(x_all, y_all[:, live], rng, rtol)
    if found is None:
        return None
    mixing[:, live] = found
    return mixing


def _kink(changes: np.ndarray, knots: np.ndarray) -> float:
    """Where one channel's activation leaves 0, from the slope changes of the piecewise-linear fit at its
    ``knots`` (one vector per knot, along the channel's column of M): the largest one, interpolated
    between its neighbours. A clip (ReLU6's 6) is a second, opposite change; of the two, the kink is the
    one whose flat side holds more positions (the activation is 0 more often than 6)."""
    strength = changes @ np.linalg.svd(changes, full_matrices=False)[2][0]
    q = int(np.abs(strength).argmax())
    opposite = np.flatnonzero((np.sign(strength) == -np.sign(strength[q]))
                              & (np.abs(np.arange(len(knots)) - q) > 1))
    if len(opposite):
        p = int(opposite[np.abs(strength[opposite]).argmax()])
        if abs(strength[p]) > MIXING_CLIP * abs(strength[q]):
            low, high = min(p, q), max(p, q)
            q = low if low > len(knots) - 1 - high else high  # knots below low, against above high
    near = slice(max(q - 1, 0), min(q + 2, len(knots)))
    w = np.clip(strength[near] * np.sign(strength[q]), 0.0, None)
    return float((w * knots[near]).sum() / w.sum()) if w.sum() > 0 else float(knots[q])


def _hinge_features(y: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Per channel: its value, its value where above the threshold, that indicator; and a constant. Any
    continuous function linear on both sides of ``t`` is a combination of these."""
    above = y > t
    return np.hstack([y, above * y, above.astype(np.float64), np.ones((len(y), 1))])


def _hinge_fit(x_all: np.ndarray, y_all: np.ndarray, rng: np.random.Generator,
               rtol: float) -> np.ndarray | None:
    positions, k = y_all.shape
    # 1. One least-squares fit of a piecewise-linear function per channel: the slope changes at the knots
    #    (one vector of the block's outputs each, all along the same column of M) peak at the threshold.
    pick = rng.choice(positions, min(MIXING_POSITIONS, positions), replace=False)
    x, y = x_all[pick].astype(np.float64), y_all[pick].astype(np.float64)
    knots = np.quantile(y, np.linspace(0.02, 0.98, MIXING_KNOTS), axis=0).T  # (k, knots)
    basis = np.hstack([y, np.ones((len(y), 1))] + [np.maximum(0.0, y[:, [c]] - knots[c]) for c in range(k)])
    coef, *_ = np.linalg.lstsq(basis, x, rcond=None)
    changes = coef[k + 1:].reshape(k, MIXING_KNOTS, -1)
    t = np.array([_kink(changes[c], knots[c]) for c in range(k)])
    # 2. Exact fits: continuity at each threshold (jump * t + step = 0) moves it where the data says.
    pick = rng.choice(positions, min(4 * MIXING_POSITIONS, positions), replace=False)
    x, y = x_all[pick].astype(np.float64), y_all[pick].astype(np.float64)
    spread = y.std(axis=0)
    span = float(np.ptp(x, axis=0).max())
    if not span > 0:
        return None
    kept = np.ones(len(x), bool)
    for _ in range(MIXING_REFITS):
        features = _hinge_features(y, t)
        away = np.abs(y - t) > MIXING_MARGIN * spread
        away[:, away.mean(axis=0) < 0.9] = True  # a point mass at the threshold (a channel exactly 0)
        used = kept & away.all(axis=1)
        if used.sum() < 4 * features.shape[1]:
            return None
        coef, *_ = np.linalg.lstsq(features[used], x[used], rcond=None)
        error = np.abs(features @ coef - x).max(axis=1)
        jump, step = coef[k:2 * k], coef[2 * k:3 * k]
        size = (jump ** 2).sum(axis=1)
        t = np.where(size > 0, -(step * jump).sum(axis=1) / np.where(size > 0, size, 1.0), t)
        exact = error <= rtol * span
        kept = exact | (error <= 4 * np.median(error[used]))
    if (used & exact).sum() < max(0.25 * len(x), 4 * features.shape[1]):
        return None
    below, above = coef[:k].T, (coef[:k] + coef[k:2 * k]).T  # slopes on each side of each threshold
    fitted = used & exact
    steep_above, steep_below = np.linalg.norm(above, axis=0), np.linalg.norm(below, axis=0)
    upper = steep_above >= steep_below
    mixing = np.where(upper, above, below)
    # Where the channel is active: the side with the slope, or both where both have one (no kink: linear).
    linear = np.minimum(steep_above, steep_below) > 0.5 * np.maximum(steep_above, steep_below)
    active = (np.where(upper, y > t, y < t) | linear) & fitted[:, None]
    # A side seen on a few positions only gives a slope the fit barely constrains (a channel active on
    # 0.2% of them came out at 0.27x its norm, at random): such a column is not learnt, left 0.
    mixing[:, active.sum(axis=0) < MIXING_MIN_ACTIVE] = 0.0
    return _signed_columns(x, mixing, linear, rtol * span)


def _signed_columns(x: np.ndarray, mixing: np.ndarray, linear: np.ndarray, rounding: float) -> np.ndarray:
    """``mixing``'s columns with their signs set from ``x`` (positions, k), those that are wrong left 0;
    a column where ``linear`` (no activation) as it is. ``rounding``: the exact fits' residual bound (``rtol``
    of the block's range)."""
    # Each column's sign, and whether the fit got it right at all: the activation is >= 0, and with B
    # orthogonal it is B^T x, so column c, which is B_c times a scale, has x . M_c >= 0 at every position
    # (to rounding, and to the column's own error) with the right sign, <= 0 with the wrong one. A column
    # along which x takes both signs is wrong and left 0: on MobileNet's pw1 (32 inferences) one column of
    # 16 came out at 0.02x its norm, its sign right or wrong as the positions sampled fell, and the wrong
    # one spoilt the filters of its block (47 of 64 recovered against 63). A channel with no activation
    # (both sides sloped) takes both signs anyway and keeps the sign the fit gave: nothing tells it.
    # Below 0 means by more than the larger of two: a share of the column's own size along x (its 99th
    # percentile, which one outlying position does not set), and what the fits' residuals allow a column
    # error to add (x . dM, up to 4 rounding |M_c| here): a channel of small range beside large ones would
    # otherwise be dropped for the others' error along it.
    along = x @ mixing
    size = np.percentile(np.abs(along), 99, axis=0)
    tol = np.maximum(MIXING_SIGN_RTOL * size, 4 * rounding * np.linalg.norm(mixing, axis=0))
    below, above = (along < -tol).mean(axis=0), (along > tol).mean(axis=0)
    mixing = np.where(~linear & (below > MIXING_SIGN_SHARE) & (above > MIXING_SIGN_SHARE), 0.0, mixing)
    return mixing * np.where(~linear & (below > above), -1.0, 1.0)
