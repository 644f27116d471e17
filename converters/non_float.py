"""Tensors other than float32 across the TEE's buffers.

The TA's arena slots and shared buffers hold float32 only (``tee_sim.ta_shadownet_compile.check_spec``):
its kernels, copies and checks know one element type. A tensor of another type - a comparison's bool
mask, an argmax's indices, a class label given as input - that a later TEE step reads, or that is a
model input or output, crosses as float32 instead, encoded right after the LiteRT op that makes it (an
input: by the normal world, which writes its bytes) and decoded in each later step that reads it, both by
LiteRT ops of the TEE-side model, so both ends run in the LiteRT signature of the tensor's other
ops (``converters.plan_tee._non_float_spans``): BITCAST for 4- and 8-byte types (the same bytes; an 8-byte
element as two float32s) and CAST for narrower ones (bool, 8- and 16-bit integers, float16, every value of
which is a float32). Both are exact. The normal world reads and writes a model input's or output's shared
buffer in ``tee_sim.program.wire_dtype``: the tensor's own type, or float32 for the narrow ones.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from converters.graph import Graph
from shadownet.exceptions import UnsupportedOpError
from tee_sim.program import wire_dtype

CARRIED = frozenset(np.dtype(d) for d in (np.bool_, np.int8, np.uint8, np.int16, np.uint16, np.float16,
                                          np.int32, np.uint32, np.int64, np.uint64, np.float64))


def carry_across_steps(g: Graph, steps: list[list[int]]) -> tuple[Graph, list[list[int]]]:
    """A copy of ``g`` and ``steps`` (TEE op indices per step, in execution order) in which each non-float
    tensor made in one step and read in a later one, each model output and each model input that is not
    float32, is carried as float32. The copy's ``inputs`` / ``outputs`` are what shared memory holds: the
    model's own tensors, or their carriers (an input's carrier is decoded in each step that reads it).
    ``g`` itself is not changed; the copy only gains tensors and ops, so every id stays valid."""
    g = Graph(list(g.tensors), list(g.ops), list(g.inputs), list(g.outputs), g.signature)
    steps = [list(ops) for ops in steps]
    step_of = {i: k for k, ops in enumerate(steps) for i in ops}

    def decode_later(t: int, carrier: int, after: int) -> None:
        """Decode ``carrier`` in each step past ``after`` that reads ``t``, for its readers there."""
        tensor = g.tensors[t]
        for s in sorted({step_of[c] for c in g.consumers(t) if step_of.get(c, after) > after}):
            readers = [c for c in steps[s] if t in g.ops[c].inputs]
            decoded = _decode(g, carrier, f"{tensor.name}/decoded_in_step_{s}", tensor.shape, tensor.dtype)
            steps[s].insert(steps[s].index(readers[0]), len(g.ops) - 1)
            step_of[len(g.ops) - 1] = s
            for c in readers:
                g.ops[c] = dataclasses.replace(g.ops[c], inputs=tuple(decoded if x == t else x
                                                                      for x in g.ops[c].inputs))

    def wire(t: int, carrier: int) -> None:
        g.inputs = [carrier if x == t else x for x in g.inputs]
        g.outputs = [carrier if x == t else x for x in g.outputs]

    for t in list(g.inputs):
        if g.tensors[t].dtype != np.float32:
            _check_carried(g.tensors[t], "is a model input")
            carrier = _carrier(g, t)
            decode_later(t, carrier, -1)
            wire(t, carrier)
    for k in range(len(steps)):
        for i in list(steps[k]):
            for t in g.ops[i].outputs:
                tensor = g.tensors[t]
                if tensor.dtype == np.float32 or tensor.data is not None:
                    continue
                later = any(step_of.get(c, k) > k for c in g.consumers(t))
                if not later and t not in g.outputs:
                    continue
                _check_carried(tensor, "crosses between TEE steps" if later else "is a model output")
                carrier = _encode(g, t)
                steps[k].insert(steps[k].index(i) + 1, len(g.ops) - 1)
                step_of[len(g.ops) - 1] = k
                decode_later(t, carrier, k)
                wire(t, carrier)
    return g, steps


def _check_carried(tensor: Any, what: str) -> None:
    if tensor.dtype not in CARRIED:
        raise UnsupportedOpError(f"tensor {tensor.name!r} ({tensor.dtype}) {what}: only float32 and "
                                 f"{', '.join(sorted(d.name for d in CARRIED))} tensors can")


def tee_shape(shape: tuple[int, ...], dtype: np.dtype) -> tuple[int, ...]:
    """The float32 shape that carries a tensor of ``shape`` and ``dtype`` (an 8-byte element: two)."""
    return (*shape, 2) if np.dtype(dtype).itemsize == 8 else tuple(shape)


def _carrier(g: Graph, t: int) -> int:
    """A float32 tensor that carries tensor ``t``."""
    tensor = g.tensors[t]
    return g.add_tensor(f"{tensor.name}/as_float32", tee_shape(tensor.shape, tensor.dtype), np.float32)


def _encode(g: Graph, t: int) -> int:
    carrier = _carrier(g, t)
    g.add_op(_op(g.tensors[t].dtype), [t], [carrier])
    return carrier


def _decode(g: Graph, carrier: int, name: str, shape: tuple[int, ...], dtype: np.dtype) -> int:
    decoded = g.add_tensor(name, shape, dtype)
    g.add_op(_op(dtype), [carrier], [decoded])
    return decoded


def _op(dtype: np.dtype) -> str:
    return "CAST" if wire_dtype(dtype) == np.float32 else "BITCAST"
