"""The obfuscated weights the ShadowNet TA reads for its per-inference work (``tee_sim.per_inference``: pop
masks of one-time rounds, check projections, layers it computes): ``Weights`` takes them from the normal
world's ``untrusted.tflite`` in the same read that authenticates it, and keeps them in secure memory or reads
them back from the normal world's copy, checked."""

from __future__ import annotations

import hashlib
import hmac
import math
from collections.abc import Callable
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.poly1305 import Poly1305

from tee_sim.errors import (
    TEE_ERROR_BAD_PARAMETERS,
    TEE_ERROR_BAD_STATE,
    TEE_ERROR_OUT_OF_MEMORY,
    TEE_ERROR_SECURITY,
    TEEC_ORIGIN_TRUSTED_APP,
    TEEError,
)

# The read of untrusted.tflite at load goes through secure memory this many bytes at a time (``Weights``).
CHUNK = 64 << 10
# Weights asked for outside stay resident where all of them take at most this much more than the largest
# layer, the staging buffer's size (``Weights``).
RESIDENT_SLACK = 1 << 20
UNTRUSTED_MISMATCH = "the untrusted model is not the one these secrets were made for"


def check_untrusted(digest: str, sealed: Any) -> None:
    """``TEE_ERROR_SECURITY`` unless ``digest`` (SHA-256, hex) is the untrusted model's the vendor sealed."""
    if not isinstance(sealed, str) or not hmac.compare_digest(digest, sealed):
        raise TEEError(TEE_ERROR_SECURITY, TEEC_ORIGIN_TRUSTED_APP, UNTRUSTED_MISMATCH)


Regions = dict[str, tuple[int, tuple[int, ...]]]  # weights name -> (byte offset, shape) in untrusted.tflite


def weight_regions(layers: dict[str, dict[str, Any]], names: set[str]) -> Regions:
    """Where the weights ``names`` lie in ``untrusted.tflite`` (byte offset, shape), as the sealed program's
    layers say (``weights_at``): the TA never parses the normal world's flatbuffer."""
    where = {layer["weights"]: layer.get("weights_at") for layer in layers.values()}
    regions = {}
    for name in sorted(names):
        at = where.get(name)
        if at is None:
            raise ValueError(f"the program does not say where the weights {name!r} lie (convert again with "
                             "this version)")
        offset, shape = at
        shape = tuple(int(d) for d in shape)
        if not (isinstance(offset, int) and offset % 4 == 0 and offset >= 0 and min(shape, default=1) >= 0):
            raise ValueError(f"weights {name!r} at {offset!r}, shape {shape}")
        regions[name] = (offset, shape)
    spans = sorted((o, o + 4 * math.prod(shape)) for o, shape in regions.values())
    if any(b > c for (_, b), (c, _) in zip(spans, spans[1:], strict=False)):
        raise ValueError("the program's weights overlap in the untrusted model")
    return regions


class Weights:
    """The obfuscated weights the TA needs (pop masks of one-time rounds, check projections), by tensor
    name: copies in secure memory, or (``outside``) the normal world's own copy of ``untrusted.tflite``
    (``bind``) read back one layer at a time into a secure staging buffer and checked there against the
    tag taken from the authenticated file at load: secure memory then holds the largest layer, not the
    model (MobileNet: 4 MB instead of 17). Where all the layers it needs take at most ``RESIDENT_SLACK`` more
    than the largest (MiniVGG with every round masked: 8.7 MB against its dense layer's 8.0), it keeps them
    resident instead: each refill then skips reading them back and checking them (MiniVGG: a refill of one
    entry 9.3 -> 8.4 ms).

    The tag is Poly1305 (``cryptography``'s, OpenSSL's) under a key drawn from the TEE's CSPRNG at load,
    one key for every layer and every read: a universal hash whose key and tags never leave the TEE, so
    the normal world can only change its copy and see whether a refill fails; a changed layer of ``L``
    bytes passes with probability at most ``8 ceil(L / 16) / 2^106`` per attempt over the secret key
    (Bernstein's bound; about 2^-85 for MobileNet's largest layer). It is the check of bytes the TEE
    already authenticated, not of a file's authenticity (the load's SHA-256 of ``untrusted.tflite`` is),
    and it reads 4x faster than SHA-256 (26 MB: 4.0 against 16.5 ms), which every refill of a verified
    ResNet-404 paid for its 406 layers.

    At load the weights come from one read of the file (``_read_once``), which also takes its SHA-256 and
    checks it against the one sealed with the program (``sealed_sha256``): the tags or copies are of the
    bytes hashed, in secure memory. (The TA hashes the file once before too, to refuse a wrong one early.)"""

    def __init__(self, untrusted: Any, regions: Regions, sealed_sha256: Any,
                 alloc: Callable[..., np.ndarray], outside: bool, random_bytes: Callable[[int], bytes],
                 visit: Callable[[str, np.ndarray], None] | None = None) -> None:
        self.shapes = {name: shape for name, (_, shape) in regions.items()}
        self._shared: np.ndarray | None = None
        spans = sorted((offset, 4 * math.prod(shape), name) for name, (offset, shape) in regions.items())
        largest = max((n for _, n, _ in spans), default=0)
        # Asked for outside (BIND_WEIGHTS then binds the normal world's copy), read back from it at each get
        self.outside = outside
        self.read_back = outside and sum(n for _, n, _ in spans) > largest + RESIDENT_SLACK
        self._resident: dict[str, np.ndarray] = {}
        self._where: dict[str, tuple[int, int, bytes]] = {}
        def alloc_for(what: str, shape: Any, dtype: Any) -> np.ndarray:
            try:
                return alloc(shape, dtype)
            except TEEError as exc:  # said what for (a helper's probe: the bytes alone, with no layer)
                if exc.code != TEE_ERROR_OUT_OF_MEMORY:
                    raise
                raise TEEError(exc.code, exc.origin, f"{exc.message}, for {what} (README, 'Secure memory')") \
                    from None

        if self.read_back:
            self._key = random_bytes(32)
            self._staging = alloc_for("the copy through which the trusted app reads the obfuscated weights, "
                                      "the largest layer's whole (at each refill of its one-time masks or, "
                                      "verified, of its checks)", max(largest, CHUNK), np.uint8)
        else:
            self._resident = {name: alloc_for(f"the obfuscated weights of {name}, kept in secure memory",
                                              shape, np.float32) for name, (_, shape) in regions.items()}
            self._staging = alloc(CHUNK, np.uint8)
        self._size = max((o + n for o, n, _ in spans), default=0)
        src = np.frombuffer(untrusted, np.uint8)
        failed: list[Exception] = []  # what ``visit`` raised: told once the file is known authentic
        check_untrusted(self._read_once(src, spans, visit, failed), sealed_sha256)
        if failed:
            raise failed[0]
        if self._size > src.size:  # an authentic file the program's weights lie beyond: a bad program
            raise ValueError(f"weights lie up to byte {self._size}, past the untrusted model's end "
                             f"({src.size})")

    def _read_once(self, src: np.ndarray, spans: list[tuple[int, int, str]],
                   visit: Callable[[str, np.ndarray], None] | None, failed: list[Exception]) -> str:
        """SHA-256 of the normal world's ``untrusted.tflite``, with the weights' tags (``outside``) or
        resident copies taken from the same read: every byte is copied into secure memory once, then hashed
        and used from there; ``visit(name, weights)`` sees each layer's weights there as they are read
        (what it makes of them counts only if the hash then matches). A second read of the normal world's
        buffer for the weights, after the hash, took whatever the normal world wrote there in between as
        authentic (a review: a verified model's checks then drawn from the attacker's weights passed its
        accelerator's results)."""
        sha = hashlib.sha256()
        staging = self._staging

        def hashed(start: int, stop: int) -> None:  # bytes the TA does not use: hashed only
            for a in range(start, stop, staging.size):
                piece = staging[:min(staging.size, stop - a)]
                np.copyto(piece, src[a:a + piece.size])
                sha.update(piece)

        done = 0
        for offset, nbytes, name in spans:
            if offset + nbytes > src.size:
                break  # a shorter file: its hash fails, or the program is bad (checked after)
            hashed(done, offset)
            # The layer whole in secure memory (the staging buffer holds the largest), hashed, then used.
            copy = staging[:nbytes] if self.read_back else self._resident[name].reshape(-1).view(np.uint8)
            np.copyto(copy, src[offset:offset + nbytes])
            sha.update(copy)
            if self.read_back:
                self._where[name] = (offset, nbytes, Poly1305.generate_tag(self._key, copy))
            if visit is not None and not failed:
                try:
                    visit(name, copy.view(np.float32).reshape(self.shapes[name]))
                except Exception as exc:  # noqa: BLE001 - told after the hash: a changed file is a SECURITY error
                    failed.append(exc)
            done = offset + nbytes
        hashed(done, src.size)
        return sha.hexdigest()

    def bind(self, shared: np.ndarray) -> None:
        """The normal world's copy of ``untrusted.tflite`` (uint8, read-only), for ``outside`` weights."""
        if shared.size < self._size:
            raise TEEError(TEE_ERROR_BAD_PARAMETERS, TEEC_ORIGIN_TRUSTED_APP,
                           f"weights of {shared.size} bytes, the model's are {self._size}")
        self._shared = shared

    def get(self, name: str) -> np.ndarray:
        """Layer ``name``'s weights (read back: valid until the next ``get``)."""
        if not self.read_back:
            return self._resident[name]
        if self._shared is None:
            raise TEEError(TEE_ERROR_BAD_STATE, TEEC_ORIGIN_TRUSTED_APP,
                           "the untrusted model's weights are not bound (BIND_WEIGHTS)")
        offset, nbytes, tag = self._where[name]
        staging = self._staging[:nbytes]
        np.copyto(staging, self._shared[offset:offset + nbytes])  # copied first: then checked and used
        try:
            Poly1305.verify_tag(self._key, staging, tag)  # compares in constant time
        except InvalidSignature:
            raise TEEError(TEE_ERROR_SECURITY, TEEC_ORIGIN_TRUSTED_APP,
                           f"the untrusted model's weights {name!r} changed since it was loaded") from None
        return staging.view(np.float32).reshape(self.shapes[name])
