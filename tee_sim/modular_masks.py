"""Modular one-time masks: a round's input sent modulo a period, so that what crosses is uniform whatever
the input, and no number of inferences averages the mask out.

A one-time mask drawn from a fixed distribution and added, ``v + r``, hides each inference's ``v``, but
the mean of what crosses is ``v + E[r]``: a normal world that chooses its inputs and sees many inferences
fits what the round's input is made of through it (``shadownet.mask_fit``: the zoo's MiniVGG gave 30 of
its 32 first-layer filters from 1,600 inferences through round 2's 10x Gaussian mask), the more easily
the smaller the mask is against ``v``. Sent modulo a period ``P`` with ``r`` uniform over one period
(Slalom's field masks, in float32), ``x = (v + r) mod P`` is uniform over ``[-P/2, P/2)`` for every
``v``: its distribution does not depend on the input at all, and neither does any statistic of many.

- The mask: ``r`` uniform over ``[-P/2, P/2)`` (24 random bits an element, from the mask's key;
  ``tee_sim.one_time_masks``), no mean; ``P`` a power of two (the program's ``std``, the uniform's RMS
  ``P / sqrt(12)``, names it: ``tee_sim.program.modular_period``), so that ``w - k P`` is exact and
  scaling the mask by a power of two (``tee_sim.mask_spread``) scales its period with it.
- The push (``sn_run``'s ``send_modular``): ``w = v + r``, ``k = floor(w / P + 1/2)``, sends ``w - k P``,
  within the half-open ``[-P/2, P/2)`` (a value on the boundary sent as either end would tell which side
  the input lay on), and keeps ``k`` (int8, the wraps, in secure memory the sessions share: the unwraps
  read them in the same call; about ``E|v| / P`` of the elements: 0.3-0.8% on the zoo's round 2 at
  10x its spread; about a fifth, by that estimate, on the deeper rounds at 1x). An exact split's
  (``send_split_modular``) takes its high half ``r_hi + q`` modulo ``P`` so, on a grid that divides ``P``
  (``converters.exact_split.plan``), and its low half ``x_lo`` within ``[-g/2, g/2)``: both halves uniform
  whatever ``v``.
- The unwrap (``sn_unwrap``, this module's ``Unwrap``): the accelerator computes ``L(v + r - k P)``, so the
  restore's offset ``bias - restore(L(r))`` (made offline, ``PopMask``) gets ``+ P restore(L(k))`` before the
  restore reads it, summed where ``k`` is not 0 only, from the layer's weights composed with the restore
  (``PopMask.composed``, kept in secure memory at load); an exact split's pop mask gets ``- P L(k)`` through
  the blocks ``[W'_hi | W'_lo]`` its high half meets, both halves exact. It costs the TEE that share of
  the layer's multiply-adds and secure memory for those weights and the wraps.

What it does not change: the precision the mask costs (``P / sqrt(12)`` within 2^+-0.5 of the Gaussian
mask's std it replaces: float32 rounds ``v + r`` and the layer's sums at that magnitude, as before, unless
the round is split); the
accelerator learns nothing from ``k`` (it never leaves the TEE), but the unwrap's time grows with how many
elements wrapped, a side channel of ``sum |v| / P`` per round that an attacker timing the TEE could read
(one number per inference; the layer's whole correction computed every time would close it, at the
layer's cost). Which masks are modular: ``converters.schemes.groupmix``'s ``modular_masks`` and
``modular_depth``.
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Callable
from typing import Any

import numpy as np

from tee_sim.layer_geometry import Geometry
from tee_sim.ta_shadownet_kernels import LIBRARY

SN_UNWRAP = ctypes.cast(LIBRARY.sn_unwrap, ctypes.c_void_p).value  # for the secure world's fast path


class _Unwrap(ctypes.Structure):  # sn_unwrap_t
    _fields_ = [("k", ctypes.c_void_p),
                *((name, ctypes.c_int64)
                  for name in ("n", "h", "w", "c", "ho", "wo", "y0", "y1", "x0", "x1")),
                *((name, ctypes.c_int32) for name in ("kh", "kw", "sh", "sw", "dh", "dw", "top", "left")),
                ("e", ctypes.c_void_p), ("m", ctypes.c_int64), ("period", ctypes.c_void_p),
                ("out", ctypes.c_void_p)]


class Unwrap:
    """One restore's unwrap of a modular mask: ``composed``, the layer's weights composed with the restore
    as float32 ``[taps * C, N]`` (rows tap-major, then channel; ``PopMask.composed``), in secure memory;
    ``geometry``, the layer's."""

    def __init__(self, geometry: Geometry, composed: np.ndarray) -> None:
        if geometry.kind not in ("CONV_2D", "FULLY_CONNECTED"):
            raise ValueError(f"a modular mask read by a {geometry.kind}: only conv and dense layers unwrap")
        rows = composed.shape[0] if composed.ndim == 2 else 0
        fits = (rows == geometry.taps * geometry.x_shape[-1] if geometry.spatial
                else rows > 0 and math.prod(geometry.x_shape) % rows == 0)
        if composed.dtype != np.float32 or not composed.flags.c_contiguous or not fits:
            raise ValueError(f"composed weights {composed.dtype} {composed.shape} for {geometry}")
        self.geometry, self.composed = geometry, composed

    def compile(self, wraps: np.ndarray, period_now: np.ndarray, offset: np.ndarray,
                pad: Any = None) -> Callable[[], int]:
        """The unwrap of ``wraps`` (int8, the mask's shape; of a push padded by ``pad``, only its interior is
        read: the push writes nothing else, and the wraps live in memory other calls share) at
        ``period_now`` (float32 ``[1]``) into ``offset`` (the restore's per-element offset, float32); its
        ``c_call`` for the fast path."""
        geo = self.geometry
        m = self.composed.shape[1]
        if geo.spatial:
            n, h, w, c = geo.x_shape
            (kh, kw), (sh, sw), (dh, dw), (top, left) = geo.kernel, geo.stride, geo.dilation, geo.before
            _, ho, wo, _ = geo.y_shape
        else:  # [rows, K] on the flattened input, K the weights' (a dense layer on a 4-D tensor too)
            c = self.composed.shape[0]
            n, h, w, ho, wo = math.prod(geo.x_shape) // c, 1, 1, 1, 1
            kh = kw = sh = sw = dh = dw = 1
            top = left = 0
        if (wraps.dtype != np.int8 or wraps.size != n * h * w * c or not wraps.flags.c_contiguous
                or offset.dtype != np.float32 or offset.size != n * ho * wo * m
                or not offset.flags.c_contiguous
                or period_now.dtype != np.float32 or period_now.shape != (1,)):
            raise ValueError(f"an unwrap of {wraps.dtype} {wraps.shape} into {offset.dtype} {offset.shape} "
                             f"for {geo}")
        y0, y1, x0, x1 = 0, h, 0, w
        if pad is not None and geo.spatial:
            if len(pad) != 4 or any(pad[0]) or any(pad[3]):
                raise ValueError(f"an unwrap of a push padded by {pad}")
            (y0, below), (x0, right) = pad[1], pad[2]
            y1, x1 = h - below, w - right
        call = _Unwrap(wraps.ctypes.data, n, h, w, c, ho, wo, y0, y1, x0, x1, kh, kw, sh, sw, dh, dw, top,
                       left,
                       self.composed.ctypes.data, m, period_now.ctypes.data, offset.ctypes.data)
        run, address = LIBRARY.sn_unwrap, ctypes.addressof(call)

        def unwrap(keep: tuple = (call, wraps, period_now, offset, self.composed)) -> int:
            return run(address)
        unwrap.c_call = (SN_UNWRAP, address)  # type: ignore[attr-defined]
        return unwrap
