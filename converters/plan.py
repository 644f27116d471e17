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
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from ai_edge_litert import schema_py_generated as schema_fb

from converters import linear
from converters.graph import Graph, Signature, fused_activation, write_model
from converters.partition import Partition
from converters.per_inference import describe, locate_weights
from converters.schemes import ActivationStats, LinearLayer, ObfuscatedLinear, Scheme
from shadownet.exceptions import ModelFormatError, UnsupportedOpError

ALIGN = 64
# Activations the TEE applies in place right after a restore (same float32 results as LiteRT's kernels).
NUMPY_ACTIVATIONS = frozenset({"RELU", "RELU6", "RELU_N1_TO_1", "LEAKY_RELU"})
PROGRAM_FORMAT = "shadownet-tee-program"
# Offloaded weights beyond this magnitude are no trained model's (a damaged file): added masks of the
# activations' scale times such a weight leave float32 too few digits for the layer's other outputs.
MAX_ABS_WEIGHT = 1e8


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
    _check_linear_shapes(graph, i)
    for t in op.inputs[1:3]:
        value = graph.tensors[t].data if t >= 0 else None
        if value is None or not value.size:
            continue
        if not np.all(np.isfinite(value)):
            raise ModelFormatError(f"{graph.describe_op(i)}: {graph.tensors[t].name!r} holds NaN or infinite "
                                   "values")
        largest = float(np.max(np.abs(value)))
        if largest > MAX_ABS_WEIGHT:
            raise ModelFormatError(f"{graph.describe_op(i)}: {graph.tensors[t].name!r} holds a value of "
                                   f"magnitude {largest:.3g}, beyond any trained model's (limit "
                                   f"{MAX_ABS_WEIGHT:g}): a damaged file?")


def _check_linear_shapes(graph: Graph, i: int) -> None:
    """The file's shapes of an offloaded op fit together (LiteRT's delegates do not always check)."""
    op = graph.ops[i]
    x, w, y = (graph.tensors[t].shape for t in (op.inputs[0], op.inputs[1], op.outputs[0]))
    bias = graph.tensors[op.inputs[2]].shape if len(op.inputs) > 2 and op.inputs[2] >= 0 else None
    o = op.options
    channels = None
    if op.kind == "FULLY_CONNECTED":
        ok = len(w) == 2 and min(w) > 0 and len(x) >= 1 and len(y) >= 1 and y[-1] == w[0] \
            and math.prod(x) % w[1] == 0 and math.prod(y) == math.prod(x) // w[1] * w[0]
        channels = w[0] if ok else None
    else:
        ok = len(x) == len(w) == len(y) == 4 and min(w) > 0 and o is not None \
            and min(o.strideH, o.strideW, o.dilationHFactor or 1, o.dilationWFactor or 1) >= 1
        if ok:
            same = o.padding == schema_fb.Padding.SAME
            out_h = linear._padding(x[1], w[1], o.strideH, o.dilationHFactor or 1, same)[0]
            out_w = linear._padding(x[2], w[2], o.strideW, o.dilationWFactor or 1, same)[0]
            channels = w[0] if op.kind == "CONV_2D" else w[3]
            ok = y == (x[0], out_h, out_w, channels) and out_h > 0 and out_w > 0 \
                and (op.kind == "CONV_2D" or (w[0] == 1 and w[3] % x[3] == 0))
    if not ok or (bias is not None and bias != (channels,)):
        raise ModelFormatError(f"corrupt TFLite model: {graph.describe_op(i)} has input {list(x)}, weights "
                               f"{list(w)}, bias {bias and list(bias)} and output {list(y)}, which do not "
                               "fit together")


class _Builder:
    def __init__(self, graph: Graph, part: Partition, scheme: Scheme, rng: np.random.Generator,
                 stats: dict[int, ActivationStats], one_time_rounds: Sequence[int]) -> None:
        self.g, self.part, self.scheme, self.rng, self.stats = graph, part, scheme, rng, stats
        self.one_time = set(one_time_rounds)
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
                    obf = self.scheme.obfuscate(LinearLayer(op.kind, weights, mult, name,
                                                            g.tensors[x].shape[-1]), self.rng)
                except ValueError as exc:
                    raise UnsupportedOpError(f"{name}: {exc}") from None
                transformed = obf.input_permutation is not None or obf.input_index is not None
                key = (x, i) if transformed else (x, None)
                if key not in pushes:
                    j = len(pushes)
                    shape = g.tensors[x].shape
                    tid = u.add_tensor(f"round_{r}/x{j}", shape, np.float32)
                    sig_in[f"x{j}"] = tid
                    stats = self.stats.get(x) or ActivationStats.unit(shape[-1])
                    stats = stats.for_input_of(obf)
                    # One-time rounds: the TEE draws the mask per inference (converters.per_inference).
                    one_time = r in self.one_time
                    mask = None if one_time else self.scheme.push_mask(shape, stats, self.rng)
                    source, pad = self._zero_pad(x)
                    pushes[key] = {"tensor": source, "pad": pad, "shape": shape, "name": f"x{j}",
                                   "untrusted": tid, "permutation": obf.input_permutation, "mask": mask,
                                   "one_time": one_time, "stats": stats,
                                   "mix": None if obf.input_index is None
                                   else (obf.input_index, obf.input_coef)}
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
                # The offset: the bias minus the pop mask, a full tensor; per channel when unmasked.
                offset = np.zeros(out_shape[-1]) if bias is None else bias.reshape(out_shape[-1])
                if push["mask"] is not None:
                    offset = offset - self._pop(op.kind, obf, push["mask"], options, obf_shape)
                offset = offset.astype(np.float32)
                consumers = g.consumers(y)
                if (len(consumers) == 1 and y not in g.outputs
                        and _numpy_activation(g.ops[consumers[0]])
                        and len(g.ops[consumers[0]].inputs) == 1):
                    self.fused[i] = consumers[0]
                self.result[i] = g.ops[self.fused[i]].outputs[0] if i in self.fused else y
                restores.append({"op": i, "name": f"y{j}", "tensor": self.result[i], "obf": obf,
                                 "offset": offset, "obf_shape": obf_shape, "push": push["name"],
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
        """Each step's ops as units run in order: one numpy instruction per op the TA does itself
        (``_numpy_form``), and runs of consecutive other ops as one LiteRT signature each."""
        g, R = self.g, self.R
        skip = set(self.fused.values()) | set(self.pads.values())
        produced_by: dict[int, tuple[str, int]] = {t: ("input", 0) for t in g.inputs}
        for r, restores in enumerate(self.restores, start=1):
            for rest in restores:
                produced_by[rest["tensor"]] = ("restore", r)
        self.units: list[list[dict[str, Any]]] = []
        uses: dict[int, set[tuple[int, str]]] = {}  # tensor -> {(step, consumer)}

        def use(t: int, k: int, who: str) -> None:
            if t >= 0 and g.tensors[t].data is None:
                uses.setdefault(t, set()).add((k, who))

        for k, ops in enumerate(self.part.steps):
            units: list[dict[str, Any]] = []
            run: list[int] = []

            def flush(k: int = k, units: list[dict[str, Any]] = units, run: list[int] = run) -> None:
                if run:
                    count = sum(u["kind"] == "litert" for u in units)
                    key = f"step_{k}" + (f"_{count}" if count else "")
                    units.append({"kind": "litert", "key": key, "ops": list(run)})
                    run.clear()

            for i in ops:
                if i in skip:
                    continue
                numpy_form = _numpy_form(g, i)
                if numpy_form is None:
                    run.append(i)
                else:
                    flush()
                    form, data = numpy_form
                    units.append({"kind": "numpy", "key": f"numpy:{i}", "ops": [i], "form": form,
                                  "data": data})
            flush()
            for unit in units:
                inside: set[int] = set()
                needed: list[int] = []
                for i in unit["ops"]:
                    for t in g.ops[i].inputs:
                        if t >= 0 and g.tensors[t].data is None and t not in inside and t not in needed:
                            needed.append(t)
                    inside.update(g.ops[i].outputs)
                    for t in g.ops[i].outputs:
                        produced_by[t] = ("step", k)
                unit["inputs"], unit["produced"] = needed, inside
                for t in needed:
                    use(t, k, unit["key"])
            self.units.append(units)
        for r, pushes in enumerate(self.pushes, start=1):
            for p in pushes:
                use(p["tensor"], r - 1, "push")
        for t in g.outputs:
            use(t, R, "output")
        for t in uses:
            if t not in produced_by:
                raise UnsupportedOpError(f"tensor {g.tensors[t].name!r} is needed in the TEE but never "
                                         "computed")
        for units in self.units:
            for unit in units:
                unit["outputs"] = sorted(t for t in unit["produced"]
                                         if any(who != unit["key"] for _, who in uses.get(t, ())))
        self.produced_by, self.uses = produced_by, uses

    def emit(self) -> None:
        """The instruction lists, the secure arena's slots (by liveness) and the TEE-side LiteRT model."""
        g, R = self.g, self.R
        steps: list[list[dict[str, Any]]] = [[] for _ in range(R + 1)]
        slot_life: dict[int, list[int]] = {}  # tensor -> [first write, last read] (instruction numbers)
        seq = 0
        loc: dict[int, str] = {}  # where each tensor is now

        alias, elided = self._views()  # tensor -> (the tensor whose slot it is a slice of, axis, start)

        def base(t: int) -> int:
            return alias[t][0] if t in alias else t

        def add(k: int, instr: dict[str, Any], writes: tuple[int, ...] = (),
                reads: tuple[int, ...] = ()) -> None:
            nonlocal seq
            seq += 1
            steps[k].append(instr)
            for t in reads:
                if loc.get(t, "").partition("@")[0] == f"slot:t{base(t)}":
                    slot_life[base(t)][1] = max(slot_life[base(t)][1], seq)
            for t in writes:
                if loc[t].partition("@")[0] == f"slot:t{base(t)}":
                    slot_life.setdefault(base(t), [seq, seq])[1] = seq

        def later(t: int, k: int) -> bool:
            return any(s > k for s, _ in self.uses.get(t, ()))

        def place(t: int, k: int) -> str:
            """Where a tensor made in step ``k`` by a restore or a numpy op goes: straight into the input
            of the one LiteRT signature that consumes it when all its uses are in this step (LiteRT
            never overwrites a subgraph's inputs, so the others read it there), else a slot."""
            if t in alias:
                whole, axis, start = alias[t]
                return f"slot:t{whole}@{axis}:{start}:{start + g.tensors[t].shape[axis]}"
            consumers = self.uses.get(t, set())
            signatures = {who for _, who in consumers if who.startswith("step_")}
            if len(signatures) == 1 and all(s == k for s, _ in consumers):
                return f"in:{signatures.pop()}:t{t}"
            return f"slot:t{t}"

        def ref(t: int) -> str:
            if g.tensors[t].data is not None:
                name = f"const/t{t}"
                self.arrays.setdefault(name, np.ascontiguousarray(g.tensors[t].data, np.float32))
                return f"const:{name}"
            return loc[t]

        fused: set[int] = set()  # pushes done by the restore of their tensor
        sigs: list[Signature] = []
        self.signature_specs: dict[str, dict[str, dict[str, list[int]]]] = {}
        arena_bytes = 0
        for k in range(R + 1):
            if k == 0:
                for i, t in enumerate(g.inputs):
                    loc[t] = f"shm:input/{i}"
                    if later(t, 0):  # shared memory is the normal world's: keep a copy in secure memory
                        loc[t] = f"slot:t{t}"
                        add(0, {"op": "copy", "src": f"shm:input/{i}", "dst": loc[t]}, writes=(t,))
            else:
                for rest in self.restores[k - 1]:
                    t = rest["tensor"]
                    name = f"r{k}/{rest['name']}"
                    obf: ObfuscatedLinear = rest["obf"]
                    self.arrays[f"{name}/index"] = obf.restore_index.astype(np.int32)
                    self.arrays[f"{name}/coef"] = obf.restore_coef.astype(np.float32)
                    instr = {"op": "restore", "src": f"shm:round_{k}/out/{rest['name']}",
                             "index": f"{name}/index", "coef": f"{name}/coef", "offset": f"{name}/offset",
                             **_activation_fields(rest["activation"])}
                    pushes = [p for p in self.pushes[k] if p["tensor"] == t] if k < R else []
                    if len(pushes) == 1 and self.uses.get(t) == {(k, "push")}:
                        # Its one use is the next round's push: restore, permute or mix, mask and pad on the
                        # way into shared memory, a chunk at a time (the tensor never fills a slot).
                        p = pushes[0]
                        fused.add(id(p))
                        push = self._push_arrays(k, p)
                        perm = p["permutation"]
                        self.arrays[f"{name}/offset"] = rest["offset"] if perm is None else \
                            np.ascontiguousarray(rest["offset"][..., perm])
                        add(k, {**instr, "dst": f"shm:round_{k + 1}/in/{p['name']}", **push})
                        continue
                    loc[t] = place(t, k)
                    self.arrays[f"{name}/offset"] = rest["offset"]
                    add(k, {**instr, "dst": loc[t]}, writes=(t,))
            for unit in self.units[k]:
                if unit["kind"] == "numpy":
                    i = unit["ops"][0]
                    op = g.ops[i]
                    if i in elided:  # a concatenation written in place, a split read in place
                        for t in op.outputs:
                            loc[t] = place(t, k)
                        continue
                    srcs = [ref(op.inputs[j]) for j in unit["data"]]
                    reads = tuple(op.inputs[j] for j in unit["data"])
                    for t in op.outputs:
                        loc[t] = place(t, k)
                    add(k, {**unit["form"], "srcs": srcs, "dsts": [loc[t] for t in op.outputs]},
                        writes=tuple(op.outputs), reads=reads)
                    continue
                key = unit["key"]
                for t in unit["inputs"]:
                    dst = f"in:{key}:t{t}"
                    if loc[t] != dst:
                        add(k, {"op": "copy", "src": loc[t], "dst": dst}, reads=(t,))
                add(k, {"op": "litert", "signature": key})
                for t in unit["outputs"]:
                    loc[t] = f"out:{key}:t{t}"
                    if later(t, k):  # LiteRT's tensors are only read within their step
                        src, loc[t] = loc[t], f"slot:t{t}"
                        add(k, {"op": "copy", "src": src, "dst": loc[t]}, writes=(t,))
                inputs = {f"t{t}": t for t in unit["inputs"]}
                outputs = {f"t{t}": t for t in unit["outputs"]}
                sigs.append(Signature(key, unit["ops"], inputs, outputs))
                self.signature_specs[key] = {
                    "inputs": {n: list(g.tensors[t].shape) for n, t in inputs.items()},
                    "outputs": {n: list(g.tensors[t].shape) for n, t in outputs.items()}}
                arena_bytes += _live_peak(g, unit["ops"], set(inputs.values()) | set(outputs.values()))
            if k < R:
                for p in self.pushes[k]:
                    if id(p) not in fused:
                        add(k, {"op": "push", "src": loc[p["tensor"]],
                                "dst": f"shm:round_{k + 1}/in/{p['name']}", **self._push_arrays(k, p)},
                            reads=(p["tensor"],))
            else:
                for i, t in enumerate(g.outputs):
                    add(k, {"op": "copy", "src": loc[t], "dst": f"shm:output/{i}"}, reads=(t,))
        self.steps = steps
        self.slots, self.arena_size = _plan_arena(
            {f"t{t}": (g.tensors[t].shape, first, last) for t, (first, last) in slot_life.items()})
        for sig in sigs:
            for t in (*sig.inputs.values(), *sig.outputs.values()):
                if g.tensors[t].dtype != np.float32:
                    raise UnsupportedOpError(f"tensor {g.tensors[t].name!r} ({g.tensors[t].dtype}) crosses "
                                             "between TEE steps; only float32 tensors can")
        self.tee_model = write_model(g, sigs) if sigs else None
        self.tee_arena_bytes = arena_bytes
        self.step_ops = [[i for u in units if u["kind"] == "litert" for i in u["ops"]]
                         for units in self.units]
        self.numpy_ops = [i for units in self.units for u in units if u["kind"] == "numpy" for i in u["ops"]]

    def _views(self) -> tuple[dict[int, tuple[int, int, int]], set[int]]:
        """Tensors that live as slices of another tensor's slot, and the ops that so need not run: the
        inputs of a concatenation are written straight into its slices, the outputs of a split are read
        straight from its input (yolov4-tiny's arena 10.6 -> 7.9 MiB, and no copies). Only for tensors
        made in the TEE by a restore or a numpy op that can write a strided view, and read only by
        numpy ops and pushes that accept one. Returns {tensor: (root tensor, axis, start)} and the op
        indices elided."""
        g = self.g
        forms = {i: u["form"] for units in self.units for u in units if u["kind"] == "numpy"
                 for i in u["ops"]}
        restored = {t for t, (kind, _) in self.produced_by.items() if kind == "restore"}
        views: dict[int, tuple[int, int, int]] = {}
        elided: set[int] = set()

        def readers_accept_views(t: int) -> bool:
            pushes = [p for ps in self.pushes for p in ps if p["tensor"] == t]
            return all((who.startswith("numpy:") and forms[int(who[6:])]["op"] != "reshape")
                       or (who == "push" and all(p.get("mix") is None for p in pushes))
                       for _, who in self.uses.get(t, ()))

        def free(t: int) -> bool:  # not yet a view, nor the root of views, nor seen outside the TEE's slots
            return (t >= 0 and g.tensors[t].data is None and t not in views and t not in g.outputs
                    and t not in g.inputs and all(root != t for root, _, _ in views.values()))

        # Concatenations first: a split's outputs can then be slices of a concatenation's slot too.
        for i, form in sorted(forms.items(), key=lambda item: item[1]["op"] != "concat"):
            op = g.ops[i]
            if form["op"] == "concat":
                out, parts = op.outputs[0], list(op.inputs)
                if (out in views or out in g.outputs or len(set(parts)) != len(parts)
                        or any(who.startswith("step_") for _, who in self.uses.get(out, ()))):
                    continue  # a LiteRT signature may want it as its own input tensor
                if all(free(t) and readers_accept_views(t)
                       and (t in restored or forms.get(g.producer(t), {}).get("op") not in (None, "upsample"))
                       for t in parts):
                    start = 0
                    for t in parts:
                        views[t] = (out, form["axis"], start)
                        start += g.tensors[t].shape[form["axis"]]
                    elided.add(i)
            elif form["op"] == "split":
                x = op.inputs[1] if op.kind == "SPLIT" else op.inputs[0]
                root, axis, start = views.get(x, (x, form["axis"], 0))
                made_here = x in restored or forms.get(g.producer(x), {}).get("op") is not None
                if (axis != form["axis"] or not made_here or x in g.inputs or x in g.outputs
                        or any(who.startswith("step_") for _, who in self.uses.get(x, ()))):
                    continue
                if all(free(t) and readers_accept_views(t) for t in op.outputs):
                    for t in op.outputs:
                        views[t] = (root, axis, start)
                        start += g.tensors[t].shape[axis]
                    elided.add(i)
        return views, elided

    def _push_arrays(self, k: int, p: dict[str, Any]) -> dict[str, Any]:
        """A push's mask and input permutation or mixing as program arrays; its instruction fields."""
        name = f"r{k + 1}/{p['name']}"
        mask = None
        if p["one_time"] or p["mask"] is not None:
            mask = f"{name}/mask"  # a one-time mask is drawn into it by the TEE
        if p["mask"] is not None:
            self.arrays[mask] = p["mask"]
        perm = None
        if p["permutation"] is not None:
            perm = f"{name}/permutation"
            self.arrays[perm] = p["permutation"].astype(np.int32)
        mix: dict[str, Any] = {}
        if p["mix"] is not None:
            mix = {"input_index": f"{name}/input_index", "input_coef": f"{name}/input_coef"}
            self.arrays[mix["input_index"]] = p["mix"][0].astype(np.int32)
            self.arrays[mix["input_coef"]] = p["mix"][1].astype(np.float32)
        return {"permutation": perm, "mask": mask, "pad": p["pad"], **mix}

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

# Ops the TA runs itself, in numpy, on its liveness-planned arena: each is an IEEE add / multiply / max or a
# copy, so the result is LiteRT's bit for bit. Through LiteRT every signature would keep an arena of its own
# (yolov4-tiny: 41 MiB of secure memory, most of it for SPLIT / CONCATENATION / MAX_POOL_2D copies;
# ResNet-404: 29 MiB for 201 ADD + RELU signatures), and each crossing into it costs a copy.
NUMPY_BINARY = frozenset({"ADD", "SUB", "MUL", "MAXIMUM", "MINIMUM"})


def _numpy_form(g: Graph, i: int) -> tuple[dict[str, Any], list[int]] | None:
    """The TA's numpy instruction for op ``i`` (without its tensor references) and the positions of its
    data inputs, or None when LiteRT must run it."""
    op = g.ops[i]
    if fused_activation(op) is not None or any(t < 0 for t in op.outputs):
        return None
    outs = [g.tensors[t] for t in op.outputs]
    if any(t.dtype != np.float32 or t.data is not None for t in outs):
        return None

    def const(j: int) -> np.ndarray | None:
        return g.tensors[op.inputs[j]].data if j < len(op.inputs) and op.inputs[j] >= 0 else None

    def floats(*positions: int) -> bool:
        return all(j < len(op.inputs) and op.inputs[j] >= 0 and g.tensors[op.inputs[j]].dtype == np.float32
                   for j in positions)

    kind, out = op.kind, outs[0].shape
    if kind in NUMPY_BINARY and len(op.inputs) == 2 and floats(0, 1):
        shapes = [g.tensors[t].shape for t in op.inputs]
        if any(g.tensors[t].data is None for t in op.inputs) and _broadcast(shapes) == out:
            return {"op": "binary", "kind": kind}, [0, 1]
    elif _numpy_activation(op) and floats(0) and g.tensors[op.inputs[0]].data is None:
        return {"op": "activation", **_activation_fields(op)}, [0]
    elif kind == "MAX_POOL_2D" and floats(0) and len(out) == 4:
        o = op.options
        _, h, w, _ = g.tensors[op.inputs[0]].shape
        window, stride = (o.filterHeight, o.filterWidth), (o.strideH, o.strideW)
        pad = [_pool_padding(n, f, s, o.padding, m) for n, f, s, m in zip((h, w), window, stride, out[1:3],
                                                                           strict=True)]
        if None not in pad and min(*window, *stride) >= 1:
            return {"op": "max_pool", "window": list(window), "stride": list(stride), "pad": pad}, [0]
    elif kind == "CONCATENATION" and floats(*range(len(op.inputs))):
        axis = op.options.axis % len(out)
        return {"op": "concat", "axis": axis}, list(range(len(op.inputs)))
    elif kind in ("SPLIT", "SPLIT_V"):
        data, axis_at = (1, 0) if kind == "SPLIT" else (0, 2)
        axis = const(axis_at)
        if axis is not None and axis.size == 1 and floats(data):
            rank = len(g.tensors[op.inputs[data]].shape)
            return {"op": "split", "axis": int(axis.reshape(-1)[0]) % rank}, [data]
    elif kind in ("RESHAPE", "SQUEEZE", "EXPAND_DIMS") and floats(0) and g.tensors[op.inputs[0]].data is None:
        if all(const(j) is not None for j in range(1, len(op.inputs))):
            return {"op": "reshape"}, [0]
    elif kind in ("PAD", "PADV2") and floats(0) and g.tensors[op.inputs[0]].data is None:
        paddings = const(1)
        value = const(2) if kind == "PADV2" and len(op.inputs) > 2 else np.zeros(1, np.float32)
        shape = g.tensors[op.inputs[0]].shape
        if (paddings is not None and value is not None and value.size == 1
                and paddings.shape == (len(shape), 2) and np.all(paddings >= 0)):
            return {"op": "pad", "pad": paddings.astype(int).tolist(),
                    "value": float(np.float32(value.reshape(-1)[0]))}, [0]
    elif kind == "RESIZE_NEAREST_NEIGHBOR" and floats(0) and len(out) == 4 and not op.options.alignCorners:
        _, h, w, c = g.tensors[op.inputs[0]].shape
        factor = (out[1] // h, out[2] // w)
        # Power-of-two factors only: LiteRT maps output row y to floor(y * h / H) (or with half-pixel
        # centers floor((y + 0.5) * h / H)), which is y // factor exactly when h / H is exact in float.
        if (out[1] == h * factor[0] and out[2] == w * factor[1] and out[3] == c
                and all(f in (1, 2, 4, 8) for f in factor)):
            return {"op": "upsample", "factor": list(factor)}, [0]
    return None


def _broadcast(shapes: list[tuple[int, ...]]) -> tuple[int, ...] | None:
    try:
        return tuple(np.broadcast_shapes(*shapes))
    except ValueError:
        return None


def _pool_padding(n: int, window: int, stride: int, padding: int, out: int) -> list[int] | None:
    """[before, after] padding of one spatial axis of a pool as LiteRT computes it (SAME: the total split
    with the smaller half first), or None when ``out`` is not what LiteRT would produce."""
    if padding == 0:  # SAME
        expected = -(-n // stride)
        total = max((expected - 1) * stride + window - n, 0)
        pad = [total // 2, total - total // 2]
    else:  # VALID
        expected = (n - window) // stride + 1
        pad = [0, 0]
    return pad if expected == out and out >= 1 else None


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
          stats: dict[int, ActivationStats], one_time_rounds: Sequence[int] = ()) -> Plan:
    """Obfuscate, mask and lay out a partitioned, normalized graph (see the module docstring);
    ``one_time_rounds``: the rounds whose masks the TEE draws per inference (``converters.per_inference``)."""
    b = _Builder(graph, part, scheme, rng, stats, one_time_rounds)
    b.obfuscate_rounds()
    b.plan_tee()
    b.emit()
    b.layout()
    per_inference = describe(b, one_time_rounds)
    untrusted = write_model(b.untrusted, b.signatures)
    locate_weights(untrusted, per_inference["layers"])
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
        **per_inference,
    }
    summary = {"rounds": b.R, "offloaded_ops": sum(len(r) for r in part.rounds),
               "tee_litert_ops": sum(len(s) for s in b.step_ops), "tee_numpy_activations": len(b.fused),
               "tee_numpy_ops": len(b.numpy_ops)}
    return Plan(untrusted, program, arrays, b.rounds, b.buffers, b.shared_memory_size, summary)
