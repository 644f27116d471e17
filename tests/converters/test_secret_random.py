"""The conversion's secret generator: an AES-256-CTR keystream, and the draws the schemes take from it."""

import hashlib
import warnings

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from converters.pipeline import secret_rng
from converters.secret_random import SecretRandom


def test_its_words_are_the_aes_256_ctr_keystream_of_its_key():
    key = bytes(range(32))
    expected = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor().update(bytes(8 * 5000))
    drawn = SecretRandom(key)
    assert drawn._words(3000).tobytes() + drawn._words(2000).tobytes() == expected  # the stream goes on
    with pytest.raises(ValueError, match="32 bytes"):
        SecretRandom(bytes(16))


def test_a_seed_gives_the_same_draws_and_no_seed_never_does():
    first, again = SecretRandom.from_seed(7), SecretRandom.from_seed(7)
    assert np.array_equal(first.standard_normal(100), again.standard_normal(100))
    assert not np.array_equal(SecretRandom.from_seed(8).random(100), SecretRandom.from_seed(7).random(100))
    key = hashlib.sha256(b"shadownet conversion seed (INSECURE, tests only) 7").digest()
    assert np.array_equal(SecretRandom(key).random(10), SecretRandom.from_seed(7).random(10))
    assert not np.array_equal(SecretRandom().random(100), SecretRandom().random(100))
    assert type(secret_rng(None)) is SecretRandom
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        seeded = secret_rng(7)
    assert any("INSECURE" in str(w.message) for w in caught)
    assert np.array_equal(seeded.random(10), SecretRandom.from_seed(7).random(10))


def test_draws_have_numpys_shapes_types_and_distributions():
    rng = SecretRandom.from_seed(1)
    n = 400_000
    normal = rng.standard_normal(n)
    assert normal.dtype == np.float64 and abs(normal.mean()) < 5 / np.sqrt(n)
    assert abs(normal.var() - 1) < 5 * np.sqrt(2 / n)
    for q, z in ((0.5, 0.0), (0.8413, 1.0), (0.9772, 2.0), (0.99865, 3.0)):  # the normal's quantiles
        assert abs(np.mean(normal < z) - q) < 5 * np.sqrt(q * (1 - q) / n), (q, z)
    assert np.abs(normal).max() < 8.6
    single = rng.standard_normal((3, 4), dtype=np.float32)
    assert single.dtype == np.float32 and single.shape == (3, 4)
    assert isinstance(rng.standard_normal(), float) and isinstance(rng.random(), float)
    unit = rng.random(n)
    assert unit.min() >= 0 and unit.max() < 1
    counts = np.histogram(unit, bins=20, range=(0, 1))[0]
    assert ((counts - n / 20) ** 2 / (n / 20)).sum() < 50  # chi-square, 19 degrees of freedom: p ~ 1e-4
    spread = rng.uniform(-2.0, 3.0, (5, 6))
    assert spread.shape == (5, 6) and spread.min() >= -2 and spread.max() < 3
    picks = rng.integers(0, 7, n)
    assert picks.dtype == np.int64 and set(np.unique(picks)) == set(range(7))
    assert ((np.bincount(picks) - n / 7) ** 2 / (n / 7)).sum() < 30  # 6 degrees of freedom
    assert set(np.unique(rng.integers(3, 5, 100))) == {3, 4}
    assert set(np.unique(rng.integers(2, size=50))) == {0, 1}
    with pytest.raises(ValueError, match="range"):
        rng.integers(4, 4, 3)
    order = rng.permutation(1000)
    assert sorted(order) == list(range(1000)) and not np.array_equal(order, np.arange(1000))
    firsts = np.array([rng.permutation(4)[0] for _ in range(4000)])
    assert np.all(np.abs(np.bincount(firsts, minlength=4) - 1000) < 5 * np.sqrt(1000 * 0.75))


def test_a_large_draw_holds_no_float64_copies_of_itself():
    """Box-Muller over a whole draw held several float64 arrays of its size: 20M float32 normals (a VGG-16
    fc1's fakes under the paper's scheme) took 614 MiB, numpy's own 156 (a review). Made a chunk at a time."""
    import tracemalloc

    n = 8_000_000
    tracemalloc.start()
    try:
        drawn = SecretRandom.from_seed(3).standard_normal((n,), dtype=np.float32)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert drawn.dtype == np.float32 and drawn.shape == (n,)
    assert peak < 4 * n + 80 * (1 << 20)  # the output and one chunk's work (unchunked: ~10x the output)
