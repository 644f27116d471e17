"""A TRANSPOSE_CONV as the ordinary convolutions of its stride's phases, so that the accelerator runs them,
obfuscated like any CONV_2D (``converters.normalize`` applies it).

Output row ``j`` of a transposed convolution of stride ``s`` and ``kh`` taps sums ``W[k] x[i]`` over
``s i + k = j + pad`` (LiteRT's ``pad``: what a convolution of its output size would pad, rounded down).
Write ``j + pad = s q + r``: the taps ``k = r + s m`` of phase ``r`` make ``z_r[q]``, the sum over ``m``
of ``W[r + s m] x[q - m]``: an ordinary convolution of ``x`` with the phase's taps in reverse order, over
``x`` padded by ``M - 1`` rows before (``M``: the most taps of any phase). The phases' results, side by
side on the channel axis, are interleaved - ``z_r[q]`` to row ``s q + r`` - by DEPTH_TO_SPACE (for
unequal strides RESHAPE, TRANSPOSE, RESHAPE), and a SLICE from ``pad`` takes the output. The products are
the transposed convolution's; the TEE does the interleaving.

Where the kernel is a whole number of strides every phase has ``M`` taps, and one CONV_2D of all their
filters computes them: one accelerator op, whose input crosses once. Elsewhere (3x3 at stride 2) the
shorter phases would need zeros where the others have weights, at places the kernel and stride make
public, and the combinations of the obfuscated filters that vanish there single out each phase's real
filters (a review recovered them all, up to scale): there each phase is a CONV_2D of its own taps, sliced
where it has fewer (its results start later), then concatenated; they all read the input's one push (one
input mixing, one mask: ``converters.plan_rounds``). A phase with no tap (a kernel smaller than the stride) is
its bias alone, broadcast in the TEE.
"""

from __future__ import annotations

import numpy as np
from ai_edge_litert import schema_py_generated as schema_fb

from converters.graph import Graph, Op, Tensor

# The fused activations a phase's CONV_2D takes over (converters.normalize splits them off as ops).
_CLAMPS = {schema_fb.ActivationFunctionType.NONE: (-np.inf, np.inf),
           schema_fb.ActivationFunctionType.RELU: (0.0, np.inf),
           schema_fb.ActivationFunctionType.RELU_N1_TO_1: (-1.0, 1.0),
           schema_fb.ActivationFunctionType.RELU6: (0.0, 6.0)}


def convertible(tensors: list[Tensor], op: Op) -> bool:
    """A TRANSPOSE_CONV (inputs: output shape, weights ``[O, kh, kw, I]``, input, optional bias) whose
    output shape, weights and bias are constants, with a fused activation LiteRT applies as a clamp."""
    if op.kind != "TRANSPOSE_CONV" or len(op.inputs) < 3 or min(op.inputs[:3]) < 0:
        return False
    shape, w, x = (tensors[t] for t in op.inputs[:3])
    bias = tensors[op.inputs[3]] if len(op.inputs) > 3 and op.inputs[3] >= 0 else None
    y = tensors[op.outputs[0]]
    options = op.options
    return (shape.data is not None and w.data is not None and w.sparsity is None and w.dtype == np.float32
            and len(w.shape) == 4 and len(x.shape) == 4 and x.shape[-1] == w.shape[-1]
            and x.dtype == y.dtype == np.float32 and (bias is None or bias.data is not None)
            and tuple(int(d) for d in np.asarray(shape.data).ravel()) == y.shape
            and y.shape[-1] == w.shape[0] and options.strideH >= 1 and options.strideW >= 1
            and getattr(options, "fusedActivationFunction", 0) in _CLAMPS)


def as_convolutions(tensors: list[Tensor], op: Op) -> list[Op]:
    """The ops, in execution order, that compute what ``op`` (``convertible``) does (module docstring);
    ``tensors`` gains their tensors. They write ``op``'s output tensor."""
    options = op.options
    sh, sw = int(options.strideH), int(options.strideW)
    x, y, w = tensors[op.inputs[2]], tensors[op.outputs[0]], tensors[op.inputs[1]]
    weights = np.asarray(w.data, np.float32)
    filters, kh, kw, channels = weights.shape
    batch, out_h, out_w, _ = y.shape
    bias = np.asarray(tensors[op.inputs[3]].data, np.float32) if len(op.inputs) > 3 and op.inputs[3] >= 0 \
        else np.zeros(filters, np.float32)
    clamp = getattr(options, "fusedActivationFunction", 0)

    added = Graph(tensors)  # appends to ``tensors``

    def constant(name: str, value: np.ndarray) -> int:
        return added.add_tensor(f"{y.name}/as_conv/{name}", value.shape, value.dtype, value)

    def made(name: str, shape: tuple[int, ...]) -> int:
        return added.add_tensor(f"{y.name}/as_conv/{name}", shape, np.float32)

    def ints(*values: int) -> np.ndarray:
        return np.array(values, np.int32)

    pad_top, pad_left = _padding(options.padding, sh, out_h, kh), _padding(options.padding, sw, out_w, kw)
    most_h, most_w = -(-kh // sh), -(-kw // sw)
    # Phase rows 0 .. rows - 1 give output rows up to sh * rows: enough for pad_top + out_h.
    rows = max(x.shape[1], -(-(pad_top + out_h) // sh))
    cols = max(x.shape[2], -(-(pad_left + out_w) // sw))
    ops: list[Op] = []
    src = op.inputs[2]
    paddings = [[0, 0], [most_h - 1, rows - x.shape[1]], [most_w - 1, cols - x.shape[2]], [0, 0]]
    if any(any(p) for p in paddings):
        padded = made("padded", (batch, rows + most_h - 1, cols + most_w - 1, channels))
        ops.append(Op("PAD", (src, constant("paddings", np.array(paddings, np.int32))), (padded,),
                      schema_fb.PadOptionsT()))
        src = padded
    phase_shape = (batch, rows, cols, filters)
    stacked_shape = (batch, rows, cols, sh * sw * filters)
    unsliced = (batch, sh * rows, sw * cols, filters)
    exact = pad_top == pad_left == 0 and unsliced == y.shape
    last = op.outputs[0] if exact else made("interleaved", unsliced)

    def conv(name: str, kernel: np.ndarray, conv_bias: np.ndarray, shape: tuple[int, ...]) -> int:
        conv_options = schema_fb.Conv2DOptionsT()
        conv_options.padding, conv_options.strideH, conv_options.strideW = schema_fb.Padding.VALID, 1, 1
        conv_options.dilationHFactor = conv_options.dilationWFactor = 1
        conv_options.fusedActivationFunction = clamp
        out = last if sh == sw == 1 and shape == unsliced else made(name, shape)
        weights_and_bias = (constant(f"kernel_{name}", kernel), constant(f"bias_{name}", conv_bias))
        ops.append(Op("CONV_2D", (src, *weights_and_bias), (out,), conv_options))
        return out

    def taps(rh: int, rw: int) -> np.ndarray:
        return weights[:, rh::sh, rw::sw, :][:, ::-1, ::-1, :]  # the phase's taps, reversed

    if kh % sh == 0 and kw % sw == 0:
        # Every phase has every tap: one CONV_2D of all their filters, one input pushed (the layer's input
        # crosses once, mixed and masked once, as for any conv; a CONV_2D per phase would send a copy each).
        kernels = [taps(rh, rw) for rh in range(sh) for rw in range(sw)]
        stacked = conv("phases", np.concatenate(kernels), np.tile(bias, sh * sw), stacked_shape)
    else:
        phases = []
        for rh in range(sh):
            for rw in range(sw):
                taps_h, taps_w = len(range(rh, kh, sh)), len(range(rw, kw, sw))
                if not taps_h or not taps_w:  # no weight reaches these rows or columns: the bias alone
                    lo, hi = _CLAMPS[clamp]
                    alone = made(f"phase_{rh}_{rw}", phase_shape)
                    ops.append(Op("BROADCAST_TO", (constant(f"bias_{rh}_{rw}", np.clip(bias, lo, hi)),
                                                   constant(f"shape_{rh}_{rw}", ints(*phase_shape))),
                                  (alone,), schema_fb.BroadcastToOptionsT(), version=2))  # (LiteRT has no 1)
                    phases.append(alone)
                    continue
                extra_h, extra_w = most_h - taps_h, most_w - taps_w  # rows and columns before its first
                whole = conv(f"phase_{rh}_{rw}", taps(rh, rw), bias,
                             (batch, rows + extra_h, cols + extra_w, filters))
                if extra_h or extra_w:
                    part = made(f"phase_{rh}_{rw}/sliced", phase_shape)
                    ops.append(Op("SLICE", (whole, constant(f"begin_{rh}_{rw}", ints(0, extra_h, extra_w, 0)),
                                            constant(f"size_{rh}_{rw}", ints(*phase_shape))),
                                  (part,), schema_fb.SliceOptionsT()))
                    whole = part
                phases.append(whole)
        stacked = made("phases", stacked_shape)
        concat_options = schema_fb.ConcatenationOptionsT()
        concat_options.axis = 3
        ops.append(Op("CONCATENATION", tuple(phases), (stacked,), concat_options))
    if sh == sw == 1:
        last = stacked
    elif sh == sw:  # channel (rh * s + rw) * O + o to row s q + rh, column s p + rw
        d2s_options = schema_fb.DepthToSpaceOptionsT()
        d2s_options.blockSize = sh
        ops.append(Op("DEPTH_TO_SPACE", (stacked,), (last,), d2s_options))
    else:  # which DEPTH_TO_SPACE cannot do: [N, q, p, rh, rw, O] -> [N, q, rh, p, rw, O]
        six = (batch, rows, cols, sh, sw, filters)
        split, moved = made("split", six), made("moved", (batch, rows, sh, cols, sw, filters))
        ops += [_reshape(stacked, split, six, constant("six", ints(*six))),
                Op("TRANSPOSE", (split, constant("perm", ints(0, 1, 3, 2, 4, 5))), (moved,),
                   schema_fb.TransposeOptionsT()),
                _reshape(moved, last, unsliced, constant("four", ints(*unsliced)))]
    if not exact:
        ops.append(Op("SLICE", (last, constant("begin", ints(0, pad_top, pad_left, 0)),
                                constant("size", ints(*y.shape))),
                      (op.outputs[0],), schema_fb.SliceOptionsT()))
    return ops


def _reshape(src: int, dst: int, shape: tuple[int, ...], new_shape: int) -> Op:
    options = schema_fb.ReshapeOptionsT()
    options.newShape = list(shape)
    return Op("RESHAPE", (src, new_shape), (dst,), options)


def _padding(padding: int, stride: int, size: int, taps: int) -> int:
    """The padding before a TRANSPOSE_CONV's output rows (or columns) of ``size``, as LiteRT computes it
    (``ComputePaddingHeightWidth`` on the output size: what a convolution of it would pad, rounded down)."""
    same = padding == schema_fb.Padding.SAME
    out = (size + stride - 1) // stride if same else (size + stride - taps) // stride
    return max((out - 1) * stride + taps - size, 0) // 2
