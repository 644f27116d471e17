"""The attacks on simulated layers: they must break the paper's sampling and fail on sound transforms."""

from __future__ import annotations

import math

import numpy as np
import pytest

from shadownet import attacks

# Layer shapes (filters N, fan-in D) of small CNNs: 3x3 convs over 3..128 channels and a dense layer.
SHAPES = [(16, 27), (32, 144), (64, 576), (32, 288), (10, 256)]


def he_filters(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    return rng.standard_normal((n, d)) * math.sqrt(2.0 / d)


def paper_scheme(
    rng: np.random.Generator, w: np.ndarray, ratio: float = 1.2
) -> tuple[np.ndarray, np.ndarray]:
    """The authors' sampling: fakes N(0,1), W' = (W - F_j) / s, j uniform over fakes, s ~ U(0,1), shuffle."""
    n, d = w.shape
    m = int(n * ratio)
    fakes = rng.standard_normal((m - n, d))
    s = rng.uniform(0.0, 1.0, n)
    j = rng.integers(0, m - n, n)
    rows = np.vstack([(w - fakes[j]) / s[:, None], fakes])
    is_fake = np.r_[np.zeros(n, bool), np.ones(m - n, bool)]
    perm = rng.permutation(m)
    return rows[perm], is_fake[perm]


def recovered(estimates: np.ndarray, reference: np.ndarray) -> np.ndarray:
    return attacks.best_cosines(estimates, reference) >= attacks.RECOVERY_COS


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fake_partner_recovers_the_paper_scheme(seed: int) -> None:
    rng = np.random.default_rng(seed)
    hits = total = 0
    for n, d in SHAPES:
        w = he_filters(rng, n, d)
        obf, _ = paper_scheme(rng, w)
        hits += recovered(attacks.fake_partner_recovery(obf), w).sum()
        total += n
    assert hits / total >= 0.9


def test_paper_scheme_fake_partner_matches_the_design_figure() -> None:
    # ../shared/design/SHADOWNET.md: 64 of 64 filters back with cosine >= 0.991 (3x3 conv over 64 channels).
    rng = np.random.default_rng(7)
    w = he_filters(rng, 64, 576)
    obf, _ = paper_scheme(rng, w)
    best = attacks.best_cosines(attacks.fake_partner_recovery(obf), w)
    assert (best >= 0.99).mean() >= 0.95
    # Direction matching alone sees nothing: every transformed filter points along its fake.
    assert attacks.best_cosines(attacks.direction_matching(obf, w), w).max() < 0.5


def test_variance_test_separates_the_paper_fakes() -> None:
    rng = np.random.default_rng(3)
    accuracy = []
    for n, d in SHAPES:
        w = he_filters(rng, n, d)
        obf, is_fake = paper_scheme(rng, w)
        vt = attacks.variance_test(obf, len(obf) - n)
        assert vt.is_fake.sum() == len(obf) - n
        accuracy.append((vt.is_fake == is_fake).mean())
    assert np.mean(accuracy) >= 0.85
    # Within collinear clusters the variance test is exact enough to recover nearly everything.
    w = he_filters(rng, 64, 576)
    obf, _ = paper_scheme(rng, w)
    assert recovered(attacks.cluster_variance_recovery(obf), w).mean() >= 0.95


def test_attack_layer_reports_the_paper_scheme_as_broken() -> None:
    rng = np.random.default_rng(4)
    w = he_filters(rng, 32, 288)
    obf, _ = paper_scheme(rng, w)
    report = attacks.attack_layer(obf, w)
    assert report["obfuscated_filters"] == 38
    assert report["recovered"]["any"] >= 29
    assert report["recovered"]["direction"] == 0
    # W lies in the span of the fakes and the transformed filters: full leakage, far above chance.
    assert report["subspace"]["energy_mean"] == pytest.approx(1.0)
    assert report["subspace"]["chance"] == pytest.approx(38 / 288)
    assert report["subspace"]["excess"] == pytest.approx(1.0)
    assert report["chance"]["any"] < 1e-6


def dense_mix(rng: np.random.Generator, w: np.ndarray) -> np.ndarray:
    """Every obfuscated filter a random orthogonal (condition number 1) mix of the whole layer."""
    q, _ = np.linalg.qr(rng.standard_normal((len(w), len(w))))
    return q @ w


@pytest.mark.parametrize("control", ["dense_mix", "dense_mix_with_fakes", "random"])
def test_controls_recover_nothing(control: str) -> None:
    rng = np.random.default_rng(11)
    hits = total = 0
    for n, d in SHAPES:
        w = he_filters(rng, n, d)
        if control == "dense_mix":
            obf = dense_mix(rng, w)
        elif control == "dense_mix_with_fakes":
            fakes = rng.standard_normal((int(n * 1.2) - n, d)) * math.sqrt(2.0 / d)
            obf = rng.permutation(np.vstack([dense_mix(rng, w), fakes]))
        else:
            obf = rng.standard_normal((int(n * 1.2), d))
        report = attacks.attack_layer(obf, w)
        hits += report["recovered"]["any"]
        total += n
    assert hits / total <= 0.02


def test_small_group_mixing_leaks_to_direction_matching() -> None:
    # Random orthogonal 4x4 mixes often let one filter dominate a row: the suite must see that.
    rng = np.random.default_rng(12)
    w = he_filters(rng, 128, 576)
    blocks = [np.linalg.qr(rng.standard_normal((4, 4)))[0] @ w[g : g + 4] for g in range(0, 128, 4)]
    report = attacks.attack_layer(np.vstack(blocks), w)
    assert report["recovered"]["direction"] >= 5
    assert report["subspace"]["excess"] == pytest.approx(1.0)


def test_min_norm_point_undoes_the_transform() -> None:
    rng = np.random.default_rng(5)
    w = rng.standard_normal(50)
    v = rng.standard_normal(50)
    v -= (v @ w) / (w @ w) * w
    # Exact when W is the foot of the perpendicular from the origin, i.e. W orthogonal to W - F.
    f = w + 30 * v
    w_obf = (w - f) / 0.37
    assert np.allclose(attacks.min_norm_points(f[None], w_obf[None])[0], w)
    # A large random fake is nearly there; the attacker need not know which of the two is the fake.
    f = 30 * rng.standard_normal(50) / math.sqrt(50) * np.linalg.norm(w)
    w_obf = (w - f) / 0.37
    for est in (attacks.min_norm_points(f[None], w_obf[None]), attacks.min_norm_points(w_obf[None], f[None])):
        assert attacks.abs_cosines(est, w[None])[0, 0] > 0.9


def test_direction_matching_undoes_depthwise_permutation_and_scaling() -> None:
    rng = np.random.default_rng(6)
    k = rng.standard_normal((32, 9))
    obf = k[rng.permutation(32)] * rng.uniform(0.01, 1.0, (32, 1))
    report = attacks.attack_layer(obf, k)
    assert report["recovered"]["direction"] == 32
    # ...whereas a random kernel reaches the threshold with 9 taps only at the chance rate.
    p = attacks.chance_abs_cos(9)
    assert 3e-4 < p < 5e-4
    assert report["chance"]["direction"] == pytest.approx(1 - (1 - p) ** 32)


@pytest.mark.parametrize(
    ("dim", "expected"),
    [
        (2, 4 * math.acos(0.9) / (2 * math.pi)),  # uniform angle on the circle
        (3, 0.1),  # Archimedes: |cos| is uniform on [0, 1] on the 2-sphere
        # (1 - c^2)^3 integrated from 0.9 to 1, over its integral 16/35 on [0, 1].
        (9, (1 - 0.9 - (1 - 0.9**3) + 3 * (1 - 0.9**5) / 5 - (1 - 0.9**7) / 7) / (16 / 35)),
    ],
)
def test_chance_rate_is_exact(dim: int, expected: float) -> None:
    assert attacks.chance_abs_cos(dim, 0.9) == pytest.approx(expected, rel=1e-9)


def test_chance_rate_agrees_with_monte_carlo() -> None:
    rng = np.random.default_rng(0)
    v = rng.standard_normal((200_000, 9))
    mc = (np.abs(v[:, 0]) / np.linalg.norm(v, axis=1) >= 0.9).mean()
    assert attacks.chance_abs_cos(9) == pytest.approx(mc, abs=1.5e-4)


def test_subspace_leakage_is_chance_for_a_random_subspace() -> None:
    rng = np.random.default_rng(8)
    w = he_filters(rng, 64, 576)
    sub = attacks.subspace_leakage(rng.standard_normal((76, 576)), w)
    assert sub.rank == 76
    assert sub.energy.mean() == pytest.approx(76 / 576, abs=0.02)
    assert attacks.subspace_leakage(dense_mix(rng, w), w).energy.min() == pytest.approx(1.0)


def test_large_real_weights_need_the_fake_orthogonal_point() -> None:
    # Real filters about 2/3 the norm of the fakes (a random-init classifier after batch-norm folding):
    # the minimum-norm point then keeps only ~0.85 of W's direction, the point orthogonal to F all of it.
    rng = np.random.default_rng(13)
    w = rng.standard_normal((200, 1024)) * 0.64
    obf, _ = paper_scheme(rng, w)
    assert recovered(attacks.fake_partner_recovery(obf), w).mean() < 0.5
    assert recovered(attacks.cluster_variance_recovery(obf), w).mean() >= 0.95
    assert attacks.attack_layer(obf, w)["recovered"]["any"] >= 190
