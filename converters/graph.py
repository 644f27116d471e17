"""The TFLite graph layer: ``.tflite`` bytes <-> a small graph IR.

``read_model`` turns subgraph 0 of any float ``.tflite`` into a :class:`Graph` (tensors with shape, dtype and
constant data; ops in execution order), ``normalize`` rewrites what real models contain into the few forms
the rest of ShadowNet expects, and ``write_model`` writes a graph (or subsets of its ops as signatures) back
to a ``TFL3`` flatbuffer that LiteRT loads. Only ``ai_edge_litert``'s schema and flatbuffer tools are used,
never TensorFlow. Op kinds are the schema's ``BuiltinOperator`` names; groupings of kinds are frozensets.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import flatbuffers
import numpy as np
from ai_edge_litert import schema_py_generated as schema_fb
from ai_edge_litert.tools import flatbuffer_utils

from converters.tflite_sparsity import densify
from converters.tflite_verify import verify
from shadownet.exceptions import ModelFormatError, UnsupportedOpError

OFFLOADABLE: frozenset[str] = frozenset({"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"})
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
# Float kernels of LiteRT that reject a conv without bias (conv.cc: TF_LITE_ENSURE(context, has_bias)).
_BIAS_REQUIRED: frozenset[str] = frozenset({"CONV_2D", "DEPTHWISE_CONV_2D"})
# Input positions LiteRT's kernels accept absent (-1); None: the op checks each input itself (recurrent ops'
# optional tensors, custom ops). Elsewhere an absent input can reach a kernel that dereferences it (RESHAPE
# without its shape tensor crashes LiteRT: found by fuzzing).
_OPTIONAL_INPUTS: dict[str, frozenset[int] | None] = {
    "CONV_2D": frozenset({2}), "DEPTHWISE_CONV_2D": frozenset({2}), "FULLY_CONNECTED": frozenset({2}),
    "TRANSPOSE_CONV": frozenset({3}), "CONV_3D": frozenset({2}), "CONV_3D_TRANSPOSE": frozenset({3}),
    "LSTM": None, "UNIDIRECTIONAL_SEQUENCE_LSTM": None, "BIDIRECTIONAL_SEQUENCE_LSTM": None, "RNN": None,
    "UNIDIRECTIONAL_SEQUENCE_RNN": None, "BIDIRECTIONAL_SEQUENCE_RNN": None, "SVDF": None, "CUSTOM": None,
}
# Control flow: ops whose options name other subgraphs, which a one-subgraph Graph cannot keep.
_CALLS_SUBGRAPHS: frozenset[str] = frozenset({"WHILE", "IF", "CALL_ONCE", "CALL", "STABLEHLO_WHILE",
                                               "STABLEHLO_CASE", "STABLEHLO_COMPOSITE"})
# Custom ops LiteRT's builtin op resolver registers itself (tflite/kernels/register.cc).
LITERT_CUSTOM_OPS: frozenset[str] = frozenset({
    "TFLite_Detection_PostProcess", "AudioSpectrogram", "Mfcc", "NumericVerify",
})


def _enum(cls: type) -> dict[str, int]:
    return {k: v for k, v in vars(cls).items() if not k.startswith("_")}


_TFL3 = b"TFL3"
MAX_TENSOR_BYTES = 1 << 31  # one tensor of a model a device runs; a larger shape is a damaged file
_OP_CODES: dict[str, int] = _enum(schema_fb.BuiltinOperator)
_OP_NAMES: dict[int, str] = {v: k for k, v in _OP_CODES.items()}
_ACTIVATION_NAMES: dict[int, str] = {v: k for k, v in _enum(schema_fb.ActivationFunctionType).items()}
_TYPE_NAMES: dict[int, str] = {v: k for k, v in _enum(schema_fb.TensorType).items()}
_T = schema_fb.TensorType
_NUMPY_DTYPES: dict[int, np.dtype] = {
    _T.FLOAT32: np.dtype(np.float32), _T.FLOAT16: np.dtype(np.float16), _T.FLOAT64: np.dtype(np.float64),
    _T.INT8: np.dtype(np.int8), _T.INT16: np.dtype(np.int16), _T.INT32: np.dtype(np.int32),
    _T.INT64: np.dtype(np.int64), _T.UINT8: np.dtype(np.uint8), _T.UINT16: np.dtype(np.uint16),
    _T.UINT32: np.dtype(np.uint32), _T.UINT64: np.dtype(np.uint64), _T.BOOL: np.dtype(np.bool_),
    _T.COMPLEX64: np.dtype(np.complex64), _T.COMPLEX128: np.dtype(np.complex128),
}
_TENSOR_TYPES: dict[np.dtype, int] = {v: k for k, v in _NUMPY_DTYPES.items()}
_QUANTIZED_TYPES = frozenset({_T.INT8, _T.UINT8, _T.INT16, _T.INT4, _T.UINT4, _T.INT2})
_OPTIONS_TYPES: dict[str, int] = _enum(schema_fb.BuiltinOptions)
_OPTIONS2_TYPES: dict[str, int] = _enum(schema_fb.BuiltinOptions2)


@dataclass(frozen=True, eq=False)
class Tensor:
    """One tensor of a graph. ``data`` is the constant value (read-only ndarray of ``shape`` and ``dtype``),
    None for activations and model inputs. A sparse constant (``sparsity`` = the schema's
    ``SparsityParametersT``) keeps its stored values as a 1-D ``data``; ``normalize`` densifies it.
    ``shape_signature`` keeps dynamic dimensions (-1) when the model has them."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    data: np.ndarray | None = None
    shape_signature: tuple[int, ...] | None = None
    sparsity: Any = None


@dataclass(frozen=True)
class Op:
    """One operator. ``kind`` is the TFLite ``BuiltinOperator`` name ("CONV_2D", ...) or "CUSTOM";
    ``inputs`` / ``outputs`` are tensor ids into ``Graph.tensors`` (-1 = optional input absent);
    ``options`` is the schema's builtin options object (e.g. ``schema_fb.Conv2DOptionsT``) or None;
    ``version`` is the operator-code version, kept so LiteRT picks the same kernel."""

    kind: str
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    options: Any = None
    custom_code: str | None = None
    custom_options: bytes | None = None
    version: int = 1


@dataclass(frozen=True)
class Signature:
    """A named entry point: the ops (indices into ``graph.ops``, in execution order) and its named
    input / output tensors (name -> tensor id)."""

    key: str
    ops: list[int]
    inputs: dict[str, int]
    outputs: dict[str, int]


@dataclass
class Graph:
    """A model's subgraph: ``tensors``, ``ops`` in a valid execution order, model ``inputs`` / ``outputs``
    (tensor ids, in the original order) and the model's own ``signature`` (SignatureDef of subgraph 0, with
    ``ops`` = every op at read time), if it had one; ``write_model(graph)`` keeps its key and names."""

    tensors: list[Tensor] = field(default_factory=list)
    ops: list[Op] = field(default_factory=list)
    inputs: list[int] = field(default_factory=list)
    outputs: list[int] = field(default_factory=list)
    signature: Signature | None = None

    def add_tensor(self, name: str, shape: Sequence[int], dtype: Any, data: Any = None, *,
                   shape_signature: Sequence[int] | None = None, sparsity: Any = None) -> int:
        """Append a tensor and return its id. ``dtype`` is anything ``np.dtype`` accepts; ``data`` (for a
        constant) is converted to that dtype and shape and stored read-only (a copy is made)."""
        dtype = np.dtype(dtype)
        if dtype not in _TENSOR_TYPES:
            raise ValueError(f"tensor {name!r}: dtype {dtype} has no TFLite tensor type")
        shape = tuple(int(d) for d in shape)
        if data is not None:
            data = np.array(data, dtype=dtype)
            data = data.reshape(-1) if sparsity is not None else data.reshape(shape)
            data.flags.writeable = False
        signature = tuple(int(d) for d in shape_signature) if shape_signature is not None else None
        self.tensors.append(Tensor(name, shape, dtype, data, signature, sparsity))
        return len(self.tensors) - 1

    def add_op(self, kind: str, inputs: Sequence[int], outputs: Sequence[int], options: Any = None, *,
               custom_code: str | None = None, custom_options: bytes | None = None, version: int = 1) -> int:
        """Append an op (after every existing op: keep the list in execution order) and return its index.

        ``kind`` is a ``BuiltinOperator`` name or "CUSTOM"; ``inputs`` may hold -1 for an absent optional
        input (e.g. ``add_op("CONV_2D", [x, w, -1], [y], opts)`` is a conv without bias). ``options`` is the
        schema's options object for the kind, built by the caller, e.g.
        ``schema_fb.Conv2DOptionsT(padding=schema_fb.Padding.SAME, strideW=1, strideH=1)`` (mind that the
        schema's default strides are 0, invalid) or ``schema_fb.FullyConnectedOptionsT()``; None for kinds
        without options (RELU, LOGISTIC, ...).
        """
        if kind != "CUSTOM" and kind not in _OP_CODES:
            raise ValueError(f"unknown op kind {kind!r} (expected a TFLite BuiltinOperator name or 'CUSTOM')")
        for t in (*inputs, *outputs):
            if not -1 <= t < len(self.tensors):
                raise ValueError(f"{kind}: tensor id {t} out of range ({len(self.tensors)} tensors)")
        if -1 in outputs:
            raise ValueError(f"{kind}: an output cannot be absent (-1)")
        self.ops.append(Op(kind, tuple(int(t) for t in inputs), tuple(int(t) for t in outputs), options,
                           custom_code, custom_options, int(version)))
        return len(self.ops) - 1

    def producer(self, tensor_id: int) -> int | None:
        """Index of the op that writes ``tensor_id``, or None (constant, model input)."""
        return next((i for i, op in enumerate(self.ops) if tensor_id in op.outputs), None)

    def consumers(self, tensor_id: int) -> list[int]:
        """Indices of the ops that read ``tensor_id``, in execution order."""
        return [i for i, op in enumerate(self.ops) if tensor_id in op.inputs]

    def describe_op(self, op_index: int) -> str:
        """A human-readable reference to an op for messages: ``op 12 CONV_2D (output 'conv/Relu')``."""
        op = self.ops[op_index]
        kind = f"CUSTOM {op.custom_code!r}" if op.kind == "CUSTOM" else op.kind
        out = f" (output {self.tensors[op.outputs[0]].name!r})" if op.outputs else ""
        return f"op {op_index} {kind}{out}"


def fused_activation(op: Op) -> str | None:
    """The activation fused into ``op`` ("RELU", "RELU6", "RELU_N1_TO_1", "TANH", "SIGN_BIT") or None."""
    code = getattr(op.options, "fusedActivationFunction", 0)
    return _ACTIVATION_NAMES.get(code, str(code)) if code else None


def is_offloadable(graph: Graph, op_index: int) -> bool:
    """True for a CONV_2D / DEPTHWISE_CONV_2D / FULLY_CONNECTED whose weights are a dense constant."""
    op = graph.ops[op_index]
    if op.kind not in OFFLOADABLE or len(op.inputs) < 2 or op.inputs[1] < 0:
        return False
    weights = graph.tensors[op.inputs[1]]
    return weights.data is not None and weights.sparsity is None


# ---------------------------------------------------------------------------------------------- reading

def read_model(src: bytes | bytearray | memoryview | str | os.PathLike) -> Graph:
    """Read subgraph 0 of a ``.tflite`` (bytes or a path) into a :class:`Graph`.

    The bytes are checked structurally before anything is trusted (LiteRT never sees them). Raises
    ``ModelFormatError`` for anything that is not a valid float TFLite model (not a flatbuffer, truncated,
    out-of-range indices or buffers, no subgraph, quantized tensors) and ``UnsupportedOpError`` for an op
    LiteRT would not resolve (unknown custom op or builtin code).
    """
    data = _load_bytes(src)
    if len(data) < 8:
        raise ModelFormatError(f"not a TFLite model: {len(data)} bytes is too short for a flatbuffer")
    if data[4:8] != _TFL3:
        raise ModelFormatError(
            f"not a TFLite model: file identifier is {bytes(data[4:8])!r}, expected {_TFL3!r}")
    root = int.from_bytes(data[:4], "little")
    if not 8 <= root <= len(data) - 4:
        raise ModelFormatError(
            f"corrupt TFLite model: root table offset {root} outside the {len(data)}-byte file")
    # The flatbuffer reader trusts offsets and lengths; LiteRT's C++ verifier does not. Check first.
    verify(data)
    try:
        model = flatbuffer_utils.convert_bytearray_to_object(data)
    except Exception as e:  # the flatbuffer reader fails with whatever exception the bad offset leads to
        raise ModelFormatError(
            f"corrupt or truncated TFLite model ({len(data)} bytes): {type(e).__name__}: {e}") from None
    if not model.subgraphs:
        raise ModelFormatError("TFLite model has no subgraph")
    sub = model.subgraphs[0]
    buffers = model.buffers or []
    opcodes = model.operatorCodes or []
    tensors = [_read_tensor(i, t, buffers, data) for i, t in enumerate(sub.tensors or [])]
    n = len(tensors)

    def ids(values: Any, what: str, optional: bool = False) -> tuple[int, ...]:
        out = tuple(int(v) for v in (values if values is not None else ()))
        low = -1 if optional else 0
        for v in out:
            if not low <= v < n:
                raise ModelFormatError(f"corrupt TFLite model: {what} refers to tensor {v} of {n}")
        return out

    ops = []
    for i, o in enumerate(sub.operators or []):
        if not 0 <= o.opcodeIndex < len(opcodes):
            raise ModelFormatError(f"corrupt TFLite model: op {i} has opcode index {o.opcodeIndex}")
        code = opcodes[o.opcodeIndex]
        outputs = ids(o.outputs, f"op {i}'s outputs")
        inputs = ids(o.inputs, f"op {i}'s inputs", optional=True)
        out_name = repr(tensors[outputs[0]].name) if outputs else "none"
        builtin = flatbuffer_utils.get_builtin_code_from_operator_code(code)
        kind = _OP_NAMES.get(builtin)
        if kind is None:
            raise UnsupportedOpError(
                f"op {i} has builtin code {builtin}, unknown to this LiteRT (output {out_name})")
        optional = _OPTIONAL_INPUTS.get(kind, frozenset())
        absent = [k for k, t in enumerate(inputs) if t < 0]
        if optional is not None and not set(absent) <= optional:
            raise ModelFormatError(f"corrupt TFLite model: op {i} {kind} has no input {absent[0]}, which it "
                                   f"needs (output {out_name})")
        custom_code = _text(code.customCode) if kind == "CUSTOM" else None
        if kind == "CUSTOM" and custom_code not in LITERT_CUSTOM_OPS:
            why = ("a TensorFlow (Flex) op, which needs TensorFlow's select-ops delegate"
                   if custom_code.startswith("Flex") else "which LiteRT does not resolve")
            raise UnsupportedOpError(f"op {i} is custom op {custom_code!r}, {why} (output {out_name})")
        if kind in _CALLS_SUBGRAPHS:
            raise UnsupportedOpError(
                f"op {i} {kind} calls other subgraphs; ShadowNet reads subgraph 0 only (output {out_name})")
        custom_options = None
        if o.largeCustomOptionsOffset > 1:
            start, size = o.largeCustomOptionsOffset, o.largeCustomOptionsSize
            if start + size > len(data):
                raise ModelFormatError(f"truncated TFLite model: op {i}'s custom options lie past the end")
            custom_options = bytes(data[start:start + size])
        elif o.customOptions is not None:
            custom_options = bytes(np.asarray(o.customOptions, dtype=np.uint8))
        options = o.builtinOptions if o.builtinOptions is not None else o.builtinOptions2
        ops.append(Op(kind, inputs, outputs, options, custom_code, custom_options, int(code.version or 1)))

    graph = Graph(tensors, ops, list(ids(sub.inputs, "subgraph input")),
                  list(ids(sub.outputs, "subgraph output")))
    _check_dataflow(graph, {i for i, t in enumerate(sub.tensors or []) if t.isVariable})
    for sig in model.signatureDefs or []:
        if sig.subgraphIndex == 0:
            names_in = {_text(m.name): int(m.tensorIndex) for m in sig.inputs or []}
            names_out = {_text(m.name): int(m.tensorIndex) for m in sig.outputs or []}
            ids((*names_in.values(), *names_out.values()), "signature")
            graph.signature = Signature(_text(sig.signatureKey), list(range(len(ops))), names_in, names_out)
            break
    return graph


def _check_dataflow(graph: Graph, variables: set[int]) -> None:
    """Every tensor an op reads is a model input, a constant, a variable or written by an earlier op, and
    every model output is written: otherwise the file is damaged (LiteRT would read memory nobody wrote)."""
    ready = set(graph.inputs) | variables | {i for i, t in enumerate(graph.tensors) if t.data is not None}
    for i, op in enumerate(graph.ops):
        for t in op.inputs:
            if t >= 0 and t not in ready:
                raise ModelFormatError(f"corrupt TFLite model: {graph.describe_op(i)} reads tensor {t} "
                                       f"{graph.tensors[t].name!r}, which is neither a model input, a "
                                       "constant nor written by an earlier op")
        ready.update(op.outputs)
    for t in graph.outputs:
        if t not in ready:
            raise ModelFormatError(f"corrupt TFLite model: output tensor {t} {graph.tensors[t].name!r} is "
                                   "never written")


def _load_bytes(src: Any) -> bytes | bytearray | memoryview:
    if isinstance(src, bytes | bytearray | memoryview):
        return src
    try:
        with open(src, "rb") as f:
            return f.read()
    except OSError as e:
        raise ModelFormatError(f"cannot read model file {os.fspath(src)!r}: {e.strerror or e}") from None


def _text(value: Any) -> str:
    if value is None:
        return ""
    return value.decode("utf-8", "replace") if isinstance(value, bytes | bytearray) else str(value)


def _read_tensor(index: int, t: Any, buffers: list, data: Any) -> Tensor:
    name = _text(t.name)
    shape = tuple(int(d) for d in (t.shape if t.shape is not None else ()))
    q = t.quantization
    if t.type in _QUANTIZED_TYPES and q is not None and q.scale is not None and len(q.scale):
        raise ModelFormatError(
            f"quantized model: tensor {index} {name!r} is {_TYPE_NAMES[t.type]} with quantization "
            f"parameters; ShadowNet needs a float model")
    dtype = _NUMPY_DTYPES.get(t.type)
    if dtype is None:
        raise ModelFormatError(
            f"tensor {index} {name!r} has type {_TYPE_NAMES.get(t.type, t.type)}, not supported by ShadowNet")
    if any(d < 0 for d in shape) or math.prod(shape) * dtype.itemsize > MAX_TENSOR_BYTES:
        # Checked before LiteRT sees the file: it would try to allocate whatever a damaged shape says.
        raise ModelFormatError(f"corrupt TFLite model: tensor {index} {name!r} has shape {list(shape)} "
                               f"(over {MAX_TENSOR_BYTES >> 30} GiB or negative)")
    if not 0 <= t.buffer < max(len(buffers), 1):
        raise ModelFormatError(f"corrupt TFLite model: tensor {index} {name!r} refers to buffer {t.buffer} "
                               f"of {len(buffers)}")
    raw = None
    if buffers:
        buf = buffers[t.buffer]
        if buf.offset > 1:  # LiteRT's convention: offsets 0 and 1 mean "data inline"
            if buf.offset + buf.size > len(data):
                raise ModelFormatError(f"truncated TFLite model: tensor {index} {name!r}'s data at "
                                       f"{buf.offset}+{buf.size} lies past the {len(data)}-byte file")
            raw = np.frombuffer(data, np.uint8, count=buf.size, offset=buf.offset)
        elif buf.data is not None and len(buf.data):
            raw = np.asarray(buf.data, dtype=np.uint8)
    value = None
    if raw is not None:
        count = int(np.prod(shape, dtype=np.int64))
        if t.sparsity is None and raw.size != count * dtype.itemsize:
            raise ModelFormatError(f"corrupt TFLite model: tensor {index} {name!r} of shape {list(shape)} "
                                   f"{dtype} has {raw.size} bytes of data")
        if raw.size % dtype.itemsize:
            raise ModelFormatError(f"corrupt TFLite model: tensor {index} {name!r} has {raw.size} bytes")
        value = raw.view(dtype)
        value = value if t.sparsity is not None else value.reshape(shape)
        if value.flags.writeable:
            value = value.copy()
            value.flags.writeable = False
    signature = tuple(int(d) for d in t.shapeSignature) if t.shapeSignature is not None else None
    return Tensor(name, shape, dtype, value, signature, t.sparsity)


# ---------------------------------------------------------------------------------------------- normalize

def normalize(graph: Graph) -> Graph:
    """Rewrite ``graph`` into the forms ShadowNet handles; returns a new Graph (tensor ids change).

    - ``DEQUANTIZE`` of a float16 constant -> a float32 constant (op removed; float16 -> float32 is exact);
    - ``DENSIFY`` of a sparse constant -> a dense constant (op removed); other sparse constants densified;
    - a fused activation (RELU, RELU6, RELU_N1_TO_1) of a conv / dense / add / pool / ... op becomes its
      own op: the op writes a new tensor ``<output name>/pre_activation`` and the activation writes the
      original output tensor, so names seen downstream do not change (``UnsupportedOpError`` for a fused
      TANH / SIGN_BIT, which LiteRT's kernels silently skip);
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


# ---------------------------------------------------------------------------------------------- writing

class _AlignedBufferT(schema_fb.BufferT):
    """A Buffer whose data vector starts on a 16-byte boundary (the schema's force_align: 16), which the
    generated BufferT.Pack does not honour."""

    def Pack(self, builder: flatbuffers.Builder) -> int:  # noqa: N802 - the schema's method name
        data_offset = None
        if self.data is not None:
            n = self.data.size
            builder.StartVector(1, n, 16)
            builder.head -= n
            builder.Bytes[builder.head:builder.head + n] = self.data.data
            data_offset = builder.EndVector()
        schema_fb.BufferStart(builder)
        if data_offset is not None:
            schema_fb.BufferAddData(builder, data_offset)
        return schema_fb.BufferEnd(builder)


def write_model(graph: Graph, signatures: Sequence[Signature] | None = None) -> bytes:
    """Write ``graph`` as a ``.tflite`` (``TFL3`` flatbuffer) that LiteRT loads.

    ``signatures=None``: the whole graph as subgraph 0 with ``graph.inputs`` / ``graph.outputs`` (tensor
    names, shapes and dtypes kept; ``graph.signature``, if any, becomes its SignatureDef). Otherwise one
    subgraph + SignatureDef per signature, holding only its ops and the tensors they touch, in the order
    given; ``interpreter.get_signature_runner(key)`` then takes and returns the signature's names. Every
    non-constant tensor a signature's ops read must be one of its inputs or written by an earlier op of it
    (``ValueError`` otherwise). Constant buffers are written once, however many subgraphs use them.

    LiteRT's float CONV_2D and DEPTHWISE_CONV_2D kernels insist on a bias, so a conv whose bias is absent
    (-1) is written with an all-zero bias constant (named ``<output name>/zero_bias``); x + 0 changes no
    value.
    """
    if signatures is None:
        sig = graph.signature
        parts = [(sig.key if sig else None, list(range(len(graph.ops))), list(graph.inputs),
                  list(graph.outputs), sig.inputs if sig else {}, sig.outputs if sig else {})]
    else:
        if not signatures:
            raise ValueError("write_model: empty list of signatures")
        keys = [s.key for s in signatures]
        if len(set(keys)) != len(keys):
            raise ValueError(f"write_model: duplicate signature keys in {keys}")
        parts = [(s.key, list(s.ops), list(s.inputs.values()), list(s.outputs.values()), s.inputs, s.outputs)
                 for s in signatures]
    writer = _Writer(graph)
    for key, op_ids, inputs, outputs, names_in, names_out in parts:
        _check_part(graph, key, op_ids, inputs, outputs)
        writer.add_subgraph(key, op_ids, inputs, outputs, names_in, names_out)
    return writer.finish()


class _Writer:
    """Builds the schema's ModelT from a Graph, one subgraph at a time, sharing buffers and opcodes."""

    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self.model = schema_fb.ModelT()
        self.model.version = 3
        self.model.description = "ShadowNet"
        self.model.buffers = [_AlignedBufferT()]  # buffer 0: the empty buffer of every non-constant tensor
        self.model.operatorCodes, self.model.subgraphs, self.model.signatureDefs = [], [], []
        self.buffer_of: dict[Any, int] = {}  # tensor id (or zero-bias key) -> buffer index
        self.opcode_of: dict[tuple[str, str | None, int], int] = {}
        self.total_bytes = 0

    def buffer(self, key: Any, data: np.ndarray) -> int:
        if key not in self.buffer_of:
            buf = _AlignedBufferT()
            buf.data = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
            self.total_bytes += buf.data.size
            self.buffer_of[key] = len(self.model.buffers)
            self.model.buffers.append(buf)
        return self.buffer_of[key]

    def add_subgraph(self, key: str | None, op_ids: list[int], inputs: list[int], outputs: list[int],
                     names_in: dict[str, int], names_out: dict[str, int]) -> None:
        graph = self.graph
        touched = {t for i in op_ids for t in (*graph.ops[i].inputs, *graph.ops[i].outputs)}
        used = sorted({*inputs, *outputs, *touched} - {-1})
        local = {t: k for k, t in enumerate(used)}
        local[-1] = -1
        sub = schema_fb.SubGraphT()
        sub.name = key or "main"
        sub.tensors = []
        for t in used:
            tensor = graph.tensors[t]
            buffer = self.buffer(t, tensor.data) if tensor.data is not None else 0
            sub.tensors.append(_tensor_t(tensor, buffer))
        sub.inputs = [local[t] for t in inputs]
        sub.outputs = [local[t] for t in outputs]
        sub.operators = []
        for i in op_ids:
            op = graph.ops[i]
            op_inputs = [local[t] for t in op.inputs]
            if op.kind in _BIAS_REQUIRED and (len(op_inputs) < 3 or op_inputs[2] < 0):
                out = graph.tensors[op.outputs[0]]
                zeros = np.zeros(out.shape[-1], dtype=out.dtype)
                bias = _tensor_t(Tensor(f"{out.name}/zero_bias", zeros.shape, out.dtype),
                                 self.buffer(("zero_bias", out.dtype.str, zeros.size), zeros))
                sub.tensors.append(bias)
                op_inputs = [*op_inputs[:2], len(sub.tensors) - 1, *op_inputs[3:]]
            code_key = (op.kind, op.custom_code, op.version)
            if code_key not in self.opcode_of:
                self.opcode_of[code_key] = len(self.model.operatorCodes)
                self.model.operatorCodes.append(_opcode_t(op))
            sub.operators.append(_operator_t(op, self.opcode_of[code_key], op_inputs,
                                             [local[t] for t in op.outputs]))
        self.model.subgraphs.append(sub)
        if key is not None:
            sig_def = schema_fb.SignatureDefT()
            sig_def.signatureKey = key
            sig_def.subgraphIndex = len(self.model.subgraphs) - 1
            sig_def.inputs = [_tensor_map(n, local[t]) for n, t in names_in.items()]
            sig_def.outputs = [_tensor_map(n, local[t]) for n, t in names_out.items()]
            self.model.signatureDefs.append(sig_def)

    def finish(self) -> bytes:
        builder = flatbuffers.Builder(self.total_bytes + (1 << 16))  # one allocation for the weights
        builder.Finish(self.model.Pack(builder), file_identifier=_TFL3)
        return bytes(builder.Output())


def _check_part(graph: Graph, key: str | None, op_ids: list[int], inputs: Sequence[int],
                outputs: Sequence[int]) -> None:
    where = f"signature {key!r}" if key is not None else "graph"
    n = len(graph.tensors)
    for t in (*inputs, *outputs):
        if not 0 <= t < n:
            raise ValueError(f"{where}: tensor id {t} out of range (graph has {n} tensors)")
    ready = set(inputs)
    for i in op_ids:
        op = graph.ops[i]
        for t in op.inputs:
            if t >= 0 and graph.tensors[t].data is None and t not in ready:
                raise ValueError(f"{where}: {graph.describe_op(i)} reads tensor {t} "
                                 f"{graph.tensors[t].name!r}, which is neither an input nor written before")
        ready.update(op.outputs)
    for t in outputs:
        if t not in ready and graph.tensors[t].data is None:
            raise ValueError(f"{where}: output tensor {t} {graph.tensors[t].name!r} is never written")


def _tensor_t(tensor: Tensor, buffer: int) -> Any:
    t = schema_fb.TensorT()
    t.name = tensor.name
    t.shape = list(tensor.shape)
    t.type = _TENSOR_TYPES[np.dtype(tensor.dtype)]
    t.buffer = buffer
    t.sparsity = tensor.sparsity
    if tensor.shape_signature is not None:
        t.shapeSignature = list(tensor.shape_signature)
    return t


def _opcode_t(op: Op) -> Any:
    code = schema_fb.OperatorCodeT()
    code.builtinCode = _OP_CODES[op.kind]
    # Readers older than the extended builtin codes look at the deprecated byte-sized field.
    code.deprecatedBuiltinCode = min(code.builtinCode, _OP_CODES["PLACEHOLDER_FOR_GREATER_OP_CODES"])
    code.version = op.version
    if op.kind == "CUSTOM":
        code.customCode = op.custom_code
    return code


def _operator_t(op: Op, opcode_index: int, inputs: list[int], outputs: list[int]) -> Any:
    o = schema_fb.OperatorT()
    o.opcodeIndex = opcode_index
    o.inputs, o.outputs = inputs, outputs
    if op.options is not None:
        name = type(op.options).__name__.removesuffix("T")
        if name in _OPTIONS_TYPES:
            o.builtinOptionsType, o.builtinOptions = _OPTIONS_TYPES[name], op.options
        elif name in _OPTIONS2_TYPES:
            o.builtinOptions2Type, o.builtinOptions2 = _OPTIONS2_TYPES[name], op.options
        else:
            raise ValueError(f"{op.kind}: options of type {type(op.options).__name__} are not a schema "
                             f"BuiltinOptions object")
    if op.custom_options is not None:
        o.customOptions = np.frombuffer(op.custom_options, dtype=np.uint8)
    return o


def _tensor_map(name: str, index: int) -> Any:
    m = schema_fb.TensorMapT()
    m.name, m.tensorIndex = name, index
    return m


def tiny_model_bytes() -> bytes:
    """A minimal valid float model (``y = x + x`` on a float32[1, 2]), built with ``write_model``."""
    graph = Graph()
    x = graph.add_tensor("x", (1, 2), np.float32)
    y = graph.add_tensor("y", (1, 2), np.float32)
    graph.add_op("ADD", [x, x], [y], schema_fb.AddOptionsT())
    graph.inputs, graph.outputs = [x], [y]
    return write_model(graph)
