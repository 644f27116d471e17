"""The obfuscated weights the ShadowNet TA reads for its per-inference work (``tee_sim.per_inference``: pop
masks of one-time rounds, check projections, layers it computes): views of the authenticated
``untrusted.tflite``, and ``Weights``, which keeps them in secure memory or reads them back from the normal
world's copy, checked."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
from ai_edge_litert import schema_py_generated as schema_fb
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.poly1305 import Poly1305

from tee_sim.errors import (
    TEE_ERROR_BAD_PARAMETERS,
    TEE_ERROR_BAD_STATE,
    TEE_ERROR_SECURITY,
    TEEC_ORIGIN_TRUSTED_APP,
    TEEError,
)


def read_weights(untrusted: Any, names: set[str]) -> dict[str, np.ndarray]:
    """The constant float32 tensors ``names`` of a ``.tflite`` (every subgraph), as read-only views; only
    the operators' inputs are looked at (the weights of ``untrusted.tflite``'s layers are their second)."""
    model = schema_fb.Model.GetRootAs(untrusted, 0)
    found: dict[str, np.ndarray] = {}
    for s in range(model.SubgraphsLength()):
        subgraph = model.Subgraphs(s)
        for o in range(subgraph.OperatorsLength()):
            for t in subgraph.Operators(o).InputsAsNumpy().tolist():
                if t < 0:
                    continue
                tensor = subgraph.Tensors(t)
                name = tensor.Name().decode()
                if name not in names or name in found:
                    continue
                if tensor.Type() != schema_fb.TensorType.FLOAT32:
                    raise ValueError(f"tensor {name!r} is not float32")
                data = model.Buffers(tensor.Buffer()).DataAsNumpy()
                shape = tuple(int(d) for d in tensor.ShapeAsNumpy())
                if isinstance(data, int) or data.nbytes != 4 * math.prod(shape):
                    raise ValueError(f"tensor {name!r} has no data of shape {shape}")
                found[name] = data.view(np.float32).reshape(shape)
    missing = names - set(found)
    if missing:
        raise ValueError(f"untrusted model lacks the weights {sorted(missing)[:3]}")
    return found


def weight_views(untrusted: Any, layers: dict[str, dict[str, Any]], names: set[str]) -> dict[str, np.ndarray]:
    """The weights ``names`` as views of the authenticated ``untrusted.tflite``, where the program's
    layers say they lie (``weights_at``; parsed from the flatbuffer for programs without it)."""
    if not names:
        return {}
    where = {layer["weights"]: layer.get("weights_at") for layer in layers.values()}
    if any(where.get(name) is None for name in names):
        return read_weights(untrusted, names)
    data = np.frombuffer(untrusted, np.uint8)
    views = {}
    for name in names:
        offset, shape = where[name]
        nbytes = 4 * math.prod(shape)
        if not (isinstance(offset, int) and offset % 4 == 0 and 0 <= offset <= data.size - nbytes):
            raise ValueError(f"weights {name!r} at {offset} lie outside the untrusted model")
        views[name] = data[offset:offset + nbytes].view(np.float32).reshape(shape)
    return views


class Weights:
    """The obfuscated weights the TA needs (pop masks of one-time rounds, check projections), by tensor
    name: copies in secure memory, or (``outside``) the normal world's own copy of ``untrusted.tflite``
    (``bind``) read back one layer at a time into a secure staging buffer and checked there against the
    tag taken from the authenticated file at load: secure memory then holds the largest layer, not the
    model (MobileNet: 4 MB instead of 17).

    The tag is Poly1305 (``cryptography``'s, OpenSSL's) under a key drawn from the TEE's CSPRNG at load,
    one key for every layer and every read: a universal hash whose key and tags never leave the TEE, so
    the normal world can only change its copy and see whether a refill fails; a changed layer of ``L``
    bytes passes with probability at most ``8 ceil(L / 16) / 2^106`` per attempt over the secret key
    (Bernstein's bound; about 2^-85 for MobileNet's largest layer). It is the check of bytes the TEE
    already authenticated, not of a file's authenticity (the load's SHA-256 of ``untrusted.tflite`` is),
    and it reads 4x faster than SHA-256 (26 MB: 4.0 against 16.5 ms), which every refill of a verified
    ResNet-404 paid for its 406 layers."""

    def __init__(self, untrusted: Any, found: dict[str, np.ndarray], alloc: Callable[..., np.ndarray],
                 outside: bool, random_bytes: Callable[[int], bytes]) -> None:
        self.shapes = {name: w.shape for name, w in found.items()}
        self.outside = outside
        self._shared: np.ndarray | None = None
        if outside:
            base = np.frombuffer(untrusted, np.uint8).ctypes.data
            self._key = random_bytes(32)
            self._where = {name: (w.ctypes.data - base, w.nbytes,
                                  Poly1305.generate_tag(self._key, w.reshape(-1).view(np.uint8)))
                           for name, w in found.items()}
            self._size = max((o + n for o, n, _ in self._where.values()), default=0)
            self._staging = alloc(max((n for _, n, _ in self._where.values()), default=0), np.uint8)
            self._resident: dict[str, np.ndarray] = {}
        else:
            self._resident = {}
            for name, w in found.items():
                self._resident[name] = alloc(w.shape, np.float32)
                self._resident[name][...] = w

    def bind(self, shared: np.ndarray) -> None:
        """The normal world's copy of ``untrusted.tflite`` (uint8, read-only), for ``outside`` weights."""
        if shared.size < self._size:
            raise TEEError(TEE_ERROR_BAD_PARAMETERS, TEEC_ORIGIN_TRUSTED_APP,
                           f"weights of {shared.size} bytes, the model's are {self._size}")
        self._shared = shared

    def get(self, name: str) -> np.ndarray:
        """Layer ``name``'s weights (outside: valid until the next ``get``)."""
        if not self.outside:
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
