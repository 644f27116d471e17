"""Shapes an open batch leaves to run time, folded at batch 1.

TensorFlow writes a Keras model exported with an open batch (``TFLiteConverter.from_keras_model``'s
default) with shape arithmetic in the graph: a Dense on a 3-D input reshapes by ``SHAPE`` -> ``GATHER`` ->
``REDUCE_PROD`` -> ``PACK``, a Flatten by ``SHAPE`` -> ``STRIDED_SLICE`` -> ``PACK``. LiteRT evaluates it
at every invoke; the TEE program, preallocated and bound to fixed buffers, cannot follow a shape that
changes. A protected model has batch 1, so such a value is a constant: every tensor computed from shapes
and constants alone (``shape_only``; an integer shape, or a float made of one) takes the value LiteRT
computes at batch 1, and the ops that computed it go. The shape of a tensor whose size is data (``WHERE``'s
output, say) is data itself: it stays, and a shape computed from it is refused
(``converters.original_model.check_static``), as is one computed from values.
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
    # A detection head's non-maximum suppression: outputs of max_output_size rows, padded (LiteRT sizes them
    # in Prepare from a constant, and makes them dynamic for a computed one).
    "NON_MAX_SUPPRESSION_V4": (2,), "NON_MAX_SUPPRESSION_V5": (2,),
}
# Ops whose outputs are not a function of their inputs' values (random, stateful, calls).
_IMPURE = frozenset({"RANDOM_STANDARD_NORMAL", "RANDOM_UNIFORM", "MULTINOMIAL", "VAR_HANDLE", "READ_VARIABLE",
                     "ASSIGN_VARIABLE", "CALL_ONCE", "CALL", "CUSTOM", "WHILE", "IF"})
# Ops whose output's shape depends on their inputs' values: SHAPE of it is data, not a shape (and the TEE
# program, its buffers fixed, cannot hold such an output: converters.original_model refuses them).
DATA_SHAPED = frozenset({"WHERE", "UNIQUE"})
# Constants normalize() folds itself, exactly (a float16 weight's DEQUANTIZE, a sparse one's DENSIFY).
_LEFT_TO_NORMALIZE = frozenset({"DEQUANTIZE", "DENSIFY"})


def shape_only(graph: Graph) -> set[int]:
    """The computed tensors whose values depend on tensor shapes and constants alone: ``SHAPE``'s output
    when its input's shape is static (``_propagate``), and the outputs of a pure op all of whose inputs are
    constants or such tensors."""
    return _propagate(graph)[0]


def _propagate(graph: Graph) -> tuple[set[int], set[int]]:
    """(``shape_only`` tensors, tensors of static shape), in one pass in execution order. A shape is
    static - the same whatever the data, at batch 1 - for the model's inputs and constants, and for the
    outputs of a pure op whose output shape is not data (``DATA_SHAPED``), whose inputs' shapes are static
    and whose shape inputs (``SHAPE_INPUTS``) are constants or shape-only."""
    constants = {t for t, tensor in enumerate(graph.tensors) if tensor.data is not None}
    known, static = set(constants), constants | set(graph.inputs)
    for op in graph.ops:
        inputs = [t for t in op.inputs if t >= 0]
        if op.kind == "SHAPE":
            if inputs and inputs[0] in static:
                known.update(op.outputs)
        elif op.kind not in _IMPURE and inputs and all(t in known for t in inputs):
            known.update(op.outputs)
        shape_inputs = [op.inputs[i] for i in SHAPE_INPUTS.get(op.kind, ()) if i < len(op.inputs)]
        if op.kind not in DATA_SHAPED | _IMPURE and all(t in static for t in inputs) \
                and all(t < 0 or t in known for t in shape_inputs):
            static.update(op.outputs)
    return known - constants, static


def fold_shapes(graph: Graph, model: bytes) -> list[str]:
    """Make every ``shape_only`` tensor of ``graph`` (read from ``model``, tensor ids as in the file) the
    constant LiteRT computes at batch 1 (with its builtin kernels, every tensor kept), and drop the ops left
    computing nothing but constants. Returns the folded tensors' names."""
    made_by = {t: op.kind for op in graph.ops for t in op.outputs}
    targets = sorted(t for t in shape_only(graph) if made_by.get(t) not in _LEFT_TO_NORMALIZE)
    if not targets:
        return []
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    interpreter = Interpreter(model_content=model, num_threads=1, experimental_preserve_all_tensors=True,
                              experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
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
