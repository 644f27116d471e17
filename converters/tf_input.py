"""Keras and SavedModel input: converted to a float32 ``.tflite`` with TensorFlow's own converter (extra
``tf``), at batch size 1.

Keras and SavedModel signatures usually leave the batch dimension open. Converted as they are, every shape
computed from it stays a tensor LiteRT computes at run time (a ``Flatten`` becomes SHAPE, STRIDED_SLICE,
PACK and a RESHAPE whose shape is that result), which the TEE program, preallocated and bound to fixed
buffers, cannot follow. So the serving function is traced again with the batch dimension fixed to 1, its
variables frozen into constants, and converted from there: TensorFlow's converter then folds those shapes.
Other open dimensions are refused, naming the input: they need a shape the user chooses.

TensorFlow's native libraries write to the process's standard error directly, before its log level applies:
a notice that oneDNN is on, twice (once per library), and when its converter fails, pages of MLIR
diagnostics. Everything they write while a model is converted is held back (``_native_stderr``): on success
it is written out without those notices, on failure dropped, since the error says what failed in one line
(``SHADOWNET_DEBUG=1`` writes it all out: ``shadownet.debug``).
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from shadownet.debug import debugging
from shadownet.exceptions import ModelFormatError

# What TensorFlow's libraries write to standard error on every import, before its log level applies.
_NOTICES = ("WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
            "oneDNN custom operations are on.")


def convert(path: Path, kind: str, signature: str | None = None, several_only: bool = False) -> bytes:
    """The ``.tflite`` bytes of the Keras file (``kind="keras"``) or SavedModel directory (``"saved_model"``)
    at ``path``: of a SavedModel, its signature ``signature`` (default "serving_default", else its first),
    under that key - unless ``several_only`` and the SavedModel has one function, which it then is (bench's
    ``--signature``, given for all its models). The outputs keep their names where the function returns a
    dict."""
    with _native_stderr():
        return _convert(path, kind, signature, several_only)


@contextmanager
def _native_stderr() -> Iterator[None]:
    """File descriptor 2 into a temporary file while the block runs; then what was written there written
    out again: on success all but TensorFlow's notices (``_NOTICES``), on failure nothing (the error says
    what failed), with ``SHADOWNET_DEBUG`` set (not to 0) everything. (``models.backend.quiet`` holds back
    the zoo's exports the same way, for the zoo's own use; the trust domains keep the two packages apart.)"""
    sys.stderr.flush()
    saved = os.dup(2)
    failed = True
    with tempfile.TemporaryFile() as spool:
        os.dup2(spool.fileno(), 2)
        try:
            yield
            failed = False
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            spool.seek(0)
            debug = debugging()
            for line in spool.read().decode(errors="replace").splitlines():
                if debug or not (failed or any(notice in line for notice in _NOTICES)):
                    print(line, file=sys.stderr)


def _convert(path: Path, kind: str, signature: str | None, several_only: bool = False) -> bytes:
    what = {"keras": "Keras model", "saved_model": "SavedModel"}[kind]
    try:
        # (With LiteRT's library loaded first TensorFlow logs its oneDNN notice before it reads this. Turning
        # oneDNN off would silence it but change TensorFlow's numerics for the whole process: the zoo's
        # exports then differed from another process's by a bit.)
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        import tensorflow as tf
    except ImportError:
        raise ModelFormatError(f"{path}: converting a {what} needs TensorFlow (pip install 'shadownet[tf]'), "
                               "or give a .tflite") from None
    try:
        # The owner (the Keras model, the loaded SavedModel) holds the variables the function captures.
        if kind == "keras":
            (function, owner), key = _keras_function(tf, path), None
        else:
            function, owner, key = _saved_model_function(tf, path, signature, several_only)
    except (ModelFormatError, _NoSuchSignature):
        raise
    except Exception as exc:  # noqa: BLE001 - TensorFlow raises many kinds; the user needs one line
        raise ModelFormatError(f"{path}: TensorFlow could not load the {what}: {_first_line(exc)}") from None
    try:
        from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

        frozen = _named_outputs(tf, convert_variables_to_constants_v2(function), function.structured_outputs)
        del owner
        # An empty module saved beside the function gives the file its SignatureDef (as in models.zoo).
        data = bytes(tf.lite.TFLiteConverter.from_concrete_functions([frozen], tf.Module()).convert())
    except Exception as exc:  # noqa: BLE001
        raise ModelFormatError(f"{path}: TensorFlow could not convert the {what}: "
                               f"{_first_line(exc)}") from None
    return data if key is None else _signature_key(data, key)


def _named_outputs(tf: Any, frozen: Any, structured: Any) -> Any:
    """``frozen`` (which returns a flat list: freezing drops the structure) returning a dict by the names of
    ``structured`` again, when that was a dict (a SavedModel signature's outputs, a Keras model's dict
    outputs): TensorFlow's converter names the outputs by those keys, else "output_0", ..."""
    if not isinstance(structured, dict):
        return frozen
    names = sorted(structured)  # the order of tf.nest.flatten, which freezing keeps
    specs = [tf.TensorSpec(t.shape, t.dtype, name=t.name.split(":")[0]) for t in frozen.inputs]

    def named(*xs: Any) -> Any:
        return dict(zip(names, frozen(*xs), strict=True))

    return tf.function(named).get_concrete_function(*specs)


def _signature_key(data: bytes, key: str) -> bytes:
    """The converted model with its one SignatureDef under ``key`` (TensorFlow's converter writes
    "serving_default"), as an app converting the SavedModel's signature ``key`` itself would find it. The
    file is rewritten (every weight copied) only when the key differs."""
    from ai_edge_litert import schema_py_generated as schema_fb
    from ai_edge_litert.tools import flatbuffer_utils

    root = schema_fb.Model.GetRootAs(data, 0)
    if root.SignatureDefsLength() != 1 or root.SignatureDefs(0).SignatureKey().decode() == key:
        return data
    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(data))
    model.signatureDefs[0].signatureKey = key
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


class _NoSuchSignature(ValueError):
    """A signature key the SavedModel lacks: the caller's wrong argument, raised as it is (TensorFlow's own
    ValueErrors become ModelFormatError)."""


def _first_line(exc: BaseException) -> str:
    """The exception's type and first line; of TensorFlow's converter, its first diagnostic ("'tf.Svd' op is
    neither a custom op nor a flex op") rather than its summary glued to a source location."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))  # Keras's bold
    lines = [line.strip() for line in text.splitlines() if line.strip()] or [""]
    line = lines[0]
    if type(exc).__name__ == "ConverterError" and ": error: " in line:
        return line.split(": error: ", 1)[1]
    # A traced function's error ("in user code:", then source lines) or a Keras layer's ("Exception
    # encountered when calling ...", then the reason, then the arguments): the reason, not the heading,
    # which said nothing to act on (a helper's probe)
    for k, heading in enumerate(lines[:-1]):
        if "Exception encountered when calling" in heading:
            return lines[k + 1]
    if line == "in user code:":
        raised = [r for r in lines if re.match(r"\w+(Error|Exception): ", r)]
        return raised[-1] if raised else lines[-1]
    return f"{type(exc).__name__}: {line}"


def _batch_one(tf: Any, spec: Any, name: str, path: Path) -> Any:
    """``spec`` with its leading (batch) dimension fixed to 1; refused if any other dimension is open."""
    shape = spec.shape
    if shape.rank is None:
        raise ModelFormatError(f"{path}: input {name!r} has an unknown rank: give the model a fixed input "
                               "shape")
    dims = list(shape)
    if dims and dims[0] is None:
        dims[0] = 1
    if any(d is None for d in dims):
        raise ModelFormatError(f"{path}: input {name!r} has shape {shape} with open dimensions besides the "
                               "batch: give the model a fixed input shape")
    return tf.TensorSpec(dims, spec.dtype, name=name)


def _keras_function(tf: Any, path: Path) -> tuple[Any, Any]:
    import keras

    try:
        model = keras.models.load_model(path, compile=False)
    except ValueError as exc:
        if "safe_mode" not in str(exc):
            raise
        # Keras's advice (safe_mode=False) is not an option of convert: it runs the file's Python code (a
        # Lambda layer's) or reads files outside it.
        raise ModelFormatError(f"{path}: Keras loads this file only outside its safe mode (it holds Python "
                               "code, as Lambda layers do, or reads files outside it); export the model as a "
                               "SavedModel (model.export(DIR)) and convert that directory") from None
    try:
        structure = model.input  # one tensor, a list of them, or a dict of them by name (as it was built)
    except (AttributeError, ValueError):  # a loaded Sequential: built with its inputs, never called
        inputs = model.inputs
        structure = inputs[0] if len(inputs) == 1 else inputs
    if isinstance(structure, dict):
        named = list(structure.items())
    else:
        tensors = structure if isinstance(structure, list | tuple) else [structure]
        # Keras's own names, whole: cut at ":" ("in:0" -> "in") one took another input's (a review)
        named = [(getattr(t, "name", None) or f"input_{i}", t) for i, t in enumerate(tensors)]
    specs = [_batch_one(tf, tf.TensorSpec(t.shape, t.dtype), node_name, path)
             for node_name, (_, t) in zip(_node_names([name for name, _ in named]), named, strict=True)]

    def serve(*xs: Any) -> Any:
        if isinstance(structure, dict):
            return model({name: x for (name, _), x in zip(named, xs, strict=True)}, training=False)
        return model(list(xs) if isinstance(structure, list | tuple) else xs[0], training=False)

    try:
        return tf.function(serve).get_concrete_function(*specs), model
    except Exception as exc:  # noqa: BLE001 - the file loaded: its tracing failed (was "could not load")
        raise ModelFormatError(f"{path}: TensorFlow could not trace the Keras model: {_first_line(exc)}") \
            from None


def _node_names(names: list[str]) -> list[str]:
    """Keras's input names as TensorFlow's graph takes them (letters, digits, "_"; as Keras's own export
    makes them), each once: one with a space or a colon ("a img", "in:0") was dropped for "Placeholder",
    and the inputs could not be told apart (a helper's probe)."""
    nodes = [re.sub(r"[^A-Za-z0-9_]", "_", name) for name in names]
    nodes = [node if node[:1].isalnum() else f"input{node}" for node in nodes]
    taken = {node for name, node in zip(names, nodes, strict=True) if node == name}  # kept as they are: a
    made = []  # made name took a valid one's first, and feeding by it gave the other input (a review)
    for name, node in zip(names, nodes, strict=True):
        unique, n = node, 1
        while node != name and unique in taken:
            unique, n = f"{node}_{n}", n + 1
        taken.add(unique)
        made.append(unique)
    return made


def _called(function: Any) -> tuple[Any, ...]:
    """What a SavedModel signature is: its inputs, outputs and the functions its wrapper calls."""
    calls = sorted(node.attr["f"].func.name for node in function.graph.as_graph_def().node
                   if node.op in ("StatefulPartitionedCall", "PartitionedCall"))
    return repr(function.structured_input_signature), repr(function.structured_outputs), tuple(calls)


def _saved_model_function(tf: Any, path: Path, key: str | None,
                          several_only: bool = False) -> tuple[Any, Any, str]:
    loaded = tf.saved_model.load(str(path))
    signatures = dict(loaded.signatures)
    if not signatures:
        raise ModelFormatError(f"{path}: the SavedModel has no signature to convert")
    # A wrong argument (converters.original_model.one_signature says the same), but for a SavedModel of one
    # function when ``several_only`` (Keras's export writes its one function twice: "serve" and
    # "serving_default").
    if key is not None and key not in signatures:
        if several_only and len({_called(s) for s in signatures.values()}) == 1:
            key = None
        else:
            raise _NoSuchSignature(f"the SavedModel has no signature {key!r} (it has "
                                   f"{', '.join(map(repr, sorted(signatures)))})")
    chosen = key is not None
    key = key if chosen else "serving_default" if "serving_default" in signatures else next(iter(signatures))
    signature = signatures[key]
    # Other signatures a protected model (one signature) leaves out: said, unless the user chose. Keras's
    # export writes its one function twice ("serve" and "serving_default": wrappers of one call), which is
    # not another.
    others = sorted(k for k in signatures if _called(signatures[k]) != _called(signature))
    if others and not chosen:
        left = ", ".join(map(repr, others))
        warnings.warn(f"{path}: the SavedModel's signature {key!r} is converted, not {left} (a protected "
                      "model runs one signature: choose another with --signature KEY)", stacklevel=3)
    _, named = signature.structured_input_signature
    specs = {name: _batch_one(tf, spec, name, path) for name, spec in named.items()}

    def serve(**xs: Any) -> Any:
        return signature(**xs)

    return tf.function(serve).get_concrete_function(**specs), loaded, key
