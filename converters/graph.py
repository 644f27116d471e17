"""The TFLite graph layer: a small graph IR and writing it as ``.tflite`` bytes.

A :class:`Graph` holds tensors (shape, dtype, constant data) and ops in execution order; ``write_model``
writes a graph (or subsets of its ops as signatures) as a ``TFL3`` flatbuffer that LiteRT loads. Reading
``.tflite`` bytes into a Graph is :mod:`converters.tflite_reader`; rewriting a read model into the forms
ShadowNet handles is :mod:`converters.normalize`. Only ``ai_edge_litert``'s schema and flatbuffer tools are
used, never TensorFlow. Op kinds are the schema's ``BuiltinOperator`` names; groupings of kinds are
frozensets.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import flatbuffers
import numpy as np
from ai_edge_litert import schema_py_generated as schema_fb

from tee_sim.program import window_fits

OFFLOADABLE: frozenset[str] = frozenset({"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"})
# Float kernels of LiteRT that reject a conv without bias (conv.cc: TF_LITE_ENSURE(context, has_bias)).
_BIAS_REQUIRED: frozenset[str] = frozenset({"CONV_2D", "DEPTHWISE_CONV_2D"})


def _enum(cls: type) -> dict[str, int]:
    return {k: v for k, v in vars(cls).items() if not k.startswith("_")}


# The schema's codes for the IR's names, shared with the reader (converters.tflite_reader).
FILE_IDENTIFIER = b"TFL3"
OP_CODES: dict[str, int] = _enum(schema_fb.BuiltinOperator)
_ACTIVATION_NAMES: dict[int, str] = {v: k for k, v in _enum(schema_fb.ActivationFunctionType).items()}
_T = schema_fb.TensorType
NUMPY_DTYPES: dict[int, np.dtype] = {
    _T.FLOAT32: np.dtype(np.float32), _T.FLOAT16: np.dtype(np.float16), _T.FLOAT64: np.dtype(np.float64),
    _T.INT8: np.dtype(np.int8), _T.INT16: np.dtype(np.int16), _T.INT32: np.dtype(np.int32),
    _T.INT64: np.dtype(np.int64), _T.UINT8: np.dtype(np.uint8), _T.UINT16: np.dtype(np.uint16),
    _T.UINT32: np.dtype(np.uint32), _T.UINT64: np.dtype(np.uint64), _T.BOOL: np.dtype(np.bool_),
    _T.COMPLEX64: np.dtype(np.complex64), _T.COMPLEX128: np.dtype(np.complex128),
}
_TENSOR_TYPES: dict[np.dtype, int] = {v: k for k, v in NUMPY_DTYPES.items()}
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
        if kind != "CUSTOM" and kind not in OP_CODES:
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
    """True for a CONV_2D / DEPTHWISE_CONV_2D / FULLY_CONNECTED whose weights are a dense constant; not for
    a grouped CONV_2D (its filters span a slice of the input channels), which runs in the TEE like any
    other op: the schemes mix whole input channels (``converters.normalize`` makes one CONV_2D per group of
    those whose groups are wide enough to mix); nor for a convolution dilated so far that its taps lie
    more than twice its input apart (``tee_sim.program.window_fits``: every window reads the input through
    one tap at most; the TA's checks and masks refuse it)."""
    op = graph.ops[op_index]
    if op.kind not in OFFLOADABLE or len(op.inputs) < 2 or op.inputs[1] < 0:
        return False
    weights, x = graph.tensors[op.inputs[1]], graph.tensors[op.inputs[0]]
    if op.kind == "CONV_2D" and weights.shape[-1] != x.shape[-1]:
        return False
    if op.kind != "FULLY_CONNECTED" and len(x.shape) == 4 and len(weights.shape) == 4 and not all(
            window_fits(k, int(getattr(op.options, f"dilation{a}Factor", 1) or 1), size)
            for k, size, a in ((weights.shape[1], x.shape[1], "H"), (weights.shape[2], x.shape[2], "W"))):
        return False
    return weights.data is not None and weights.sparsity is None


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


def with_static_shapes(graph: Graph) -> Graph:
    """``graph`` with no tensor's shape signature: the shapes planned with are the only ones LiteRT may use
    (the TEE program's buffers are fixed; with an open batch's -1 kept, LiteRT's TOPK_V2 left its outputs
    unallocated until a run, and the trusted app could not bind them: a helper's probe)."""
    return dataclasses.replace(graph, tensors=[dataclasses.replace(t, shape_signature=None)
                                               for t in graph.tensors])


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
        builder.Finish(self.model.Pack(builder), file_identifier=FILE_IDENTIFIER)
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
    code.builtinCode = OP_CODES[op.kind]
    # Readers older than the extended builtin codes look at the deprecated byte-sized field.
    code.deprecatedBuiltinCode = min(code.builtinCode, OP_CODES["PLACEHOLDER_FOR_GREATER_OP_CODES"])
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
