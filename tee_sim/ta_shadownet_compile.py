"""How the ShadowNet trusted app turns a loaded program into the closures RUN_STEP calls.

A program names its arrays by reference: ``slot:NAME`` (the secure arena; ``slot:NAME@axis:start:stop`` a
slice of it), ``const:NAME`` (the sealed arrays and the per-inference material), ``shm:NAME`` (a buffer
in the normal world's shared memory, bound by BIND_SHARED_MEMORY) and ``in:`` / ``out:`` (the TEE-side
LiteRT interpreter's tensors). ``resolve`` maps a reference to its array; ``compile_instruction`` one
instruction to a closure over those arrays, so a step allocates nothing and looks nothing up.
``checked_placement`` checks where the normal world placed the shared buffers. ``model`` is the TA's
loaded model (``tee_sim.ta_shadownet._Model``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import numpy as np

from tee_sim.errors import TEE_ERROR_BAD_PARAMETERS, TEE_ERROR_GENERIC, TEEC_ORIGIN_TRUSTED_APP, TEEError
from tee_sim.program import ALIGN
from tee_sim.ta_shadownet_depthwise import compile_depthwise, pack_weights
from tee_sim.ta_shadownet_max_pool import compile_max_pool
from tee_sim.ta_shadownet_numpy_ops import compile_numpy, slice_along
from tee_sim.ta_shadownet_restore_push import compile_push, compile_restore, elements
from tee_sim.ta_shadownet_small_ops import (
    compile_copy,
    compile_mean,
    compile_smooth_activation,
    compile_softmax,
)


def resolve(model: Any, ref: str) -> np.ndarray:
    """The array a program's reference names (module docstring); ValueError on a bad slice."""
    ref, _, part = ref.partition("@")  # "slot:tN@axis:start:stop": a slice of a slot
    if ref.startswith("shm:"):
        array = model.shm[ref[4:]]
    elif ref.startswith("const:"):
        array = model.arrays[ref[6:]]
    else:
        array = model.views[ref]
    if part:
        axis, start, stop = (int(x) for x in part.split(":"))
        if not (ref.startswith("slot:") and 0 <= axis < array.ndim
                and 0 <= start < stop <= array.shape[axis]):
            raise ValueError(f"bad slice {part} of {ref} {array.shape}")
        array = slice_along(array, axis, start, stop)
    return array


def shape_of(model: Any, ref: str) -> tuple[int, ...]:
    """The shape of what ``ref`` names, shared buffers included before they are bound."""
    if ref.startswith("shm:"):
        return tuple(model.program["shared_buffers"][ref[4:]]["shape"])
    return resolve(model, ref).shape


def prepare_depthwise(model: Any, steps: list[list[dict[str, Any]]], packed: dict[str, np.ndarray],
                      reserve: Callable[[int], None]) -> None:
    """At load, each depthwise layer's weights in its kernel's layout (``pack_weights``):
    ``model.depthwise``, by the weights' reference. Made once per program, into ``packed`` (the sessions of
    a model share them, as they share its program), each counted in secure memory by ``reserve(nbytes)``.
    ValueError for weights that are not one of the program's constants (packed once, they could not follow
    a buffer's changes)."""
    for instr in (i for step in steps for i in step if i["op"] == "depthwise"):
        ref = instr["srcs"][1]
        if not (isinstance(ref, str) and ref.startswith("const:")):
            raise ValueError(f"depthwise weights {ref!r}: not a constant")
        if ref not in packed:
            weights = pack_weights(resolve(model, ref))
            if weights is None:  # not a depthwise layer's: compile_depthwise refuses it
                continue
            reserve(weights.nbytes)
            packed[ref] = weights
        model.depthwise[ref] = packed[ref]


def compile_instruction(model: Any, instr: dict[str, Any]) -> Callable[[], Any]:
    """One instruction of a step as a closure over its arrays; ValueError when it does not fit them."""
    op = instr["op"]
    written = [*instr.get("dsts", ()), *([instr["dst"]] if "dst" in instr else [])]
    if any(not isinstance(ref, str) or ref.startswith("const:") for ref in written):
        raise ValueError(f"{op} writes into {written}: the sealed constants are read-only")
    if op == "litert":
        wrapper, sub = model.interpreter._interpreter, model.subgraphs[instr["signature"]]

        def invoke() -> None:
            try:
                wrapper.Invoke(sub)
            except RuntimeError as exc:  # an op failed on this input (a GATHER index out of range): said so,
                # not a panic, which would end every session of the app (the failed step ends the inference).
                if type(exc) is not RuntimeError:  # NotImplementedError, RecursionError: not LiteRT's
                    raise
                # The op's name only: LiteRT's text numbers the nodes of the sealed TEE model, and some
                # kernels print values.
                ops = ", ".join(sorted(set(re.findall(r"\(([A-Z][A-Z0-9_]*)\) failed to invoke", str(exc)))))
                raise TEEError(TEE_ERROR_GENERIC, TEEC_ORIGIN_TRUSTED_APP,
                               f"an op of the model{f' ({ops})' if ops else ''} failed on this input in the "
                               "TEE: LiteRT's kernel refused it") from None

        return invoke
    if op in ("max_pool", "mean", "softmax"):
        (src,), (dst,) = ([resolve(model, r) for r in instr[k]] for k in ("srcs", "dsts"))
        if op == "mean":
            return compile_mean(src, dst)
        if op == "softmax":
            return compile_softmax(instr, src, dst)
        return compile_max_pool(instr, src, dst)
    if op == "depthwise":
        (src, weights, bias), (dst,) = ([resolve(model, r) for r in instr[k]] for k in ("srcs", "dsts"))
        return compile_depthwise(instr, src, weights, bias, dst, model.depthwise.get(instr["srcs"][1]))
    if op == "activation" and instr.get("activation") in ("LOGISTIC", "HARD_SWISH", "GELU"):  # one C call
        (src,), (dst,) = ([resolve(model, r) for r in instr[k]] for k in ("srcs", "dsts"))  # where dense
        kernel = compile_smooth_activation(instr["activation"], src, dst, instr.get("approximate") is True)
        if kernel is not None:
            return kernel
    if op == "reshape":  # one C call where both sides are dense (the fast path runs it), else numpy's
        (src,), (dst,) = ([resolve(model, r) for r in instr[k]] for k in ("srcs", "dsts"))
        kernel = compile_copy(src, dst)
        if kernel is not None:
            return kernel
    if "srcs" in instr:
        return compile_numpy(instr, [resolve(model, r) for r in instr["srcs"]],
                             [resolve(model, r) for r in instr["dsts"]])
    src, dst = resolve(model, instr["src"]), resolve(model, instr["dst"])
    if op == "copy":
        if src.shape != dst.shape or src.dtype != dst.dtype:
            raise ValueError(f"copy {instr['src']} -> {instr['dst']}: {src.shape} vs {dst.shape}")
        return compile_copy(src, dst) or (lambda: np.copyto(dst, src))
    compile_ = {"push": compile_push, "restore": compile_restore}.get(op)
    if compile_ is None:
        raise ValueError(f"unknown instruction {op!r}")
    extra = {}
    if op == "restore" and instr.get("addend"):  # a residual block's shortcut
        extra["addend"] = resolve(model, instr["addend"])
    if model.online is not None and model.online.enabled:
        return model.online.kernels.wrap(instr, src, dst,
                                         lambda s, d, **kw: compile_(model, instr, s, d, **extra, **kw))
    return compile_(model, instr, src, dst, **extra)


def checked_placement(data: bytes, program: dict[str, Any], size: int) -> dict[str, int]:
    """BIND_SHARED_MEMORY's placement, checked: the normal world chooses it, so every buffer must be named,
    aligned and inside the memory, and no step's buffers may overlap (no step may read what it writes
    itself). Buffers of different steps may: the runtime reuses memory round after round
    (``shadownet.artifacts.place_buffers``), and what the normal world does to its memory between steps
    it can do anyway."""
    specs = program["shared_buffers"]
    try:
        offsets = json.loads(data)
        if not isinstance(offsets, dict) or set(offsets) != set(specs):
            raise ValueError("it must name every shared buffer, and only those")
        span = {}
        for name, spec in specs.items():
            offset = count(offsets[name])
            check_spec({**spec, "offset": offset}, size, f"shared buffer {name!r}")
            span[name] = (offset, offset + elements(spec["shape"]) * 4)
        for k, step in enumerate(program["steps"]):
            spans = sorted((*span[name], name) for name in _shared_refs(step))
            for (_, end, a), (start, _, b) in zip(spans, spans[1:], strict=False):
                if start < end:
                    raise ValueError(f"buffers {a!r} and {b!r} of step {k} overlap")
    except (ValueError, TypeError, KeyError, RecursionError) as exc:
        raise TEEError(TEE_ERROR_BAD_PARAMETERS, TEEC_ORIGIN_TRUSTED_APP,
                       f"shared buffer placement: {exc}") from None
    return offsets


def _shared_refs(step: list[dict[str, Any]]) -> set[str]:
    """The shared buffers a step's instructions name (``shm:NAME``, alone or in a list)."""
    refs = set()
    for instr in step:
        for value in instr.values():
            for item in value if isinstance(value, list) else (value,):
                if isinstance(item, str) and item.startswith("shm:"):
                    refs.add(item[4:])
    return refs


def count(value: Any) -> int:
    """A size or offset from the program: a non-negative int (ValueError otherwise)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"expected a non-negative integer, not {value!r}")
    return value


def check_spec(spec: dict[str, Any], size: int, what: str) -> None:
    """A float32 buffer ``spec`` (offset, shape) aligned and inside ``size`` bytes (ValueError otherwise)."""
    offset = count(spec["offset"])
    dtype = np.dtype(spec["dtype"])
    if dtype != np.float32 or offset % ALIGN or offset + elements(spec["shape"]) * 4 > size:
        raise ValueError(f"{what}: {json.dumps(spec)} does not fit {size} bytes")


def view(arena: np.ndarray, spec: dict[str, Any], what: str) -> np.ndarray:
    """The float32 array ``spec`` places in ``arena`` (bytes), checked."""
    check_spec(spec, arena.nbytes, what)
    n = elements(spec["shape"])
    return arena[spec["offset"]:spec["offset"] + 4 * n].view(np.float32).reshape(spec["shape"])
