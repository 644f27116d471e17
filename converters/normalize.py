"""``normalize``: rewrite what real float models contain into the few forms ShadowNet handles.

Constants that only feed an op (a float16 constant behind DEQUANTIZE, a sparse constant behind DENSIFY) are
folded into plain float constants, and fused activations become ops of their own, so that the partition
sees every linear op bare and every non-linear op explicit. Works on the IR of :mod:`converters.graph`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import replace

import numpy as np
from ai_edge_litert import schema_py_generated as schema_fb

from converters.graph import Graph, Op, Signature, Tensor, fused_activation
from converters.tflite_sparsity import densify
from shadownet.exceptions import UnsupportedOpError

# Fused activations normalize() splits off into standalone ops of the same name. These are the ones
# LiteRT's float kernels apply (as an output clamp); they ignore a fused TANH or SIGN_BIT (FULLY_CONNECTED
# rejects it), so such a model means something LiteRT does not compute and normalize() refuses it.
ACTIVATIONS: frozenset[str] = frozenset({"RELU", "RELU6", "RELU_N1_TO_1"})
# Ops whose fused activation LiteRT applies to their output. Others keep theirs as it is (LiteRT's float
# CONCATENATION ignores it; RNN/LSTM ops use theirs inside the cell).
FUSED_ACTIVATION_OPS: frozenset[str] = frozenset({
    "CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "ADD", "SUB", "MUL", "DIV", "AVERAGE_POOL_2D",
    "MAX_POOL_2D", "L2_POOL_2D",
})


def normalize(graph: Graph) -> Graph:
    """Rewrite ``graph`` into the forms ShadowNet handles; returns a new Graph (tensor ids change).

    - ``DEQUANTIZE`` of a float16 constant -> a float32 constant (op removed; float16 -> float32 is exact);
    - ``DENSIFY`` of a sparse constant -> a dense constant (op removed); other sparse constants densified;
    - a fused activation (RELU, RELU6, RELU_N1_TO_1) of a conv / dense / add / pool / ... op becomes its
      own op: the op writes a new tensor ``<output name>/pre_activation`` and the activation writes the
      original output tensor, so names seen downstream do not change (``UnsupportedOpError`` for a fused
      TANH / SIGN_BIT, which LiteRT's kernels silently skip);
    - a CONV_2D with as many groups as input channels -> the DEPTHWISE_CONV_2D it is (offloadable);
    - a TRANSPOSE_CONV with constant weights -> the CONV_2D it computes, phase by phase, then
      DEPTH_TO_SPACE (or, for unequal strides, RESHAPE, TRANSPOSE, RESHAPE) and a SLICE (offloadable;
      ``_transpose_conv_as_conv``);
    - everything else is kept as it is; tensors no longer used are dropped.
    """
    tensors = list(graph.tensors)
    ops: list[Op] = []
    for index, op in enumerate(graph.ops):
        src = tensors[op.inputs[0]] if op.inputs and op.inputs[0] >= 0 else None
        foldable = op.kind == "DENSIFY" or (op.kind == "DEQUANTIZE" and src is not None
                                            and src.dtype == np.float16)
        if foldable and src is not None and src.data is not None:
            value = densify(src.data, src.shape, src.sparsity) if src.sparsity is not None else src.data
            out = op.outputs[0]
            folded = np.array(value, dtype=tensors[out].dtype)
            folded.flags.writeable = False
            tensors[out] = replace(tensors[out], data=folded, sparsity=None)
            continue
        for t in op.inputs:
            if t >= 0 and tensors[t].sparsity is not None and tensors[t].data is not None:
                dense = densify(tensors[t].data, tensors[t].shape, tensors[t].sparsity)
                dense.flags.writeable = False
                tensors[t] = replace(tensors[t], data=dense, sparsity=None)
        if _depthwise_as_grouped(tensors, op):
            op = _as_depthwise(tensors, op)
        after: list[Op] = []
        if _convertible_transpose_conv(tensors, op):
            before, op, after = _transpose_conv_as_conv(tensors, op)
            ops.extend(before)
        activation = fused_activation(op) if op.kind in FUSED_ACTIVATION_OPS else None
        if activation is not None and activation not in ACTIVATIONS:
            raise UnsupportedOpError(
                f"{graph.describe_op(index)}: fused activation {activation}, which LiteRT's float "
                f"kernel does not apply; ShadowNet cannot reproduce this model's LiteRT outputs")
        if activation is not None:
            options = copy.copy(op.options)
            options.fusedActivationFunction = schema_fb.ActivationFunctionType.NONE
            out = tensors[op.outputs[0]]
            tensors.append(Tensor(f"{out.name}/pre_activation", out.shape, out.dtype,
                                  shape_signature=out.shape_signature))
            pre = len(tensors) - 1
            ops.append(replace(op, outputs=(pre, *op.outputs[1:]), options=options))
            ops.append(Op(activation, (pre,), (op.outputs[0],)))
        else:
            ops.append(op)
        ops.extend(after)
    return _compact(Graph(tensors, ops, list(graph.inputs), list(graph.outputs), graph.signature))


def _depthwise_as_grouped(tensors: list[Tensor], op: Op) -> bool:
    """A CONV_2D with as many groups as input channels (a filter of one input channel each, constant
    weights): a depthwise convolution written as a grouped one (ConvNeXt's, Keras ``Conv2D(groups=C)``),
    which would run in the TEE as a grouped conv (``converters.graph.is_offloadable``)."""
    if op.kind != "CONV_2D" or len(op.inputs) < 2 or op.inputs[1] < 0:
        return False
    x, w = tensors[op.inputs[0]], tensors[op.inputs[1]]
    channels = x.shape[-1] if x.shape else 0
    return (w.data is not None and w.sparsity is None and len(w.shape) == 4 and w.shape[-1] == 1
            and channels > 1 and w.shape[0] % channels == 0)


def _as_depthwise(tensors: list[Tensor], op: Op) -> Op:
    """The DEPTHWISE_CONV_2D that ``op`` (``_depthwise_as_grouped``) computes: output channel ``c * m + j``
    of both reads input channel ``c`` (a grouped conv's output ``o`` is in group ``o // m``), the weights
    ``[M, kh, kw, 1]`` laid out as ``[1, kh, kw, M]``, the options carried over."""
    w = tensors[op.inputs[1]]
    channels = tensors[op.inputs[0]].shape[-1]
    weights = np.ascontiguousarray(np.asarray(w.data).transpose(3, 1, 2, 0))
    weights.flags.writeable = False
    tensors.append(Tensor(f"{w.name}/depthwise", weights.shape, w.dtype, weights))
    conv, options = op.options, schema_fb.DepthwiseConv2DOptionsT()
    options.padding, options.strideH, options.strideW = conv.padding, conv.strideH, conv.strideW
    options.dilationHFactor, options.dilationWFactor = conv.dilationHFactor, conv.dilationWFactor
    options.fusedActivationFunction = conv.fusedActivationFunction
    options.depthMultiplier = w.shape[0] // channels
    return Op("DEPTHWISE_CONV_2D", (op.inputs[0], len(tensors) - 1, *op.inputs[2:]), op.outputs, options,
              version=2)


def _convertible_transpose_conv(tensors: list[Tensor], op: Op) -> bool:
    """A TRANSPOSE_CONV (inputs: output shape, weights ``[O, kh, kw, I]``, input, optional bias) whose
    output shape, weights and bias are constants and whose kernel is a whole number of strides each way:
    ``_transpose_conv_as_conv`` rewrites it. Otherwise some phases have fewer taps than others, and their
    filters zeros where the others have weights; those zeros, at places the kernel and stride make public,
    survive the output mixing of a phase's filters and single out the subspace of each phase's real
    filters (a review's attack recovered every one of them up to scale): such a layer stays in the TEE."""
    if op.kind != "TRANSPOSE_CONV" or len(op.inputs) < 3 or min(op.inputs[:3]) < 0:
        return False
    shape, w, x = (tensors[t] for t in op.inputs[:3])
    bias = tensors[op.inputs[3]] if len(op.inputs) > 3 and op.inputs[3] >= 0 else None
    y = tensors[op.outputs[0]]
    return (shape.data is not None and w.data is not None and w.sparsity is None and w.dtype == np.float32
            and len(w.shape) == 4 and len(x.shape) == 4 and x.shape[-1] == w.shape[-1]
            and x.dtype == y.dtype == np.float32 and (bias is None or bias.data is not None)
            and tuple(int(d) for d in np.asarray(shape.data).ravel()) == y.shape
            and y.shape[-1] == w.shape[0] and op.options.strideH >= 1 and op.options.strideW >= 1
            and w.shape[1] % op.options.strideH == 0 and w.shape[2] % op.options.strideW == 0)


def _transpose_conv_as_conv(tensors: list[Tensor], op: Op) -> tuple[list[Op], Op, list[Op]]:
    """The ops that compute what a TRANSPOSE_CONV (``_convertible_transpose_conv``) does, as (ops before,
    the CONV_2D, ops after).

    Output row ``j`` of a transposed convolution of stride ``s`` and ``kh`` taps sums ``W[k] x[i]`` over
    ``s i + k = j + pad`` (LiteRT's ``pad``: what a convolution of its output size would pad). Write
    ``j + pad = s q + r``: the taps ``k = r + s m`` of phase ``r`` make ``z_r[q]``, the sum over ``m`` of
    ``W[r + s m] x[q - m]``: an ordinary convolution of ``x`` with the phase's ``M = kh / s`` taps
    reversed. All ``s * s`` phases are one CONV_2D of ``s * s * O`` filters over ``x`` padded by ``M - 1``
    before (and after, as far as the output reaches), whose DEPTH_TO_SPACE puts ``z_r[q]`` at row
    ``s q + r``; a SLICE from ``pad`` takes the output. The products are the transposed convolution's (its
    bias in each phase). The TEE ran such ops (a decoder's upsampling); now the accelerator runs them,
    obfuscated.
    """
    options = op.options
    sh, sw = int(options.strideH), int(options.strideW)
    w = tensors[op.inputs[1]]
    x = tensors[op.inputs[2]]
    y = tensors[op.outputs[0]]
    weights = np.asarray(w.data, np.float32)
    filters, kh, kw, channels = weights.shape
    batch, out_h, out_w, _ = y.shape
    taps_h, taps_w = kh // sh, kw // sw
    phases = np.zeros((sh, sw, filters, taps_h, taps_w, channels), np.float32)
    for rh in range(sh):
        for th in range(taps_h):
            for rw in range(sw):
                for tw in range(taps_w):
                    phases[rh, rw, :, th, tw, :] = weights[:, rh + sh * (taps_h - 1 - th),
                                                           rw + sw * (taps_w - 1 - tw), :]

    def constant(name: str, value: np.ndarray) -> int:
        value = np.ascontiguousarray(value)
        value.flags.writeable = False
        tensors.append(Tensor(name, value.shape, value.dtype, value))
        return len(tensors) - 1

    def activation(name: str, shape: tuple[int, ...]) -> int:
        tensors.append(Tensor(name, shape, np.dtype(np.float32)))
        return len(tensors) - 1

    pad_top = _transpose_padding(options.padding, sh, out_h, kh)
    pad_left = _transpose_padding(options.padding, sw, out_w, kw)
    # Conv output rows 0 .. rows - 1 give output rows up to sh * rows; enough for pad_top + out_h.
    rows = max(x.shape[1], -(-(pad_top + out_h) // sh))
    cols = max(x.shape[2], -(-(pad_left + out_w) // sw))
    before: list[Op] = []
    src = op.inputs[2]
    paddings = [[0, 0], [taps_h - 1, rows - x.shape[1]], [taps_w - 1, cols - x.shape[2]], [0, 0]]
    if any(any(p) for p in paddings):
        padded = activation(f"{y.name}/as_conv/padded",
                            (batch, rows + taps_h - 1, cols + taps_w - 1, channels))
        before.append(Op("PAD", (src, constant(f"{y.name}/as_conv/paddings", np.array(paddings, np.int32))),
                         (padded,), schema_fb.PadOptionsT()))
        src = padded
    bias = -1
    if len(op.inputs) > 3 and op.inputs[3] >= 0:
        bias = constant(f"{tensors[op.inputs[3]].name}/as_conv",
                        np.tile(np.asarray(tensors[op.inputs[3]].data, np.float32), sh * sw))
    conv_options = schema_fb.Conv2DOptionsT()
    conv_options.padding, conv_options.strideH, conv_options.strideW = schema_fb.Padding.VALID, 1, 1
    conv_options.dilationHFactor = conv_options.dilationWFactor = 1
    conv_options.fusedActivationFunction = getattr(options, "fusedActivationFunction", 0)
    unsliced = (batch, sh * rows, sw * cols, filters)
    exact = pad_top == pad_left == 0 and unsliced == y.shape
    kernel = constant(f"{w.name}/as_conv", phases.reshape(sh * sw * filters, taps_h, taps_w, channels))
    phased = op.outputs[0] if sh == sw == 1 and exact else \
        activation(f"{y.name}/as_conv", (batch, rows, cols, sh * sw * filters))
    conv = Op("CONV_2D", (src, kernel, bias), (phased,), conv_options)
    if sh == sw == 1:
        after, interleaved = [], phased
    else:  # channel (rh * sw + rw) * O + o to row sh q + rh, column sw p + rw
        interleaved = op.outputs[0] if exact else activation(f"{y.name}/as_conv/interleaved", unsliced)
        if sh == sw:
            d2s_options = schema_fb.DepthToSpaceOptionsT()
            d2s_options.blockSize = sh
            after = [Op("DEPTH_TO_SPACE", (phased,), (interleaved,), d2s_options)]
        else:  # which DEPTH_TO_SPACE cannot do: [N, q, p, rh, rw, O] -> [N, q, rh, p, rw, O]
            six = (batch, rows, cols, sh, sw, filters)
            split = activation(f"{y.name}/as_conv/phases", six)
            moved = activation(f"{y.name}/as_conv/phases_moved", (batch, rows, sh, cols, sw, filters))
            perm = constant(f"{y.name}/as_conv/perm", np.array([0, 1, 3, 2, 4, 5], np.int32))
            after = [_reshape(phased, split, six, constant(f"{y.name}/as_conv/six", np.array(six, np.int32))),
                     Op("TRANSPOSE", (split, perm), (moved,), schema_fb.TransposeOptionsT()),
                     _reshape(moved, interleaved, unsliced,
                              constant(f"{y.name}/as_conv/four", np.array(unsliced, np.int32)))]
    if not exact:
        begin = constant(f"{y.name}/as_conv/begin", np.array([0, pad_top, pad_left, 0], np.int32))
        size = constant(f"{y.name}/as_conv/size", np.array(y.shape, np.int32))
        after.append(Op("SLICE", (interleaved, begin, size), (op.outputs[0],), schema_fb.SliceOptionsT()))
    return before, conv, after


def _reshape(src: int, dst: int, shape: tuple[int, ...], new_shape: int) -> Op:
    options = schema_fb.ReshapeOptionsT()
    options.newShape = list(shape)
    return Op("RESHAPE", (src, new_shape), (dst,), options)


def _transpose_padding(padding: int, stride: int, size: int, taps: int) -> int:
    """The padding before a TRANSPOSE_CONV's output rows (or columns) of ``size``, as LiteRT computes it
    (``ComputePaddingHeightWidth`` on the output size: what a convolution of it would pad, rounded down)."""
    same = padding == schema_fb.Padding.SAME
    out = (size + stride - 1) // stride if same else (size + stride - taps) // stride
    return max((out - 1) * stride + taps - size, 0) // 2


def _compact(graph: Graph) -> Graph:
    """Drop tensors nothing refers to and renumber the rest (in their original order)."""
    used = {t for op in graph.ops for t in (*op.inputs, *op.outputs) if t >= 0}
    used.update(graph.inputs, graph.outputs)
    sig = graph.signature
    if sig is not None:
        used.update(sig.inputs.values(), sig.outputs.values())
    keep = sorted(used)
    new_id = {old: new for new, old in enumerate(keep)}
    new_id[-1] = -1

    def remap(ids: Iterable[int]) -> tuple[int, ...]:
        return tuple(new_id[t] for t in ids)

    ops = [replace(op, inputs=remap(op.inputs), outputs=remap(op.outputs)) for op in graph.ops]
    if sig is not None:
        sig = Signature(sig.key, list(range(len(ops))), {k: new_id[v] for k, v in sig.inputs.items()},
                        {k: new_id[v] for k, v in sig.outputs.items()})
    return Graph([graph.tensors[t] for t in keep], ops, list(remap(graph.inputs)), list(remap(graph.outputs)),
                 sig)
