"""``normalize``: rewrite what real float models contain into the few forms ShadowNet handles.

Constants that only feed an op (a float16 constant behind DEQUANTIZE, a sparse constant behind DENSIFY) are
folded into plain float constants, and fused activations become ops of their own, so that the partition
sees every linear op bare and every non-linear op explicit. Works on the IR of :mod:`converters.graph`.
``normalize_for`` adds what a scheme's plan needs: its grouped convolutions split where it splits them, and
its long sums on the user's input cut into chunks (``chunked``).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

import numpy as np
from ai_edge_litert import schema_py_generated as schema_fb

from converters import exact_split, transpose_conv
from converters.graph import Graph, Op, Signature, Tensor, fused_activation
from converters.schemes import (
    GROUP_MIN_CHANNELS,
    group_min_channels,
    long_sums_after_input,
    partition_for,
    splits_masks,
)
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
# ``chunked`` cuts a layer's sum into K chunks only while K times its output is at most this many values: each
# chunk's result crosses back on its own, so the TEE pops and adds K results (their exact split's pop masks,
# high and low halves, 8 MiB in each one-time pool entry at this bound). A dense layer's few outputs always
# fit; a conv of large outputs that would need more chunks stays in the TEE, as before chunks.
CHUNKED_RESULTS = 1 << 20


def normalize(graph: Graph, group_min_channels: int | None = GROUP_MIN_CHANNELS) -> Graph:
    """Rewrite ``graph`` into the forms ShadowNet handles; returns a new Graph (tensor ids change).

    - ``DEQUANTIZE`` of a float16 constant -> a float32 constant (op removed; float16 -> float32 is exact);
    - ``DENSIFY`` of a sparse constant -> a dense constant (op removed); other sparse constants densified;
    - a fused activation (RELU, RELU6, RELU_N1_TO_1) of a conv / dense / add / pool / ... op becomes its
      own op: the op writes a new tensor ``<output name>/pre_activation`` and the activation writes the
      original output tensor, so names seen downstream do not change (``UnsupportedOpError`` for a fused
      TANH / SIGN_BIT, which LiteRT's kernels silently skip);
    - a CONV_2D with as many groups as input channels -> the DEPTHWISE_CONV_2D it is (offloadable);
    - a CONV_2D of groups of at least ``group_min_channels`` input channels each (the scheme's:
      ``converters.schemes.group_min_channels``; None: none) -> a SPLIT of its input, one CONV_2D per
      group and a CONCATENATION (offloadable; the TEE runs the SPLIT and the CONCATENATION as views of
      one tensor where it can: not of a model input or output, nor of a tensor a TEE-side LiteRT step
      reads);
    - a TRANSPOSE_CONV with constant weights -> the CONV_2D it computes for each phase of its stride, then
      their interleaving and a SLICE (offloadable; ``converters.transpose_conv``);
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
        if transpose_conv.convertible(tensors, op):
            rewritten = transpose_conv.as_convolutions(tensors, op)
        else:
            groups = _groups(tensors, op, group_min_channels)
            rewritten = _as_groups(tensors, op, groups) if groups > 1 else [op]
        for op in rewritten:
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
    return _compact(Graph(tensors, ops, list(graph.inputs), list(graph.outputs), graph.signature))


# What ``normalize_for`` does beyond stop 56's plan (``summary.plan_revision`` in a manifest; the audit plans
# an older artifact's reference as its converter did): 1 (stop 57), dense layers on 4-D tensors computed as
# convolutions and long sums on maps too narrow to mix cut into chunks.
PLAN_REVISION = 1


def normalize_for(graph: Graph, scheme: object, chunks: bool = True, revision: int = PLAN_REVISION) -> Graph:
    """``normalize`` as ``scheme`` plans the model (the converter's and the audit's graph): its grouped
    convolutions split by group where it splits them (``converters.schemes.group_min_channels``), its dense
    layers on a 4-D tensor computed as the convolution they are where it splits masks (``as_convolutions``),
    then the conv and dense layers on the user's input that sum too many terms for its exact split
    (``converters.partition``'s long sums), and those on what one layer made of it or on a map too narrow to
    mix, which it masks whatever the policy (``converters.schemes.long_sums_after_input``), cut into chunks
    that it can split (``chunked``). An older converter's plan: ``chunks=False``, before stop 56 (no chunks);
    ``revision`` 0, before stop 57 (``PLAN_REVISION``)."""
    graph = normalize(graph, group_min_channels(scheme))
    if revision >= 1 and splits_masks(scheme):
        graph = as_convolutions(graph)
    if not chunks:
        return graph
    part = partition_for(graph, scheme)
    long_sums = set(part.long_sums) | long_sums_after_input(part, scheme, narrow=revision >= 1)
    return chunked(graph, long_sums, group_min_channels(scheme))


def as_convolutions(graph: Graph) -> Graph:
    """``graph`` with each FULLY_CONNECTED that reads a 4-D tensor ``[N, H, W, C]`` whole (``H W C`` terms,
    at most ``exact_split.MAX_DOT_LENGTH``) computed as the CONV_2D it is - an ``H x W`` VALID window of
    ``C`` channels, the weights ``[M, H W C]`` read as ``[M, H, W, C]`` (NHWC order) - and a RESHAPE of its
    ``[N, 1, 1, M]`` result: its one-time mask then crosses as an exact split (``converters.plan_rounds``
    splits a conv, not a dense layer on a flattened tensor, whose weights it would have to reorder) and, on
    the user's image, keeps the image's shape, which a shaped mask needs. A review measured such a first
    layer unsplit at 1-2.5e-4 of its outputs (a 52x52x3 image into 64 units; split, ~1e-5). The
    multiply-adds are the layer's, in the same order of terms."""
    tensors, rewritten, changed = list(graph.tensors), [], False
    for op in graph.ops:
        if _dense_on_image(tensors, op):
            rewritten.extend(_as_convolution(tensors, op))
            changed = True
        else:
            rewritten.append(op)
    if not changed:
        return graph
    return _compact(Graph(tensors, rewritten, list(graph.inputs), list(graph.outputs), graph.signature))


def _dense_on_image(tensors: list[Tensor], op: Op) -> bool:
    """A FULLY_CONNECTED of constant ``[M, K]`` weights on a float32 ``[N, H, W, C]`` tensor of more than one
    position, ``K = H W C`` (each of the ``N`` rows whole) at most ``exact_split.MAX_DOT_LENGTH``, its output
    ``[N, M]``, whose split weights (4x its own) fit ``exact_split.LATER_SPLIT_BYTES``: the trusted app reads
    them into secure memory at each refill of its one-time masks, and a 32x32x3 image read by 1,280 units
    (63 MB split) no longer loaded under the 64 MiB cap (a review). (On one position it reads the last axis,
    which an exact split serves as it is.)"""
    if op.kind != "FULLY_CONNECTED" or len(op.inputs) < 2 or min(op.inputs[:2]) < 0:
        return False
    x, w, y = tensors[op.inputs[0]], tensors[op.inputs[1]], tensors[op.outputs[0]]
    return (w.data is not None and w.sparsity is None and len(w.shape) == 2 and len(x.shape) == 4
            and x.dtype == np.float32 and tuple(y.shape) == (x.shape[0], w.shape[0])
            and x.shape[-1] < int(np.prod(x.shape[1:])) == w.shape[1] <= exact_split.MAX_DOT_LENGTH
            and 4 * np.asarray(w.data).nbytes <= exact_split.LATER_SPLIT_BYTES)


def _as_convolution(tensors: list[Tensor], op: Op) -> list[Op]:
    """``op`` (``_dense_on_image``) as a CONV_2D and a RESHAPE into its output (``as_convolutions``)."""
    x, w, y = tensors[op.inputs[0]], tensors[op.inputs[1]], tensors[op.outputs[0]]
    n, h, width, c = x.shape
    m = w.shape[0]
    added = Graph(tensors)  # appends to ``tensors``
    weights = np.ascontiguousarray(np.asarray(w.data).reshape(m, h, width, c))
    weights.flags.writeable = False
    kernel = added.add_tensor(f"{w.name}/conv", (m, h, width, c), w.dtype, weights)
    result = added.add_tensor(f"{y.name}/conv", (n, 1, 1, m), y.dtype)
    shape = added.add_tensor(f"{y.name}/conv/shape", (2,), np.int32, np.array(y.shape, np.int32))
    options = schema_fb.Conv2DOptionsT()
    options.padding, options.strideH, options.strideW = schema_fb.Padding.VALID, 1, 1
    options.dilationHFactor = options.dilationWFactor = 1
    # (normalize has split it off already; a graph that was not normalized keeps it on the conv)
    options.fusedActivationFunction = getattr(op.options, "fusedActivationFunction", 0) or 0
    bias = op.inputs[2] if len(op.inputs) > 2 else -1
    return [Op("CONV_2D", (op.inputs[0], kernel, bias), (result,), options),
            Op("RESHAPE", (result, shape), op.outputs, schema_fb.ReshapeOptionsT(newShape=list(y.shape)))]


def chunked(graph: Graph, ops: Iterable[int], min_channels: int | None = GROUP_MIN_CHANNELS) -> Graph:
    """``graph`` with each CONV_2D or FULLY_CONNECTED of ``ops`` that ``_chunks`` can cut computed as
    chunks of its sum: a SPLIT of its input (a dense layer's flattened first) into ``K`` parts, a layer on
    each part with its weights' matching slice (the bias on the first), and the ``K`` partial results added
    into its output. Each chunk sums at most ``exact_split.MAX_DOT_LENGTH`` terms, so a one-time mask on
    the input crosses as an exact split: one long sum of a mask ~10x the input, split at the few bits a
    long sum leaves, measured 3-10x LiteRT's own error (a dense layer on 12,288-16,384 inputs: up to 1.1e-4
    of the outputs, against 2.8e-5 in chunks of 8,192), and a longer one ran in the TEE, its weights
    too (past the secure memory's cap from 16 MiB of them). The multiply-adds are the layer's; the TEE adds
    ``K - 1`` partial results. Layers it cannot cut are left as they are (the partition keeps them in the
    TEE): a window of more taps than a chunk's sum, chunks narrower than ``min_channels`` input channels (the
    scheme's input mixing: ``converters.schemes.group_min_channels``), or more partial results than
    ``CHUNKED_RESULTS``."""
    cut = {i: k for i in ops if (k := _chunks(graph, graph.ops[i], min_channels)) > 1}
    if not cut:
        return graph
    tensors, rewritten = list(graph.tensors), []
    for i, op in enumerate(graph.ops):
        rewritten.extend(_as_chunks(tensors, op, cut[i]) if i in cut else [op])
    return _compact(Graph(tensors, rewritten, list(graph.inputs), list(graph.outputs), graph.signature))


def _chunks(graph: Graph, op: Op, min_channels: int | None) -> int:
    """Into how many chunks ``chunked`` cuts ``op``'s sum (along a dense layer's inputs, a conv's input
    channels); 1 where it cannot."""
    if op.kind not in ("CONV_2D", "FULLY_CONNECTED") or len(op.inputs) < 2 or min(op.inputs[:2]) < 0:
        return 1
    x, w = graph.tensors[op.inputs[0]], graph.tensors[op.inputs[1]]
    if w.data is None or not x.shape or (op.kind == "CONV_2D" and (len(w.shape) != 4 or len(x.shape) != 4
                                                                   or w.shape[-1] != x.shape[-1])):
        return 1
    if op.kind == "FULLY_CONNECTED" and (len(w.shape) != 2 or int(np.prod(x.shape)) % w.shape[1]):
        return 1
    taps, channels = int(np.prod(w.shape[1:-1])), w.shape[-1]
    per_chunk = exact_split.MAX_DOT_LENGTH // taps
    count = -(-channels // per_chunk) if per_chunk else 0
    narrowest = channels // count if count else 0
    results = count * int(np.prod(graph.tensors[op.outputs[0]].shape))
    return count if count > 1 and narrowest >= max(1, min_channels or 1) and results <= CHUNKED_RESULTS else 1


def _as_chunks(tensors: list[Tensor], op: Op, count: int) -> list[Op]:
    """``op`` (``chunked``) as ``count`` chunks of its sum, their results added in chunk order into its
    output."""
    x, w, y = tensors[op.inputs[0]], tensors[op.inputs[1]], tensors[op.outputs[0]]
    bias = op.inputs[2] if len(op.inputs) > 2 else -1
    added = Graph(tensors)  # appends to ``tensors``
    channels, dense = w.shape[-1], op.kind == "FULLY_CONNECTED"

    def add(name: str, shape: tuple[int, ...], dtype: Any = np.float32,
            value: np.ndarray | None = None) -> int:
        return added.add_tensor(f"{y.name}/chunk{name}", shape, dtype, value)

    ops, source = [], op.inputs[0]
    rows = int(np.prod(x.shape)) // channels if dense else 0
    if dense and x.shape != (rows, channels):  # a dense layer reads its input as [rows, channels]
        source = add("s/input", (rows, channels), x.dtype)
        ops.append(Op("RESHAPE", (op.inputs[0], add("s/shape", (2,), np.int32, np.array([rows, channels]))),
                      (source,), schema_fb.ReshapeOptionsT(newShape=[rows, channels])))
    sizes = [channels // count + (k < channels % count) for k in range(count)]
    part_shape = (rows,) if dense else tuple(x.shape[:3])
    parts = tuple(add(f"{k}/input", (*part_shape, size), x.dtype) for k, size in enumerate(sizes))
    axis = add("s/axis", (), np.int32, np.array(1 if dense else 3, np.int32))
    if len(set(sizes)) == 1:
        ops.append(Op("SPLIT", (axis, source), parts, schema_fb.SplitOptionsT(numSplits=count)))
    else:
        ops.append(Op("SPLIT_V", (source, add("s/sizes", (count,), np.int32, np.array(sizes)), axis), parts,
                      schema_fb.SplitVOptionsT(numSplits=count)))
    out_shape = (rows, w.shape[0]) if dense else tuple(y.shape)
    start, total = 0, -1
    for k, (part, size) in enumerate(zip(parts, sizes, strict=True)):
        weights = add(f"{k}/weights", (*w.shape[:-1], size), w.dtype,
                      np.asarray(w.data)[..., start:start + size])
        start += size
        options = copy.copy(op.options)
        if dense:
            options.keepNumDims = False
        result = add(f"{k}/output", out_shape, y.dtype)
        ops.append(Op(op.kind, (part, weights, bias if k == 0 else -1), (result,), options,
                      version=op.version))
        if total < 0:
            total = result
            continue
        last = k == count - 1 and out_shape == tuple(y.shape)
        summed = op.outputs[0] if last else add(f"{k}/sum", out_shape, y.dtype)
        ops.append(Op("ADD", (total, result), (summed,), schema_fb.AddOptionsT()))
        total = summed
    if total != op.outputs[0]:  # a dense layer that keeps its input's leading dimensions
        ops.append(Op("RESHAPE", (total, add("s/output_shape", (len(y.shape),), np.int32, np.array(y.shape))),
                      op.outputs, schema_fb.ReshapeOptionsT(newShape=list(y.shape))))
    return ops


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


def _groups(tensors: list[Tensor], op: Op, min_channels: int | None) -> int:
    """The number of groups of a grouped CONV_2D with constant dense weights whose groups read at least
    ``min_channels`` input channels each; 1 for any other op."""
    if op.kind != "CONV_2D" or len(op.inputs) < 2 or min(op.inputs[:2]) < 0 or min_channels is None:
        return 1
    x, w = tensors[op.inputs[0]], tensors[op.inputs[1]]
    bias = tensors[op.inputs[2]] if len(op.inputs) > 2 and op.inputs[2] >= 0 else None
    if (w.data is None or w.sparsity is not None or len(w.shape) != 4 or len(x.shape) != 4
            or w.shape[-1] < max(2, min_channels) or x.shape[-1] % w.shape[-1]
            or (bias is not None and (bias.data is None or bias.shape != (w.shape[0],)))):
        return 1
    groups = x.shape[-1] // w.shape[-1]
    return groups if w.shape[0] % groups == 0 else 1


def _as_groups(tensors: list[Tensor], op: Op, groups: int) -> list[Op]:
    """What the grouped ``op`` of ``groups`` groups (``_groups``) computes: group ``g`` - filters
    ``g * N/G ..`` reading input channels ``g * C/G ..`` - as a CONV_2D of its own on a SPLIT of the input,
    the results concatenated on the channel axis into ``op``'s output. Each filter's products and sums are
    the grouped conv's."""
    x, w, y = tensors[op.inputs[0]], tensors[op.inputs[1]], tensors[op.outputs[0]]
    bias = tensors[op.inputs[2]] if len(op.inputs) > 2 and op.inputs[2] >= 0 else None
    per_group = w.shape[0] // groups
    added = Graph(tensors)  # appends to ``tensors``

    def add(name: str, shape: tuple[int, ...], dtype: np.dtype, value: np.ndarray | None = None) -> int:
        return added.add_tensor(f"{y.name}/group{name}", shape, dtype, value)

    axis = add("s/axis", (), np.int32, np.array(3, np.int32))
    parts = tuple(add(f"{g}/input", (*x.shape[:3], w.shape[-1]), x.dtype) for g in range(groups))
    split_options = schema_fb.SplitOptionsT()
    split_options.numSplits = groups
    ops = [Op("SPLIT", (axis, op.inputs[0]), parts, split_options)]
    results = []
    for g, part in enumerate(parts):
        rows = slice(g * per_group, (g + 1) * per_group)
        weights = add(f"{g}/weights", (per_group, *w.shape[1:]), w.dtype, np.asarray(w.data)[rows])
        conv_bias = -1 if bias is None else add(f"{g}/bias", (per_group,), bias.dtype,
                                                np.asarray(bias.data)[rows])
        results.append(add(f"{g}/output", (*y.shape[:3], per_group), y.dtype))
        ops.append(Op("CONV_2D", (part, weights, conv_bias), (results[-1],), copy.copy(op.options)))
    concat_options = schema_fb.ConcatenationOptionsT()
    concat_options.axis = 3
    ops.append(Op("CONCATENATION", tuple(results), op.outputs, concat_options))
    return ops


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
