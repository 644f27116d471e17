"""The attacks of the literature on one obfuscated linear layer, and one of ours, in plain numpy.

Every weight attack takes the obfuscated filters of one layer as a matrix whose rows are the output
channels (a conv kernel flattened over kh*kw*cin, a dense layer's weight rows, one depthwise channel's
kh*kw taps) and returns *estimates*: vectors the attacker believes point along real filters. A reference
filter counts as recovered when some estimate has ``|cos| >= RECOVERY_COS`` with it (direction only:
every scheme here scales freely, and a scale is cheap to learn back once the direction is known).
Two attacks of ours read what crosses the boundary besides the weights (``shadownet.boundary``,
``shadownet.crossing_fits``): their estimates come in ready-made (``attack_layer``'s
``from_crossings``). The attacks on the inputs the accelerator receives are in ``shadownet.input_leakage``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

RECOVERY_COS = 0.9


def _as_rows(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    return a.reshape(len(a), -1)


def unit_rows(a: np.ndarray) -> np.ndarray:
    """Rows scaled to unit norm; all-zero rows stay zero (they match nothing)."""
    a = _as_rows(a)
    norms = np.linalg.norm(a, axis=1, keepdims=True)
    return np.divide(a, norms, out=np.zeros_like(a), where=norms > 0)


def abs_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``|cos|`` between every row of ``a`` and every row of ``b``: shape (len(a), len(b))."""
    return np.abs(unit_rows(a) @ unit_rows(b).T)


def best_cosines(estimates: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """For each reference filter, the largest ``|cos|`` any estimate reaches with it."""
    if len(estimates) == 0:
        return np.zeros(len(reference))
    return abs_cosines(estimates, reference).max(axis=0)


# ---------------------------------------------------------------------------------------------
# Weight attacks
# ---------------------------------------------------------------------------------------------


def direction_matching(obfuscated: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """GroupCover's attack: per reference filter, the obfuscated filter of largest ``|cos|``.

    Channel scaling and shuffling keep every filter's direction, so a public pretrained model undoes
    them. Returns one estimate per reference filter (sign aligned with it).
    """
    obf = _as_rows(obfuscated)
    ref = _as_rows(reference)
    if len(obf) == 0:
        return np.zeros_like(ref)
    cos = unit_rows(obf) @ unit_rows(ref).T
    best = np.abs(cos).argmax(axis=0)
    signs = np.sign(cos[best, np.arange(len(ref))])
    return obf[best] * np.where(signs == 0, 1.0, signs)[:, None]


def min_norm_points(partners: np.ndarray, filters: np.ndarray) -> np.ndarray:
    """Row-wise minimum-norm point of the line ``F + t W'``: ``t = -<F, W'> / |W'|^2``.

    Undoes ``W' = (W - F) / s``: the line through the fake ``F`` along ``W'`` holds ``W``, and since a
    real filter is nearly orthogonal to a large random fake, its point closest to the origin is ``W``
    up to an error of relative size ``~1/sqrt(D)``.
    """
    f = _as_rows(partners)
    w = _as_rows(filters)
    ww = np.einsum("ij,ij->i", w, w)
    fw = np.einsum("ij,ij->i", f, w)
    t = np.divide(-fw, ww, out=np.zeros_like(fw), where=ww > 0)
    return f + t[:, None] * w


def fake_orthogonal_points(partners: np.ndarray, filters: np.ndarray) -> np.ndarray:
    """Row-wise point of the line ``F + t W'`` orthogonal to ``F``: ``t = -|F|^2 / <F, W'>``.

    Also undoes ``W' = (W - F) / s``, assuming only that the real filter is orthogonal to its random
    fake (true up to ``|W| / sqrt(D)``): its error is ``<W, F> F / |F|^2`` whatever the ratio of
    ``|W|`` to ``|F|``, where the minimum-norm point loses W's component along ``W'`` once real
    weights are not much smaller than the fakes.
    """
    f = _as_rows(partners)
    w = _as_rows(filters)
    ff = np.einsum("ij,ij->i", f, f)
    fw = np.einsum("ij,ij->i", f, w)
    t = np.divide(-ff, fw, out=np.zeros_like(fw), where=np.abs(fw) > 1e-12 * ff)
    return f + t[:, None] * w


def _pair_estimates(f: np.ndarray, w: np.ndarray) -> np.ndarray:
    # Both estimators for pairs (F, W'): the attacker keeps every candidate.
    return np.vstack([min_norm_points(f, w), fake_orthogonal_points(f, w)])


def collinearity(obfuscated: np.ndarray) -> np.ndarray:
    """``|cos|`` between obfuscated filters, with the diagonal at -1 so no filter pairs with itself."""
    c = abs_cosines(obfuscated, obfuscated)
    np.fill_diagonal(c, -1.0)
    return c


def fake_partner_recovery(obfuscated: np.ndarray, partners_per_filter: int = 1,
                          estimators: str = "min_norm") -> np.ndarray:
    """Pair every filter with its most collinear other filter(s) and take the minimum-norm point of
    ``F + t W'`` (``estimators="both"``: also the point orthogonal to ``F``).

    The attacker does not need to know which of a pair is the fake: ``F + t W'`` and ``W' + t F``
    both reduce to the component of ``W`` orthogonal to the fake. With ``partners_per_filter = k`` each
    filter is paired with its k most collinear others (k * M estimates, twice that for "both").
    """
    obf = _as_rows(obfuscated)
    if len(obf) < 2:
        return np.zeros((0, obf.shape[1]))
    k = min(partners_per_filter, len(obf) - 1)
    partners = np.argsort(-collinearity(obf), axis=1)[:, :k]
    rows = np.repeat(np.arange(len(obf)), k)
    f, w = obf[partners.reshape(-1)], obf[rows]
    return _pair_estimates(f, w) if estimators == "both" else min_norm_points(f, w)


@dataclass(frozen=True)
class VarianceTest:
    """Which obfuscated filters the variance test calls fake, and how clearly."""

    is_fake: np.ndarray  # bool, one per obfuscated filter
    variances: np.ndarray  # per-weight variance of every obfuscated filter
    separation: float  # gap between the fake cluster and the nearest other filter / the cluster's spread


def variance_test(obfuscated: np.ndarray, n_fakes: int) -> VarianceTest:
    """TEESlice's test against additive fakes: fakes drawn i.i.d. from one distribution share one
    per-weight variance, far from that of real filters, so the attacker can tell them apart and drop them.

    The attacker knows the architecture, hence ``n_fakes = M - N``. Fakes sit at one end of the
    variance spectrum (in the paper's scheme the low end: every transformed real filter ``(W - F) / s``
    with ``s < 1`` has a larger variance than the fakes; a scheme with large fakes and unscaled real
    filters puts them at the top), and they share one variance: of the ``n_fakes`` lowest and the
    ``n_fakes`` highest log-variances, the narrower group is called fake.
    """
    obf = _as_rows(obfuscated)
    variances = obf.var(axis=1)
    m = len(obf)
    is_fake = np.zeros(m, dtype=bool)
    n_fakes = max(0, min(n_fakes, m))
    if n_fakes == 0 or n_fakes == m:
        is_fake[:] = n_fakes == m
        return VarianceTest(is_fake, variances, 0.0)
    logv = np.log(np.maximum(variances, 1e-300))
    order = np.argsort(logv)
    sorted_logv = logv[order]
    low_width = sorted_logv[n_fakes - 1] - sorted_logv[0]
    high_width = sorted_logv[-1] - sorted_logv[m - n_fakes]
    start = 0 if low_width <= high_width else m - n_fakes
    chosen = order[start : start + n_fakes]
    is_fake[chosen] = True
    spread = sorted_logv[start + n_fakes - 1] - sorted_logv[start]
    gaps = []
    if start > 0:
        gaps.append(sorted_logv[start] - sorted_logv[start - 1])
    if start + n_fakes < m:
        gaps.append(sorted_logv[start + n_fakes] - sorted_logv[start + n_fakes - 1])
    gap = min(gaps) if gaps else 0.0
    separation = float(gap / spread) if spread > 0 else math.inf
    return VarianceTest(is_fake, variances, separation)


def variance_paired_recovery(obfuscated: np.ndarray, n_fakes: int) -> np.ndarray:
    """Drop the filters the variance test calls fake, pair every remaining one with its most collinear
    fake, and take the minimum-norm point of ``F + t W'`` and its point orthogonal to ``F`` (two
    estimates per filter called real)."""
    obf = _as_rows(obfuscated)
    test = variance_test(obf, n_fakes)
    fakes = np.flatnonzero(test.is_fake)
    reals = np.flatnonzero(~test.is_fake)
    if len(fakes) == 0 or len(reals) == 0:
        return np.zeros((0, obf.shape[1]))
    cos = abs_cosines(obf[reals], obf[fakes])
    partner = fakes[cos.argmax(axis=1)]
    return _pair_estimates(obf[partner], obf[reals])


def collinear_clusters(obfuscated: np.ndarray) -> np.ndarray:
    """Label filters by connected component of the graph "``|cos| >= tau``" (tau well above chance:
    ``max(0.5, min(0.9, 4 / sqrt(D)))``, four standard deviations of a random pair's cosine)."""
    obf = _as_rows(obfuscated)
    m, d = obf.shape
    tau = max(0.5, min(0.9, 4.0 / math.sqrt(max(d, 1))))
    adjacent = collinearity(obf) >= tau
    labels = np.full(m, -1)
    for seed in range(m):
        if labels[seed] >= 0:
            continue
        labels[seed] = seed
        stack = [seed]
        while stack:
            i = stack.pop()
            for j in np.flatnonzero(adjacent[i] & (labels < 0)):
                labels[j] = seed
                stack.append(int(j))
    return labels


def cluster_variance_recovery(obfuscated: np.ndarray) -> np.ndarray:
    """The variance test inside each collinear cluster: a fake and the transformed filters it hides
    (``(W - F) / s``, ``s < 1``) are mutually collinear, and the fake has the smallest per-weight
    variance among them; pair every other member with it (two estimates per non-fake member, as in
    :func:`variance_paired_recovery`).

    Unlike the layer-wide test this needs no variance gap between all fakes and all real filters,
    and it never pairs two filters that share a fake (which gives ``W_a - W_b``)."""
    obf = _as_rows(obfuscated)
    labels = collinear_clusters(obf)
    variances = obf.var(axis=1)
    fakes, reals = [], []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        if len(members) < 2:
            continue
        fake = members[np.argmin(variances[members])]
        for i in members:
            if i != fake:
                fakes.append(fake)
                reals.append(i)
    if not reals:
        return np.zeros((0, obf.shape[1]))
    return _pair_estimates(obf[fakes], obf[reals])


@dataclass(frozen=True)
class SubspaceLeakage:
    energy: np.ndarray  # per reference filter: |P w|^2 / |w|^2, P the projection on the obfuscated row space
    chance: float  # what a random subspace of the same dimension holds: rank / D
    rank: int


def subspace_leakage(obfuscated: np.ndarray, reference: np.ndarray, rtol: float = 1e-5) -> SubspaceLeakage:
    """How much of each reference filter lies in the span of the layer's obfuscated filters.

    Any output-side transform ``W' = A W (+ fakes)`` keeps ``span(W)`` inside ``span(W')``, so a
    reference filter lies wholly in it while a random direction holds ``rank / D`` of its energy.
    Needs the answer to find the combination, so it is reported, never counted as recovery.
    """
    obf = _as_rows(obfuscated)
    ref = _as_rows(reference)
    d = obf.shape[1]
    if len(obf) == 0:
        return SubspaceLeakage(np.zeros(len(ref)), 0.0, 0)
    # Row scaling keeps the span; unit rows keep a huge row (a tiny secret scale s) from burying the
    # small singular values that carry the real filters under the rank tolerance.
    _, sv, vt = np.linalg.svd(unit_rows(obf), full_matrices=False)
    rank = int((sv > rtol * sv[0]).sum()) if sv[0] > 0 else 0
    basis = vt[:rank]
    refn = unit_rows(ref)
    energy = ((refn @ basis.T) ** 2).sum(axis=1)
    return SubspaceLeakage(np.clip(energy, 0.0, 1.0), rank / d, rank)


def chance_abs_cos(dim: int, threshold: float = RECOVERY_COS) -> float:
    """Probability that a uniformly random direction in R^dim has ``|cos| >= threshold`` with a fixed one.

    With ``c = sin(theta)`` the density of theta on [0, pi/2] is proportional to ``cos(theta)^(dim-2)``;
    ``F_n(a) = int_a^{pi/2} cos^n`` follows the reduction
    ``F_n = -cos^(n-1)(a) sin(a) / n + (n-1)/n F_(n-2)``, and the answer is
    ``F_(dim-2)(asin(threshold)) / F_(dim-2)(0)`` (exact up to rounding).
    """
    if dim <= 1 or threshold <= 0:
        return 1.0
    if threshold >= 1:
        return 0.0
    tail = _cos_power_tail(dim - 2, math.asin(threshold)) / _cos_power_tail(dim - 2, 0.0)
    return float(np.clip(tail, 0.0, 1.0))


def _cos_power_tail(n: int, a: float) -> float:
    sin_a, cos_a = math.sin(a), math.cos(a)
    f = 1.0 - sin_a if n % 2 else math.pi / 2 - a  # F_1 or F_0
    for k in range(2 + n % 2, n + 1, 2):
        f = -(cos_a ** (k - 1)) * sin_a / k + (k - 1) / k * f
    return f


def chance_any(p: float, candidates: int) -> float:
    """Probability that at least one of ``candidates`` independent random estimates reaches the threshold."""
    return float(1.0 - (1.0 - p) ** max(candidates, 0))


# ---------------------------------------------------------------------------------------------
# One layer, every attack
# ---------------------------------------------------------------------------------------------

# estimates made from the crossings (``shadownet.boundary``; the chosen inputs': ``shadownet.chosen_inputs``;
# the critical points': ``shadownet.critical_points``, and the mask fit's: ``shadownet.mask_fit``, a first
# layer's each, when the audit is asked to run them)
CROSSING_ATTACKS = ("restore_regression", "input_unmixing", "chosen_input", "critical_point", "mask_fit")
WEIGHT_ATTACKS = ("direction", "fake_partner", "fake_partner_top3", "variance_paired", "cluster_variance",
                  *CROSSING_ATTACKS)


def layer_estimates(obfuscated: np.ndarray, reference: np.ndarray,
                    from_crossings: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Every weight attack's estimates on one layer (``WEIGHT_ATTACKS`` -> rows like the filters), the
    attacker's public weights being ``reference``; ``from_crossings``: as ``attack_layer`` takes them."""
    unknown = set(from_crossings or ()) - set(CROSSING_ATTACKS)
    if unknown:
        raise ValueError(f"not attacks on the crossings: {sorted(unknown)}")
    obf = _as_rows(obfuscated)
    ref = _as_rows(reference)
    n, d = ref.shape
    m = len(obf)
    return {
        "direction": direction_matching(obf, ref),
        "fake_partner": fake_partner_recovery(obf, 1),
        "fake_partner_top3": fake_partner_recovery(obf, 3, estimators="both"),
        "variance_paired": variance_paired_recovery(obf, m - n),
        "cluster_variance": cluster_variance_recovery(obf),
    } | {name: np.asarray((from_crossings or {}).get(name, np.zeros((0, d))), np.float64).reshape(-1, d)
         for name in CROSSING_ATTACKS}


def attack_layer(obfuscated: np.ndarray, reference: np.ndarray, threshold: float = RECOVERY_COS,
                 from_crossings: dict[str, np.ndarray] | None = None) -> dict:
    """Run every weight attack on one layer; JSON-ready figures.

    ``reference`` holds the N real filters (the attacker's public weights, here the original model),
    ``obfuscated`` the M >= N filters the accelerator holds for the same layer, ``from_crossings`` the
    estimates of the attacks that read the crossings (``CROSSING_ATTACKS``: ``shadownet.boundary``), as rows
    like the filters; an attack not given has none (nothing observed).
    """
    obf = _as_rows(obfuscated)
    ref = _as_rows(reference)
    n, d = ref.shape
    m = len(obf)
    estimates = layer_estimates(obf, ref, from_crossings)
    best = {name: best_cosines(est, ref) for name, est in estimates.items()}
    any_best = np.max(np.stack(list(best.values())), axis=0)
    vt = variance_test(obf, m - n)
    sub = subspace_leakage(obf, ref)
    p = chance_abs_cos(d, threshold)
    n_estimates = m + sum(len(e) for k, e in estimates.items() if k != "direction")
    excess = (sub.energy.mean() - sub.chance) / (1.0 - sub.chance) if sub.chance < 1.0 else 0.0
    return {
        "filters": n,
        "obfuscated_filters": m,
        "dim": d,
        "recovered": {name: int((b >= threshold).sum()) for name, b in best.items()}
        | {"any": int((any_best >= threshold).sum())},
        "median_best_cos": {name: float(np.median(b)) for name, b in best.items()}
        | {"any": float(np.median(any_best))},
        "variance_test": {
            "called_fake": int(vt.is_fake.sum()),
            "separation": vt.separation if math.isfinite(vt.separation) else None,
            "variance_ratio": _variance_ratio(vt),
        },
        "subspace": {
            "rank": sub.rank,
            "energy_mean": float(sub.energy.mean()),
            "chance": float(sub.chance),
            "excess": float(excess),
            "over_threshold": int((np.sqrt(sub.energy) >= threshold).sum()),
        },
        "chance": {
            "per_comparison": p,
            "direction": chance_any(p, m),
            "any": chance_any(p, n_estimates),
        },
        "reference_self_match": _self_match_rate(ref, threshold),
    }


def _variance_ratio(vt: VarianceTest) -> float | None:
    if vt.is_fake.all() or not vt.is_fake.any():
        return None
    fake = float(np.median(vt.variances[vt.is_fake]))
    real = float(np.median(vt.variances[~vt.is_fake]))
    return real / fake if fake > 0 else None


def _self_match_rate(reference: np.ndarray, threshold: float) -> float:
    """Fraction of reference filters that another reference filter already matches at the threshold:
    the rate a "recovery" reaches by naming the wrong channel (high for small depthwise kernels)."""
    if len(reference) < 2:
        return 0.0
    c = collinearity(reference)
    return float((c.max(axis=1) >= threshold).mean())
