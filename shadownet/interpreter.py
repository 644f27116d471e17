"""``shadownet.Interpreter``: LiteRT's ``Interpreter`` surface over a protected-artifact directory.

An app written for ``ai_edge_litert.interpreter.Interpreter`` switches by changing its import and pointing
``model_path`` at the artifact directory: input/output details are the ORIGINAL model's (names, order,
indices, shapes, dtypes, quantization fields as LiteRT reports them for a float model; ``shape_signature`` is
the shape the protected model takes, an open batch fixed as conversion fixed it), available before
``allocate_tensors()``; ``get_tensor`` returns a copy the app may write to; the signature runner is keyed
by the original signature's names. What a protected model cannot do (resize an input) fails clearly.
"""

from __future__ import annotations

import operator
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from shadownet import after_fork
from shadownet.artifacts import TensorSpec
from shadownet.exceptions import ArtifactError, InputError
from shadownet.runtime import ProtectedModel, load

# LiteRT's Interpreter's other keyword arguments: taken, so that an app passing them runs unchanged, and
# without effect (the accelerator runs LiteRT's defaults on untrusted.tflite; no inner tensor is public).
LITERT_OPTIONS = frozenset({
    "experimental_op_resolver_type", "experimental_preserve_all_tensors",
    "experimental_disable_delegate_clustering", "experimental_default_delegate_latest_features",
    "experimental_compress_quantization_zero_points", "experimental_disable_delegate_node_fusion",
    "experimental_force_delegate_node_profiling",
})


def _one_subgraph(subgraph_index: Any, details: bool = False) -> None:
    """LiteRT's errors (``get_tensor``'s, or ``get_tensor_details``') for a subgraph the model does not
    have: a protected model shows one, the original model's main graph."""
    try:
        subgraph_index = operator.index(subgraph_index)
    except TypeError:
        raise TypeError(f"a subgraph index is an int, not {subgraph_index!r}") from None
    if subgraph_index != 0:
        raise ValueError(f"subgraph_index is out of range: {subgraph_index} for the model, which has 1 "
                         "subgraphs." if details else
                         f"Invalid subgraph index {subgraph_index} exceeds max subgraph index 1")


def _details(spec: TensorSpec) -> dict[str, Any]:
    # A float tensor as LiteRT's _get_tensor_details reports it (no quantization, dense).
    return {
        "name": spec.name,
        "index": spec.index,
        "shape": np.array(spec.shape, dtype=np.int32),
        # The shape it takes: a batch the original left open (-1) is fixed by the conversion, and an app that
        # read -1 here resized to a batch resize_tensor_input refuses (a helper's probe)
        "shape_signature": np.array(spec.shape, dtype=np.int32),
        "dtype": spec.dtype.type,
        "quantization": (0.0, 0),
        "quantization_parameters": {
            "scales": np.array([], dtype=np.float32),
            "zero_points": np.array([], dtype=np.int32),
            "quantized_dimension": 0,
            "block_size": 0,
        },
        "sparsity_parameters": {},
    }


class Interpreter:
    """Drop-in for ``ai_edge_litert.interpreter.Interpreter`` on a protected model.

    ``model_path`` is the directory written by ``shadownet convert``; ``num_threads`` and
    ``experimental_delegates`` (``load_delegate`` objects) configure the accelerator. Each method is atomic
    with respect to the others (one lock); as with LiteRT, an app sharing one interpreter between
    threads must still keep its own set_tensor / invoke / get_tensor sequences together.
    """

    def __init__(self, model_path: Any = None, model_content: bytes | None = None,
                 experimental_delegates: Sequence[Any] | None = None, num_threads: int | None = None,
                 **litert_options: Any) -> None:
        unknown = sorted(set(litert_options) - LITERT_OPTIONS)
        if unknown:  # LiteRT's own options are taken (and have no effect here); a misspelt one is refused
            raise TypeError(f"Interpreter got unexpected keyword argument(s) {', '.join(unknown)}")
        if model_content is not None or model_path is None:
            raise ArtifactError("a protected model is an artifact directory: pass model_path=OUT_DIR "
                                "(the directory written by `shadownet convert`)")
        if isinstance(experimental_delegates, str | bytes | os.PathLike) or not (
                experimental_delegates is None or hasattr(experimental_delegates, "__iter__")):
            raise TypeError(f"experimental_delegates is a list of delegates, not {experimental_delegates!r}")
        self._model: ProtectedModel = load(model_path, num_threads=num_threads,
                                           delegate=list(experimental_delegates or ()) or None)
        self._lock = threading.RLock()  # re-entered from an accelerator: the model says so (RuntimeError)
        after_fork.track(self)
        inputs, outputs = self._model.inputs, self._model.outputs
        self._input_values = [np.zeros(t.shape, t.dtype) for t in inputs]
        self._by_index: dict[int, tuple[TensorSpec, np.ndarray]] = {}
        for spec, value in zip(inputs, self._input_values, strict=True):
            self._by_index[spec.index] = (spec, value)
        for spec in outputs:  # an output that repeats another or is an input is that tensor, as in LiteRT
            self._by_index.setdefault(spec.index, (spec, np.zeros(spec.shape, spec.dtype)))
        self._output_values = [self._by_index[t.index][1] for t in outputs]
        self._input_index = {t.index for t in inputs}
        self._allocated = False

    # --- details -----------------------------------------------------------------------------------------
    def get_input_details(self) -> list[dict[str, Any]]:
        return [_details(t) for t in self._model.inputs]

    def get_output_details(self) -> list[dict[str, Any]]:
        return [_details(t) for t in self._model.outputs]

    def get_tensor_details(self, subgraph_index: int = 0) -> list[dict[str, Any]]:
        """The model's inputs and outputs only, each tensor once: its intermediate tensors are the secret
        part."""
        _one_subgraph(subgraph_index, details=True)
        return [_details(spec) for spec, _ in self._by_index.values()]

    def num_subgraphs(self) -> int:
        return 1

    # --- tensors -----------------------------------------------------------------------------------------
    def allocate_tensors(self) -> None:
        self._allocated = True  # buffers were allocated at load; kept for LiteRT's call sequence

    def _entry(self, tensor_index: int) -> tuple[TensorSpec, np.ndarray]:
        try:  # what LiteRT takes: an int, or anything that is one (numpy's); not 0.5 nor "0"
            tensor_index = operator.index(tensor_index)
        except TypeError:
            raise TypeError(f"a tensor index is an int (the details' 'index'), not {tensor_index!r}") \
                from None
        entry = self._by_index.get(tensor_index)
        if entry is None:
            raise InputError(f"tensor index {tensor_index} is not an input or output of this model "
                             f"(inputs and outputs: {sorted(self._by_index)})")
        return entry

    def _require_allocated(self, message: str) -> None:
        """LiteRT's ``ValueError`` for a tensor used before ``allocate_tensors()`` (or a signature run)."""
        if not self._allocated:
            raise ValueError(f"{message}. Run allocate_tensors() first")

    def set_tensor(self, tensor_index: int, value: Any) -> None:
        spec, target = self._entry(tensor_index)
        self._require_allocated("Cannot set tensor: Tensor is unallocated")
        if spec.index not in self._input_index:
            raise InputError(f"tensor {spec.index} ({spec.name!r}) is an output; only inputs can be set")
        value = np.asarray(value)
        if value.dtype.newbyteorder("=") != spec.dtype:  # either byte order, as LiteRT takes it
            raise InputError(f"Cannot set tensor: got value of type {value.dtype} but expected type "
                             f"{spec.dtype} for input {spec.index}, name: {spec.name}")
        if value.shape != spec.shape:
            raise InputError(f"Cannot set tensor: dimension mismatch, got {list(value.shape)} but expected "
                             f"{list(spec.shape)} for input {spec.index}, name: {spec.name}")
        with self._lock:
            self._model.check_not_closed()  # rather than write where nothing will read it
            np.copyto(target, value)

    def get_tensor(self, tensor_index: int, subgraph_index: int = 0) -> np.ndarray:
        _one_subgraph(subgraph_index)
        _, value = self._entry(tensor_index)
        self._require_allocated("Tensor data is null")
        with self._lock:
            self._model.check_not_closed()  # rather than the values of before the close (or the fork)
            return value.copy()

    def tensor(self, tensor_index: int) -> Callable[[], np.ndarray]:
        """A function returning a writable view of an input (read at ``invoke``) or of an output."""
        _, value = self._entry(tensor_index)

        def view() -> np.ndarray:
            self._require_allocated("Tensor data is null")
            self._model.check_not_closed()  # rather than the values of before the close
            return value

        return view

    def resize_tensor_input(self, input_index: int, tensor_size: Any, strict: bool = False) -> None:
        spec, _ = self._entry(input_index)
        if spec.index not in self._input_index:
            raise InputError(f"tensor {spec.index} ({spec.name!r}) is not an input")
        if tuple(int(d) for d in tensor_size) != spec.shape:
            raise InputError(f"a protected model has fixed input shapes: {spec.name!r} is "
                             f"{list(spec.shape)}, cannot resize to {[int(d) for d in tensor_size]} "
                             "(convert a model exported with that shape)")

    def _forget_after_fork(self, parent: int) -> None:
        # The model closes itself in the child; this lock may have been held by an invoke of the parent's.
        self._lock._at_fork_reinit()

    def invoke(self) -> None:
        if not self._allocated:  # as LiteRT refuses it (an app that works there calls allocate_tensors), as
            # it refuses tensors used before (_require_allocated)
            raise RuntimeError("Invoke called on model that is not ready: call allocate_tensors() first")
        with self._lock:
            self._model._infer_into(self._input_values, self._output_values)

    def reset_all_variables(self) -> None:
        pass  # a protected model has no variable tensors

    # --- signatures --------------------------------------------------------------------------------------
    def _has_signature(self) -> bool:
        return bool(self._model.artifacts.manifest.get("signature"))  # recorded when the original had one

    def get_signature_list(self) -> dict[str, dict[str, list[str]]]:
        if not self._has_signature():
            return {}  # as LiteRT on a model without SignatureDefs
        sig = self._model.artifacts.signature
        return {sig.key: {"inputs": list(sig.inputs), "outputs": list(sig.outputs)}}

    def get_signature_runner(self, signature_key: str | None = None) -> SignatureRunner:
        """The original model's signature (its only one), sharing this interpreter's tensors as LiteRT's
        runner does: ``get_tensor`` then reads what the runner's last call set and computed."""
        if not self._has_signature():
            if signature_key is not None:  # LiteRT's message for a key the model does not have
                raise ValueError(f'Invalid signature_key provided: "{signature_key}"')
            raise ValueError("SignatureDef signature_key is None and model has 0 Signatures. None is only "
                             "allowed when the model has 1 SignatureDef")
        key = self._model.artifacts.signature.key
        if signature_key is not None and signature_key != key:
            raise ValueError(f'Invalid signature_key provided: "{signature_key}" (this model has "{key}")')
        return SignatureRunner(self)

    # --- life cycle (not in LiteRT's surface, which relies on garbage collection) -------------------------
    @property
    def protected_model(self) -> ProtectedModel:
        return self._model

    def close(self) -> None:
        self._model.close()

    def __enter__(self) -> Interpreter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SignatureRunner:
    """The original model's signature, as LiteRT's ``SignatureRunner``: ``runner(**inputs) -> {name: array}``.
    """

    def __init__(self, interpreter: Interpreter) -> None:
        model = interpreter.protected_model
        self._interpreter = interpreter
        self._model = model
        sig = model.artifacts.signature
        by_name = {t.name: t for t in model.inputs + model.outputs}
        self._inputs = {k: by_name[v] for k, v in sig.inputs.items()}
        order = {t.name: i for i, t in enumerate(model.inputs)}
        self._positions = {k: order[t.name] for k, t in self._inputs.items()}
        self._outputs = {k: by_name[v] for k, v in sig.outputs.items()}
        position = {t.name: i for i, t in enumerate(model.outputs)}
        self._output_positions = [(k, position[t.name]) for k, t in self._outputs.items()]

    def __call__(self, **kwargs: Any) -> dict[str, np.ndarray]:
        if len(kwargs) != len(self._inputs):
            raise InputError(f"Invalid number of inputs provided for running a SignatureDef, expected "
                             f"{len(self._inputs)} vs provided {len(kwargs)}")
        unknown = [k for k in kwargs if k not in self._inputs]
        if unknown:
            raise InputError(f"Invalid Input name ({unknown[0]}) for SignatureDef; inputs are "
                             f"{list(self._inputs)}")
        # In the model's order, by the signature's own names: the model's name table lets a tensor's name
        # win over a signature's that is the same word.
        ordered = [np.asarray(kwargs[k]) for k in sorted(kwargs, key=self._positions.__getitem__)]
        arrays = self._model.check_inputs(ordered)
        it = self._interpreter
        it._allocated = True  # as LiteRT's runner allocates the tensors it runs on
        with it._lock:  # the interpreter's own tensors, as LiteRT's runner uses its subgraph's
            for target, value in zip(it._input_values, arrays, strict=True):
                np.copyto(target, value)
            self._model._infer_into(it._input_values, it._output_values)
            return {k: it._output_values[i].copy() for k, i in self._output_positions}

    def get_input_details(self) -> dict[str, dict[str, Any]]:
        return {k: _details(t) for k, t in self._inputs.items()}

    def get_output_details(self) -> dict[str, dict[str, Any]]:
        return {k: _details(t) for k, t in self._outputs.items()}
