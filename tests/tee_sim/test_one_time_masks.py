"""The TA's one-time masks (``tee_sim.one_time_masks``): the stream a key makes, white or shaped."""

from __future__ import annotations

import math

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from tee_sim.one_time_masks import MaskStream, gaussian_table
from tee_sim.program import mask_bands


def _alloc(shape, dtype):
    return np.zeros(shape, dtype)


def test_mask_stream_draws_the_schemes_distribution():
    mean = np.array([-3.0, 0.5, 7.0], np.float32)
    stream = MaskStream({"buffer": "b", "shape": [1, 64, 64, 3], "std": 10.0}, mean, _alloc)
    a, b, c = (np.empty((1, 64, 64, 3), np.float32) for _ in range(3))
    stream.draw(b"k" * 32, a)
    stream.draw(b"k" * 32, b)
    stream.draw(b"j" * 32, c)
    assert np.array_equal(a, b) and np.abs(a - c).min() > 0  # a key makes its mask, another key another
    flat = a.reshape(-1, 3)
    assert np.allclose(flat.mean(axis=0), mean, atol=0.5) and np.allclose(flat.std(axis=0), 10, rtol=0.05)
    centres, widths = gaussian_table()
    assert centres.dtype == widths.dtype == np.float32 and abs(float(centres.mean())) < 1e-6
    variance = float(np.mean(centres.astype(np.float64) ** 2) + np.mean(widths.astype(np.float64) ** 2) / 12)
    assert abs(variance - 1) < 1e-6 and np.all(widths > 0)
    # A mask larger than one keystream chunk is the same AES-CTR stream, 32 bits an element: a cell of
    # the table, and the place within it.
    shape = (1, 300, 300, 3)
    big = MaskStream({"buffer": "b", "shape": list(shape), "std": 2.0}, mean, _alloc)
    got = np.empty(shape, np.float32)
    big.draw(b"q" * 32, got)
    encryptor = Cipher(algorithms.AES(b"q" * 32), modes.CTR(bytes(16))).encryptor()
    words = np.frombuffer(encryptor.update(bytes(4 * got.size)), np.uint16).astype(np.float64)
    index = words[0::2].astype(np.intp)
    unit = centres[index] + (words[1::2] * 2.0 ** -16 - (0.5 - 2.0 ** -17)) * widths[index]
    want = np.clip(unit, -centres[-1], centres[-1]).reshape(shape) * 2.0 + mean
    assert np.allclose(got, want, rtol=0, atol=1e-5)


def test_a_white_mask_takes_more_than_the_tables_values():
    """A review: with 16 bits an element a white mask took 65536 values per channel, which an attacker
    learns and then reads 8-bit inputs back exactly from. Each value is now placed within its cell."""
    stream = MaskStream({"buffer": "b", "shape": [1, 512, 512, 1], "std": 1.0}, np.zeros(1, np.float32),
                        _alloc)
    mask = np.empty((1, 512, 512, 1), np.float32)
    stream.draw(b"w" * 32, mask)
    assert len(np.unique(mask)) > 3 * (1 << 16)  # 262,144 values drawn; at most 65,536 distinct before


def _octave(side: int) -> np.ndarray:
    """Each bin of a full ``side`` x ``side`` spectrum's band, computed apart from ``mask_bands``: 0 for the
    mean, else ``max(1, floor(-log2 |f|))``, numbered from 0 in increasing order."""
    f = np.fft.fftfreq(side)
    radius = np.hypot(f[:, None], f[None, :])
    octave = np.where(radius > 0, np.maximum(1, np.floor(-np.log2(np.where(radius > 0, radius, 1)))), 0)
    return np.searchsorted(np.unique(octave), octave)


@pytest.mark.parametrize("side", [16, 17, 32, 38])
def test_a_shaped_mask_shares_its_power_equally_among_bands_and_with_the_common_direction(side):
    """Every octave of spatial frequency (the mean one included) holds 1 / bands of each channel's
    variance, which is 1 (``std``), its values within the table's tails; half of it is a field the channels
    share (the direction of ones). A white mask has a small fraction of that in the lowest octave. Odd and
    awkward sides too: a field made on a faster FFT length (18 for 17) and cropped put half its share in
    one band of 17 (a review)."""
    shape = (1, side, side, 3)
    _, bands = mask_bands((side, side))
    band = _octave(side)
    assert bands == band.max() + 1 == {16: 5, 17: 5, 32: 6, 38: 6}[side]
    spec = {"buffer": "b", "shape": list(shape), "std": 1.0, "bands": bands}
    stream = MaskStream(spec, np.zeros(3, np.float32), _alloc, common=np.ones(3))
    masks = np.empty((400, *shape), np.float32)
    for k, mask in enumerate(masks):
        stream.draw(k.to_bytes(32, "little"), mask)
    assert abs(float(masks.var()) - 1) < 0.03 and np.abs(masks).max() <= gaussian_table()[0][-1]
    spectrum = np.abs(np.fft.fft2(masks[:, 0], axes=(1, 2))) ** 2 / side**2  # power per bin, [K, H, W, C]
    power = np.stack([spectrum[:, band == b].sum(axis=1) for b in range(bands)], axis=1)  # [K, bands, C]
    share = power.mean(axis=0) / power.mean(axis=0).sum(axis=0)
    assert np.allclose(share, 1 / bands, rtol=0.25), share
    channels = masks.reshape(-1, 3)
    assert np.allclose(np.corrcoef(channels.T)[np.triu_indices(3, 1)], 0.5, atol=0.03)
    white = MaskStream({"buffer": "b", "shape": list(shape), "std": 1.0}, np.zeros(3, np.float32), _alloc)
    for k, mask in enumerate(masks[:50]):
        white.draw(k.to_bytes(32, "little"), mask)
    spectrum = np.abs(np.fft.fft2(masks[:50, 0], axes=(1, 2))) ** 2 / side**2
    lowest = spectrum[:, band == bands - 1].sum(axis=1).mean() / spectrum.sum(axis=(1, 2)).mean()
    assert lowest < share[-1].min() / 10  # a white mask's share there: its 4 bins of side^2


def test_a_shaped_mask_is_its_key_s_and_without_positions_only_its_common_field():
    spec = {"buffer": "b", "shape": [1, 8, 8, 2], "std": 3.0, "bands": mask_bands((8, 8))[1]}
    stream = MaskStream(spec, np.array([1.0, -1.0], np.float32), _alloc, common=np.ones(2))
    a, b = np.empty((2, 1, 8, 8, 2), np.float32)
    stream.draw(b"k" * 32, a)
    stream.draw(b"k" * 32, b)
    assert np.array_equal(a, b)
    vector = MaskStream({"buffer": "v", "shape": [1, 6], "std": 1.0, "bands": 1}, np.zeros(6, np.float32),
                        _alloc, common=np.ones(6))
    draws = np.empty((2000, 1, 6), np.float32)
    for k, mask in enumerate(draws):
        vector.draw(k.to_bytes(32, "little"), mask)
    # The six values share a field: their mean, what a constant vector input would show, is hidden too.
    assert np.allclose(np.corrcoef(draws.reshape(-1, 6).T)[np.triu_indices(6, 1)], 0.5, atol=0.06)


@pytest.mark.parametrize("spec,common,message", [
    ({"bands": 4}, None, "bands"),  # a 16x16 mask has 5
    ({"bands": True}, None, "mean"),
    ({}, np.ones(3), "mean"),  # a common direction without bands
    ({"bands": 5}, np.ones(2), "mean"),
    ({"bands": 5}, np.array([1.0, np.nan, 1.0]), "mean"),
])
def test_a_shaped_mask_that_does_not_fit_its_tensor_is_refused(spec, common, message):
    with pytest.raises(ValueError, match=message):
        MaskStream({"buffer": "b", "shape": [1, 16, 16, 3], "std": 1.0, **spec}, np.zeros(3, np.float32),
                   _alloc, common=common)



@pytest.mark.parametrize("spec,scale", [
    ({}, np.ones(3, np.float32)),  # channel scales on a mask that does not follow its input
    ({"spread": 1.0}, np.ones(2, np.float32)),
    ({"spread": 1.0}, np.ones(3, np.float64)),
    ({"spread": 1.0}, np.array([1.0, 0.0, 0.5], np.float32)),
    ({"spread": 1.0}, np.array([1.0, 2.0, 0.5], np.float32)),  # the largest channel's scale is 1
    ({"spread": 1.0}, np.array([1.0, np.nan, 0.5], np.float32)),
])
def test_channel_scales_that_do_not_fit_the_mask_are_refused(spec, scale):
    """A raw input's channel scales, which its mask's spread is measured with (``tee_sim.mask_spread``)."""
    with pytest.raises(ValueError, match="scale"):
        MaskStream({"buffer": "b", "shape": [1, 16, 16, 3], "std": 1.0, **spec}, np.zeros(3, np.float32),
                   _alloc, scale=scale)
    MaskStream({"buffer": "b", "shape": [1, 16, 16, 3], "std": 1.0, "spread": 1.0}, np.zeros(3, np.float32),
               _alloc, scale=np.array([1.0, 2.0 ** -20, 0.5], np.float32))


@pytest.mark.parametrize("std", [1.0, 10.0])
def test_a_small_mask_follows_its_inputs_rms_and_a_hiding_one_its_peak(std):
    """A sparse input (one lit element in 12,288, its peak ~110x its RMS): a mask that hides values (10x
    the spread it was sized for) follows the peak over ``PEAK_RATIO``; a small one (1x, ``deep_mask_scale``)
    only drowns a chosen-input attack's probes and follows the RMS alone, so it stays within ``2**KEPT``
    times its ratio to the input - on a helper's sparse activations the peak rule took it to 26x their RMS,
    and a verified round's tolerance with it (stop 59). The restore kernel's measure carries the same
    weight; and the check of the layer it feeds is sized for the small mask's most (``small_mask_ratio``)."""
    from types import SimpleNamespace

    from tee_sim.mask_spread import KEPT, PEAK_RATIO, SpreadFollower, small_mask_ratio

    spec = {"buffer": "b", "shape": [1, 64, 64, 3], "std": std, "spread": 1.0}
    mean = np.array([0.8, -0.5, 0.0], np.float32) * std  # centred: minus calibration's means
    stream = MaskStream(spec, mean, _alloc)
    assert stream.small == (std == 1.0)
    follower = SpreadFollower({"m": stream}, {}, 1)
    x = np.zeros(spec["shape"], np.float32)
    x[0, 5, 7, 1] = 1.0
    rms = float(np.sqrt(np.mean(x.astype(np.float64) ** 2)))
    entry = SimpleNamespace(slot=0, exponents={}, masks={"m": np.ones(spec["shape"], np.float32)})
    follower.follow(entry, "m", x, lambda e, n: None)
    mask = std * 2.0 ** entry.exponents["m"]  # the mask's std now
    if stream.small:
        assert std * rms <= mask <= 2 ** KEPT * std * rms
        assert follower.measure(_alloc, "m")[2] == 0.0
        # The mask drawn at that power of two, its mean moved with it, within the ratio of its input's RMS
        # its check is sized for (its std alone, 4x: a helper's masks reached 4.7-5.0x, stop 59).
        q = small_mask_ratio(spec, mean)
        assert q == pytest.approx(2 ** KEPT * math.sqrt(std ** 2 + float(np.mean(mean.astype(float) ** 2))))
        drawn = np.empty(spec["shape"], np.float32)
        stream.draw(b"d" * 32, drawn)
        ratio = math.sqrt(float(np.mean(drawn.astype(np.float64) ** 2))) * 2.0 ** entry.exponents["m"] / rms
        assert mask / rms < ratio <= q  # the mean adds to the std, within the bound
    else:
        assert mask >= std / PEAK_RATIO and mask > 10 * std * rms  # the peak over 6: 18x the RMS
        assert follower.measure(_alloc, "m")[2] == PEAK_RATIO ** -2
        assert small_mask_ratio(spec, mean) == 0.0
