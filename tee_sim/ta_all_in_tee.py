"""The all-in-TEE baseline: a whole, unprotected model run by LiteRT inside the secure world.

Commands and layout: ``tee_sim.ta_all_in_tee_commands``. The model's bytes are copied into secure memory
and LiteRT runs them there with one thread; inputs and outputs cross through registered shared memory.
Secure memory accounted: the model (its weights live in the flatbuffer) plus the activations LiteRT's
arena needs (the peak of live activation tensors in execution order, as its planner achieves); with
XNNPACK add its packed copy of the weights. GET_STATS also reports how much the secure world's resident
memory grew, as a check on that estimate.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from ai_edge_litert import schema_py_generated as schema_fb
from ai_edge_litert.tools import flatbuffer_utils

from tee_sim.errors import TEE_ERROR_BAD_FORMAT, TEE_ERROR_BAD_STATE
from tee_sim.params import (
    TEE_PARAM_TYPE_MEMREF_INOUT,
    TEE_PARAM_TYPE_MEMREF_INPUT,
    TEE_PARAM_TYPE_VALUE_INPUT,
    TEE_PARAM_TYPE_VALUE_OUTPUT,
    TAParams,
    check_param_types,
)
from tee_sim.ta import TrustedApp, bad_parameters, ta_error
from tee_sim.ta_all_in_tee_commands import KERNELS_BUILTIN, KERNELS_XNNPACK, UUID, Command, io_layout


def _resident_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def activation_peak(model: bytes) -> tuple[int, int]:
    """(bytes of constant tensors, peak bytes of live activations in execution order) of subgraph 0, from
    LiteRT's own object API (call it on bytes LiteRT's verifier accepted: the Interpreter's constructor)."""
    m = flatbuffer_utils.read_model_from_bytearray(bytearray(model))
    sub = m.subgraphs[0]

    def holds_data(index: int) -> bool:
        buffer = m.buffers[index] if 0 < index < len(m.buffers) else None
        return buffer is not None and (buffer.data is not None and len(buffer.data) > 0
                                       or (getattr(buffer, "offset", 0) or 0) > 1)

    constant = {t for t, tensor in enumerate(sub.tensors) if holds_data(tensor.buffer)}

    def size(t: int) -> int:
        tensor = sub.tensors[t]
        if tensor.type not in _ITEMSIZE:
            raise ValueError(f"tensor {t} has type {tensor.type}, which this TA does not size")
        shape = tensor.shape if tensor.shape is not None else ()
        return int(np.prod(shape, dtype=np.int64)) * _ITEMSIZE[tensor.type]

    constants = sum(size(t) for t in constant)
    ops = [([int(t) for t in op.inputs], [int(t) for t in op.outputs]) for op in sub.operators or ()]
    last: dict[int, int] = {}
    for k, (inputs, _) in enumerate(ops):
        for t in inputs:
            if t >= 0 and t not in constant:
                last[t] = k
    pinned = {int(t) for t in (*sub.inputs, *sub.outputs)}
    live = sum(size(t) for t in pinned)
    peak = live
    for k, (inputs, outputs) in enumerate(ops):
        new = [t for t in outputs if t not in pinned and t not in constant]
        live += sum(size(t) for t in new)
        peak = max(peak, live)
        dead = {t for t in (*inputs, *new) if t >= 0 and t not in pinned and t not in constant
                and last.get(t, k) <= k}
        live -= sum(size(t) for t in dead)
    return constants, peak


_ITEMSIZE = {getattr(schema_fb.TensorType, name): np.dtype(dtype).itemsize for name, dtype in (
    ("FLOAT32", "f4"), ("FLOAT16", "f2"), ("FLOAT64", "f8"), ("INT64", "i8"), ("INT32", "i4"),
    ("INT16", "i2"), ("INT8", "i1"), ("UINT8", "u1"), ("BOOL", "?"))}


class AllInTEETA(TrustedApp):
    """Runs a given ``.tflite`` entirely in the secure world (the all-in-TEE baseline)."""

    UUID = UUID
    VERSION = 1
    SIGNER = "shadownet"

    def open_session(self, params: TAParams) -> dict[str, Any]:
        check_param_types(params)
        return {}

    def close_session(self, session: dict[str, Any]) -> None:
        self._unload(session)

    def invoke_command(self, session: dict[str, Any], cmd_id: int, params: TAParams) -> None:
        if cmd_id == Command.RUN:
            check_param_types(params)
            run = session.get("run")
            if run is None:
                raise ta_error(TEE_ERROR_BAD_STATE, "no model loaded and bound to shared memory")
            run()
        elif cmd_id == Command.LOAD:
            check_param_types(params, TEE_PARAM_TYPE_MEMREF_INPUT, TEE_PARAM_TYPE_VALUE_INPUT)
            self._load(session, bytes(params[0].buffer), params[1].a)
        elif cmd_id == Command.BIND_SHARED_MEMORY:
            check_param_types(params, TEE_PARAM_TYPE_MEMREF_INOUT)
            self._bind(session, params[0])
        elif cmd_id == Command.GET_STATS:
            check_param_types(params, TEE_PARAM_TYPE_VALUE_OUTPUT)
            params[0].a = session.get("reserved", 0)
            params[0].b = max(_resident_bytes() - session.get("resident_before", 0), 0)
        else:
            super().invoke_command(session, cmd_id, params)

    def _load(self, session: dict[str, Any], model: bytes, kernels: int) -> None:
        from ai_edge_litert.interpreter import Interpreter, OpResolverType

        if kernels not in (KERNELS_XNNPACK, KERNELS_BUILTIN):
            raise bad_parameters(f"kernels must be {KERNELS_XNNPACK} (XNNPACK) or {KERNELS_BUILTIN} "
                                 "(builtin)")
        self._unload(session)
        session["resident_before"] = _resident_bytes()
        resolver = (OpResolverType.AUTO if kernels == KERNELS_XNNPACK
                    else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
        try:  # LiteRT's verifier first: the sizes below are read from bytes it accepted
            interpreter = Interpreter(model_content=model, num_threads=1,
                                      experimental_op_resolver_type=resolver)
        except (ValueError, RuntimeError) as exc:
            raise ta_error(TEE_ERROR_BAD_FORMAT, f"LiteRT cannot load the model: {exc}") from None
        try:
            constants, activations = activation_peak(model)
        except Exception as exc:  # noqa: BLE001 - any model it cannot size is the caller's bad format
            raise ta_error(TEE_ERROR_BAD_FORMAT, f"not a model this TA runs: {exc}") from None
        # The model's bytes, its activations, and XNNPACK's packed copy of the weights: reserved before
        # the arena is allocated, so that a model over the cap is refused rather than run.
        reserved = len(model) + activations + (constants if kernels == KERNELS_XNNPACK else 0)
        self.tee.reserve(reserved)
        session["reserved"] = reserved
        try:
            interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            self._unload(session)
            raise ta_error(TEE_ERROR_BAD_FORMAT, f"LiteRT cannot load the model: {exc}") from None
        session["interpreter"] = interpreter

    def _unload(self, session: dict[str, Any]) -> None:
        session.pop("run", None)
        session.pop("interpreter", None)
        self.tee.unreserve(session.pop("reserved", 0))

    def _bind(self, session: dict[str, Any], param: Any) -> None:
        interpreter = session.get("interpreter")
        if interpreter is None:
            raise ta_error(TEE_ERROR_BAD_STATE, "no model loaded")
        details = interpreter.get_input_details() + interpreter.get_output_details()
        shapes = [(tuple(int(x) for x in d["shape"]), np.dtype(d["dtype"])) for d in details]
        offsets, size = io_layout([int(np.prod(s, dtype=np.int64)) * t.itemsize for s, t in shapes])
        if param.buffer.nbytes < size:
            raise bad_parameters(f"shared memory of {param.buffer.nbytes} bytes, the layout needs {size}")
        views = [param.ndarray(t, s, o) for (s, t), o in zip(shapes, offsets, strict=True)]
        n_in = len(interpreter.get_input_details())
        tensors = [interpreter.tensor(d["index"]) for d in details]
        copy_in = list(zip(tensors[:n_in], views[:n_in], strict=True))
        copy_out = list(zip(views[n_in:], tensors[n_in:], strict=True))
        invoke = interpreter.invoke

        def run() -> None:
            for tensor, view in copy_in:
                np.copyto(tensor(), view)
            invoke()
            for view, tensor in copy_out:
                np.copyto(view, tensor())
        session["run"] = run
