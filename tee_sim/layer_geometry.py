"""Where a linear layer's output positions read their input: the geometry of a conv, depthwise or dense layer
of the TEE program, as the TA's checks (``tee_sim.freivalds``) and pop masks (``tee_sim.one_time_masks``,
``tee_sim.exact_split``) read it, checked against its weights' and tensors' shapes as LiteRT's kernels
would have them."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from tee_sim.program import window_fits

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
        if not window_fits(k, d, size):
            raise ValueError(f"{kind}: kernel {k} dilated {d}: taps further apart than twice the input's "
                             f"{size}")
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
