"""Shapes an open batch leaves to run time, folded at batch 1.

TensorFlow writes a Keras model exported with an open batch (``TFLiteConverter.from_keras_model``'s
default) with shape arithmetic in the graph: a Dense on a 3-D input reshapes by ``SHAPE`` -> ``GATHER`` ->
``REDUCE_PROD`` -> ``PACK``, a Flatten by ``SHAPE`` -> ``STRIDED_SLICE`` -> ``PACK``. LiteRT evaluates it
at every invoke; the TEE program, preallocated and bound to fixed buffers, cannot follow a shape that
changes. A protected model has batch 1, so such a value is a constant: every integer tensor computed from
shapes and constants alone (``shape_only``) takes the value LiteRT computes at batch 1, and the ops that
computed it go. A shape computed from the data itself stays, and the converter refuses it
(``converters.pipeline``'s ``_check_static``).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from converters.graph import Graph

# Inputs that decide an op's output shape. A computed one makes LiteRT allocate the output while it runs
# (a dynamic tensor), which the TEE program, preallocated and bound to fixed buffers, cannot follow.
SHAPE_INPUTS: dict[str, tuple[int, ...]] = {
    "RESHAPE": (1,), "PAD": (1,), "PADV2": (1,), "MIRROR_PAD": (1,), "RESIZE_BILINEAR": (1,),
    "RESIZE_NEAREST_NEIGHBOR": (1,), "TILE": (1,), "SLICE": (1, 2), "STRIDED_SLICE": (1, 2, 3),
    "TRANSPOSE": (1,), "BROADCAST_TO": (1,), "SPLIT": (0,), "SPLIT_V": (1, 2), "MEAN": (1,), "SUM": (1,),
    "REDUCE_MAX": (1,), "REDUCE_MIN": (1,), "REDUCE_PROD": (1,), "REDUCE_ANY": (1,), "EXPAND_DIMS": (1,),
    "FILL": (0,), "ARG_MAX": (1,), "ARG_MIN": (1,), "ONE_HOT": (1,), "CUMSUM": (1,),
}
# Ops whose outputs are not a function of their inputs' values (random, stateful, calls).
_IMPURE = frozenset({"RANDOM_STANDARD_NORMAL", "RANDOM_UNIFORM", "MULTINOMIAL", "VAR_HANDLE", "READ_VARIABLE",
                     "ASSIGN_VARIABLE", "CALL_ONCE", "CALL", "CUSTOM", "WHILE", "IF"})


def shape_only(graph: Graph) -> set[int]:
    """The computed tensors whose values depend on tensor shapes and constants alone: ``SHAPE``'s output,
    and the outputs of a pure op all of whose inputs are constants or such tensors."""
    known = {t for t, tensor in enumerate(graph.tensors) if tensor.data is not None}
    constants = set(known)
    for op in graph.ops:  # in execution order
        inputs = [t for t in op.inputs if t >= 0]
        if op.kind == "SHAPE" or (op.kind not in _IMPURE and inputs and all(t in known for t in inputs)):
            known.update(op.outputs)
    return known - constants


def fold_shapes(graph: Graph, model: bytes) -> list[str]:
    """Make every integer ``shape_only`` tensor of ``graph`` (read from ``model``, tensor ids as in the
    file) the constant LiteRT computes at batch 1, and drop the ops left computing nothing but constants.
    Returns the folded tensors' names."""
    targets = [t for t in sorted(shape_only(graph)) if np.dtype(graph.tensors[t].dtype).kind in "iub"]
    if not targets:
        return []
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=model, num_threads=1, experimental_preserve_all_tensors=True)
    interpreter.allocate_tensors()
    for d in interpreter.get_input_details():
        interpreter.set_tensor(d["index"], np.zeros(d["shape"], d["dtype"]))
    interpreter.invoke()
    for t in targets:
        value = np.array(interpreter.get_tensor(t))
        value.flags.writeable = False
        graph.tensors[t] = replace(graph.tensors[t], data=value, shape=tuple(value.shape),
                                   shape_signature=None)
    graph.ops[:] = [op for op in graph.ops if not all(graph.tensors[t].data is not None for t in op.outputs)]
    return [graph.tensors[t].name for t in targets]
