"""The attacks on what the accelerator receives, in plain numpy: how much of the tensor it should not learn
(the user's input, or the true activation at that point of the network) an attacker recovers from it after
the best affine fit: scored within one inference, and across two (a reused mask cancels in their
difference), the fits chosen on other inferences; fitted on some inferences and scored on the others
pooled (a fixed mixing is learned once); averaging neighbours first; and from an input it chose (a static
mask is learned once). The attacks on weights are in
``shadownet.attacks``.
"""

from __future__ import annotations

import math

import numpy as np


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    """The signed correlation of ``x`` and ``y`` (0 when either is constant): each fit is scored with the
    sign it chose, so that one that learnt nothing scores about 0."""
    x = x - x.mean()
    y = y - y.mean()
    den = math.sqrt(float(x @ x) * float(y @ y))
    return float(x @ y) / den if den > 0 else 0.0


# affine_leakage chooses every fit on one half of the positions (interleaved) and scores it on the other,
# keeping the sign the fit chose: a fit that learned nothing then scores about 0 on average. Scoring |r|
# instead would report the noise floor ~0.8 / sqrt(positions) as leakage (0.05-0.1 on a 17x17x3 input).
# The halves share neighbourhoods: on inputs smooth over blocks a regression over many channels can learn
# block values from one half that the other repeats - an unrelated tensor of 16 smooth channels scored
# 0.43 - so those figures err high there, never low. single_leakage and difference_leakage choose on other
# inferences instead (the same tensor: -0.003), and pooled_leakage holds out whole inferences.
_FIT, _TEST = slice(0, None, 2), slice(1, None, 2)


def _psnr(truth: np.ndarray, fitted: np.ndarray) -> float:
    mse = float(np.mean((truth - fitted) ** 2))
    peak = float(truth.max() - truth.min())
    if peak == 0:
        return 0.0
    if mse == 0:
        return math.inf
    return 10.0 * math.log10(peak * peak / mse)


def affine_leakage(observed: np.ndarray, truth: np.ndarray, max_channels_regression: int = 64) -> dict:
    """How well ``truth`` is recovered from ``observed`` by the best affine fit (worst case for the defender).

    ``observed`` and ``truth`` are channels-last tensors with the same number of positions (C may
    differ); every position is one sample. Three fits, the largest correlation reported as
    ``correlation``:
    - ``overall``: one scalar ``a * observed + b`` (needs equal shapes and >= 16 values);
    - ``per_channel``: each true channel against its best-correlated observed channel (undoes a
      channel permutation and per-channel scaling), averaged over true channels;
    - ``regression``: each true channel regressed on all observed channels at the same position
      (undoes any channel mixing); only with >= 5 fitted positions per unknown.
    Each fit is chosen on half of the positions and scored, with the sign it chose, on the other half
    (interleaved), so that neither picking the best of many channels nor a small sample's noise can pass
    for leakage: a fit that learned nothing scores about 0. ``per_channel`` needs >= 16 positions. PSNR
    is of the truth against the overall fit (on all positions), peak = its range.
    """
    obs = np.asarray(observed, dtype=np.float64)
    tru = np.asarray(truth, dtype=np.float64)
    xo, yt = obs.reshape(-1, obs.shape[-1]), tru.reshape(-1, tru.shape[-1])
    if len(xo) != len(yt):
        return _score({}, obs, tru)
    fits = _choose(xo[_FIT], yt[_FIT], obs.shape == tru.shape, max_channels_regression)
    return _score(fits, obs, tru, _TEST)


def _choose(fit_x: np.ndarray, fit_y: np.ndarray, same_shape: bool, max_channels: int) -> dict:
    """The fits of :func:`affine_leakage` chosen on positions ``fit_x`` [P, Co] / ``fit_y`` [P, Ct]: the
    overall fit's sign, each true channel's best observed channel and sign, the regression's coefficients."""
    fits: dict = {}
    if same_shape:
        fits["overall"] = math.copysign(1.0, _pearson(fit_x.reshape(-1), fit_y.reshape(-1)))
    if len(fit_x) >= 8:
        correlation = _corr_matrix(fit_x, fit_y)
        best = np.abs(correlation).argmax(axis=1)
        fits["per_channel"] = best, np.sign(correlation[np.arange(len(best)), best])
    co = fit_x.shape[1]
    if co <= max_channels and len(fit_x) >= 5 * (co + 1):
        fits["regression"] = np.linalg.lstsq(np.hstack([fit_x, np.ones((len(fit_x), 1))]), fit_y,
                                             rcond=None)[0]
    return fits


def _score(fits: dict, obs: np.ndarray, tru: np.ndarray, scored: slice = slice(None)) -> dict:
    """``fits`` (:func:`_choose`) scored on the positions ``scored`` of ``obs`` / ``tru`` with the signs they
    chose, and the PSNR of the truth against its own best scalar fit on all of them (peak = its range)."""
    xo, yt = obs.reshape(-1, obs.shape[-1]), tru.reshape(-1, tru.shape[-1])
    out: dict = {}
    if obs.shape == tru.shape:
        x, y = obs.reshape(-1), tru.reshape(-1)
        a, b = _lstsq_affine(x, y)
        # Fewer than 16 values: |r| mostly chance (0.3-0.5 on 8): pooled_leakage's. None scored (one position,
        # held out from its own fit): not measured, rather than a correlation of nothing.
        if len(x) >= 16 and "overall" in fits and xo[scored].size:
            out["overall"] = fits["overall"] * _pearson(xo[scored].reshape(-1), yt[scored].reshape(-1))
        out["psnr_db"] = _psnr(y, a * x + b)
    enough = len(xo) == len(yt) and len(xo) >= 16  # positions in the tensor, before a half is taken
    xo, yt = xo[scored], yt[scored]
    if enough:
        if "per_channel" in fits:
            best, sign = fits["per_channel"]
            out["per_channel"] = float(np.mean([sign[c] * _pearson(xo[:, best[c]], yt[:, c])
                                                for c in range(yt.shape[1])]))
        if "regression" in fits:
            pred = np.hstack([xo, np.ones((len(xo), 1))]) @ fits["regression"]
            out["regression"] = float(np.mean([_pearson(pred[:, c], yt[:, c])
                                               for c in range(yt.shape[1])]))
    figures = [v for k, v in out.items() if k in ("overall", "per_channel", "regression")]
    out["correlation"] = max(figures) if figures else None
    return out


def _mean_figures(figures: list[dict]) -> dict:
    """Average of per-inference figures, key by key; ``correlation`` is the best fit's average (the
    average of each inference's best would add the noise of picking among three), ``max_correlation``
    the worst single inference's best."""
    out: dict = {}
    for key in ("overall", "psnr_db", "per_channel", "regression"):
        values = [f[key] for f in figures if f.get(key) is not None]
        if values:
            out[key] = float(np.mean(values))
    fits = [out[key] for key in ("overall", "per_channel", "regression") if key in out]
    if fits:
        out["correlation"] = max(fits)
    values = [f["correlation"] for f in figures if f.get("correlation") is not None]
    if values:
        out["max_correlation"] = float(max(values))
    return out


# The fits of single_leakage choose on at most this many positions of the other inferences.
SINGLE_FIT_POSITIONS = 200_000


def single_leakage(observed: np.ndarray, truth: np.ndarray) -> dict:
    """What one inference reveals: :func:`affine_leakage`'s fits scored within each inference of the
    stacks (``(K, ...)``) and averaged over the K inferences, each fit chosen on the inferences of the other
    parity (at most ``SINGLE_FIT_POSITIONS`` of their positions), as an attacker learns a fixed
    transform's sign, channels or mixing from inputs of its own; with one inference, on interleaved halves
    of its positions. Chosen within the inference, on neighbouring positions, a fit kept any chance
    correlation the two halves share - a mask with power at low spatial frequencies (a shaped one) and an
    input with structure there (a zero border) share one - and scored it as leakage: 0.21 on a
    zero-padded input under a mask that hides it (a white mask's view plus noise, which scored 0.03).
    The fits are the same at every position, so a mask that differs from position to position stays noise
    even when it is the same in every inference (a static mask: :func:`difference_leakage` removes it).
    A transform drawn afresh per inference is what these fits cannot learn (a review: a sign flip per
    inference scored 0.09, a channel permutation 0.49, against 1.0 fitted within the inference); no scheme
    draws one, and one that did would need the within-inference fits back."""
    obs = np.asarray(observed, dtype=np.float64)
    tru = np.asarray(truth, dtype=np.float64)
    if len(obs) < 2 or obs.shape[:-1] != tru.shape[:-1]:
        return _mean_figures([affine_leakage(o, t) for o, t in zip(obs, tru, strict=True)])
    folds = []
    for parity in (0, 1):
        other = slice(1 - parity, None, 2)
        fit_x, fit_y = obs[other].reshape(-1, obs.shape[-1]), tru[other].reshape(-1, tru.shape[-1])
        step = max(1, -(-len(fit_x) // SINGLE_FIT_POSITIONS))
        folds.append(_choose(fit_x[::step], fit_y[::step], obs.shape == tru.shape, 64))
    return _mean_figures([_score(folds[k % 2], o, t) for k, (o, t) in enumerate(zip(obs, tru, strict=True))])


def _lstsq_affine(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    xm, ym = x.mean(), y.mean()
    xx = float((x - xm) @ (x - xm))
    a = float((x - xm) @ (y - ym)) / xx if xx > 0 else 0.0
    return a, ym - a * xm


def _corr_matrix(xo: np.ndarray, yt: np.ndarray) -> np.ndarray:
    xc = xo - xo.mean(axis=0)
    yc = yt - yt.mean(axis=0)
    num = yc.T @ xc
    den = np.outer(np.linalg.norm(yc, axis=0), np.linalg.norm(xc, axis=0))
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


# The pooled fit: at least POOLED_MIN positions per unknown in its half (fewer: not fitted); every one of
# them up to a cost of POOLED_FLOPS (positions x unknowns^2: seconds at 1,024 channels), at least
# POOLED_MIN_KEPT per unknown - a sample of 16 per unknown missed channels that rarely fire, and the fit
# then put them wrong (0.00-0.86 on rounds that all positions fit at 1.000: a review); POOLED_TEST_MAX
# scored.
POOLED_MIN, POOLED_MIN_KEPT, POOLED_FLOPS, POOLED_TEST_MAX = 4, 64, 2e10, 50_000
POOLED_VALUES = 25_000_000  # and positions x unknowns at most (200 MB of float64): memory, not time


def pooled_leakage(observed: np.ndarray, truth: np.ndarray) -> dict:
    """The fits across inferences: fitted on the positions of every other inference of the stacks
    (``(K, ...)``) and scored on the inferences they never saw (Pearson correlation with the sign the fit
    chose), as an attacker learns a fixed transform from inputs of its own whose features it computes with
    the public weights and applies it to the user's:
    - ``regression``: each true channel regressed on all observed channels at the same position, averaged
      over the true channels that vary in both halves (a ReLU that never fires has nothing to leak);
      needs ``POOLED_MIN`` fit positions per unknown (channels + 1);
    - ``overall``: one scalar ``a * observed + b`` (equal shapes; 8 fitted values at least): the figure
      (``correlation``) of a one-channel tensor, reported beside the regression for the others (it cannot
      undo a mixing: without the regression their figure is None, not a scalar fit's ~0).
    Within one inference a layer with many channels and few positions (ResNet-44's 16x16x32 rounds) left a
    regression too few samples to run at all; pooled, the mixing of an unmasked round is undone (1.000),
    while a fresh mask per inference is noise it cannot learn. ``{}`` when neither
    fit has the samples."""
    obs, tru = np.asarray(observed), np.asarray(truth)
    if len(obs) < 2 or obs.shape[:-1] != tru.shape[:-1]:
        return {}
    co, ct = obs.shape[-1], tru.shape[-1]
    rng = np.random.default_rng(0)

    def positions(k: slice, most: int, width: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Inferences ``k``'s positions (``width`` values each; 0: a position's channels), at most ``most``
        of them drawn at random, in float64."""
        x, y = obs[k].reshape(-1, width or co), tru[k].reshape(-1, width or ct)
        if len(x) > most:
            chosen = np.sort(rng.choice(len(x), most, replace=False))
            x, y = x[chosen], y[chosen]
        return x.astype(np.float64), y.astype(np.float64)

    out: dict = {}
    if obs.shape == tru.shape and obs[0::2].size >= 8:
        (xf, yf), (xt, yt) = positions(slice(0, None, 2), POOLED_TEST_MAX, 1), \
            positions(slice(1, None, 2), POOLED_TEST_MAX, 1)
        a, _ = _lstsq_affine(xf[:, 0], yf[:, 0])
        out["overall"] = math.copysign(1.0, a) * _pearson(xt[:, 0], yt[:, 0])
    unknowns = co + 1
    if obs[0::2].size // co >= POOLED_MIN * unknowns:
        kept = max(POOLED_MIN_KEPT * unknowns,
                   min(int(POOLED_FLOPS / unknowns ** 2), POOLED_VALUES // unknowns))
        xf, yf = positions(slice(0, None, 2), kept)
        xt, yt = positions(slice(1, None, 2), POOLED_TEST_MAX)
        coef, *_ = np.linalg.lstsq(np.hstack([xf, np.ones((len(xf), 1))]), yf, rcond=None)
        predicted = xt @ coef[:-1] + coef[-1]
        predicted -= predicted.mean(axis=0)
        yt = yt - yt.mean(axis=0)
        # Scored on the true channels that vary in both halves: one that never varied where the fit was
        # made taught it nothing (more inferences would), one that never varies where it is scored has
        # nothing to leak.
        varies = (np.einsum("pc,pc->c", yt, yt) > 0) & (np.ptp(yf, axis=0) > 0)
        if varies.any():
            den = np.sqrt(np.einsum("pc,pc->c", predicted, predicted) * np.einsum("pc,pc->c", yt, yt))
            scores = np.divide(np.einsum("pc,pc->c", predicted, yt), den, out=np.zeros(ct), where=den > 0)
            out["regression"] = float(scores[varies].mean())
            out["positions"] = len(xf)
    # The scalar fit counts where it is the whole question (one channel); elsewhere it cannot undo a mixing
    # and would read as no leakage where the regression only lacked inferences (the report shows '-').
    fits = [out[key] for key in ("overall", "regression") if key in out and (key == "regression" or co == 1)]
    if fits:
        out["correlation"] = max(fits)
    return out


AVERAGING_SIDES = (2, 3, 4, 6, 8, 12, 16)  # the box filters tried, side in positions


def _box(x: np.ndarray, side: int) -> np.ndarray:
    """``x`` (``(K, N, H, W, C)``) averaged over each ``side`` x ``side`` window (the windows that fit:
    ``H - side + 1`` by ``W - side + 1`` of them), in float64."""
    c = np.cumsum(np.cumsum(np.pad(x.astype(np.float64), ((0, 0), (0, 0), (1, 0), (1, 0), (0, 0))), 2), 3)
    return (c[:, :, side:, side:] - c[:, :, :-side, side:] - c[:, :, side:, :-side]
            + c[:, :, :-side, :-side]) / (side * side)


def averaging_leakage(observed: np.ndarray, truth: np.ndarray) -> dict:
    """What averaging neighbours first recovers: the observed tensor box-averaged over windows of
    ``AVERAGING_SIDES`` positions each way, then :func:`pooled_leakage`'s regression of the true value at
    each window's centre on the averaged channels (which undoes a mixing of the channels as well as it
    averages their noise: a channel mean is one such combination), fitted on every other inference of the
    stacks (``(K, N, H, W, C)``) and scored on the others. The window is chosen within the fitting half
    (fitted on its even inferences, scored on its odd ones), then fitted and scored once. A white mask,
    independent element by element, holds a fit of one position's values to about 0.1 at 10x the input's
    spread; neighbours or channels whose true values agree let an attacker average the noise down first
    (SECURITY.md). ``{}`` unless the stacks are NHWC images of at least 8 inferences."""
    obs, tru = np.asarray(observed), np.asarray(truth)
    if obs.ndim != 5 or obs.shape[:-1] != tru.shape[:-1] or len(obs) < 8:
        return {}

    def averaged(side: int, infs: slice) -> tuple[np.ndarray, np.ndarray]:
        estimate = _box(obs[infs], side)
        at = (side - 1) // 2  # each window's centre (the upper left of the four, for an even side)
        return estimate, tru[infs][:, :, at:at + estimate.shape[2], at:at + estimate.shape[3]]

    # Windows of at most a quarter of the image each way: wider ones leave too few independent averages
    # (pure noise scored 0.05 through 16x16 windows of MiniVGG's 32x32 inputs over 24 inferences).
    sides = [side for side in (1, *AVERAGING_SIDES) if side <= min(obs.shape[2:4]) // 4 or side == 1]
    chosen = {side: pooled_leakage(*averaged(side, slice(0, None, 2))).get("correlation") for side in sides}
    chosen = {side: value for side, value in chosen.items() if value is not None}
    if not chosen:
        return {}
    side = max(chosen, key=chosen.get)
    figure = pooled_leakage(*averaged(side, slice(None)))
    return {"correlation": figure["correlation"], "side": side} if "correlation" in figure else {}


def difference_leakage(observed: np.ndarray, truth: np.ndarray) -> dict:
    """The difference attack on masks reused across inferences: ``obs_k+1 - obs_k`` against
    ``x_k+1 - x_k`` (a static additive mask cancels exactly), averaged over consecutive pairs, each fit
    chosen on the other pairs as :func:`single_leakage` chooses it."""
    obs = np.asarray(observed, dtype=np.float64)
    tru = np.asarray(truth, dtype=np.float64)
    if len(obs) < 2:
        return {}
    return single_leakage(obs[1:] - obs[:-1], tru[1:] - tru[:-1])


def known_input_leakage(observed: np.ndarray, truth: np.ndarray) -> dict:
    """The chosen-input attack on a static mask: the normal world runs the model once on an input it
    knows (``truth[0]``), learns the mask as ``obs_0 - x_0`` and unmasks every later inference:
    ``x_k ~ obs_k - obs_0 + x_0``, scored without any fit (correlation and PSNR, averaged over k >= 1).
    Only for tensors the attacker can know for its own input: the user's raw input."""
    obs = np.asarray(observed, dtype=np.float64)
    tru = np.asarray(truth, dtype=np.float64)
    if len(obs) < 2 or obs.shape != tru.shape:
        return {}
    figures = []
    for k in range(1, len(obs)):
        estimate = obs[k] - obs[0] + tru[0]
        # Signed: nothing is fitted, the estimate has its sign; |r| of noise is 0.8 / sqrt(values), 0.21 of a
        # 16-value input with nothing learnt (a review).
        figures.append({"correlation": _pearson(estimate.reshape(-1), tru[k].reshape(-1)),
                        "psnr_db": _psnr(tru[k], estimate)})
    return {key: float(np.mean([f[key] for f in figures])) for key in ("correlation", "psnr_db")}
