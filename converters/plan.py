"""From a partitioned graph to the contents of the three artifacts.

``build`` obfuscates every offloaded op with the scheme, writes the accelerator's model (one signature
``round_r`` per round: obfuscated weights only, no bias, no activation), draws the push masks, computes
the pop masks by linearity (float64, through the obfuscated layer and the restore), and lays out the TEE
program: per step, an instruction list over named buffers (see ``tee_sim.ta_shadownet``), the TEE-side
``.tflite`` (one signature ``step_k`` with the step's other ops), a secure arena where tensors that live
across instructions get slots (shared by tensors whose lifetimes do not overlap), and the shared-memory
layout that the manifest publishes.

Where a tensor lives in the TEE: a restore writes straight into the LiteRT input tensor that consumes it
when that is its only use in the step; LiteRT outputs are read in place within their step; anything needed
in a later step is kept in a slot. Shared memory: round ``r``'s inputs and outputs share one bank (the
runtime copies inputs into the accelerator before it runs), consecutive rounds use alternate banks, so
step ``r`` never reads and writes the same bytes and the layout stays two rounds big however deep the
model.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from converters import linear
from converters.graph import Graph, Signature, write_model
from converters.partition import Partition
from converters.schemes import ActivationStats, LinearLayer, ObfuscatedLinear, Scheme
from shadownet.exceptions import UnsupportedOpError

ALIGN = 64
# Activations the TEE applies in place right after a restore (same float32 results as LiteRT's kernels).
NUMPY_ACTIVATIONS = frozenset({"RELU", "RELU6", "RELU_N1_TO_1", "LEAKY_RELU"})
PROGRAM_FORMAT = "shadownet-tee-program"


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


@dataclass
class Plan:
    """What ``build`` produces: ``untrusted`` (.tflite bytes), the TEE ``program`` (JSON-able, without the
    untrusted model's hash yet) and its ``arrays``, the public ``rounds`` / ``buffers`` of the manifest."""

    untrusted: bytes
    program: dict[str, Any]
    arrays: dict[str, np.ndarray]
    rounds: list[dict[str, Any]]
    buffers: list[dict[str, Any]]
    shared_memory_size: int
    summary: dict[str, Any] = field(default_factory=dict)


def _check_linear(graph: Graph, i: int) -> None:
    op = graph.ops[i]
    tensors = [graph.tensors[op.inputs[0]], graph.tensors[op.outputs[0]], graph.tensors[op.inputs[1]]]
    if any(t.dtype != np.float32 for t in tensors):
        raise UnsupportedOpError(f"{graph.describe_op(i)}: only float32 linear ops can be offloaded "
                                 f"({', '.join(str(t.dtype) for t in tensors)})")
    if len(op.inputs) > 2 and op.inputs[2] >= 0 and graph.tensors[op.inputs[2]].data is None:
        raise UnsupportedOpError(f"{graph.describe_op(i)}: its bias is computed, not a constant")
    in_channels = graph.tensors[op.inputs[0]].shape[-1]
    if op.kind == "CONV_2D" and graph.tensors[op.inputs[1]].shape[-1] != in_channels:
        raise UnsupportedOpError(f"{graph.describe_op(i)}: grouped convolution is not supported")


class _Builder:
    def __init__(self, graph: Graph, part: Partition, scheme: Scheme, rng: np.random.Generator,
                 stats: dict[int, ActivationStats]) -> None:
        self.g, self.part, self.scheme, self.rng, self.stats = graph, part, scheme, rng, stats
        self.R = len(part.rounds)
        self.arrays: dict[str, np.ndarray] = {}
        self.untrusted = Graph()
        self.signatures: list[Signature] = []
        self.shared: dict[str, dict[str, Any]] = {}

    # -- accelerator side ------------------------------------------------------------------------------
    def obfuscate_rounds(self) -> None:
        g, u = self.g, self.untrusted
        self.fused: dict[int, int] = {}  # offloaded op -> the activation op the restore applies
        self.pads: dict[int, int] = {}  # padded tensor -> the PAD op a push does instead
        self.result: dict[int, int] = {}  # offloaded op -> the tensor its restore produces
        self.pushes: list[list[dict[str, Any]]] = []  # per round: {tensor, name, permutation, mask}
        self.restores: list[list[dict[str, Any]]] = []  # per round: {op, name, tensor, ...arrays}
        for r, ops in enumerate(self.part.rounds, start=1):
            pushes: dict[Any, dict[str, Any]] = {}
            restores = []
            sig_in: dict[str, int] = {}
            sig_out: dict[str, int] = {}
            sig_ops = []
            for i in ops:
                _check_linear(g, i)
                op = g.ops[i]
                x, w_id, y = op.inputs[0], op.inputs[1], op.outputs[0]
                weights = g.tensors[w_id].data
                mult = int(getattr(op.options, "depthMultiplier", 1) or 1)
                if op.kind == "DEPTHWISE_CONV_2D":
                    mult = weights.shape[-1] // g.tensors[x].shape[-1]
                name = f"{g.describe_op(i)}"
                try:
                    obf = self.scheme.obfuscate(LinearLayer(op.kind, weights, mult, name), self.rng)
                except ValueError as exc:
                    raise UnsupportedOpError(f"{name}: {exc}") from None
                key = (x, i) if obf.input_permutation is not None else (x, None)
                if key not in pushes:
                    j = len(pushes)
                    shape = g.tensors[x].shape
                    tid = u.add_tensor(f"round_{r}/x{j}", shape, np.float32)
                    sig_in[f"x{j}"] = tid
                    stats = self.stats.get(x) or ActivationStats.unit(shape[-1])
                    mask = self.scheme.push_mask(shape, stats.permuted(obf.input_permutation), self.rng)
                    source, pad = self._zero_pad(x)
                    pushes[key] = {"tensor": source, "pad": pad, "shape": shape, "name": f"x{j}",
                                   "untrusted": tid, "permutation": obf.input_permutation, "mask": mask}
                push = pushes[key]
                j = len(restores)
                out_shape = g.tensors[y].shape
                m = obf.weights.shape[-1] if op.kind == "DEPTHWISE_CONV_2D" else obf.weights.shape[0]
                obf_shape = (*out_shape[:-1], m)
                w = u.add_tensor(f"round_{r}/w{j}", obf.weights.shape, np.float32, obf.weights)
                yt = u.add_tensor(f"round_{r}/y{j}", obf_shape, np.float32)
                options = copy.copy(op.options)
                sig_ops.append(u.add_op(op.kind, [push["untrusted"], w, -1], [yt], options,
                                        version=op.version))
                sig_out[f"y{j}"] = yt
                bias = None
                if len(op.inputs) > 2 and op.inputs[2] >= 0:
                    bias = g.tensors[op.inputs[2]].data.astype(np.float64)
                pop = self._pop(op.kind, obf, push["mask"], options, obf_shape)
                offset = (-pop if bias is None else bias - pop).astype(np.float32)
                consumers = g.consumers(y)
                if (len(consumers) == 1 and y not in g.outputs
                        and _numpy_activation(g.ops[consumers[0]])
                        and len(g.ops[consumers[0]].inputs) == 1):
                    self.fused[i] = consumers[0]
                self.result[i] = g.ops[self.fused[i]].outputs[0] if i in self.fused else y
                restores.append({"op": i, "name": f"y{j}", "tensor": self.result[i], "obf": obf,
                                 "offset": offset, "obf_shape": obf_shape,
                                 "activation": g.ops[self.fused[i]] if i in self.fused else None})
            self.signatures.append(Signature(f"round_{r}", sig_ops, sig_in, sig_out))
            self.pushes.append(list(pushes.values()))
            self.restores.append(restores)

    def _zero_pad(self, x: int) -> tuple[int, list[list[int]] | None]:
        """If ``x`` is a zero PAD feeding only offloaded ops, the push pads (the mask fills the border) and
        the PAD never runs in LiteRT, whose arenas would hold both the tensor and its padded copy."""
        g = self.g
        p = g.producer(x)
        if p is None or g.ops[p].kind not in ("PAD", "PADV2") or x in g.outputs:
            return x, None
        op = g.ops[p]
        paddings = g.tensors[op.inputs[1]].data
        if paddings is None or paddings.shape != (len(g.tensors[x].shape), 2) or np.any(paddings < 0):
            return x, None
        value = g.tensors[op.inputs[2]].data if op.kind == "PADV2" and len(op.inputs) > 2 else None
        if op.kind == "PADV2" and (value is None or np.any(value)):
            return x, None
        if not all(c in self.part.offloaded and g.ops[c].inputs[0] == x for c in g.consumers(x)):
            return x, None
        if g.tensors[op.inputs[0]].dtype != np.float32:
            return x, None
        self.pads[x] = p
        return op.inputs[0], paddings.astype(int).tolist()

    def _pop(self, kind: str, obf: ObfuscatedLinear, mask: np.ndarray, options: Any,
             obf_shape: tuple[int, ...]) -> np.ndarray:
        """The pop mask: the push mask through the obfuscated layer and the restore, in float64. Zero
        padding keeps every op exactly linear, so subtracting it removes the mask's whole effect."""
        y_obf = linear.apply(kind, mask.astype(np.float64), obf.weights, options, obf_shape)
        return obf.restore(y_obf)

    # -- TEE side --------------------------------------------------------------------------------------
    def plan_tee(self) -> None:
        g, R = self.g, self.R
        numpy_ops = set(self.fused.values()) | set(self.pads.values())
        produced_by: dict[int, tuple[str, int]] = {}
        for t in g.inputs:
            produced_by[t] = ("input", 0)
        for r, restores in enumerate(self.restores, start=1):
            for rest in restores:
                produced_by[rest["tensor"]] = ("restore", r)
        self.step_ops: list[list[int]] = []
        sig_inputs: list[list[int]] = []
        for k, ops in enumerate(self.part.steps):
            ops = [i for i in ops if i not in numpy_ops]
            self.step_ops.append(ops)
            inside: set[int] = set()
            needed: list[int] = []
            for i in ops:
                for t in g.ops[i].inputs:
                    if t >= 0 and g.tensors[t].data is None and t not in inside and t not in needed:
                        needed.append(t)
                inside.update(g.ops[i].outputs)
                for t in g.ops[i].outputs:
                    produced_by[t] = ("litert", k)
            sig_inputs.append(needed)
        uses: dict[int, set[tuple[int, str]]] = {}
        for k, needed in enumerate(sig_inputs):
            for t in needed:
                uses.setdefault(t, set()).add((k, "litert"))
        for r, pushes in enumerate(self.pushes, start=1):
            for p in pushes:
                uses.setdefault(p["tensor"], set()).add((r - 1, "push"))
        for t in g.outputs:
            uses.setdefault(t, set()).add((R, "output"))
        for t, _where in uses.items():
            if t not in produced_by:
                raise UnsupportedOpError(f"tensor {g.tensors[t].name!r} is needed in the TEE but never "
                                         "computed")
        sig_outputs: list[list[int]] = [[] for _ in range(R + 1)]
        for t, (kind, k) in produced_by.items():
            if kind == "litert" and any(not (s == k and what == "litert") for s, what in uses.get(t, ())):
                sig_outputs[k].append(t)
        self.sig_inputs, self.sig_outputs = sig_inputs, sig_outputs
        self.produced_by, self.uses = produced_by, uses

    def emit(self) -> None:
        """The instruction lists, slots and the TEE model."""
        g, R = self.g, self.R
        steps: list[list[dict[str, Any]]] = [[] for _ in range(R + 1)]
        slot_life: dict[int, list[int]] = {}  # tensor -> [first write, last read] (instruction numbers)
        seq = 0

        def add(k: int, instr: dict[str, Any], writes: int | None = None, reads: int | None = None) -> None:
            nonlocal seq
            seq += 1
            steps[k].append(instr)
            if writes is not None:
                slot_life.setdefault(writes, [seq, seq])
            if reads is not None:
                slot_life[reads][1] = max(slot_life[reads][1], seq)

        def sig_key(k: int) -> str:
            return f"step_{k}"

        def later(t: int, k: int) -> bool:
            return any(s > k for s, _ in self.uses.get(t, ()))

        home: dict[int, str] = {}  # where a tensor lives from its producer to its last use in that step
        slot = {t: f"slot:t{t}" for t in self.uses}

        def loc(t: int, k: int) -> tuple[str, int | None]:
            kind, at = self.produced_by[t]
            if at == k and t in home:
                return home[t], (t if home[t] == slot[t] else None)
            return slot[t], t

        for k in range(R + 1):
            if k == 0:
                for i, t in enumerate(g.inputs):
                    home[t] = f"shm:input/{i}"
                    if later(t, 0):
                        add(0, {"op": "copy", "src": home[t], "dst": slot[t]}, writes=t)
            if k >= 1:
                for rest in self.restores[k - 1]:
                    t = rest["tensor"]
                    only_here = {s for s, _ in self.uses.get(t, ())} <= {k}
                    if (k, "litert") in self.uses.get(t, ()) and only_here:
                        home[t] = f"in:{sig_key(k)}:t{t}"
                        writes = None
                    else:
                        home[t] = slot[t]
                        writes = t
                    name = f"r{k}/{rest['name']}"
                    obf: ObfuscatedLinear = rest["obf"]
                    self.arrays[f"{name}/index"] = obf.restore_index.astype(np.int32)
                    self.arrays[f"{name}/coef"] = obf.restore_coef.astype(np.float32)
                    self.arrays[f"{name}/offset"] = rest["offset"]
                    add(k, {"op": "restore", "src": f"shm:round_{k}/out/{rest['name']}", "dst": home[t],
                            "index": f"{name}/index", "coef": f"{name}/coef", "offset": f"{name}/offset",
                            **_activation_fields(rest["activation"])}, writes=writes)
            if self.step_ops[k]:
                for t in self.sig_inputs[k]:
                    src, reads = loc(t, k)
                    dst = f"in:{sig_key(k)}:t{t}"
                    if src != dst:
                        add(k, {"op": "copy", "src": src, "dst": dst}, reads=reads)
                add(k, {"op": "litert", "signature": sig_key(k)})
                for t in self.sig_outputs[k]:
                    home[t] = f"out:{sig_key(k)}:t{t}"
                    if later(t, k):
                        add(k, {"op": "copy", "src": home[t], "dst": slot[t]}, writes=t)
            if k < R:
                for _j, p in enumerate(self.pushes[k]):
                    name = f"r{k + 1}/{p['name']}"
                    self.arrays[f"{name}/mask"] = p["mask"]
                    perm = None
                    if p["permutation"] is not None:
                        perm = f"{name}/permutation"
                        self.arrays[perm] = p["permutation"].astype(np.int32)
                    src, reads = loc(p["tensor"], k)
                    add(k, {"op": "push", "src": src, "dst": f"shm:round_{k + 1}/in/{p['name']}",
                            "permutation": perm, "mask": f"{name}/mask", "pad": p["pad"]}, reads=reads)
            else:
                for i, t in enumerate(g.outputs):
                    src, reads = loc(t, k)
                    add(k, {"op": "copy", "src": src, "dst": f"shm:output/{i}"}, reads=reads)
        self.steps = steps
        self.slots, self.arena_size = _plan_arena(
            {f"t{t}": (g.tensors[t].shape, first, last) for t, (first, last) in slot_life.items()})
        sigs = []
        self.signature_specs: dict[str, dict[str, dict[str, list[int]]]] = {}
        arena_bytes = 0
        for k, ops in enumerate(self.step_ops):
            if not ops:
                continue
            inputs = {f"t{t}": t for t in self.sig_inputs[k]}
            outputs = {f"t{t}": t for t in self.sig_outputs[k]}
            sigs.append(Signature(sig_key(k), ops, inputs, outputs))
            self.signature_specs[sig_key(k)] = {
                "inputs": {n: list(g.tensors[t].shape) for n, t in inputs.items()},
                "outputs": {n: list(g.tensors[t].shape) for n, t in outputs.items()}}
            arena_bytes += _live_peak(g, ops, set(inputs.values()) | set(outputs.values()))
        for sig in sigs:
            for t in (*sig.inputs.values(), *sig.outputs.values()):
                if g.tensors[t].dtype != np.float32:
                    raise UnsupportedOpError(f"tensor {g.tensors[t].name!r} ({g.tensors[t].dtype}) crosses "
                                             "between TEE steps; only float32 tensors can")
        self.tee_model = write_model(g, sigs) if sigs else None
        self.tee_arena_bytes = arena_bytes

    # -- shared memory ---------------------------------------------------------------------------------
    def layout(self) -> None:
        g = self.g
        buffers: list[dict[str, Any]] = []
        offset = 0

        def put(name: str, shape: tuple[int, ...], at: int) -> int:
            nbytes = int(np.prod(shape, dtype=np.int64)) * 4
            buffers.append({"name": name, "offset": at, "nbytes": nbytes, "shape": list(shape),
                            "dtype": "float32"})
            return _align(at + nbytes)

        for i, t in enumerate(g.inputs):
            if g.tensors[t].dtype != np.float32:
                raise UnsupportedOpError(f"model input {g.tensors[t].name!r} is {g.tensors[t].dtype}, "
                                         "not float32")
            offset = put(f"input/{i}", g.tensors[t].shape, offset)
        for i, t in enumerate(g.outputs):
            if g.tensors[t].dtype != np.float32:
                raise UnsupportedOpError(f"model output {g.tensors[t].name!r} is {g.tensors[t].dtype}, "
                                         "not float32")
            offset = put(f"output/{i}", g.tensors[t].shape, offset)
        bank_size = [0, 0]
        placed = []
        for r in range(1, self.R + 1):
            ins = [(f"round_{r}/in/{p['name']}", p["shape"]) for p in self.pushes[r - 1]]
            outs = [(f"round_{r}/out/{rest['name']}", rest["obf_shape"]) for rest in self.restores[r - 1]]
            for group in (ins, outs):
                at = 0
                for name, shape in group:
                    placed.append((r % 2, name, shape, at))
                    at = _align(at + int(np.prod(shape, dtype=np.int64)) * 4)
                bank_size[r % 2] = max(bank_size[r % 2], at)
        bank_start = [offset, offset + bank_size[0]]
        for bank, name, shape, at in placed:
            put(name, shape, bank_start[bank] + at)
        self.buffers = buffers
        self.shared_memory_size = max(64, offset + bank_size[0] + bank_size[1])
        self.rounds = [{"signature": f"round_{r}",
                        "inputs": [{"name": p["name"], "buffer": f"round_{r}/in/{p['name']}"}
                                   for p in self.pushes[r - 1]],
                        "outputs": [{"name": rest["name"], "buffer": f"round_{r}/out/{rest['name']}"}
                                    for rest in self.restores[r - 1]]}
                       for r in range(1, self.R + 1)]


def _numpy_activation(op: Any) -> bool:
    if op.kind == "LEAKY_RELU":  # max(x, alpha * x) is LiteRT's x > 0 ? x : alpha * x only for alpha <= 1
        return 0 <= float(getattr(op.options, "alpha", -1)) <= 1
    return op.kind in NUMPY_ACTIVATIONS and len(op.inputs) == 1


def _activation_fields(op: Any) -> dict[str, Any]:
    if op is None:
        return {"activation": None, "alpha": None}
    alpha = float(np.float32(op.options.alpha)) if op.kind == "LEAKY_RELU" else None
    return {"activation": op.kind, "alpha": alpha}


def _live_peak(g: Graph, ops: list[int], pinned: set[int]) -> int:
    """Peak bytes of a signature's non-constant tensors when each is freed after its last use (what
    LiteRT's arena planner achieves, roughly); signature inputs and outputs live throughout."""
    def size(t: int) -> int:
        return int(np.prod(g.tensors[t].shape, dtype=np.int64)) * g.tensors[t].dtype.itemsize

    last: dict[int, int] = {}
    for k, i in enumerate(ops):
        for t in g.ops[i].inputs:
            if t >= 0 and g.tensors[t].data is None:
                last[t] = k
    live = sum(size(t) for t in pinned)
    peak = live
    for k, i in enumerate(ops):
        new = [t for t in g.ops[i].outputs if t not in pinned]
        live += sum(size(t) for t in new)
        peak = max(peak, live)
        live -= sum(size(t) for t in {*g.ops[i].inputs, *new} - pinned if t >= 0 and last.get(t, k) <= k)
    return peak


def _plan_arena(items: dict[str, tuple[tuple[int, ...], int, int]]) -> tuple[dict[str, dict[str, Any]], int]:
    """Offsets in one secure arena for float32 tensors live over [first, last] instruction numbers; tensors
    whose lifetimes do not overlap share bytes (greedy, biggest first, lowest free offset)."""
    placed: list[tuple[int, int, int, int]] = []  # offset, end, first, last
    slots: dict[str, dict[str, Any]] = {}
    order = sorted(items.items(), key=lambda kv: (-int(np.prod(kv[1][0], dtype=np.int64)), kv[1][1]))
    for name, (shape, first, last) in order:
        nbytes = int(np.prod(shape, dtype=np.int64)) * 4
        busy = sorted((o, e) for o, e, f, lst in placed if not (lst < first or last < f))
        offset = 0
        for o, e in busy:
            if offset + nbytes <= o:
                break
            offset = max(offset, _align(e))
        placed.append((offset, offset + nbytes, first, last))
        slots[name] = {"offset": offset, "shape": list(shape), "dtype": "float32"}
    size = max((_align(e) for _, e, _, _ in placed), default=0)
    return slots, max(size, ALIGN)


def build(graph: Graph, part: Partition, scheme: Scheme, rng: np.random.Generator,
          stats: dict[int, ActivationStats]) -> Plan:
    """Obfuscate, mask and lay out a partitioned, normalized graph (see the module docstring)."""
    b = _Builder(graph, part, scheme, rng, stats)
    b.obfuscate_rounds()
    b.plan_tee()
    b.emit()
    b.layout()
    untrusted = write_model(b.untrusted, b.signatures)
    arrays = dict(b.arrays)
    if b.tee_model is not None:
        arrays["tee_model"] = np.frombuffer(b.tee_model, np.uint8)
    program = {
        "format": PROGRAM_FORMAT,
        "scheme": scheme.name,
        "shared_memory_size": b.shared_memory_size,
        "shared_buffers": {x["name"]: {"offset": x["offset"], "shape": x["shape"], "dtype": x["dtype"]}
                           for x in b.buffers},
        "arena_size": b.arena_size,
        "slots": b.slots,
        "tee_model": "tee_model" if b.tee_model is not None else None,
        "tee_model_arena_bytes": b.tee_arena_bytes,
        "signatures": b.signature_specs,
        "steps": b.steps,
    }
    summary = {"rounds": b.R, "offloaded_ops": sum(len(r) for r in part.rounds),
               "tee_litert_ops": sum(len(s) for s in b.step_ops), "tee_numpy_activations": len(b.fused)}
    return Plan(untrusted, program, arrays, b.rounds, b.buffers, b.shared_memory_size, summary)
