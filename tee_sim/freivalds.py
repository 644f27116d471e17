"""Freivalds' check of the accelerator's results, run by the ShadowNet TA on a model loaded with ``verify``.

For one offloaded layer the accelerator returns ``y' = L(x', W')``: ``P`` output positions by ``M``
channels, for the input ``x'`` the TEE sent and the obfuscated weights ``W'`` of ``untrusted.tflite``
(which the TA authenticated by hash at load). Per inference the TEE draws ``k`` secret projections
``u_1 .. u_k ~ N(0, I_M)`` and precomputes the single-output filters ``F_j = sum_i u_ji W'_i`` (off the
hot path, with the one-time masks). When it writes ``x'`` it computes ``z_j = L(x', F_j)`` - a layer with
one output channel per projection, ``k / M`` of the layer's work (a depthwise layer, whose ``F_j`` read as
much as the layer itself, is computed instead and projected, ``z_j = u_j . L(x', W')``: ``T + k`` rather
than ``k T`` multiply-adds per output channel and position; with a depth multiplier of 1 the TA goes one
step further and uses that result itself, unchecked, instead of the accelerator's:
``LayerCheck.computing``, ``tee_sim.per_inference_kernels``; so it does with a dense layer whose check
would cost more than the layer, and with a dense or conv layer whose results have too few directions for
a check, ``LayerCheck.cheaper_computed``) - and the window norms ``n_p`` (the
norm of the input window output position ``p`` reads); when the results come back the restore copies
them into secure memory a tile at a time (the normal world could change shared memory between the check
and the use), checks the tile there and restores it from there, accepting it only if, at every position
``p`` and for every ``j``::

    |u_j . y'_p - z_jp| <= tau_p = TOLERANCE * eps32 * S * n_p

The tolerance, its long sums' term and the bound (how many projections a layer takes, and how likely a
changed result passes) are ``tee_sim.freivalds_bound``'s.

The popped check. An exact split's layer (``converters.exact_split``: by default round 1's, where it can be
split) returns ``[y_hi | y_lo]`` of the masked input ``v + r``, and the tolerance above follows that
magnitude: round 1's mask is tens of times the input (~70x on MiniVGG), so changes a fifth of the tolerance -
which the normal world can compute and aim - passed every check and moved MiniVGG's outputs by up to 5.6e-3
(a red-team probe). What the TEE uses is ``d = (y_hi - pop_hi) + (y_lo - pop_lo) = L(v, W')``, of the
input's own magnitude, and honestly ``y_hi`` is exact (the split's point), so ``d`` is off by the rounding
of ``y_lo`` and of the pop mask alone. A second ``LayerCheck`` (``popped``) checks ``d``, tile by tile
after the first and after the pop, against ``z = L(v, u W')`` from the input ``v`` itself (which the push
copies into secure memory), with
``tau_p = TOLERANCE eps32 ||W'||_F sqrt(sum over the window of |v|^2 + h |x_hi|^2 + |x_lo|^2)``,
``h = ||W'_lo||_F^2 / ||W'||_F^2`` (``W'_lo``'s rounding of ``x_hi``'s magnitude, ``W'``'s of ``x_lo``; about
1.3x the unmasked layer's tolerance where the first check's is ~50x). Its bound is the absolute one
above (``d`` can be ~0: a blank image), so it reports none; the first check keeps the stated bound, and
catches what the second cannot see (a change that cancels between the halves, which leaves ``d`` as it was).
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Callable
from typing import Any

import numpy as np

from tee_sim import freivalds_bound as bound
from tee_sim import freivalds_directions as directions
from tee_sim.freivalds_bound import EPS32, SMALL_OUTPUT, TOLERANCE
from tee_sim.freivalds_directions import COMPUTED_DENSE_BYTES, FEW_CONV_DIRECTIONS, FEW_DIRECTIONS
from tee_sim.layer_geometry import Geometry, geometry
from tee_sim.ta_shadownet_kernels import LANES, LIBRARY
from tee_sim.ta_shadownet_small_ops import compile_dense

POPPED = "#popped"  # the key of a split layer's popped check, after its result's (tee_sim.per_inference)
# The most taps a depthwise layer the TEE computes may have (fv_prepare's FV_MAX_DIRECT_TAPS): its kernels
# keep a pointer or two per tap on the stack, which a 600x600 kernel overflowed (a helper's ASan run); a
# larger one is checked with projected filters instead.
MAX_DIRECT_TAPS = 4096


def direct(kind: str, weights_shape: tuple[int, ...], x_shape: tuple[int, ...]) -> bool:
    """A depthwise layer with multiplier 1 (of at most ``MAX_DIRECT_TAPS`` taps): the TEE computes it
    rather than project filters that read as much (``LayerCheck``), and on a verified model uses that
    result (``LayerCheck.computing``)."""
    return (kind == "DEPTHWISE_CONV_2D" and weights_shape[-1] == x_shape[-1]
            and math.prod(weights_shape[1:3]) <= MAX_DIRECT_TAPS)


def _depthwise_taps(weights: np.ndarray, geo: Geometry) -> np.ndarray:
    """A depthwise layer's weights as float64 ``[T, C, m]`` (``m``: the depth multiplier)."""
    w = np.asarray(weights, np.float64)
    c = geo.x_shape[3]
    if w.shape[3] % c:
        raise ValueError(f"depthwise: {w.shape[3]} channels for {c} inputs")
    return w.reshape(geo.taps, c, w.shape[3] // c)


class _Prepare(ctypes.Structure):  # fv_prepare_t
    _fields_ = [("x", ctypes.c_void_p),
                *((name, ctypes.c_int64) for name in ("n", "h", "w", "c", "ho", "wo")),
                *((name, ctypes.c_int32) for name in ("kh", "kw", "sh", "sw", "dh", "dw", "top", "left")),
                ("filters", ctypes.c_void_p), ("k", ctypes.c_int32), ("kp", ctypes.c_int32),
                ("z", ctypes.c_void_p), ("tau", ctypes.c_void_p), ("unit", ctypes.c_float),
                ("norms", ctypes.c_void_p), ("tau_norm", ctypes.c_double),
                ("dw_weights", ctypes.c_void_p), ("u", ctypes.c_void_p), ("mp", ctypes.c_int64),
                ("y_out", ctypes.c_void_p), ("tiled", ctypes.c_int32), ("sent", ctypes.c_void_p),
                ("hi_weight", ctypes.c_float)]


class _Check(ctypes.Structure):  # fv_check_t
    _fields_ = [("y", ctypes.c_void_p), ("p", ctypes.c_int64), ("m", ctypes.c_int64),
                ("u", ctypes.c_void_p), ("k", ctypes.c_int32), ("kp", ctypes.c_int32),
                ("z", ctypes.c_void_p), ("tau", ctypes.c_void_p), ("worst", ctypes.c_double),
                ("y_norm2", ctypes.c_double), ("want_norm", ctypes.c_int32), ("tiled", ctypes.c_int32),
                ("coherent", ctypes.c_float)]


class _Draw(ctypes.Structure):  # fv_draw_t
    _fields_ = [("u", ctypes.c_void_p), ("w", ctypes.c_void_p), ("acc", ctypes.c_void_p),
                *((name, ctypes.c_int64) for name in ("m", "taps", "c")),
                ("k", ctypes.c_int32), ("kp", ctypes.c_int32),
                ("u_packed", ctypes.c_void_p), ("f_packed", ctypes.c_void_p)]


class LayerCheck:
    """The check of one layer: buffers made once, ``draw`` per inference (off the hot path), ``prepare``
    when the TEE writes the layer's input, ``check`` when the result comes back; the last two are the C
    kernels ``fv_prepare`` and ``fv_check`` (``tee_sim/ta_shadownet_freivalds.c``, ``_freivalds_check.c``).

    ``z = L(x, F)`` is computed output position by output position, each tap's input pixel times the
    projected filters, ``k`` projections and ``16 / kp`` input channels to a vector (``kp``: ``k`` rounded
    up to a power of two), so that a check with 4 projections costs 9 C / 4 vector FMAs per output of a
    3x3 layer, not 9 C; the window norms come from each input pixel's squared norm, summed over the taps.
    A conv layer with ``kp >= 4`` is prepared a tile of output positions at a time (``tiled``: each
    position's sums stay in registers over its whole window, the filters are loaded once per tile): 1.2-1.9x
    faster on 3x3 layers (``fv_prepare``'s ``prepare_tiled`` says how it was measured); its check too.
    A depthwise layer with multiplier 1 (``direct``) keeps its weights in secure memory and is computed
    by the TEE, then projected (``prepare_dw``): as fast as its projected filters on MobileNet's
    112x112x32 depthwise layer, 1.1-1.5x faster on its 56x56x128 and 14x14x512 ones (minima of 40 calls),
    and no projected filters to draw per inference.
    ``alloc(shape, dtype)`` gives (accounted) secure memory for what lives from the push to the check;
    the input pixels' norms go in scratch shared with the other layers (``bind_scratch``).
    ``input_mask``: the most a small one-time mask on the layer's input, unsplit, may be against the input's
    RMS (``mask_spread.small_mask_ratio``; 0: none): the tolerance follows the masked input, so ``k`` is
    sized for ``1 + input_mask`` times the estimate - ``||x + r|| <= ||x|| + ||r||`` whatever the input: a
    centred mask's per-channel mean is not independent of it, so ``sqrt(1 + input_mask^2)`` would be a
    guess (ResNet-44: 383 -> 440 projections, MiniVGG 30 -> 33) - and the bound holds against a change of
    the round's own output, not of the larger masked one (a helper, stop 59: sized as unmasked, MiniVGG's
    rounds 3-5 reached 2^-17.1 / -15.4 on dense inputs and 2^0 on sparse ones, against that output).
    """

    def __init__(self, layer: dict[str, Any], weights: np.ndarray, x_shape: tuple[int, ...],
                 y_shape: tuple[int, ...], alloc: Any, projections: int | None = None,
                 computed: bool = False, shared_results: bool = False, popped: bool = False,
                 known: float | None = None, input_mask: float = 0.0) -> None:
        self.input_mask = float(input_mask)
        # A popped check (module docstring): of an exact split's layer, whose weights, input and result
        # are given as the accelerator has them; it checks L(v, W') on v, W' their second blocks.
        self.popped, self.hi_weight = popped, 0.0
        self.split_shape = tuple(weights.shape)
        if popped:
            m, c = weights.shape[0] // 2, weights.shape[-1] // 2
            if layer["kind"] not in ("CONV_2D", "FULLY_CONNECTED") or weights.shape[0] % 2 \
                    or weights.shape[-1] % 2 or x_shape[-1] % 2 or y_shape[-1] % 2:
                raise ValueError(f"{layer['kind']} {weights.shape}: not the weights of an exact split")
            low = np.asarray(weights[m:, ..., :c], np.float32).reshape(-1)
            weights = weights[m:, ..., c:]
            x_shape, y_shape = (*x_shape[:-1], x_shape[-1] // 2), (*y_shape[:-1], y_shape[-1] // 2)
        self.geo = geo = geometry(layer, weights.shape, x_shape, y_shape)
        self.kind = geo.kind
        # Norms in float64 accumulation, without a float64 copy (draw() is given the weights again).
        w = np.asarray(weights, np.float32)
        frobenius = math.sqrt(float(np.einsum("i,i->", w.reshape(-1), w.reshape(-1), dtype=np.float64)))
        if popped and frobenius > 0:
            self.hi_weight = float(np.einsum("i,i->", low, low, dtype=np.float64)) / frobenius ** 2
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
        # How far the calibration inputs were from isotropic (converters.anisotropy): >= 1, the factor by
        # which the estimate of ||tau|| / ||y'|| grows.
        self.anisotropy = layer.get("anisotropy", 1.0)
        if not (isinstance(self.anisotropy, (int, float)) and not isinstance(self.anisotropy, bool)
                and 1.0 <= self.anisotropy <= 2.0 ** 20):
            raise ValueError(f"{self.kind}: anisotropy {self.anisotropy!r} is not a number in [1, 2^20]")
        # Secure memory left for the weights of layers computed for their few directions or capped
        # projections (the TA's budget, ``freivalds_directions.COMPUTED_TOTAL_BYTES``; ``_too_large``).
        self.room: float = math.inf
        # How many independent directions a dense or conv layer's results have (``freivalds_directions``;
        # ``known``: as the check made before this computed one counted them).
        self.directions = math.inf if self.kind == "DEPTHWISE_CONV_2D" or popped else \
            known if known is not None else \
            directions.count(w.reshape(self.m_out, -1), directions.independent_rows(self.kind, y_shape),
                             self._threshold())
        # The length of one output's sum (a depthwise output's: its taps), for the long sums' term
        # (``freivalds_bound.coherent``).
        self.sum_length = geo.taps * (1 if self.kind == "DEPTHWISE_CONV_2D" else self.in_channels)
        # A layer only ever ``computing`` (``computed``) projects nothing: one lane layout suffices.
        self.capped = False  # whether the bound wanted more than MAX_PROJECTIONS (projections_needed)
        self.k = k = 1 if computed else projections or self.projections_needed(frobenius)
        if not 1 <= k <= LANES:
            raise ValueError(f"{k} projections: 1 to {LANES} are supported")
        self.kp = 1 << (k - 1).bit_length()
        self.group = bound.lane_group(k)  # channels per vector
        self.coherent = float(np.float32(bound.coherent(self.sum_length, self.m_out, self.group)))
        self.unit = np.float32(TOLERANCE * EPS32 * self.scale)
        # z and tau, kept from the push to the check (``results_elements`` floats; z with 16 floats of slack:
        # the kernels read it a vector at a time, the lanes past it unused), here or where ``bind_results``
        # puts them (``shared_results``). A layer only ever ``computing`` (``computed``) has neither.
        self.computed = computed
        rows = 0 if computed else self.rows_out
        self.results_elements = -(-(rows * self.kp + LANES) // LANES) * LANES + rows
        self.bind_results(None if shared_results and rows else alloc((self.results_elements,), np.float32))
        self.tau_norm = 0.0
        c = self.in_channels
        if geo.spatial:
            n, h, wd, _ = geo.x_shape
            _, ho, wo, _ = geo.y_shape
        else:  # dense: each output row reads one row of the input, flattened
            n, h, wd, ho, wo = self.rows_out, 1, 1, 1, 1
        self.x_elements = n * h * wd * c
        # A depthwise layer with multiplier 1 is computed by the TEE and projected (fv_prepare's
        # prepare_dw): its weights [taps, M rounded up to 16], zero-padded, from the authenticated model.
        self.direct = direct(self.kind, w.shape, x_shape)
        # A dense layer whose check would cost more than the layer, or a dense or conv layer of few
        # directions (``cheaper_computed``), is computed by the TEE when asked (``computed``) as a matrix
        # product: its weights [M, D] from the authenticated model (a conv's as ``freivalds_directions.
        # as_dense`` lays them out, over its whole input).
        self.dense = computed and self.kind in ("FULLY_CONNECTED", "CONV_2D") and not popped
        if computed and not (self.direct or self.dense):
            raise ValueError(f"{self.kind}: only a depthwise layer with multiplier 1, a dense or a conv "
                             "layer is computed by the TEE")
        width = -(-self.m_out // LANES) * LANES if self.direct else LANES
        self._dw: np.ndarray | None = None
        if self.direct:
            self._dw = alloc((geo.taps, width), np.float32)
            self._dw[:, :self.m_out] = w.reshape(geo.taps, self.m_out)
        self._w: np.ndarray | None = None
        if self.dense:
            self._w = alloc(self._computed_shape(), np.float32)
            if self.kind == "FULLY_CONNECTED":
                self._w[...] = w.reshape(self._w.shape)
            else:
                directions.as_dense(w, geo, self._w)
        # A tile of output positions at a time: a conv layer's prepare as a matrix product (fv_prepare's
        # prepare_tiled), a computed layer (compute_dw).
        self.tiled = computed or (self.kind == "CONV_2D" and self.kp >= 4)
        # The scratch: the input pixels' squared norms, then a row of output positions' sums (prepare_kp),
        # one position's outputs or a row of zeros (direct), or a row of zeros and the input's last pixels,
        # padded (tiled: under 3 rows of G-channel groups).
        rest = width if self.direct else max(wo * (LANES + 1), 3 * (c + LANES))
        self.scratch_elements = 0 if self.dense else n * h * wd + rest
        self._prepare = _Prepare(None, n, h, wd, c, ho, wo, *geo.kernel, *geo.stride, *geo.dilation,
                                 *geo.before, None, k, self.kp, *self._addresses(),
                                 self.unit, None, 0.0, None if self._dw is None else self._dw.ctypes.data,
                                 None, width if self.direct else 0, None, int(self.tiled), None,
                                 self.hi_weight)
        self._norms: np.ndarray | None = None
        self._shapes = self.projection_shapes()
        # fv_draw's arguments but the arrays, which draw() sets per call.
        self._draw = _Draw(None, None, None, self.m_out, geo.taps if self.kind == "CONV_2D" else 1, c, k,
                           self.kp, None, None)

    def bind_results(self, memory: np.ndarray | None) -> None:
        """Keep z and tau in ``memory`` (float32, at least ``results_elements``; None: nowhere yet, and
        nothing is prepared until they are bound): e.g. shared with the checks of layers never under way at
        the same time (``tee_sim.per_inference``: less secure memory). Bind before ``prepared`` and
        ``fused``, which take the addresses."""
        rows = 0 if self.computed else self.rows_out
        if memory is None:
            self._z = self.z = self.tau = None
        elif (memory.dtype != np.float32 or memory.size < self.results_elements
              or not memory.flags.c_contiguous):
            raise ValueError(f"results memory of {memory.size} {memory.dtype}: {self.results_elements} "
                             "contiguous float32 needed")
        else:
            z_end = self.results_elements - rows
            self._z = memory[:z_end]
            self.z = self._z[:rows * self.kp].reshape(rows, self.kp)
            self.tau = memory[z_end:z_end + rows].reshape(rows, 1)
        prepare = getattr(self, "_prepare", None)
        if prepare is not None:
            prepare.z, prepare.tau = self._addresses()

    def _addresses(self) -> tuple[int | None, int | None]:
        """Where z and tau are (None: not bound)."""
        return (None, None) if self.z is None else (self.z.ctypes.data, self.tau.ctypes.data)

    def bind_scratch(self, scratch: np.ndarray) -> None:
        """Use ``scratch`` (float32, at least ``scratch_elements``; shared) for the input pixels' norms
        and an output row's sums."""
        if scratch.dtype != np.float32 or scratch.size < self.scratch_elements:
            raise ValueError(f"scratch of {scratch.size} {scratch.dtype}: {self.scratch_elements} float32 "
                             "needed")
        self._norms = scratch
        self._prepare.norms = scratch.ctypes.data

    def projections_needed(self, frobenius: float) -> int:
        """``k`` for this layer (``freivalds_bound.projections_needed``): the isotropic estimate of ``||tau||
        / ||y'||``, times the layer's measured ``anisotropy``; ``capped`` when it wanted more."""
        if frobenius == 0:
            return bound.MIN_PROJECTIONS
        rho = TOLERANCE * EPS32 * self.scale * math.sqrt(self.geo.taps * self.in_channels) / frobenius \
            * self.anisotropy * (1.0 + self.input_mask)
        # A depthwise layer's estimate is the least reliable (each output channel reads one input channel:
        # with batch norm folded in, the channels of large spread tend to have the small filters; MobileNet's
        # 14x14x512 ones achieved 2^-19.9 .. -20.6 with the small margin): the full margin.
        concentrated = self.rows_out * self.m_out >= SMALL_OUTPUT and self.kind != "DEPTHWISE_CONV_2D"
        k, self.capped = bound.projections_needed(rho, self.sum_length, self.m_out, concentrated)
        return k

    # -- per inference -----------------------------------------------------------------------------------
    def projection_shapes(self) -> tuple[tuple[int, int], tuple[int, int, int]]:
        """Shapes of the two float32 arrays ``draw`` fills, packed for the kernels: the projections ``u``
        ``[ceil(M / G), 16]`` and the projected filters ``[taps, ceil(C / G), 16]`` (``G`` channels of
        ``kp`` lanes each to a vector; none for a layer the TEE computes, ``direct``)."""
        g = self.group
        filters = (0, 0, LANES) if self.direct else (self.geo.taps, -(-self.in_channels // g), LANES)
        return (-(-self.m_out // g), LANES), filters

    def draw(self, rng: np.random.Generator, u: np.ndarray, filters: np.ndarray, weights: np.ndarray) -> None:
        """Fresh secret projections into ``u`` and their filters into ``filters`` (packed, see
        ``projection_shapes``), from the layer's obfuscated ``weights`` (LiteRT's layout, as at
        construction). Conv and dense layers in C (``fv_draw``: ``F = u W'`` in double, then packed)."""
        u_shape, f_shape = self._shapes
        if self.popped and tuple(weights.shape) == self.split_shape:  # W' of [[W'_hi, 0], [W'_lo, W']]
            weights = weights[self.m_out:, ..., self.in_channels:]
        if tuple(weights.shape) != self.weights_shape:
            raise ValueError(f"weights {weights.shape}, expected {self.weights_shape}")
        for name, array, shape in (("projections", u, u_shape), ("filters", filters, f_shape)):
            if array.shape != shape or array.dtype != np.float32 or not array.flags.c_contiguous:
                raise ValueError(f"{name} {array.shape} {array.dtype}: {shape} float32 expected")
        u64 = np.zeros((self.m_out, self.kp))  # [M, kp], zero past k
        u64[:, :self.k] = rng.standard_normal((self.m_out, self.k))
        if self.kind == "DEPTHWISE_CONV_2D" and not self.direct:  # a depth multiplier (rare): numpy
            self._pack(u64[None, :, :self.k], u)
            _, c, m = (taps := _depthwise_taps(weights, self.geo)).shape
            self._pack(np.einsum("tcm,cmj->tcj", taps, u64[:, :self.k].reshape(c, m, self.k)), filters)
            return
        call = self._draw
        call.u, call.u_packed = u64.ctypes.data, u.ctypes.data
        if not self.direct:  # else: u only (the TEE computes the layer)
            w = np.ascontiguousarray(weights, np.float32)
            acc = np.empty(self.kp * (w.size // self.m_out))
            call.w, call.acc, call.f_packed = w.ctypes.data, acc.ctypes.data, filters.ctypes.data
        if LIBRARY.fv_draw(ctypes.byref(call)):
            raise ValueError(f"fv_draw refused k = {self.k}, kp = {self.kp}")

    def _pack(self, values: np.ndarray, out: np.ndarray) -> None:
        """``[T, rows, k]`` -> ``[T, ceil(rows / G), 16]`` (``out``'s layout: lane ``j * G + r`` holds
        projection ``j`` of row ``r`` of the group), zero-padded; as ``fv_draw`` packs."""
        t, rows, k = values.shape
        padded = np.zeros((t, out.shape[-2] * self.group, self.kp))
        padded[:, :rows, :k] = values
        out[...] = padded.reshape(t, -1, self.group, self.kp).transpose(0, 1, 3, 2).reshape(out.shape)

    def prepare(self, x: np.ndarray, u: np.ndarray, filters: np.ndarray,
                sent: np.ndarray | None = None) -> None:
        """At the push: ``z = L(x, F)`` (``direct``: ``u . L(x, W')``) and the tolerances, from the secure
        copy ``x`` of what was sent, with one pool slot's projections ``u`` and ``filters``; a ``popped``
        check's ``x`` is the input itself, ``v``, and ``sent`` the secure copy of ``[x_hi | x_lo]``."""
        self.prepared(x, u, filters, sent)()

    def prepared(self, x: np.ndarray, u: np.ndarray, filters: np.ndarray,
                 sent: np.ndarray | None = None) -> Callable[[], None]:
        """``prepare(x, u, filters, sent)`` as a call without arguments, the arrays checked once, here: the
        TA binds each pool slot's at load and prepares them every inference, and checking them took about
        13 us a call against 2 us for a small layer's prepare (ResNet-404 verifies 404 layers)."""
        if self.computed:
            raise ValueError(f"prepare: {self.kind} is computed by the TEE, not checked: nothing to prepare")
        if (self.z is None or x.dtype != np.float32 or x.size != self.x_elements
                or not x.flags.c_contiguous
                or (u.shape, filters.shape) != self.projection_shapes()
                or any(a.dtype != np.float32 or not a.flags.c_contiguous for a in (u, filters))
                or self._norms is None
                or (sent is None) == self.popped
                or sent is not None and (sent.dtype != np.float32 or sent.size != 2 * self.x_elements
                                         or not sent.flags.c_contiguous)):
            raise ValueError(f"prepare: {x.dtype} {x.shape} input, {u.shape} projections, {filters.shape} "
                             f"filters{'' if sent is None else f', {sent.dtype} {sent.shape} sent'}"
                             f"{' (a popped check needs what was sent)' if self.popped else ''}")
        made = _Prepare.from_buffer_copy(self._prepare)
        made.x, made.filters, made.u = x.ctypes.data, filters.ctypes.data, u.ctypes.data
        if sent is not None:
            made.sent = sent.ctypes.data
        run, address = LIBRARY.fv_prepare, ctypes.addressof(made)

        def call(keep: tuple = (made, x, u, filters, sent)) -> None:
            if run(address):  # a lane layout the kernel does not know (k is checked at construction)
                raise ValueError(f"fv_prepare refused k = {self.k}, kp = {self.kp}")
            self.tau_norm = made.tau_norm
        call.made = made  # type: ignore[attr-defined] - its tau_norm after a prepare made in C
        call.c_call = (ctypes.cast(run, ctypes.c_void_p).value, address)  # type: ignore[attr-defined]
        return call

    def cheaper_computed(self) -> bool:
        """Whether this dense layer's check costs more than the layer, or cannot reach the bound: ``k`` of
        at least its ``M`` outputs (a projection's ``z`` costs as much as an output, and each inference's
        projected filters ``k M D`` more than the layer, ``M D`` per row), more projections than a
        check takes (``capped``: a 10-output head on a flattened 32x32x128 map achieved 2^-1.6, a red
        team's) or results along fewer than ``FEW_DIRECTIONS`` directions (``freivalds_directions``),
        either with weights of at most ``COMPUTED_DENSE_BYTES``, which the TEE then keeps in secure
        memory. The TEE then computes it (``computed``). A conv layer likewise, for few directions alone
        (few output positions: under the paper's scheme a one-position 3x3 conv of stride 2 on a 4x4 map
        reached 2^-4.9 on 20 of 40 inputs, a helper's probe), as the dense layer it is on each image's
        input (``freivalds_directions.as_dense``)."""
        if self.popped or self.computed:
            return False
        if self.kind == "CONV_2D":  # few directions: few output positions of weights of few directions
            return self._few_directions() and not self._too_large()
        return (self.kind == "FULLY_CONNECTED"
                and (self.k >= self.m_out  # its projected filters (k x D) then outweigh its weights (M x D)
                     or (self.capped or self._few_directions()) and not self._too_large()))

    def _few_directions(self) -> bool:
        return self.directions < self._threshold()

    def _threshold(self) -> int:
        return FEW_CONV_DIRECTIONS if self.kind == "CONV_2D" else FEW_DIRECTIONS

    def _too_large(self) -> bool:
        """Weights, as the TEE would compute with them, past ``COMPUTED_DENSE_BYTES`` (a 2457x4096 layer of
        the paper's scheme, 38 MiB, failed the load in a 64 MiB TEE that holds their authenticated read
        besides: a review), or past the ``room`` the load has left for them."""
        return 4 * math.prod(self._computed_shape()) > min(COMPUTED_DENSE_BYTES, self.room)

    def _computed_shape(self) -> tuple[int, int]:
        """The weights the TEE computes the layer with: a dense layer's ``[M, C]``, a conv's laid out as
        a dense one (``freivalds_directions.dense_shape``)."""
        if self.kind == "FULLY_CONNECTED":
            return self.m_out, self.in_channels
        return directions.dense_shape(self.geo)

    @property
    def computed_bytes(self) -> int:
        """The secure memory of the weights a computed dense layer (or conv as one) keeps."""
        return 0 if self._w is None else self._w.nbytes

    @property
    def weak(self) -> bool:
        """Whether this check's bound cannot be counted on: it wanted more projections than a check takes
        (``capped``), or its results have too few directions (``freivalds_directions``), and its weights
        are too large to compute it (``cheaper_computed``). (An exact split's dense layer of few directions is
        checked on its masked input, whose mask draws its results' directions afresh each inference: the
        5-output head of the tests' small CNN held 2^-24.9 or better on 40 images; not counted.)"""
        return not self.computed and (self.capped or self._few_directions() and self._too_large())

    def computing(self, x: np.ndarray, y: np.ndarray) -> Callable[[], None]:
        """A call without arguments that computes the layer itself, ``y = L(x, W')``, from the secure copy
        ``x`` of what was sent into ``y`` (float32, the result's size, secure memory): a ``direct``
        depthwise layer, which the TEE computes to check anyway (class docstring), or a ``dense`` one (a
        dense layer, or a conv as one: ``freivalds_directions.as_dense``; ``cheaper_computed``), whose
        result it then uses instead of the accelerator's (``tee_sim.per_inference_kernels``). Depthwise:
        the same kernel as ``prepare`` without the projection, the window norms or ``z`` (``fv_prepare``
        with ``y_out``); dense: one C call (``ta_shadownet_small_ops.compile_dense``), so that its step
        stays on the fast path."""
        if not (self.direct or self.dense):
            raise ValueError(f"{self.kind}: only a depthwise layer with multiplier 1, a dense or a conv "
                             "layer is computed by the TEE")
        if (x.dtype != np.float32 or x.size != self.x_elements or not x.flags.c_contiguous
                or y.dtype != np.float32 or y.size != self.rows_out * self.m_out or not y.flags.c_contiguous
                or self._norms is None):
            raise ValueError(f"computing: {x.dtype} {x.shape} input, {y.dtype} {y.shape} result")
        if self.dense:  # a conv: each image's input against as_dense's rows
            rows = self.rows_out if self.kind == "FULLY_CONNECTED" else self.geo.x_shape[0]
            return compile_dense(x.reshape(rows, -1), self._w, y.reshape(rows, -1))
        made = _Prepare.from_buffer_copy(self._prepare)
        made.x, made.y_out, made.kp = x.ctypes.data, y.ctypes.data, 1
        run, address = LIBRARY.fv_prepare, ctypes.addressof(made)

        def call(keep: tuple = (made, x, y)) -> None:
            if run(address):
                raise ValueError(f"fv_prepare refused to compute {self.kind} (kp = {made.kp})")
        call.c_call = (ctypes.cast(run, ctypes.c_void_p).value, address)  # type: ignore[attr-defined]
        return call

    def fused(self, u: np.ndarray) -> _Check:
        """The check's parameters for the restore kernel, which makes it on the result tile by tile as it
        restores it (``tee_sim.ta_shadownet_restore_push``), with the projections ``u`` (one pool slot's).
        After a run, ``outcome`` reads it."""
        if (self.computed or self.z is None or u.dtype != np.float32 or u.shape != self.projection_shapes()[0]
                or not u.flags.c_contiguous):
            raise ValueError(f"projections {u.shape}{' for a layer only computed' if self.computed else ''}")
        tiled = self.kp >= 4 and self.m_out % self.group == 0  # a tile of positions at a time (check_rows)
        return _Check(None, self.rows_out, self.m_out, u.ctypes.data, self.k, self.kp, self.z.ctypes.data,
                      self.tau.ctypes.data, 0.0, 0.0, 0, int(tiled), self.coherent)

    def outcome(self, fused: _Check) -> tuple[float, float | None]:
        """``(worst, log2_bound)`` of the last check made with ``fused`` (as ``check``; the bound only
        when its ``want_norm`` was set)."""
        worst = fused.worst if math.isfinite(fused.worst) else math.inf
        # A popped check's result can be ~0 (a blank image): its tolerance, not a share of it, is its bound.
        bound = fused.want_norm and not self.popped
        return worst, self.bound_log2(math.sqrt(fused.y_norm2)) if bound else None

    def check(self, y: np.ndarray, u: np.ndarray, bound: bool = True) -> tuple[float, float | None]:
        """Compare the secure copy ``y`` of the accelerator's result with ``z``: ``(worst, log2_bound)``,
        ``worst`` the largest ``|u . y'_p - z_p| / tau_p`` (> 1: the result is wrong), ``log2_bound``
        the bound ``log2 beta^k`` this check achieved against a change of 1e-3 of ``||y||`` (``None``
        unless ``bound``: it costs one more pass over ``y``)."""
        if y.dtype != np.float32 or y.size != self.rows_out * self.m_out or not y.flags.c_contiguous:
            raise ValueError(f"check: {y.dtype} {y.shape} result")
        made = self.fused(u)
        made.y, made.want_norm = y.ctypes.data, int(bound)
        LIBRARY.fv_check(ctypes.addressof(made))
        return self.outcome(made)

    def bound_log2(self, y_norm: float) -> float:
        """``log2 beta^k`` for a change of ``RELATIVE_CHANGE * y_norm`` (``freivalds_bound.bound_log2``)."""
        return bound.bound_log2(self.k, self.tau_norm, self.coherent, y_norm)
