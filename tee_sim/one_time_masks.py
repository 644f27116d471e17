"""One-time masks in the ShadowNet TA: a mask drawn from its 256-bit key, and its unblinding term.

When it refills its pool (``tee_sim.per_inference``) the TEE draws each one-time mask from a fresh key:
AES-256 in counter mode gives 32 bits per element: 16 index a table of 65536 standard normal quantiles,
the centres of equal-probability cells, and 16 place the value uniformly within its cell (unit variance,
tails at 4.3 sigma); scaled by the scheme's ``std`` and shifted by its per-channel ``mean``: a few ns an
element, against 18 for numpy's normal sampler. Without the second 16 bits a mask took 65536 values per
channel: a review learnt ``std`` and the means from 300 inputs of its own and then read 8-bit images
back exactly where the mask was white (95% of pixels; ``x + r`` has one ``x`` on the 1/255 grid).
A shaped mask (the spec's ``bands``; round 1 and the other rounds that carry a user input,
``converters.schemes.groupmix``) is that white noise filtered so that every frequency band of
``tee_sim.program.mask_bands`` gets an equal share of its power, plus a second such field shared by
all channels along the spec's ``common`` direction: a white mask's power sits almost all in the finest
octaves, where an image has little, and averaging neighbours or channels first takes it off
(SECURITY.md). The TA draws each field's spectrum directly - white noise's discrete Fourier transform is
itself white, complex normal - scales it by the bands' gains and takes one inverse FFT: less than half
the work of filtering a field drawn in space (yolov4-tiny's padded 417x417x3 mask: 12.5 ms against 28.6;
MobileNet's 225x225x3: 2.1 against 3.0). On the mask's own grid: made on a faster FFT length (420, as 417
is 3 x 139) and cropped, a field's band shares blur, and some sizes lost half of one band's (a review).
Its variance per element is at most 1, so ``std`` bounds it as it bounds a white mask (the exact split's
grid); values cut at the table's tails (about 2e-5 of a shaped mask's).
A modular mask (the spec's ``modular``, ``tee_sim.modular_masks``) is 24 bits of the keystream per element,
uniform over its power-of-two period, no table.
The unblinding term of a one-time round's restore is its offset ``bias - restore(L(mask))`` (``PopMask``,
the pop mask of Slalom and of the paper: the mask pushed through the layer's obfuscated weights and the
restore, in float64), made offline when the pool is refilled.
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from tee_sim.layer_geometry import Geometry, geometry
from tee_sim.program import SMALL_MASK, mask_bands, modular_period
from tee_sim.ta_shadownet_kernels import LIBRARY

TABLE_BITS = 16
MASK_CHUNK = 1 << 14  # mask elements drawn per keystream block (64 KiB of AES-CTR output)
DENSE_RESTORE = 1 << 16  # pop masks restore with a dense float64 matrix up to this many entries (512 KiB)
DENSE_SLICE = 1 << 20  # bytes of a dense layer's weights a pop mask widens to float64 at a time
POP_P = 4  # output positions sn_pop sums at once (ta_shadownet_pool.c's POP_P): its window scratch holds them
_NONCE = bytes(16)  # every key is used for one mask only
_table: tuple[np.ndarray, np.ndarray] | None = None


def gaussian_table() -> tuple[np.ndarray, np.ndarray]:
    """``(centres, widths)``: ``2**16`` float32 standard normal quantiles at the centres of
    equal-probability cells and the cells' widths (the centres' spacing), rescaled together so that
    ``centres[i] + (f - 1/2) * widths[i]``, ``i`` and ``f`` uniform, has unit variance: a normal sample,
    cut at ``centres[-1]`` (4.3 sigma)."""
    global _table
    if _table is None:
        n = 1 << TABLE_BITS
        values = normal_quantiles((np.arange(n // 2) + 0.5) / n)  # the lower half; the upper mirrors it
        values = np.concatenate([values, -values[::-1]])
        widths = np.empty(n)
        widths[1:-1] = (values[2:] - values[:-2]) / 2
        widths[0], widths[-1] = values[1] - values[0], values[-1] - values[-2]
        scale = 1 / np.sqrt(np.mean(values ** 2) + np.mean(widths ** 2) / 12)
        _table = (values * scale).astype(np.float32), (widths * scale).astype(np.float32)
    return _table


def normal_quantiles(p: np.ndarray) -> np.ndarray:
    """The standard normal's inverse CDF for ``0 < p <= 0.5`` (Acklam's rational approximation, relative
    error below 1.2e-9: far below float32's resolution), vectorized."""
    a = (-3.969683028665376e+01, 2.209460984245205e+02, -2.759285104469687e+02, 1.383577518672690e+02,
         -3.066479806614716e+01, 2.506628277459239e+00)
    b = (-5.447609879822406e+01, 1.615858368580409e+02, -1.556989798598866e+02, 6.680131188771972e+01,
         -1.328068155288572e+01)
    c = (-7.784894002430293e-03, -3.223964580411365e-01, -2.400758277161838e+00, -2.549732539343734e+00,
         4.374664141464968e+00, 2.938163982698783e+00)
    d = (7.784695709041462e-03, 3.224671290700398e-01, 2.445134137142996e+00, 3.754408661907416e+00)
    p = np.asarray(p, np.float64)
    tail = p < 0.02425
    q = np.sqrt(-2 * np.log(np.where(tail, p, 0.5)))
    low = (((((c[0] * q + c[1]) * q + c[2]) * q + c[3]) * q + c[4]) * q + c[5]) / \
        ((((d[0] * q + d[1]) * q + d[2]) * q + d[3]) * q + 1)
    q = p - 0.5
    r = q * q
    central = (((((a[0] * r + a[1]) * r + a[2]) * r + a[3]) * r + a[4]) * r + a[5]) * q / \
        (((((b[0] * r + b[1]) * r + b[2]) * r + b[3]) * r + b[4]) * r + 1)
    return np.where(tail, low, central)


class MaskStream:
    """One one-time push's masks: ``draw(key, out)`` writes the mask of ``key`` (see the module doc).
    ``alloc(shape, dtype)``: secure memory; ``scratch(purpose, shape, dtype)``: secure memory used within
    one call (a draw), which the trusted app may share between its sessions (None: ``alloc``'s)."""

    def __init__(self, spec: dict[str, Any], mean: np.ndarray, alloc: Callable[..., np.ndarray],
                 common: np.ndarray | None = None, scale: np.ndarray | None = None,
                 scratch: Callable[..., np.ndarray] | None = None) -> None:
        scratch = scratch or (lambda purpose, shape, dtype: alloc(shape, dtype))
        self.shape = tuple(int(d) for d in spec["shape"])
        self.std = np.float32(spec["std"])
        self.split = float((spec.get("split") or {}).get("grid", 0.0))  # the exact split's grid; 0: none
        # The spread (RMS) of the input the distribution was sized for: the TEE then scales the mask by a
        # power of two to follow the input's own (``tee_sim.mask_spread``); 0: never.
        self.spread = float(spec.get("spread", 0.0))
        self.bands = spec.get("bands", 0)  # shaped: the number of frequency bands; 0: white
        # Modular (tee_sim.modular_masks): uniform over a power-of-two period, sent modulo it (an exact
        # split's high half: its grid then divides the period); white, with no mean.
        self.modular = spec.get("modular", False)
        self.period = modular_period(float(self.std)) if self.modular is True and self.std > 0 else 0.0
        if self.modular is not False and (self.modular is not True or self.bands or common is not None
                                          or np.any(mean != 0) or not 0 < float(self.std) < math.inf
                                          or self.split and not (self.period / self.split).is_integer()):
            raise ValueError(f"mask of {spec['buffer']}: modular {self.modular!r} with split {self.split}, "
                             f"bands {self.bands!r}, a common direction or a mean")
        self.period = np.float32(self.period)
        if (mean.shape != self.shape[-1:] or not math.isfinite(float(self.std))
                or not (self.split == 0 or 0 < self.split < math.inf)
                or not (self.spread == 0 or 0 < self.spread < math.inf)
                or not isinstance(self.bands, int) or isinstance(self.bands, bool)
                or (common is not None and (not self.bands or common.shape != mean.shape
                                            or not np.all(np.isfinite(common))))
                or (scale is not None and (not self.spread or scale.shape != mean.shape
                                           or scale.dtype != np.float32
                                           or not np.all((scale > 0) & (scale <= 1))))):
            raise ValueError(f"mask of {spec['buffer']}: mean {mean.shape}, bands {self.bands!r}, common "
                             f"{None if common is None else common.shape}, scale "
                             f"{None if scale is None else scale.shape} do not fit its shape {self.shape}")
        # The input's channel scales (``converters.schemes.ObfuscatedLinear.input_scale``): its spread is
        # measured on the input scaled so, whose RMS the mixed input has (``tee_sim.mask_spread``).
        self.scale = scale
        self.mean = mean
        self.size = math.prod(self.shape)
        extra = 0
        if self.bands:
            positions = self.shape[1:-1]
            index, count = mask_bands(positions)
            if count != self.bands or len(self.shape) < 2:
                raise ValueError(f"mask of {spec['buffer']}: {self.bands} bands, its shape {self.shape} "
                                 f"has {count}")
            self._axes = tuple(range(1, len(self.shape) - 1))
            # Each rfft bin stands for itself and its mirror image, but for the last axis' zero and
            # (even length) Nyquist columns: the full spectrum's bins per band, and each bin's gain so that
            # every band carries 1 / bands of a unit variance per element.
            twice = np.full(index.shape, 2.0)
            if positions:
                twice[..., 0] = 1.0
                if positions[-1] % 2 == 0:
                    twice[..., -1] = 1.0
            per_band = np.bincount(index.reshape(-1), twice.reshape(-1), count)
            # The spectrum is drawn as complex normals of unit variance per part (``_field``), where a
            # white field's transform has E|X|^2 = P (P positions): sqrt(P / 2) more. The zero and Nyquist
            # columns count their bins' Hermitian parts only (irfftn drops their imaginary parts; a pair
            # (j, -j) becomes (X_j + conj X_-j) / 2): sqrt(2) more again, as ``twice`` is 1 there.
            # (the same for every mask of these positions: one, whoever draws them)
            self._gain = scratch(f"the band gains of {positions}", index.shape, np.float32)
            p = math.prod(positions)
            self._gain[...] = np.sqrt(p / (count * per_band[index])) * np.sqrt(p / twice)
            # One channel's spectrum at a time (and the common field's): half a MobileNet input's 1.1 MB.
            self._spectrum = scratch("a mask's spectrum", (self.shape[0], *index.shape), np.complex64)
            if common is not None:
                extra = math.prod(self.shape[:-1])
                self._common = scratch("a mask's common field", self.shape[:-1], np.float32)
                # Each channel's own field plus the common one times its entry of the direction, scaled so
                # that no channel's variance exceeds 1 (the exact split's bound on the mask holds).
                scale = 1.0 / math.sqrt(1.0 + float(np.max(np.square(common))))
                self._direction = (common * scale).astype(np.float32)
                self._own = np.float32(scale)
        self.common = common
        # The keystream is made a chunk at a time, for the largest field drawn in one go: the mask (and its
        # common field) when white, one channel's spectrum when shaped.
        longest = max(self.size, extra)
        if self.bands and self.shape[1:-1]:
            longest = 2 * self._spectrum.size
        self._chunk = min(longest, MASK_CHUNK)
        self._zeros = bytes(4 * self._chunk)  # the plaintext encrypted into the keystream
        self._stream = scratch("a mask's keystream", 4 * self._chunk + 15, np.uint8)  # update_into's slack
        words = self._stream[:4 * self._chunk].view(np.uint16)
        self._index, self._place = words[0::2], words[1::2]  # each element's cell, and where in it
        self._dither = scratch("a mask's dither", (2, self._chunk), np.float32)

    @property
    def noiseless(self) -> bool:
        """Whether the masks add no noise (``groupmix:mask_scale=0``): at most the constant shift that centres
        the input, whose rounding is about the input's own."""
        return self.std == 0

    @property
    def small(self) -> bool:
        """Whether the masks are at most ``SMALL_MASK`` times the spread of the input they were sized for
        (``groupmix``'s ``deep_mask_scale``, 1x, on the rounds a policy adds past the floor): its rounding
        is then within a few times the input's own, which a check of its layer may tolerate unweakened. (Its
        std is float32: at exactly ``SMALL_MASK`` times, half of them rounded past it - a review.)"""
        return small_mask(float(self.std), self.spread)

    def draw(self, key: bytes, out: np.ndarray) -> None:
        encryptor = Cipher(algorithms.AES(key), modes.CTR(_NONCE)).encryptor()
        if self.modular:
            self._uniform(encryptor, out.reshape(-1))
            return
        centres = gaussian_table()[0]
        if self.bands and self.shape[1:-1]:
            for c in range(self.shape[-1]):
                self._field(encryptor, out[..., c])
            if self.common is not None:
                self._field(encryptor, self._common)
        else:
            self._white(encryptor, out.reshape(-1))
            if self.common is not None:  # a mask without positions, [N, C], has one band: no filter
                self._white(encryptor, self._common.reshape(-1))
        if self.common is not None:
            np.multiply(out, self._own, out=out)
            if self.shape[1:-1]:
                for c, weight in enumerate(self._direction):  # a plane at a time: no mask-sized temporary
                    out[..., c] += self._common * weight
            else:  # [N, C]: one value a channel, whose loop took 23 ms of a 12288-wide vector's refill (a
                # probe: a dense layer on a flattened image, its verified pool made on the inference's path)
                out += self._common[:, None] * self._direction
        # Cut at the outermost centres: the outer half of the two end cells (1 in 2^16 of the values of a
        # white mask; a shaped one's sums of many draws are normal without the cut) - so that the exact
        # split's bound on the mask's magnitude holds.
        np.clip(out, -centres[-1], centres[-1], out=out)
        np.multiply(out, self.std, out=out)
        np.add(out, self.mean, out=out)

    def _white(self, encryptor: Any, flat: np.ndarray) -> None:
        """Unit normals from the keystream into the contiguous float32 ``flat`` (the module doc)."""
        centres, widths = gaussian_table()
        width, offset = self._dither
        for a in range(0, flat.size, self._chunk):
            n = min(self._chunk, flat.size - a)
            encryptor.update_into(self._zeros[:4 * n], self._stream)
            np.take(centres, self._index[:n], out=flat[a:a + n])
            np.take(widths, self._index[:n], out=width[:n])
            np.multiply(self._place[:n], np.float32(2.0 ** -16), out=offset[:n])  # in [0, 1)
            np.subtract(offset[:n], np.float32(0.5 - 2.0 ** -17), out=offset[:n])  # centred
            np.multiply(offset[:n], width[:n], out=offset[:n])
            np.add(flat[a:a + n], offset[:n], out=flat[a:a + n])

    def _uniform(self, encryptor: Any, flat: np.ndarray) -> None:
        """A modular mask into the contiguous float32 ``flat``: 24 bits of the keystream per element, uniform
        over ``[-period/2, period/2)`` on a grid of ``period * 2**-24`` (all exact: the period is a power of
        two)."""
        words = self._stream[:4 * self._chunk].view(np.uint32)
        for a in range(0, flat.size, self._chunk):
            n = min(self._chunk, flat.size - a)
            encryptor.update_into(self._zeros[:4 * n], self._stream)
            part = flat[a:a + n]
            np.right_shift(words[:n], 8, out=words[:n])
            part[...] = words[:n]  # < 2**24: exact in float32
            np.multiply(part, np.float32(2.0 ** -24), out=part)
            np.subtract(part, np.float32(0.5), out=part)
            np.multiply(part, self.period, out=part)

    def _field(self, encryptor: Any, plane: np.ndarray) -> None:
        """One shaped field of unit variance into ``plane`` [N, *positions]: its spectrum drawn white and
        scaled by the bands' gains, then transformed back."""
        self._white(encryptor, self._spectrum.view(np.float32).reshape(-1))
        np.multiply(self._spectrum, self._gain, out=self._spectrum)
        np.fft.irfftn(self._spectrum, s=self.shape[1:-1], axes=self._axes, out=plane)


@dataclass
class PopMask:
    """The offset of one restore of a one-time round: ``bias - restore(L(mask))`` in float64."""

    weights: str
    geometry: Geometry
    mask: str
    bias: np.ndarray
    index: np.ndarray
    coef: np.ndarray
    permutation: np.ndarray | None

    matrix: np.ndarray | None = None  # the restore as a dense float64 [M, N] (columns permuted), if small

    def prepare(self, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """What ``compute`` needs of the weights, the same for every mask (a refill prepares it once for all
        the entries it makes): for a conv, the filters composed with the restore as float64
        [taps * C, N] (rows tap-major, then channel) and the bias, both permuted; None otherwise."""
        if self.geometry.kind != "CONV_2D":
            return None
        bias = self.bias.astype(np.float64)
        if self.permutation is not None:
            bias = bias[self.permutation]
        return self.composed(weights), np.ascontiguousarray(bias)

    def composed(self, weights: np.ndarray) -> np.ndarray:
        """``composed_weights`` of this restore: what ``prepare`` gives a conv's pop masks."""
        w = weights.reshape(weights.shape[0], -1).T.astype(np.float64)  # [taps * C, M]
        if self.matrix is not None:  # one product (columns permuted): a gather per term took ResNet-44's
            # refill 0.5 ms a layer, under every-round masks a fifth of it
            return w @ self.matrix
        return composed_weights(weights, self.index, self.coef, self.permutation)

    def compute(self, mask: np.ndarray, weights: np.ndarray, out: np.ndarray,
                prepared: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        """The offset of ``mask`` into ``out``; ``prepared``: ``prepare(weights)``, if made already."""
        if self.geometry.kind == "CONV_2D":  # in C: the filters composed with the restore, bias minus sums
            composed, bias = prepared if prepared is not None else self.prepare(weights)
            conv_pop(np.ascontiguousarray(mask, np.float32), self.geometry, composed, out, bias=bias)
            return
        self._restore(linear64(self.geometry, mask, weights), out)

    def compute_many(self, masks: Sequence[np.ndarray], weights: np.ndarray, outs: Sequence[np.ndarray],
                     prepared: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        """``compute`` for each of ``masks`` into ``outs``, a refill's batch: a dense layer's weights widened
        once for all of them (``widened_product``: MiniVGG's 4096 x 512 layer was 37% of its refill, widened
        again for each entry), anything else one mask at a time."""
        if self.geometry.kind != "FULLY_CONNECTED":
            for mask, out in zip(masks, outs, strict=True):
                self.compute(mask, weights, out, prepared)
            return
        for part in dense_batches(masks):
            for y, out in zip(dense64(self.geometry, masks[part], weights), outs[part], strict=True):
                self._restore(y, out)

    def _restore(self, y: np.ndarray, out: np.ndarray) -> None:
        """``bias - restore(y)`` into ``out``, ``y`` the layer's float64 output on a mask."""
        if self.matrix is not None:
            restored = y.reshape(-1, y.shape[-1]) @ self.matrix
            bias = self.bias if self.permutation is None else self.bias[self.permutation]
            np.subtract(bias.astype(np.float64), restored, out=restored)
            out[...] = restored.reshape(out.shape)
            return
        restored = y[..., self.index[0]] * self.coef[0].astype(np.float64)
        for j in range(1, len(self.index)):
            restored += y[..., self.index[j]] * self.coef[j].astype(np.float64)
        offset = self.bias.astype(np.float64) - restored
        out[...] = offset if self.permutation is None else offset[..., self.permutation]

    def rescale(self, offset: np.ndarray, factor: float) -> None:
        """``offset``, made for a mask ``r``, made in place for ``factor * r`` (a power of two under 1:
        the offset's rounding error shrinks with it; scaled up, it would grow with it, so an offset moved up
        is made again by ``compute``): ``bias - factor * L(r) = factor * offset + (1 - factor) * bias``."""
        if not 0 < factor < 1:
            raise ValueError(f"an offset is rescaled down only, not by {factor}")
        bias = self.bias if self.permutation is None else self.bias[self.permutation]
        np.multiply(offset, np.float32(factor), out=offset)
        np.add(offset, ((1 - factor) * bias.astype(np.float64)).astype(np.float32), out=offset)

    def dense(self, m: int, alloc: Callable[..., np.ndarray]) -> None:
        """Use a dense restore matrix (one matmul instead of a gather per term) when it is small."""
        k, n = self.index.shape
        if m * n > DENSE_RESTORE:
            return
        self.matrix = alloc((m, n), np.float64)
        self.matrix[...] = 0
        for j in range(k):
            np.add.at(self.matrix, (self.index[j], np.arange(n)), self.coef[j].astype(np.float64))
        if self.permutation is not None:
            self.matrix[...] = self.matrix[:, self.permutation]


def composed_weights(weights: np.ndarray, index: np.ndarray, coef: np.ndarray,
                     permutation: np.ndarray | None) -> np.ndarray:
    """A layer's obfuscated weights (``[M, ...]``) composed with its restore (``index`` / ``coef`` ``[k, N]``,
    then ``permutation``, the offset's channel order): float64 ``[taps * C, N]``, rows tap-major then channel
    (a dense layer's ``[C, N]``); a conv's pop masks (``PopMask.prepare``) and a modular mask's unwrap
    (``tee_sim.modular_masks``) read it."""
    m = weights.shape[0]
    if (index.ndim != 2 or coef.shape != index.shape or not np.issubdtype(index.dtype, np.integer)
            or index.size and not 0 <= int(index.min()) <= int(index.max()) < m
            or permutation is not None and sorted(permutation.tolist()) != list(range(index.shape[1]))):
        raise ValueError(f"a restore {index.shape} / {coef.shape} for weights of {m} outputs")
    w = weights.reshape(m, -1).T.astype(np.float64)  # [taps * C, M]
    composed = w[:, index[0]] * coef[0].astype(np.float64)
    for j in range(1, len(index)):
        composed += w[:, index[j]] * coef[j].astype(np.float64)
    if permutation is not None:
        composed = composed[:, permutation]
    return np.ascontiguousarray(composed)


def small_mask(std: float, spread: float) -> bool:
    """``MaskStream.small`` of a mask spec's ``std`` and ``spread``."""
    return spread > 0 and std <= SMALL_MASK * spread * (1 + 2.0 ** -20)


def check_pop(spec: dict[str, Any], layer: dict[str, Any], weights_shape: tuple[int, ...],
               shm_shapes: dict[str, tuple[int, ...]], streams: dict[str, MaskStream],
               arrays: dict[str, np.ndarray]) -> Geometry:
    """The layer's geometry; ``ValueError`` unless a one-time restore's offset spec fits its layer, mask and
    restore arrays: a program that does not is refused at load instead of failing in the pool's first
    refill."""
    x_shape, y_shape = shm_shapes[layer["input"]], shm_shapes[spec["layer"]]
    geo = geometry(layer, weights_shape, x_shape, y_shape)
    mask = spec["mask"]
    split = bool(spec.get("split"))
    if split:  # the input and the layer carry both halves (tee_sim.exact_split)
        x_shape = (*x_shape[:-1], x_shape[-1] // 2)
    if (not isinstance(mask, str) or mask not in streams or streams[mask].shape != tuple(x_shape)
            or split != bool(streams[mask].split) or (split and layer["kind"] == "DEPTHWISE_CONV_2D")):
        raise ValueError(f"offset of {spec['layer']}: mask {mask!r} is not a one-time mask of its input")
    if split:
        return geo
    index, coef, bias = arrays[spec["index"]], arrays[spec["coef"]], arrays[spec["bias"]]
    n = bias.shape[0] if bias.ndim == 1 else -1
    if (index.ndim != 2 or index.shape != coef.shape or index.shape[1] != n
            or index.min(initial=0) < 0 or index.max(initial=0) >= y_shape[-1]):
        raise ValueError(f"offset of {spec['layer']}: restore {index.shape} / bias {bias.shape} do not fit "
                         f"{tuple(y_shape)}")
    perm = spec.get("permutation")
    if perm is not None and not np.array_equal(np.sort(arrays[perm]), np.arange(n)):
        raise ValueError(f"offset of {spec['layer']}: {perm!r} is not a permutation of {n} channels")
    return geo


def linear64(geo: Geometry, x: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """A depthwise or dense layer of geometry ``geo`` (no bias) on ``x``, in float64: the TEE's own
    reference for the pop masks of those layers (a conv's is ``conv_pop``, in C). A dense layer's weights
    are widened ``DENSE_SLICE`` bytes at a time: whole, MiniVGG's 4096 x 512 took 16 MB of memory outside the
    secure world's account at each pop mask (stop 58, since its default masks that layer)."""
    if geo.kind == "FULLY_CONNECTED":
        return dense64(geo, [x], weights)[0]
    if x.shape != geo.x_shape:
        raise ValueError(f"{geo.kind}: input {x.shape}, the layer takes {geo.x_shape}")
    w = np.asarray(weights, np.float64)
    if geo.kind != "DEPTHWISE_CONV_2D":
        raise ValueError(f"linear64 computes depthwise and dense layers, not {geo.kind}")
    (kh, kw), (sh, sw), (dh, dw), (top, left) = geo.kernel, geo.stride, geo.dilation, geo.before
    n, h, wd, c = x.shape
    _, ho, wo, cm = geo.y_shape
    padded = np.zeros((n, *geo.padded(), c))
    padded[:, top:top + h, left:left + wd] = x
    if cm != c:  # output channel c * multiplier + k reads input channel c
        padded = np.repeat(padded, cm // c, axis=-1)
    taps = w.reshape(kh, kw, cm)
    y = np.zeros(geo.y_shape)
    height, width = (ho - 1) * sh + 1, (wo - 1) * sw + 1  # the span of one tap's reads
    for i in range(kh):  # one multiply-add per tap over the whole map
        for j in range(kw):
            y += padded[:, i * dh:i * dh + height:sh, j * dw:j * dw + width:sw] * taps[i, j]
    return y


def dense64(geo: Geometry, xs: Sequence[np.ndarray], weights: np.ndarray) -> list[np.ndarray]:
    """``linear64`` of a dense layer on each of ``xs`` at once: their rows stacked, the weights widened once
    for all of them (``widened_product``; a refill's batch, ``PopMask.compute_many``)."""
    for x in xs:
        if x.shape != geo.x_shape:
            raise ValueError(f"{geo.kind}: input {x.shape}, the layer takes {geo.x_shape}")
    products = widened_product(stacked_rows(xs, weights.shape[1]), weights.T)
    return [y.reshape(geo.y_shape) for y in np.split(products, len(xs))]


def stacked_rows(masks: Sequence[np.ndarray], width: int) -> np.ndarray:
    """The rows of a dense layer's input ``masks``, one under the other, in float64 [sum of rows, width]."""
    return np.concatenate([np.asarray(mask, np.float64).reshape(-1, width) for mask in masks])


def dense_batches(masks: Sequence[np.ndarray]) -> list[slice]:
    """``masks`` in runs whose ``stacked_rows`` take at most ``DENSE_SLICE`` bytes (one mask at least): a
    refill's batch of up to 64 entries of a dense layer on a flattened image stacked whole would be tens of
    MB outside the secure world's account."""
    per_mask = 8 * masks[0].size if masks else 1
    step = max(1, DENSE_SLICE // per_mask)
    return [slice(a, a + step) for a in range(0, len(masks), step)]


def widened_product(rows: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``rows @ w`` in float64 for float32 weights ``w`` [K, M] (a view, transposed or a block of a layer's),
    widened ``DENSE_SLICE`` bytes of their rows at a time: the dense pop masks' product, split or not."""
    out = np.zeros((len(rows), w.shape[1]))
    step = max(1, DENSE_SLICE // (8 * w.shape[1]))
    for a in range(0, w.shape[0], step):
        out += rows[:, a:a + step] @ w[a:a + step].astype(np.float64)
    return out


def conv_pop(mask: np.ndarray, geo: Geometry, w_full: np.ndarray, out: np.ndarray,
             w_hi: np.ndarray | None = None, grid: float = 0.0, bias: np.ndarray | None = None) -> None:
    """A CONV_2D pop mask by ``sn_pop`` (``ta_shadownet_pool.c``) for the float32 ``mask`` [N, H, W, C] of
    a layer of geometry ``geo``: ``w_full`` (and an exact split's ``w_hi``, with its ``grid``) as contiguous
    float64 [kh * kw * C, M] (rows tap-major, then channel); into float32 ``out``: ``[pop_hi | pop_lo]`` of
    a split (``tee_sim.exact_split.SplitPop``), or ``bias - L(mask, w_full)`` (``PopMask``), in double,
    rounded once."""
    n, h, wd, c = mask.shape
    kernel, ho, wo, (top, left) = geo.kernel, geo.y_shape[1], geo.y_shape[2], geo.before
    if (h, wd) != geo.x_shape[1:3]:
        raise ValueError(f"a {h}x{wd} mask for a layer on {geo.x_shape[1]}x{geo.x_shape[2]}")
    m = w_full.shape[1]
    split = grid > 0
    if w_full.shape[0] != kernel[0] * kernel[1] * c:
        raise ValueError(f"weights of {w_full.shape[0]} rows for a {kernel} kernel on {c} channels")
    if (split and (w_hi is None or w_hi.shape != w_full.shape)) or (not split and (bias is None
                                                                                   or bias.shape != (m,))):
        raise ValueError("a split pop takes w_hi as w_full's shape, a plain one a bias of its columns")
    want = (n, ho, wo, 2 * m if split else m)
    if out.shape != want or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"pop mask {out.shape} {out.dtype}: {want} float32 expected, contiguous")
    for array in (mask, w_full, w_hi, bias):
        if array is not None and not array.flags.c_contiguous:
            raise ValueError("conv_pop's arrays must be contiguous")
    window = np.empty(2 * POP_P * w_full.shape[0])  # POP_P positions' windows, twice
    call = _Pop(mask.ctypes.data, n, h, wd, c, ho, wo, *kernel, *geo.stride, *geo.dilation, top, left,
                w_hi.ctypes.data if split else None, w_full.ctypes.data, m, grid,
                bias.ctypes.data if not split else None, out.ctypes.data, window.ctypes.data)
    LIBRARY.sn_pop(ctypes.byref(call))


class _Pop(ctypes.Structure):  # sn_pop_t
    _fields_ = [("r", ctypes.c_void_p),
                *((name, ctypes.c_int64) for name in ("n", "h", "w", "c", "ho", "wo")),
                *((name, ctypes.c_int32) for name in ("kh", "kw", "sh", "sw", "dh", "dw", "top", "left")),
                ("w_hi", ctypes.c_void_p), ("w_full", ctypes.c_void_p), ("m", ctypes.c_int64),
                ("grid", ctypes.c_double), ("bias", ctypes.c_void_p), ("out", ctypes.c_void_p),
                ("window", ctypes.c_void_p)]
