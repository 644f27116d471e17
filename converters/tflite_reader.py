"""Reading ``.tflite`` bytes into the graph IR of :mod:`converters.graph`.

The bytes are untrusted: :func:`converters.tflite_verify.verify` checks the flatbuffer before the schema's
object reader touches it, and every index, buffer, shape and absent input is checked here against what
LiteRT's kernels accept, so a damaged file ends in ``ModelFormatError`` / ``UnsupportedOpError`` and never
reaches LiteRT. ``read_model`` reads subgraph 0; ``read_signatures`` reads each signature's subgraph of a
multi-subgraph model (``untrusted.tflite`` has one per round).
"""

from __future__ import annotations

import copy
import math
import os
from typing import Any

import numpy as np
from ai_edge_litert import schema_py_generated as schema_fb
from ai_edge_litert.tools import flatbuffer_utils

from converters.graph import FILE_IDENTIFIER, NUMPY_DTYPES, OP_CODES, Graph, Op, Signature, Tensor
from converters.tflite_verify import verify
from shadownet.exceptions import ModelFormatError, UnsupportedOpError

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

MAX_TENSOR_BYTES = 1 << 31  # one tensor of a model a device runs; a larger shape is a damaged file
_OP_NAMES: dict[int, str] = {v: k for k, v in OP_CODES.items()}
_TYPE_NAMES: dict[int, str] = {v: k for k, v in vars(schema_fb.TensorType).items() if not k.startswith("_")}
_T = schema_fb.TensorType
_QUANTIZED_TYPES = frozenset({_T.INT8, _T.UINT8, _T.INT16, _T.INT4, _T.UINT4, _T.INT2})


def read_model(src: bytes | bytearray | memoryview | str | os.PathLike) -> Graph:
    """Read subgraph 0 of a ``.tflite`` (bytes or a path) into a :class:`Graph`.

    The bytes are checked structurally before anything is trusted (LiteRT never sees them). Raises
    ``ModelFormatError`` for anything that is not a valid float TFLite model (not a flatbuffer, truncated,
    out-of-range indices or buffers, no subgraph, quantized tensors) and ``UnsupportedOpError`` for an op
    LiteRT would not resolve (unknown custom op or builtin code).
    """
    data, model = _parse(src)
    sig = next((s for s in model.signatureDefs or [] if s.subgraphIndex == 0), None)
    return _read_subgraph(model, data, 0, sig)


def read_signatures(src: bytes | bytearray | memoryview | str | os.PathLike) -> list[Graph]:
    """Read each SignatureDef of a ``.tflite`` (bytes or a path) as a :class:`Graph`, in the file's order.

    Each graph is the subgraph the signature runs, with ``signature`` = that SignatureDef (``ops`` = every
    op of the subgraph), e.g. one graph per round of ``untrusted.tflite``, as ``write_model(graph,
    signatures)`` wrote them. A model without SignatureDef gives ``[]``. The file is checked once, each
    subgraph as ``read_model`` checks subgraph 0, with the same errors.
    """
    data, model = _parse(src)
    return [_read_subgraph(model, data, int(sig.subgraphIndex), sig) for sig in model.signatureDefs or []]


def _parse(src: Any) -> tuple[Any, Any]:
    """The file's bytes and the schema's ``ModelT``, once the bytes are known to be a sound flatbuffer."""
    data = _load_bytes(src)
    if len(data) < 8:
        raise ModelFormatError(f"not a TFLite model: {len(data)} bytes is too short for a flatbuffer")
    if data[4:8] != FILE_IDENTIFIER:
        raise ModelFormatError(
            f"not a TFLite model: file identifier is {bytes(data[4:8])!r}, expected {FILE_IDENTIFIER!r}")
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
    return data, model


def _read_subgraph(model: Any, data: Any, index: int, sig: Any) -> Graph:
    """Subgraph ``index`` of ``model`` as a Graph; ``sig`` (a ``SignatureDefT`` of it, or None) names it."""
    if not 0 <= index < len(model.subgraphs):
        raise ModelFormatError(f"corrupt TFLite model: signature {_text(sig.signatureKey)!r} refers to "
                               f"subgraph {index} of {len(model.subgraphs)}")
    sub = model.subgraphs[index]
    buffers = model.buffers or []
    opcodes = model.operatorCodes or []
    # A tensor of a type no numpy dtype holds (a TensorFlow list's VARIANT, a variable's RESOURCE) is named
    # with the first op that touches it, the op being what the user recognises (a helper's LSTM probe).
    untyped: dict[int, str] = {}
    tensors = []
    for i, t in enumerate(sub.tensors or []):
        if t.type not in NUMPY_DTYPES:
            untyped[i] = f"tensor {i} {_text(t.name)!r} of type {_TYPE_NAMES.get(t.type, t.type)}"
            t = copy.copy(t)
            t.type, t.buffer, t.quantization = schema_fb.TensorType.UINT8, 0, None  # a stand-in until then
        tensors.append(_read_tensor(i, t, buffers, data))
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
                f"op {i} {kind} calls other subgraphs; ShadowNet does not follow calls (output {out_name})")
        state = [t for t in inputs if t >= 0 and sub.tensors[t].isVariable]
        if state:  # e.g. the fused UNIDIRECTIONAL_SEQUENCE_LSTM, whose state LiteRT keeps between calls
            raise UnsupportedOpError(
                f"op {i} {kind} keeps state between inferences in variable tensor {state[0]} "
                f"{tensors[state[0]].name!r}, which ShadowNet does not carry from one inference to the next "
                f"(output {out_name})")
        touched = [t for t in (*inputs, *outputs) if t in untyped]
        if touched:
            raise UnsupportedOpError(f"op {i} {kind} (output {out_name}) uses {untyped[touched[0]]}, which "
                                     "ShadowNet does not support (float, integer and bool tensors only)")
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

    if untyped:  # no op touches it: a model input or output of that type
        raise ModelFormatError(f"{next(iter(untyped.values()))}, not supported by ShadowNet")
    graph = Graph(tensors, ops, list(ids(sub.inputs, "subgraph input")),
                  list(ids(sub.outputs, "subgraph output")))
    _check_dataflow(graph)
    if sig is not None:
        names_in = {_text(m.name): int(m.tensorIndex) for m in sig.inputs or []}
        names_out = {_text(m.name): int(m.tensorIndex) for m in sig.outputs or []}
        ids((*names_in.values(), *names_out.values()), "signature")
        graph.signature = Signature(_text(sig.signatureKey), list(range(len(ops))), names_in, names_out)
    return graph


def _check_dataflow(graph: Graph) -> None:
    """Every tensor an op reads is a model input, a constant or written by an earlier op (a variable has
    been refused), and every model output is written: otherwise the file is damaged (LiteRT would read
    memory nobody wrote)."""
    ready = set(graph.inputs) | {i for i, t in enumerate(graph.tensors) if t.data is not None}
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
    dtype = NUMPY_DTYPES.get(t.type)
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
