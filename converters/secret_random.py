"""The generator every conversion secret is drawn from: an AES-256-CTR keystream (a CSPRNG, as the trusted
app's one-time masks are: ``tee_sim.one_time_masks``), keyed from the operating system's CSPRNG - or,
INSECURE and for tests only, from ``--seed``.

numpy's own generators are not cryptographic: PCG64's state can in principle be recovered from its
outputs, and the paper's scheme writes raw draws of its stream (the fake filters) into
``untrusted.tflite``, next to the scales and shuffles drawn from the same stream (a helper's review of
stop 46). ``SecretRandom`` offers the draws the schemes use, with numpy's ``Generator`` signatures, so
tests may still hand a scheme ``np.random.default_rng(...)`` (``Random``).
"""

from __future__ import annotations

import hashlib
import math
import secrets
from typing import Any, Protocol

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

_SEED_KEY_LABEL = b"shadownet conversion seed (INSECURE, tests only) "
_CHUNK_WORDS = 1 << 20  # keystream made 8 MiB at a time: a large draw does not hold a second copy of itself


class Random(Protocol):
    """What a scheme draws secrets with: numpy's ``Generator`` (tests) or ``SecretRandom`` (conversions)."""

    def random(self, size: Any = None) -> Any: ...

    def uniform(self, low: float = 0.0, high: float = 1.0, size: Any = None) -> Any: ...

    def standard_normal(self, size: Any = None, dtype: Any = np.float64) -> Any: ...

    def integers(self, low: int, high: int | None = None, size: Any = None) -> Any: ...

    def permutation(self, x: int) -> np.ndarray: ...


class SecretRandom:
    """Draws from an AES-256-CTR keystream: ``SecretRandom()`` under a fresh key from ``secrets``;
    ``SecretRandom.from_seed(n)`` under a key derived from ``n`` (anyone who guesses ``n`` draws the same).

    Each draw takes 64-bit words of the keystream: ``random`` their top 53 bits as ``k / 2^53``;
    ``standard_normal`` pairs of them through Box-Muller (float64, then ``dtype``; at most 8.6 standard
    deviations out); ``integers`` a word modulo the range (bias below range / 2^64); ``permutation`` the
    stable order of ``n`` words (uniform but for ties of two 64-bit words)."""

    def __init__(self, key: bytes | None = None) -> None:
        key = secrets.token_bytes(32) if key is None else bytes(key)
        if len(key) != 32:
            raise ValueError(f"an AES-256 key is 32 bytes, not {len(key)}")
        self._keystream = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()

    @classmethod
    def from_seed(cls, seed: int) -> SecretRandom:
        """INSECURE: the generator of ``seed`` (the key is SHA-256 of a label and its decimal digits)."""
        return cls(hashlib.sha256(_SEED_KEY_LABEL + str(int(seed)).encode()).digest())

    def _words(self, n: int) -> np.ndarray:
        out = np.empty(n, np.uint64)
        for start in range(0, n, _CHUNK_WORDS):
            stop = min(n, start + _CHUNK_WORDS)
            out[start:stop] = np.frombuffer(self._keystream.update(bytes(8 * (stop - start))), "<u8")
        return out

    def _unit(self, n: int) -> np.ndarray:
        """``n`` float64 in [0, 1): 53 bits each."""
        return (self._words(n) >> np.uint64(11)).astype(np.float64) * 2.0 ** -53

    def random(self, size: Any = None) -> Any:
        return self._shaped(self._unit, size)

    def uniform(self, low: float = 0.0, high: float = 1.0, size: Any = None) -> Any:
        return low + (high - low) * self.random(size)

    def standard_normal(self, size: Any = None, dtype: Any = np.float64) -> Any:
        def normals(n: int) -> np.ndarray:
            out = np.empty(n, dtype)  # made a chunk at a time: a large draw holds no float64 copies of itself
            for start in range(0, n, _CHUNK_WORDS):
                count = min(n, start + _CHUNK_WORDS) - start
                pairs = (count + 1) // 2
                u = self._unit(2 * pairs).reshape(2, pairs)
                radius = np.sqrt(-2.0 * np.log1p(-u[0]))  # 1 - u in (0, 1]: no log of zero
                angle = 2.0 * math.pi * u[1]
                out[start:start + pairs] = radius * np.cos(angle)
                out[start + pairs:start + count] = (radius * np.sin(angle))[:count - pairs]
            return out

        value = self._shaped(normals, size)
        return value if size is not None else np.dtype(dtype).type(value)

    def integers(self, low: int, high: int | None = None, size: Any = None) -> Any:
        low, high = (0, low) if high is None else (low, high)
        span = int(high) - int(low)
        if not 0 < span <= 1 << 63:
            raise ValueError(f"integers: empty or too wide a range [{low}, {high})")
        return self._shaped(lambda n: (self._words(n) % np.uint64(span)).astype(np.int64) + int(low), size)

    def permutation(self, x: int) -> np.ndarray:
        return np.argsort(self._words(int(x)), kind="stable")

    @staticmethod
    def _shaped(draw: Any, size: Any) -> Any:
        if size is None:
            return draw(1)[0]
        shape = (int(size),) if np.ndim(size) == 0 else tuple(int(d) for d in size)
        return draw(math.prod(shape)).reshape(shape)
