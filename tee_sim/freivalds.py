"""Freivalds' check of the accelerator's results, run by the ShadowNet TA on a model loaded with ``verify``.

For one offloaded layer the accelerator returns ``y' = L(x', W')``: ``P`` output positions by ``M``
channels, for the input ``x'`` the TEE sent and the obfuscated weights ``W'`` of ``untrusted.tflite``
(which the TA authenticated by hash at load). Per inference the TEE draws ``k`` secret projections
``u_1 .. u_k ~ N(0, I_M)`` and precomputes the single-output filters ``F_j = sum_i u_ji W'_i`` (off the
hot path, with the one-time masks). When it writes ``x'`` it computes ``z_j = L(x', F_j)`` - a layer with
one output channel per projection, ``k / M`` of the layer's work - and the window norms ``n_p`` (the
norm of the input window output position ``p`` reads); when the results come back it copies them into
secure memory (the normal world could change shared memory between the check and the use) and accepts
them only if, at every position ``p`` and for every ``j``::

    |u_j . y'_p - z_jp| <= tau_p = TOLERANCE * eps32 * S * n_p

``S`` is the layer's filter scale (conv / dense: ``||W'||_F``; depthwise: the largest norm of the filters
that read one input channel), so ``tau`` bounds the float32 rounding of an honest accelerator (a dot
product of a window with a filter of norm ``w`` is off by about ``eps32 * w * n_p``; projecting ``M`` such
errors with a Gaussian ``u`` adds them in quadrature) and of the check itself. ``TOLERANCE`` is set from
measurement: the largest ``|u . y' - z| / (eps32 S n_p)`` seen on clean inferences of every zoo model is
below 1, so 16 leaves a wide margin against false alarms; it assumes a float32 accelerator (a GPU
delegate that computes in float16 would be reported as tampering).

The bound. Let the accelerator return ``y' + E``, ``E`` (``[P, M]``) chosen without knowing ``u`` (the
projections are secret and fresh for every inference, so a rejected attempt teaches nothing about the
next one). With ``D = E + delta`` (``delta``: the honest rounding, also independent of ``u``),
``u_j . D_p ~ N(0, ||D_p||^2)``, so the check at one position misses with probability at most
``2 tau_p / (sqrt(2 pi) ||D_p||)`` (the Gaussian density is at most ``1 / sqrt(2 pi)``; the TEE's own
rounding is inside ``tau``). Some position has ``||D_p|| / tau_p >= ||D|| / ||tau||`` (else
``||D||^2 = sum (||D_p|| / tau_p)^2 tau_p^2 < ||D||^2``), and missing every position implies missing
that one, for each of the ``k`` independent projections::

    P(miss) <= beta^k,   beta = sqrt(2 / pi) * ||tau|| / ||D||.

For a change of norm ``||E|| >= RELATIVE_CHANGE * ||y'||`` (1e-3, the requirement), ``||D|| >=
||E|| - ||delta||`` and ``beta <= sqrt(2 / pi) ||tau|| / ((1e-3 - ||delta|| / ||y'||) ||y'||)``. With
inputs that look isotropic (the masks dominate them) ``||tau|| / ||y'|| ~ TOLERANCE eps32 S sqrt(T C) /
||W'||_F`` (``T`` taps, ``C`` input channels), which picks ``k`` per layer at load so that ``beta^k <=
2^-26`` (6 bits of margin for inputs less isotropic than the estimate assumes; 2 bits for layers with
at least ``SMALL_OUTPUT`` output values, whose norms concentrate; ``MIN_PROJECTIONS`` at least). A check
can also compute the bound it actually achieved from ``||tau||`` and ``||y'||`` (``LayerCheck.check``
returns ``log2 beta^k``); the tests assert it is at most -20 for every layer of every zoo model. A
change is per round: if ``||E||^2 >= 1e-6 sum_l ||y'_l||^2`` over the round's layers, some layer has
``||E_l|| >= 1e-3 ||y'_l||``, so the per-layer bound holds for the round.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

EPS32 = float(np.finfo(np.float32).eps)
TOLERANCE = 16.0
RELATIVE_CHANGE = 1e-3
TARGET_LOG2 = -20.0
# k is picked for 2^(-20 - margin) on the isotropic estimate: real inputs vary around it, the more so
# the fewer output values a layer has (a small dense layer's achieved bound was 2^-18 with no margin).
MARGIN_LOG2, SMALL_MARGIN_LOG2, SMALL_OUTPUT = 6.0, 2.0, 1 << 14
MIN_PROJECTIONS, MAX_PROJECTIONS = 2, 16
_DENSITY = math.sqrt(2 / math.pi)
KINDS = frozenset({"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"})


@dataclass(frozen=True)
class Geometry:
    """Where an output position's input window lies: kernel, stride, dilation, padding before."""

    kind: str
    x_shape: tuple[int, ...]
    y_shape: tuple[int, ...]
    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    dilation: tuple[int, int] = (1, 1)
    before: tuple[int, int] = (0, 0)

    @property
    def taps(self) -> int:
        return self.kernel[0] * self.kernel[1]

    @property
    def spatial(self) -> bool:
        return self.kind != "FULLY_CONNECTED"

    @property
    def pointwise(self) -> bool:
        """A 1x1 stride-1 unpadded layer (or a dense one): the window of position p is pixel p."""
        return not self.spatial or (self.taps == 1 and self.stride == (1, 1) and self.before == (0, 0)
                                    and self.x_shape[:3] == self.y_shape[:3])

    def padded(self) -> tuple[int, int]:
        """The zero-padded input extent that covers every window and the input itself."""
        (kh, kw), (sh, sw), (dh, dw) = self.kernel, self.stride, self.dilation
        _, ho, wo, _ = self.y_shape
        _, h, w, _ = self.x_shape
        return (max((ho - 1) * sh + (kh - 1) * dh + 1, self.before[0] + h),
                max((wo - 1) * sw + (kw - 1) * dw + 1, self.before[1] + w))


def _before(size: int, out: int, kernel: int, stride: int, dilation: int, same: bool) -> int:
    """Padding before the input (LiteRT's ComputePaddingHeightWidth; VALID pads nothing)."""
    if not same:
        return 0
    effective = (kernel - 1) * dilation + 1
    return max(0, (out - 1) * stride + effective - size) // 2


def geometry(layer: dict[str, Any], weights_shape: tuple[int, ...], x_shape: tuple[int, ...],
             y_shape: tuple[int, ...]) -> Geometry:
    """The geometry of a program's layer descriptor (``converters.per_inference.layer_descriptor``),
    checked against the shapes of its weights, input and output: ``ValueError`` unless they agree as
    LiteRT's kernels would have them (a descriptor that does not is refused at load, not met mid-way)."""
    kind = layer["kind"]
    if not isinstance(kind, str) or kind not in KINDS:
        raise ValueError(f"not a linear layer: {kind!r}")
    ws, xs, ys = (tuple(_positive(d, "shape") for d in s) for s in (weights_shape, x_shape, y_shape))
    if kind == "FULLY_CONNECTED":
        if len(ws) != 2 or ys[-1] != ws[0] or math.prod(xs) != ws[1] * math.prod(ys[:-1]):
            raise ValueError(f"dense weights {ws} do not take {xs} to {ys}")
        return Geometry(kind, xs, ys)
    if len(xs) != 4 or len(ys) != 4 or len(ws) != 4 or xs[0] != ys[0]:
        raise ValueError(f"{kind}: input {xs}, output {ys} and weights {ws} must be NHWC")
    if kind == "CONV_2D" and (ws[3] != xs[3] or ws[0] != ys[3]):
        raise ValueError(f"conv weights {ws} do not take {xs} to {ys}")
    if kind == "DEPTHWISE_CONV_2D" and (ws[0] != 1 or ws[3] != ys[3] or ws[3] % xs[3]):
        raise ValueError(f"depthwise weights {ws} do not take {xs} to {ys}")
    stride, dilation = (layer[key] for key in ("stride", "dilation"))
    if not (isinstance(stride, list) and isinstance(dilation, list) and len(stride) == len(dilation) == 2):
        raise ValueError(f"stride {stride!r} and dilation {dilation!r} must be pairs")
    (sh, sw), (dh, dw) = (tuple(_positive(v, "stride / dilation") for v in pair)
                          for pair in (stride, dilation))
    if layer["padding"] not in ("SAME", "VALID"):
        raise ValueError(f"padding {layer['padding']!r}")
    same = layer["padding"] == "SAME"
    kh, kw = ws[1], ws[2]
    for size, out, k, st, d in ((xs[1], ys[1], kh, sh, dh), (xs[2], ys[2], kw, sw, dw)):
        if (k - 1) * d > 2 * size:  # every tap but one would only ever read padding (and pad by that much)
            raise ValueError(f"{kind}: kernel {k} dilated {d} spans more than twice the input's {size}")
        want = -(-size // st) if same else -(-(size - (k - 1) * d) // st)
        if out != want:
            raise ValueError(f"{kind}: {layer['padding']} stride {st} dilation {d} kernel {k} takes {size} "
                             f"to {want}, not {out}")
    before = (_before(xs[1], ys[1], kh, sh, dh, same), _before(xs[2], ys[2], kw, sw, dw, same))
    return Geometry(kind, xs, ys, (kh, kw), (sh, sw), (dh, dw), before)


def _positive(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{what}: {value!r} is not a positive integer")
    return int(value)


def _taps(kind: str, weights: np.ndarray, geo: Geometry) -> np.ndarray:
    """The weights as float64 ``[M, T, C]`` (conv, dense with T = 1) or ``[T, C, m]`` (depthwise)."""
    w = np.asarray(weights, np.float64)
    if kind == "CONV_2D":
        return w.reshape(w.shape[0], geo.taps, w.shape[3])
    if kind == "FULLY_CONNECTED":
        return w.reshape(w.shape[0], 1, w.shape[1])
    c = geo.x_shape[3]
    if w.shape[3] % c:
        raise ValueError(f"depthwise: {w.shape[3]} channels for {c} inputs")
    return w.reshape(geo.taps, c, w.shape[3] // c)


def window_index(geo: Geometry) -> np.ndarray:
    """``[T, P_out]``: the input pixel (``n * H * W + ih * W + iw``) that tap ``t`` of output position ``p``
    reads, or ``P_in`` (a zero row) where the window leaves the input (zero padding)."""
    (kh, kw), (sh, sw), (dh, dw), (top, left) = geo.kernel, geo.stride, geo.dilation, geo.before
    n, h, w, _ = geo.x_shape
    _, ho, wo, _ = geo.y_shape
    rows = np.arange(ho)[:, None] * sh + np.arange(kh)[None, :] * dh - top  # [Ho, kh]
    cols = np.arange(wo)[:, None] * sw + np.arange(kw)[None, :] * dw - left  # [Wo, kw]
    ih = rows[None, :, None, :, None]  # -> [N, Ho, Wo, kh, kw]
    iw = cols[None, None, :, None, :]
    batch = np.arange(n)[:, None, None, None, None]
    pixel = (batch * h + ih) * w + iw
    inside = (ih >= 0) & (ih < h) & (iw >= 0) & (iw < w)
    index = np.where(inside, pixel, n * h * w)  # [N, Ho, Wo, kh, kw]
    return np.ascontiguousarray(index.reshape(n * ho * wo, kh * kw).T).astype(np.int32)


class LayerCheck:
    """The check of one layer: filters and buffers made once, ``draw`` per inference (off the hot path),
    ``prepare`` when the TEE writes the layer's input, ``check`` when the result comes back.

    ``alloc(shape, dtype)`` gives (accounted) secure memory for what lives from the push to the check;
    the work areas come from scratch shared with the other layers (``bind_scratch``); ``index`` maps a
    geometry to its ``window_index`` (layers of the same geometry share one).
    """

    def __init__(self, layer: dict[str, Any], weights: np.ndarray, x_shape: tuple[int, ...],
                 y_shape: tuple[int, ...], alloc: Any, index: Any = None,
                 projections: int | None = None) -> None:
        self.geo = geo = geometry(layer, weights.shape, x_shape, y_shape)
        self.kind = geo.kind
        # Norms in float64 accumulation, without a float64 copy (draw() is given the weights again).
        w = np.asarray(weights, np.float32)
        frobenius = math.sqrt(float(np.einsum("i,i->", w.reshape(-1), w.reshape(-1), dtype=np.float64)))
        if self.kind == "DEPTHWISE_CONV_2D":
            c = x_shape[-1]
            if w.shape[-1] % c:
                raise ValueError(f"depthwise: {w.shape[-1]} channels for {c} inputs")
            self.m_out, self.in_channels = w.shape[-1], c
            per_output = np.einsum("tc,tc->c", w.reshape(-1, w.shape[-1]), w.reshape(-1, w.shape[-1]),
                                   dtype=np.float64)
            self.scale = math.sqrt(float(per_output.reshape(c, -1).sum(axis=1).max(initial=0.0)))
        else:
            self.m_out, self.in_channels = w.shape[0], w.shape[-1]
            self.scale = frobenius
        if y_shape[-1] != self.m_out:
            raise ValueError(f"{self.kind}: output has {y_shape[-1]} channels, the weights {self.m_out}")
        self.weights_shape = tuple(weights.shape)
        self.rows_out = math.prod(y_shape[:-1])
        self.k = k = projections or self.projections_needed(frobenius)
        self.rows_in = math.prod(x_shape[:-1]) if geo.spatial else self.rows_out
        self.unit = np.float32(TOLERANCE * EPS32 * self.scale)
        taps, c = geo.taps, self.in_channels
        # How z = L(x, F) is computed:
        # - "direct": pointwise and dense layers, z = x @ F;
        # - "windows": the input windows copied out (im2col, about 1 MiB at a time) times the filters,
        #   for few input channels (the first layer's 3 colours), where the others' arrays are bigger;
        # - "shifts" (stride 1): in the zero-padded input flattened row by row, tap (i, j) of every output
        #   position is one contiguous block, so z is T matmuls of such blocks (one batched call) summed;
        #   the rows past each output row's end are computed and dropped (2 in 114 for MobileNet);
        # - "taps" (strided): V = x @ F_t for every tap at every input pixel (one matmul), then each output
        #   position gathers and sums its taps' rows (window_index).
        if geo.pointwise:
            self.method = "direct"
        elif c * self.rows_out <= k * self.rows_in:
            self.method = "windows"
        elif geo.stride == (1, 1):
            self.method = "shifts"
        else:
            self.method = "taps"
        self.z = alloc((self.rows_out, k), np.float32)  # kept from the push to the check
        self.tau = alloc((self.rows_out, 1), np.float32)
        self.tau_norm = 0.0
        self._parts: dict[str, tuple[int, ...]] = {"w": (self.rows_out, k)}
        if self.method == "taps":
            self.index = index(geo) if index is not None else window_index(geo)
            self.index_v = alloc(self.index.shape, np.int32)  # rows of V viewed as [(P_in + 1) T, k]
            np.add(self.index * np.int32(taps), np.arange(taps, dtype=np.int32)[:, None], out=self.index_v)
            # Output positions are gathered a block at a time (about 256 KiB of taps).
            self.block = max(1, min(self.rows_out, (1 << 16) // (taps * (k + 1))))
            self._parts.update(v=(self.rows_in + 1, taps * k), gathered=(taps, self.block, k),
                               q=(self.rows_in + 1,), q_gathered=(taps, self.block))
        elif self.method == "shifts":
            hp, wp = geo.padded()
            kw, dw = geo.kernel[1], geo.dilation[1]
            ho = geo.y_shape[1]
            self.span = ho * wp  # output rows as full padded rows
            self.apron = (kw - 1) * dw  # zero rows past the end that the last taps reach
            rows = max(1, min(ho, (1 << 16) // max(1, wp * taps * k)))  # output rows per block (~256 KiB)
            self._parts.update(xp=(hp * wp + self.apron, c), blocks=(taps, rows * wp, k),
                               zl=(self.span, k), qp=(hp * wp + self.apron,), ql=(self.span,))
            self.rows_per_block = rows
        elif self.method == "windows":
            hp, wp = geo.padded()
            wo = geo.y_shape[2]
            rows = max(1, (1 << 18) // (wo * taps * c)) * wo  # whole output rows, about 1 MiB at a time
            self._parts.update(xp=(geo.x_shape[0], hp, wp, c), cols=(min(self.rows_out, rows), taps * c))
        self.scratch_elements = sum(math.prod(s) for s in self._parts.values())

    def bind_scratch(self, scratch: np.ndarray) -> None:
        """Use ``scratch`` (float32, at least ``scratch_elements``; shared) for the work areas."""
        at = 0
        for name, shape in self._parts.items():
            size = math.prod(shape)
            setattr(self, name, scratch[at:at + size].reshape(shape))
            at += size
        if self.method == "shifts":
            self._shift_views()

    def _shift_views(self) -> None:
        """The views ``_prepare_shifts`` works on, made once (``as_strided`` costs more than the work on
        a small layer)."""
        geo = self.geo
        (kh, kw), (dh, dw), (top, left) = geo.kernel, geo.dilation, geo.before
        n, h, w, c = geo.x_shape
        ho, wo = geo.y_shape[1:3]
        hp, wp = geo.padded()
        k, span, item = self.k, self.span, self.xp.itemsize
        self._inner = self.xp[:hp * wp].reshape(hp, wp, c)[top:top + h, left:left + w]
        taps = np.lib.stride_tricks.as_strided(  # [kh, kw, span, C]: tap (i, j) of every output position
            self.xp, (kh, kw, span, c), (dh * wp * c * item, dw * c * item, c * item, item), writeable=False)
        q_taps = np.lib.stride_tricks.as_strided(
            self.qp, (kh, kw, span), (dh * wp * item, dw * item, item), writeable=False)
        step = self.rows_per_block * wp
        self._blocks = []
        for a in range(0, span, step):
            e = min(a + step, span)
            out = self.blocks.reshape(-1)[:kh * kw * (e - a) * k].reshape(kh, kw, e - a, k)
            self._blocks.append((taps[:, :, a:e], out, out.reshape(kh * kw, e - a, k), self.zl[a:e]))
        self._q_taps = q_taps
        per = ho * wo  # output positions of one batch element
        self._valid = [(self.zl.reshape(ho, wp, k)[:, :wo], self.z[b * per:(b + 1) * per].reshape(ho, wo, k),
                        self.ql.reshape(ho, wp)[:, :wo], self.tau[b * per:(b + 1) * per, 0].reshape(ho, wo))
                       for b in range(n)]

    def projections_needed(self, frobenius: float) -> int:
        """``k`` with ``beta^k <= 2^(-20 - MARGIN_LOG2)`` for the isotropic estimate of ``||tau|| / ||y'||``
        (module docstring)."""
        if frobenius == 0:
            return MIN_PROJECTIONS
        rho = TOLERANCE * EPS32 * self.scale * math.sqrt(self.geo.taps * self.in_channels) / frobenius
        beta = _DENSITY * rho / RELATIVE_CHANGE
        if beta >= 0.5:
            return MAX_PROJECTIONS
        margin = SMALL_MARGIN_LOG2 if self.rows_out * self.m_out >= SMALL_OUTPUT else MARGIN_LOG2
        k = math.ceil((TARGET_LOG2 - margin) / math.log2(beta))
        return int(min(MAX_PROJECTIONS, max(MIN_PROJECTIONS, k)))

    # -- per inference -----------------------------------------------------------------------------------
    def projection_shapes(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """Shapes of the two float32 arrays ``draw`` fills: ``u`` and the projected filters."""
        taps, c, k = self.geo.taps, self.in_channels, self.k
        filters = {"windows": (taps * c, k), "shifts": (taps, c, k)}.get(self.method, (c, taps * k))
        return (self.m_out, k), filters

    def draw(self, rng: np.random.Generator, u: np.ndarray, filters: np.ndarray, weights: np.ndarray) -> None:
        """Fresh secret projections into ``u`` ``[M, k]`` and their filters into ``filters``, from the
        layer's obfuscated ``weights`` (LiteRT's layout, as at construction)."""
        if tuple(weights.shape) != self.weights_shape:
            raise ValueError(f"weights {weights.shape}, expected {self.weights_shape}")
        taps = _taps(self.kind, weights, self.geo)
        u64 = rng.standard_normal((self.m_out, self.k))
        if self.kind == "DEPTHWISE_CONV_2D":
            _, c, m = taps.shape
            f = np.einsum("tcm,cmj->ctj", taps, u64.reshape(c, m, self.k))  # [C, T, k]
        else:
            f = np.tensordot(taps, u64, axes=(0, 0)).transpose(1, 0, 2)  # [T, C, k] -> [C, T, k]
        u[...] = u64
        if self.method in ("windows", "shifts"):
            filters[...] = f.transpose(1, 0, 2).reshape(filters.shape)
        else:
            filters[...] = f.reshape(filters.shape)

    def prepare(self, x: np.ndarray, filters: np.ndarray) -> None:
        """At the push: ``z = L(x, F)`` and the tolerances, from the secure copy ``x`` of what was sent."""
        if self.method == "direct":
            x2 = x.reshape(self.rows_out, -1)
            np.matmul(x2, filters, out=self.z)
            np.einsum("pc,pc->p", x2, x2, out=self.tau[:, 0])
        elif self.method == "shifts":
            self._prepare_shifts(x, filters)
        elif self.method == "taps":
            x2 = x.reshape(self.rows_in, -1)
            self.v[-1] = 0  # the row padded taps read
            np.matmul(x2, filters, out=self.v[:-1])
            self.q[-1] = 0
            np.einsum("pc,pc->p", x2, x2, out=self.q[:-1])
            rows = self.v.reshape(-1, self.k)
            tau = self.tau[:, 0]
            for a in range(0, self.rows_out, self.block):
                b = min(a + self.block, self.rows_out)
                taps, count = self.index.shape[0], b - a  # contiguous views of this block's size
                gathered = self.gathered.reshape(-1)[:taps * count * self.k].reshape(taps, count, self.k)
                q_gathered = self.q_gathered.reshape(-1)[:taps * count].reshape(taps, count)
                np.take(rows, self.index_v[:, a:b], axis=0, out=gathered)
                np.add.reduce(gathered, axis=0, out=self.z[a:b])
                np.take(self.q, self.index[:, a:b], out=q_gathered)
                np.add.reduce(q_gathered, axis=0, out=tau[a:b])
        else:
            self._prepare_windows(x, filters)
        np.sqrt(self.tau, out=self.tau)
        self.tau_norm = float(np.linalg.norm(self.tau)) * float(self.unit)
        np.multiply(self.tau, self.unit, out=self.tau)

    def _prepare_shifts(self, x: np.ndarray, filters: np.ndarray) -> None:
        kh, kw = self.geo.kernel
        fs = filters.reshape(kh, kw, self.in_channels, self.k)
        for b, (z_rows, z, q_rows, tau) in enumerate(self._valid):
            self.xp.fill(0)  # the border and the apron (the scratch is shared, so rewritten every time)
            np.copyto(self._inner, x[b])
            np.einsum("pc,pc->p", self.xp, self.xp, out=self.qp)
            for taps, out, stacked, z_block in self._blocks:
                np.matmul(taps, fs, out=out)
                np.add.reduce(stacked, axis=0, out=z_block)
            np.sum(self._q_taps, axis=(0, 1), out=self.ql)
            np.copyto(z, z_rows)
            np.copyto(tau, q_rows)

    def _prepare_windows(self, x: np.ndarray, filters: np.ndarray) -> None:
        geo = self.geo
        (kh, kw), (sh, sw), (dh, dw), (top, left) = geo.kernel, geo.stride, geo.dilation, geo.before
        n, h, w, c = geo.x_shape
        ho, wo = geo.y_shape[1:3]
        if self.xp.shape[1:3] != (h, w):
            self.xp.fill(0)  # the zero border (the scratch is shared, so rewritten every time)
        np.copyto(self.xp[:, top:top + h, left:left + w], x)
        s = self.xp.strides
        windows = np.lib.stride_tricks.as_strided(  # [N, Ho, Wo, kh, kw, C]: the window of each position
            self.xp, (n, ho, wo, kh, kw, c), (s[0], s[1] * sh, s[2] * sw, s[1] * dh, s[2] * dw, s[3]),
            writeable=False)
        rows = self.cols.shape[0] // wo
        tau = self.tau[:, 0]
        at = 0
        for b in range(n):
            for r in range(0, ho, rows):
                block = windows[b, r:r + rows]
                count = block.shape[0] * wo
                cols = self.cols[:count]
                np.copyto(cols.reshape(block.shape), block)
                np.matmul(cols, filters, out=self.z[at:at + count])
                np.einsum("pc,pc->p", cols, cols, out=tau[at:at + count])
                at += count

    def check(self, y: np.ndarray, u: np.ndarray, bound: bool = True) -> tuple[float, float | None]:
        """Compare the secure copy ``y`` of the accelerator's result with ``z``: ``(worst, log2_bound)``,
        ``worst`` the largest ``|u . y'_p - z_p| / tau_p`` (> 1: the result is wrong), ``log2_bound``
        the bound ``log2 beta^k`` this check achieved against a change of 1e-3 of ``||y||`` (``None``
        unless ``bound``: it costs one more pass over ``y``)."""
        y2 = y.reshape(self.rows_out, self.m_out)
        np.matmul(y2, u, out=self.w)
        np.subtract(self.w, self.z, out=self.w)
        np.abs(self.w, out=self.w)
        np.divide(self.w, self.tau, out=self.w)
        worst = float(self.w.max(initial=0.0))
        if not math.isfinite(worst):
            worst = math.inf
        if not bound:
            return worst, None
        norm = math.sqrt(float(np.dot(y2.reshape(-1), y2.reshape(-1))))
        return worst, self.bound_log2(norm)

    def bound_log2(self, y_norm: float) -> float:
        """``log2 beta^k`` for a change of ``RELATIVE_CHANGE * y_norm`` (module docstring)."""
        margin = RELATIVE_CHANGE * y_norm - self.tau_norm / TOLERANCE  # ||delta|| <= ||tau|| / TOLERANCE
        if margin <= 0:
            return 0.0
        beta = _DENSITY * self.tau_norm / margin
        return self.k * min(0.0, math.log2(beta)) if beta > 0 else -math.inf
