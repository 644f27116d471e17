"""The original model, as the converter takes it in: its ``.tflite`` bytes (from bytes, a ``.tflite``, a
Keras model file or a SavedModel directory), the one signature to protect, its graph shaped as LiteRT
computes it (``planning_graph``, the graph the converter plans with), the description of its inputs and
outputs for the manifest, and the refusals, before any work, of what a protected model cannot hold.
"""

from __future__ import annotations

import dataclasses
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
from ai_edge_litert import schema_py_generated as schema_fb

from converters import tf_input
from converters.exact_split import MAX_DOT_LENGTH
from converters.graph import Graph, is_offloadable, write_model
from converters.non_float import CARRIED
from converters.plan import LINEAR_KINDS
from converters.schemes import Scheme, group_min_channels, kept_in_tee, partition_for
from converters.shape_folding import DATA_SHAPED, SHAPE_INPUTS, fold_shapes
from converters.tflite_reader import read_model, read_signatures
from shadownet.exceptions import ModelFormatError, UnsupportedOpError


def tflite_bytes(model: Any, signature: str | None = None, several_only: bool = False) -> bytes:
    """The ``.tflite`` bytes of ``model`` (bytes, a ``.tflite``, a Keras file or a SavedModel directory, whose
    signature ``signature`` TensorFlow converts - ``several_only``: if it has several functions)."""
    if isinstance(model, bytes | bytearray | memoryview):
        return bytes(model)
    path = Path(model)
    problem = model_path_problem(path)
    if problem:
        raise ModelFormatError(f"model {path} {problem}")
    if path.is_dir():
        return tf_input.convert(path, "saved_model", signature, several_only)
    data = path.read_bytes()
    if data[4:8] == b"TFL3":
        return data
    keras_container = data[:4] in (b"PK\x03\x04", b"\x89HDF")  # a .keras zip, an .h5 HDF5 file
    if path.suffix in (".keras", ".h5", ".hdf5") and not keras_container:
        # Refused before TensorFlow is imported: it would log to stderr and say "File not found".
        raise ModelFormatError(f"{path} is not a Keras model file (a .keras file is a zip archive, an .h5 "
                               "file HDF5)")
    if data[:4] == b"PK\x03\x04":
        listed = _zip_names(path)
        if listed is None:  # a truncated or damaged .keras was called a zip archive without config.json
            raise ModelFormatError(f"{path} is a damaged or truncated zip archive (a .keras file is one)")
        if "config.json" not in listed:
            raise ModelFormatError(f"{path} is a zip archive but not a Keras model file (no config.json "
                                   "in it)")
    if keras_container:
        return tf_input.convert(path, "keras")
    raise ModelFormatError(f"{path} is neither a .tflite, a Keras model file nor a SavedModel directory")


def model_path_problem(path: Path) -> str | None:
    """What makes ``path`` no model ``tflite_bytes`` can read, said of it before any work ("does not exist",
    "is a directory but not a SavedModel ...", "is not a regular file"; None: it may be one, which reading
    it tells). A FIFO would hang the read, /dev/zero exhaust the memory (a helper's probe); bench and the
    audit found a wrong directory only when its turn came (reviews)."""
    if not path.exists():
        return "does not exist"
    if path.is_dir():
        saved = any((path / name).exists() for name in ("saved_model.pb", "saved_model.pbtxt"))
        return None if saved else "is a directory but not a SavedModel (no saved_model.pb)"
    return None if path.is_file() else "is not a regular file"


def _zip_names(path: Path) -> list[str] | None:
    """The members of a zip archive (a Keras v3 model file has config.json at its top, an .npz does not);
    None when it cannot be read as one."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return None


def one_signature(original: bytes, key: str | None, several_only: bool = False) -> bytes:
    """``original`` as a model of the one signature to protect: itself when it has at most one (``key``, if
    given, must name it - unless ``several_only``: bench's ``--signature``, given for all its models, is for
    those of several), else the subgraph of signature ``key`` written as a model of its own, with that
    signature (``read_model`` reads subgraph 0 only: without a key the others would be left out silently,
    so a model of several signatures needs one)."""
    try:  # a cheap look before the whole file is read and checked (read_model reports a damaged one)
        count = schema_fb.Model.GetRootAs(original, 0).SignatureDefsLength()
    except Exception:  # noqa: BLE001 - the flatbuffer reader fails however a bad offset leads it to
        count = 0
    if count <= 1 and (key is None or several_only):
        return original
    graphs = read_signatures(original)
    keys = [g.signature.key for g in graphs]
    listed = ", ".join(map(repr, keys))
    if key is None:
        raise UnsupportedOpError(f"the model has {len(keys)} signatures ({listed}): a protected model runs "
                                 "one; choose it with --signature KEY (signature= in Python)")
    if key not in keys:  # a wrong argument, as an unknown scheme is
        raise ValueError(f"the model has no signature {key!r}" + (f" (it has {listed})" if keys else
                                                                   " (it has none)"))
    return original if len(keys) == 1 else write_model(graphs[keys.index(key)])


def check_interface(graph: Graph) -> None:
    """Refuse, before any work, model inputs and outputs the protected model cannot have: of a type no
    float32 carries (``converters.non_float``), or inputs with an open dimension besides the batch (LiteRT
    gives such a dimension size 1 in the file's shape, which the converter would otherwise plan with,
    silently)."""
    for kind, tensors in (("input", graph.inputs), ("output", graph.outputs)):
        for t in tensors:
            tensor = graph.tensors[t]
            if tensor.dtype != np.float32 and tensor.dtype not in CARRIED:
                raise UnsupportedOpError(f"model {kind} {tensor.name!r} is {np.dtype(tensor.dtype).name}: a "
                                         f"protected model's {kind}s are float32, integers, bool, float16 or "
                                         "float64")
            signature = tensor.shape_signature
            if kind == "input" and signature is not None and any(d < 0 for d in signature[1:]):
                raise ModelFormatError(f"model input {tensor.name!r} has open dimensions (shape signature "
                                       f"{list(signature)}): convert the model with a fixed input shape (an "
                                       "open batch alone is taken as 1)")


def check_static(graph: Graph) -> None:
    """Refuse what the TEE program cannot hold: shapes decided at run time, outputs no op computes."""
    open_batch = any((graph.tensors[t].shape_signature or (0,))[:1] == (-1,) for t in graph.inputs)
    hint = (" (the model's batch dimension is open: convert it with batch size 1, or give ShadowNet the "
            "Keras model or SavedModel, which it converts at batch size 1)") if open_batch else ""
    for i, op in enumerate(graph.ops):
        if op.kind in DATA_SHAPED:
            raise UnsupportedOpError(f"{graph.describe_op(i)}: its output's shape depends on the data, which "
                                     "the TEE program, its buffers fixed, cannot hold")
        for position in SHAPE_INPUTS.get(op.kind, ()):
            if position < len(op.inputs) and op.inputs[position] >= 0 \
                    and graph.tensors[op.inputs[position]].data is None:
                name = graph.tensors[op.inputs[position]].name
                raise UnsupportedOpError(f"{graph.describe_op(i)} takes its shape from the computed tensor "
                                         f"{name!r}: shapes decided at run time are not supported{hint}")
    written = {t for op in graph.ops for t in op.outputs}
    for t in graph.outputs:
        if t not in written and t not in graph.inputs:
            raise UnsupportedOpError(f"model output {graph.tensors[t].name!r} is a constant: nothing to "
                                     "protect there, and ShadowNet's outputs are computed")
    if all(t in graph.inputs for t in graph.outputs):
        raise UnsupportedOpError("every model output is a model input: nothing to protect")


def why_nothing_offloaded(graph: Graph, scheme: Scheme) -> str:
    """Why a model has no round, for the refusal: no linear op with constant weights, or only ones the TEE
    runs itself (which, and what would offload them)."""
    kept = kept_in_tee(scheme)
    linear = [(i, op.kind, is_offloadable(graph, i)) for i, op in enumerate(graph.ops)
              if op.kind in LINEAR_KINDS]
    if not linear:
        return "the model has no linear op (CONV_2D, FULLY_CONNECTED, ...): nothing to protect"
    kinds = ", ".join(sorted({kind for _, kind, _ in linear}))
    why = []
    if any(kind in kept and offloadable for _, kind, offloadable in linear):
        why.append(f"scheme {scheme.name} keeps {', '.join(sorted(kept))} in the TEE (--scheme "
                   "groupmix:depthwise=offload offloads depthwise layers)")
    if any(not offloadable for _, _, offloadable in linear):
        narrow = group_min_channels(scheme)
        groups = "grouped convolutions" if narrow is None else \
            f"grouped convolutions of groups narrower than {narrow} input channels"
        grouped = any(op.kind == "CONV_2D" and len(op.inputs) > 1 and op.inputs[1] >= 0
                      and graph.tensors[op.inputs[1]].shape[-1] != graph.tensors[op.inputs[0]].shape[-1]
                      for op in graph.ops)
        if grouped and hasattr(scheme, "input_group") and narrow is not None:  # what would offload them
            groups += (" (--scheme groupmix:input_group=2K offloads groups of K input channels or more, "
                       "each group's inputs mixed among themselves)")
        why.append(f"{groups}, matrix products, 3-D convolutions, convolutions dilated so far that their "
                   "taps lie more than twice their input apart and layers of computed weights run in the TEE")
    long_sums = partition_for(graph, scheme).long_sums
    if long_sums:
        why.append(f"{len(long_sums)} layer(s) on the user's input sum too many terms per output to cross "
                   f"its one-time mask as an exact split (more than {MAX_DOT_LENGTH}: "
                   "converters/partition.py, long sums; --scheme groupmix:exact_split=none offloads them "
                   "unsplit, at the precision their masked sums keep)")
    if any(offloadable and kind not in kept and i not in long_sums  # partition.offloads' last rule
           for i, kind, offloadable in linear):
        why.append("a layer whose input is a constant is computed with it, in the TEE")
    return (f"nothing to offload: the model's linear ops ({kinds}) all run in the TEE, weights and all: "
            f"{'; '.join(why)}")


def planning_graph(original: bytes) -> Graph:
    """A ``.tflite`` as the converter plans with it (before ``normalize``): read, run once by LiteRT, which
    gives a tensor of open shape its shape at batch 1, and shapes computed from shapes folded. For what must
    see the graph the converter saw: the audit's reference, the bench's count of what is offloaded (read
    without it, a Keras model's transposed convolution at an open batch was no linear layer: a probe)."""
    graph = read_model(original)
    shape_as_litert(original, graph)
    return graph


def shape_as_litert(original: bytes, graph: Graph, sample: list[np.ndarray] | None = None) -> None:
    """Give ``graph``, read from ``original``, the shapes LiteRT computes (checking that LiteRT runs it, on
    ``sample`` if given) and fold the tensors computed from shapes alone."""
    _check_litert_runs(original, graph, sample)
    fold_shapes(graph, original)


def _check_litert_runs(original: bytes, graph: Graph, sample: list[np.ndarray] | None = None) -> None:
    """LiteRT prepares and runs the model once (on ``sample``, the user's first calibration input, else on
    zeros): its own checks of what the graph layer does not model (op arity, ranks, options) refuse a
    damaged model here, as a ModelFormatError, before any work; and every tensor's shape in the file must
    be the one LiteRT computes (the converter plans with the file's; a tensor of open shape takes LiteRT's,
    at batch 1). Without the XNNPACK delegate: its kernels take the file's shapes on trust, the builtin
    kernels' Prepare checks them and computes every output shape. (The user's inputs, not zeros, where
    they are given: a model that divides by an integer input fails on zeros.)"""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    computed: dict[int, tuple[int, ...]] = {}
    # Then with XNNPACK, which the converter and the runtime use and which checks some options itself.
    for resolver in (OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES, OpResolverType.AUTO):
        on = ""  # where it failed: preparing the model, or running it on the user's input
        try:
            interpreter = Interpreter(model_content=original, num_threads=1,
                                      experimental_op_resolver_type=resolver)
            interpreter.allocate_tensors()
            for i, d in enumerate(interpreter.get_input_details()):
                interpreter.set_tensor(d["index"], np.zeros(d["shape"], d["dtype"]) if sample is None
                                       else sample[i])
            on = "" if sample is None else " on the first calibration input"  # its values may be why
            interpreter.invoke()
            computed = computed or {d["index"]: tuple(int(n) for n in d["shape"])
                                    for d in interpreter.get_tensor_details()}
        except (ValueError, RuntimeError) as exc:
            message = " ".join(str(exc).split()) or type(exc).__name__
            raise ModelFormatError(f"LiteRT cannot run the model{on}: {message}") from None
    for t, tensor in enumerate(graph.tensors):
        if t in computed and computed[t] != tensor.shape:
            if any(d < 0 for d in tensor.shape_signature or ()):
                # A tensor of open shape (an open batch's): the file holds a placeholder, LiteRT's shape at
                # batch 1 is the one to plan with (check_static refuses shapes that ops compute at run time).
                graph.tensors[t] = dataclasses.replace(tensor, shape=computed[t])
                continue
            raise ModelFormatError(f"corrupt TFLite model: tensor {t} {tensor.name!r} has shape "
                                   f"{list(tensor.shape)} in the file, LiteRT computes {list(computed[t])}")


def io_description(original: bytes) -> dict[str, Any]:
    """The original model's inputs / outputs as LiteRT reports them, and its signature."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=original)

    def spec(d: dict[str, Any]) -> dict[str, Any]:
        return {"name": d["name"], "shape": [int(x) for x in d["shape"]], "dtype": np.dtype(d["dtype"]).name,
                "index": int(d["index"]), "shape_signature": [int(x) for x in d["shape_signature"]]}

    inputs = [spec(d) for d in interpreter.get_input_details()]
    outputs = [spec(d) for d in interpreter.get_output_details()]
    result: dict[str, Any] = {"inputs": inputs, "outputs": outputs}
    signatures = interpreter._get_full_signature_list()
    if signatures:
        key, sig = next(iter(signatures.items()))
        names = {d["index"]: d["name"] for d in (*inputs, *outputs)}
        try:
            signature = {"key": key, "inputs": {k: names[v] for k, v in sig["inputs"].items()},
                         "outputs": {k: names[v] for k, v in sig["outputs"].items()}}
        except KeyError:
            signature = None
        # Kept only when it names each input and output once (what the runtime accepts), else the
        # tensor names serve, as for a model without signature.
        def same(named: dict[str, str], details: list[dict[str, Any]]) -> bool:
            return sorted(named.values()) == sorted(d["name"] for d in details)

        if signature and same(signature["inputs"], inputs) and same(signature["outputs"], outputs):
            result["signature"] = signature
    # One name per tensor: an output may repeat another output or be an input (Keras's Model(x, [y, y]),
    # Model(x, [x, y])), as LiteRT reports it - the same tensor, named and indexed once.
    by_name = {d["name"]: d["index"] for d in (*inputs, *outputs)}
    if (not inputs or not outputs or len(by_name) != len({d["index"] for d in (*inputs, *outputs)})
            or len({d["name"] for d in inputs}) != len(inputs)):
        names = [d["name"] for d in (*inputs, *outputs)]
        raise ModelFormatError(f"the model's inputs and outputs must be at least one each, with one name per "
                               f"tensor and distinct inputs: {names}")
    return result
