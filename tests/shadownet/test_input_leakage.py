"""The input-leakage attacks: they must see through every affine disguise and a reused mask, and find
nothing where there is nothing."""

from __future__ import annotations

import numpy as np
import pytest

from shadownet import input_leakage


def images(rng: np.random.Generator, k: int = 4) -> np.ndarray:
    # Smooth random images in [0, 1]: neighbouring pixels correlate like natural ones.
    x = rng.uniform(0, 1, (k, 8, 8, 3))
    x = np.kron(x, np.ones((1, 4, 4, 1)))
    return x + 0.05 * rng.standard_normal(x.shape)


def test_input_leakage_sees_through_scale_shift_permutation_and_mixing() -> None:
    rng = np.random.default_rng(9)
    x = images(rng)
    assert input_leakage.affine_leakage(3 * x - 1, x)["correlation"] == pytest.approx(1.0)
    assert input_leakage.affine_leakage(3 * x - 1, x)["psnr_db"] > 100
    permuted = x[..., ::-1] * np.array([0.5, 2.0, -1.0])
    assert input_leakage.affine_leakage(permuted, x)["per_channel"] == pytest.approx(1.0)
    mixed = x @ np.linalg.qr(rng.standard_normal((3, 3)))[0]
    assert input_leakage.affine_leakage(mixed, x)["regression"] == pytest.approx(1.0)


def test_static_mask_cancels_in_the_difference_attack_and_fresh_masks_do_not() -> None:
    rng = np.random.default_rng(10)
    x = images(rng)
    spread = x.std()
    static = 10 * spread * rng.standard_normal(x.shape[1:])
    single = input_leakage.affine_leakage(x + static, x)["correlation"]
    assert single < 0.3  # a large mask hides one inference...
    assert input_leakage.difference_leakage(x + static, x)["correlation"] == pytest.approx(1.0)  # ...not two
    known = input_leakage.known_input_leakage(x + static, x)
    assert known["correlation"] == pytest.approx(1.0) and known["psnr_db"] > 100
    fresh = 10 * spread * rng.standard_normal(x.shape)
    assert input_leakage.difference_leakage(x + fresh, x)["correlation"] < 0.3
    assert input_leakage.known_input_leakage(x + fresh, x)["correlation"] < 0.3
    # The paper's tiny masks (sigma 0.05) hide nothing even once.
    assert input_leakage.affine_leakage(x + 0.05 * rng.standard_normal(x.shape[1:]), x)["correlation"] > 0.95


def test_choosing_among_many_channels_is_not_leakage() -> None:
    # 8x8 positions, 512 unrelated channels: the best of 512 correlations on 64 samples is ~0.45 by
    # chance; scored on held-out positions it falls back to chance.
    rng = np.random.default_rng(14)
    observed = rng.standard_normal((8, 8, 512))
    truth = rng.standard_normal((8, 8, 64))
    assert input_leakage.affine_leakage(observed, truth)["correlation"] < 0.25
    assert input_leakage.single_leakage(observed[None], truth[None])["correlation"] < 0.25


def test_single_leakage_does_not_fit_across_inferences() -> None:
    # A static per-element mask on 64-element vectors: one inference shows x + m (hidden when m is
    # large); only the difference of two inferences removes m.
    rng = np.random.default_rng(15)
    x = rng.uniform(0, 1, (4, 1, 64))
    m = 10 * rng.standard_normal((1, 64))
    assert input_leakage.single_leakage(x + m, x)["correlation"] < 0.3
    assert input_leakage.difference_leakage(x + m, x)["correlation"] == pytest.approx(1.0)


def test_leakage_estimate_on_a_small_tensor_is_not_its_noise_floor() -> None:
    # A 17x17x3 round input under masks 10x the input's spread: true correlation 1/sqrt(101) ~ 0.1 at
    # most per element. Scoring |r| of three fits on 433 held-out positions would add ~0.05 of noise
    # floor; fits scored with the sign they chose average out to the true value.
    rng = np.random.default_rng(16)
    x = rng.uniform(0, 1, (24, 17, 17, 3))
    unrelated = rng.standard_normal(x.shape)
    assert abs(input_leakage.single_leakage(unrelated, x)["correlation"]) < 0.03
    masked = x + 10 * x.std() * rng.standard_normal(x.shape)
    assert input_leakage.single_leakage(masked, x)["correlation"] == pytest.approx(1 / np.sqrt(101), abs=0.03)
    # ...and a leak the size of the target is still seen as one.
    leaky = x + 2 * x.std() * rng.standard_normal(x.shape)
    assert input_leakage.single_leakage(leaky, x)["correlation"] == pytest.approx(1 / np.sqrt(5), abs=0.03)


def test_fits_chosen_on_other_inferences_do_not_learn_what_neighbouring_positions_share() -> None:
    # Unrelated tensors smooth over 4x4 blocks: chosen on interleaved positions of one inference, the
    # regression over 16 channels learns block values the other half repeats (0.43); chosen on the other
    # inferences it learns nothing (a review saw the interleaved fit reach 0.95).
    rng = np.random.default_rng(3)

    def smooth(channels: int) -> np.ndarray:
        x = np.kron(rng.uniform(0, 1, (16, 1, 8, 8, channels)), np.ones((1, 1, 4, 4, 1)))
        return x + 0.05 * rng.standard_normal(x.shape)

    truth, unrelated = smooth(3), smooth(16)
    assert input_leakage.single_leakage(unrelated[:1], truth[:1])["correlation"] > 0.3  # the old way
    assert abs(input_leakage.single_leakage(unrelated, truth)["correlation"]) < 0.05
    assert abs(input_leakage.difference_leakage(unrelated, truth)["correlation"]) < 0.1


def test_a_fixed_mixing_is_learnt_across_inferences_where_one_inference_is_too_small() -> None:
    # 8x8 positions of 32 mixed channels: one inference alone has too few positions for the regression
    # (its figure is a per-channel fit's, about 1/sqrt(32) of the mixing); fitted on eight inferences and
    # applied to eight others - pooled, or scored within each inference - it undoes the mixing exactly.
    rng = np.random.default_rng(17)
    x = rng.uniform(0, 1, (16, 8, 8, 32))
    mixed = x @ np.linalg.qr(rng.standard_normal((32, 32)))[0] + 3.0
    alone = input_leakage.single_leakage(mixed[:1], x[:1])
    assert alone.get("regression") is None and alone["correlation"] < 0.6
    assert input_leakage.single_leakage(mixed, x)["regression"] == pytest.approx(1.0)
    pooled = input_leakage.pooled_leakage(mixed, x)
    assert pooled["correlation"] == pytest.approx(1.0)
    # A fresh mask per inference, ten times the spread: what a fit learns on some inferences does not
    # carry to others (about 1/sqrt(101) at best, the mask's share).
    masked = mixed + 10 * x.std() * rng.standard_normal(x.shape)
    assert input_leakage.pooled_leakage(masked, x)["correlation"] < 0.15
    # Unrelated channels: nothing.
    assert abs(input_leakage.pooled_leakage(rng.standard_normal(x.shape), x)["correlation"]) < 0.05
    # Too few positions per unknown in the fitting half (one inference of 64 positions, 33 unknowns).
    assert "regression" not in input_leakage.pooled_leakage(mixed[:2], x[:2])


def test_a_tensor_too_small_to_fit_within_one_inference_is_fitted_across_inferences() -> None:
    # 8 values (a recurrent step's state): within one inference any fit's |r| is mostly chance (0.3-0.5),
    # so none is reported; across inferences the regression undoes a mixing, and finds nothing in noise.
    rng = np.random.default_rng(18)
    x = rng.standard_normal((160, 1, 8))
    assert input_leakage.single_leakage(rng.standard_normal(x.shape), x).get("correlation") is None
    mixed = x @ np.linalg.qr(rng.standard_normal((8, 8)))[0]
    assert input_leakage.pooled_leakage(mixed, x)["correlation"] == pytest.approx(1.0)
    assert abs(input_leakage.pooled_leakage(rng.standard_normal(x.shape), x)["correlation"]) < 0.15
    # Too few inferences for the regression (36 fitted positions wanted): the scalar fit, which cannot
    # undo the mixing, is reported beside it but is not the figure; of one channel it is.
    few = input_leakage.pooled_leakage(mixed[:40], x[:40])
    assert "regression" not in few and "overall" in few and "correlation" not in few
    assert input_leakage.pooled_leakage(2 * x[:40, ..., :1] + 1, x[:40, ..., :1])["correlation"] \
        == pytest.approx(1.0)


def test_the_pooled_fit_uses_every_position_it_can_afford_and_channels_it_saw_vary() -> None:
    # A channel that fires on a few positions only: a sample of 16 positions per unknown missed it, and the
    # fit put it wrong (a review: 0.00 on a round that every position fits at 1.000). Every fit position is
    # used where the fit is cheap; a channel that never varied where the fit was made is not scored.
    rng = np.random.default_rng(19)
    x = np.maximum(rng.standard_normal((24, 8, 8, 16)), 0)
    x[..., 0] = 0
    x[2, 3, 4, 0] = x[7, 1, 1, 0] = 1.0  # fires twice, in the scored half only
    x[4, 5, 5, 1] = 2.0  # channel 1 fires once, in the fit half: fitted and scored
    x[..., 1] = np.where(np.arange(24)[:, None, None] == 4, x[..., 1], 0)
    x[9, 2, 2, 1] = 1.5
    mixed = x @ np.linalg.qr(rng.standard_normal((16, 16)))[0]
    pooled = input_leakage.pooled_leakage(mixed, x)
    assert pooled["positions"] == 12 * 64  # all of them (16 per unknown: 272)
    assert pooled["correlation"] == pytest.approx(1.0)


def test_the_chosen_input_attack_on_a_small_input_learns_nothing_from_fresh_masks() -> None:
    # No fit: the estimate's correlation is signed. Its |r| read 0.21 on 16 values of pure noise (a review).
    rng = np.random.default_rng(20)
    x = rng.uniform(0, 1, (64, 1, 16))
    fresh = x + 10 * x.std() * rng.standard_normal(x.shape)
    assert abs(input_leakage.known_input_leakage(fresh, x)["correlation"]) < 0.12  # seeded: 0.075
    static = x + 10 * x.std() * rng.standard_normal(x.shape[1:])
    assert input_leakage.known_input_leakage(static, x)["correlation"] == pytest.approx(1.0)


def test_averaging_neighbours_or_channels_recovers_more_than_one_position_of_a_white_mask() -> None:
    # A white mask at 10x the input's spread holds one position's fit to ~0.1; an input whose neighbours or
    # channels agree lets averaging bring the noise down first (SECURITY.md, "averaging").
    rng = np.random.default_rng(21)
    coarse = rng.uniform(0, 1, (24, 1, 4, 4, 1))
    gray = np.repeat(np.kron(coarse, np.ones((1, 1, 8, 8, 1))), 16, axis=-1)  # 32x32, smooth, 16 channels
    masked = gray + 10 * gray.std() * rng.standard_normal(gray.shape)
    one_position = input_leakage.single_leakage(masked, gray)["correlation"]
    averaged = input_leakage.averaging_leakage(masked, gray)
    # One position's regression already averages the 16 equal channels (0.32); windows of neighbours more.
    assert averaged["correlation"] > max(0.5, one_position + 0.2)
    # The channels mixed as groupmix mixes them (a review: comparing channel with channel found -0.005),
    # or negated (it picked no window, and the audit showed 0): the regression after the average undoes both.
    mixing = np.linalg.qr(rng.standard_normal((16, 16)))[0]
    for seen in (masked @ mixing, -masked):
        assert input_leakage.averaging_leakage(seen, gray)["correlation"] > max(0.5, one_position + 0.2)
    noise = input_leakage.averaging_leakage(rng.standard_normal(gray.shape), gray)
    assert abs(noise["correlation"]) < 0.05
    assert input_leakage.averaging_leakage(masked[:, 0], gray[:, 0]) == {}  # not NHWC stacks
    assert input_leakage.averaging_leakage(masked[:4], gray[:4]) == {}  # too few inferences to choose
