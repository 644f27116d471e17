"""The TEE side of a plan: per step, an instruction list over named buffers (run by
``tee_sim.ta_shadownet``), the TEE-side ``.tflite`` (one signature ``step_k`` per run of the step's ops the
TA does not run in numpy), a secure arena where tensors that live across instructions get slots (shared by
tensors whose lifetimes do not overlap), and the shared-memory layout that the manifest publishes.

Where a tensor lives in the TEE: a restore writes straight into the LiteRT input tensor that consumes it
when that is its only use in the step; LiteRT outputs are read in place within their step; anything needed
in a later step is kept in a slot. Shared memory: round ``r``'s inputs and outputs share one bank (the
runtime copies inputs into the accelerator before it runs), consecutive rounds use alternate banks, so
step ``r`` never reads and writes the same bytes and the layout stays two rounds big however deep the
model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from ai_edge_litert import schema_py_generated as schema_fb

from converters.graph import Graph, Signature, with_static_shapes, write_model
from converters.non_float import carry_across_steps, tee_shape
from converters.partition import Partition
from converters.plan_memory import litert_peak, plan_arena
from converters.plan_numpy import READ_DENSE, WRITE_DENSE, activation_fields, numpy_form
from converters.plan_rounds import RoundsBuilder
from converters.schemes import ActivationStats, ObfuscatedLinear, Scheme
from converters.secret_random import Random
from shadownet.exceptions import UnsupportedOpError
from tee_sim.program import align, wire_dtype


class TeeProgramBuilder(RoundsBuilder):
    """The TEE side of a plan, after the accelerator side's rounds: ``plan_tee``, ``emit`` (``steps``,
    ``arrays``, ``slots``, ``tee_model``, ...) and ``layout`` (``buffers``, ``rounds``,
    ``shared_memory_size``)."""

    def __init__(self, graph: Graph, part: Partition, scheme: Scheme, rng: Random,
                 stats: dict[int, ActivationStats], one_time_rounds: Sequence[int],
                 needs_split: dict[int, bool] | None = None) -> None:
        super().__init__(graph, part, scheme, rng, stats, one_time_rounds, needs_split)
        self.arrays: dict[str, np.ndarray] = {}  # the TEE program's arrays, by name

    def plan_tee(self) -> None:
        """Each step's ops as units run in order: one numpy instruction per op the TA does itself
        (``converters.plan_numpy``), and runs of consecutive other ops as one LiteRT signature each."""
        # Non-float tensors that cross between steps or shared memory travel as float32 from here on: g's
        # inputs and outputs become what shared memory holds, the model's own stay in ``interface``.
        self.interface = (list(self.g.inputs), list(self.g.outputs))
        self.g, steps = carry_across_steps(self.g, self.part.steps)
        g, R = self.g, self.R
        skip = set(self.fused.values()) | set(self.pads.values()) | self.residuals
        produced_by: dict[int, tuple[str, int]] = {t: ("input", 0) for t in g.inputs}
        for r, restores in enumerate(self.restores, start=1):
            for rest in restores:
                produced_by[rest["tensor"]] = ("restore", r)
        self.units: list[list[dict[str, Any]]] = []
        uses: dict[int, set[tuple[int, str]]] = {}  # tensor -> {(step, consumer)}

        def use(t: int, k: int, who: str) -> None:
            if t >= 0 and g.tensors[t].data is None:
                uses.setdefault(t, set()).add((k, who))

        for k, ops in enumerate(steps):
            units: list[dict[str, Any]] = []
            run: list[int] = []

            def flush(k: int = k, units: list[dict[str, Any]] = units, run: list[int] = run) -> None:
                if run:
                    count = sum(u["kind"] == "litert" for u in units)
                    key = f"step_{k}" + (f"_{count}" if count else "")
                    units.append({"kind": "litert", "key": key, "ops": list(run)})
                    run.clear()

            in_litert = _non_float_spans(g, [i for i in ops if i not in skip])
            for i in ops:
                if i in skip:
                    continue
                form_and_data = None if i in in_litert else numpy_form(g, i)
                if form_and_data is None:
                    run.append(i)
                else:
                    flush()
                    form, data = form_and_data
                    units.append({"kind": "numpy", "key": f"numpy:{i}", "ops": [i], "form": form,
                                  "data": data})
            flush()
            units = _fuse_depthwise_clamps(g, units)
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
        for r, restores in enumerate(self.restores, start=1):
            for rest in restores:
                if rest.get("addend") is not None:
                    use(rest["addend"], r, "restore")
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
            if len(signatures) == 1 and all(s == k for s, _ in consumers) and g.tensors[t].shape:
                return f"in:{signatures.pop()}:t{t}"
            return f"slot:t{t}"

        def ref(t: int) -> str:
            if g.tensors[t].data is not None:
                name = f"const/t{t}"
                # (np.array, not ascontiguousarray: that makes a scalar constant a 1-element vector.)
                self.arrays.setdefault(name, np.array(g.tensors[t].data, np.float32, order="C"))
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
                             **activation_fields(rest["activation"])}
                    if rest["split"] is not None:  # its one-time pop mask (converters.exact_split)
                        instr["pop"] = f"{name}/pop"
                    addend = rest.get("addend")
                    reads = () if addend is None else (addend,)
                    if addend is not None:
                        instr["addend"] = ref(addend)
                    pushes = [p for p in self.pushes[k] if p["tensor"] == t] if k < R else []
                    # (A push's permutation would reorder the restored channels, not the addend's. A push
                    # whose mask follows its input's channels scaled, a user input's, is a plain one: a
                    # restore's kernel measures what it makes unscaled, tee_sim.mask_spread.)
                    if len(pushes) == 1 and self.uses.get(t) == {(k, "push")} and pushes[0]["split"] is None \
                            and (addend is None or pushes[0]["permutation"] is None) \
                            and pushes[0].get("scale") is None:
                        # Its one use is the next round's push: restore, permute or mix, mask and pad on the
                        # way into shared memory, a chunk at a time (the tensor never fills a slot).
                        p = pushes[0]
                        fused.add(id(p))
                        push = self._push_arrays(k, p)
                        perm = p["permutation"]
                        self.arrays[f"{name}/offset"] = rest["offset"] if perm is None else \
                            np.ascontiguousarray(rest["offset"][..., perm])
                        add(k, {**instr, "dst": f"shm:round_{k + 1}/in/{p['name']}", **push}, reads=reads)
                        continue
                    loc[t] = place(t, k)
                    self.arrays[f"{name}/offset"] = rest["offset"]
                    add(k, {**instr, "dst": loc[t]}, writes=(t,), reads=reads)
            for unit in self.units[k]:
                if unit["kind"] == "numpy":
                    i = unit["ops"][0]
                    op, last = g.ops[i], g.ops[unit["ops"][-1]]  # last: an activation fused into it
                    if i in elided:  # a concatenation written in place, a split read in place
                        for t in op.outputs:
                            loc[t] = place(t, k)
                        continue
                    srcs = [ref(op.inputs[j]) for j in unit["data"]]
                    reads = tuple(op.inputs[j] for j in unit["data"])
                    for t in last.outputs:
                        loc[t] = place(t, k)
                    add(k, {**unit["form"], "srcs": srcs, "dsts": [loc[t] for t in last.outputs]},
                        writes=tuple(last.outputs), reads=reads)
                    continue
                key = unit["key"]
                for t in unit["inputs"]:
                    dst = f"in:{key}:t{t}"
                    if not g.tensors[t].shape:  # a scalar, which enters as one element (_scalar_io)
                        add(k, {"op": "reshape", "srcs": [loc[t]], "dsts": [dst]}, reads=(t,))
                    elif loc[t] != dst:
                        add(k, {"op": "copy", "src": loc[t], "dst": dst}, reads=(t,))
                add(k, {"op": "litert", "signature": key})
                for t in unit["outputs"]:
                    loc[t] = f"out:{key}:t{t}"
                    if not g.tensors[t].shape:  # a scalar, which leaves as one element, into a slot
                        src, loc[t] = loc[t], f"slot:t{t}"
                        add(k, {"op": "reshape", "srcs": [src], "dsts": [loc[t]]}, writes=(t,))
                    elif later(t, k):  # LiteRT's tensors are only read within their step
                        src, loc[t] = loc[t], f"slot:t{t}"
                        add(k, {"op": "copy", "src": src, "dst": loc[t]}, writes=(t,))
                sigs.append(_scalar_io(g, Signature(key, unit["ops"], {f"t{t}": t for t in unit["inputs"]},
                                                   {f"t{t}": t for t in unit["outputs"]})))
                inputs, outputs = sigs[-1].inputs, sigs[-1].outputs
                self.signature_specs[key] = {
                    "inputs": {n: list(g.tensors[t].shape) for n, t in inputs.items()},
                    "outputs": {n: list(g.tensors[t].shape) for n, t in outputs.items()}}
                arena_bytes += litert_peak(g, sigs[-1].ops, set(inputs.values()) | set(outputs.values()))
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
        self.slots, self.arena_size = plan_arena(
            {f"t{t}": (g.tensors[t].shape, first, last) for t, (first, last) in slot_life.items()})
        for sig in sigs:
            for t in (*sig.inputs.values(), *sig.outputs.values()):
                if g.tensors[t].dtype != np.float32:  # carried (non_float) or kept in one run (spans)
                    raise UnsupportedOpError(f"tensor {g.tensors[t].name!r} ({g.tensors[t].dtype}) passes "
                                             "between the TEE's units; only float32 tensors can")
        self.tee_model = write_model(with_static_shapes(g), sigs) if sigs else None
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

        def readers_accept_views(t: int) -> bool:  # the push kernel reads any pixel and row strides
            return all((who.startswith("numpy:") and forms[int(who[6:])]["op"] not in READ_DENSE)
                       or who == "push" for _, who in self.uses.get(t, ()))

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
                       and (t in restored or forms.get(g.producer(t), {}).get("op") not in WRITE_DENSE)
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
        split = {} if p["split"] is None else {"split": {"grid": p["split"].grid}}
        return {"permutation": perm, "mask": mask, "pad": p["pad"], **mix, **split}

    def layout(self) -> None:
        g = self.g
        buffers: list[dict[str, Any]] = []
        offset = 0

        self.tee_shapes: dict[str, list[int]] = {}  # the TA's float32 view of a non-float tensor's buffer

        def put(name: str, shape: tuple[int, ...], at: int, dtype: Any = np.float32) -> int:
            nbytes = int(np.prod(tee_shape(shape, dtype), dtype=np.int64)) * 4
            buffers.append({"name": name, "offset": at, "nbytes": nbytes, "shape": list(shape),
                            "dtype": wire_dtype(dtype).name})
            if dtype != np.float32:
                self.tee_shapes[name] = list(tee_shape(shape, dtype))
            return align(at + nbytes)

        inputs, outputs = self.interface  # the model's own tensors (non-float ones carried: non_float)
        for i, t in enumerate(inputs):
            offset = put(f"input/{i}", g.tensors[t].shape, offset, g.tensors[t].dtype)
        for i, t in enumerate(outputs):
            offset = put(f"output/{i}", g.tensors[t].shape, offset, g.tensors[t].dtype)
        bank_size = [0, 0]
        placed = []
        for r in range(1, self.R + 1):
            ins = [(f"round_{r}/in/{p['name']}", p["wire_shape"]) for p in self.pushes[r - 1]]
            outs = [(f"round_{r}/out/{rest['name']}", rest["wire_shape"]) for rest in self.restores[r - 1]]
            for group in (ins, outs):
                at = 0
                for name, shape in group:
                    placed.append((r % 2, name, shape, at))
                    at = align(at + int(np.prod(shape, dtype=np.int64)) * 4)
                bank_size[r % 2] = max(bank_size[r % 2], at)
        bank_start = [offset, offset + bank_size[0]]
        for bank, name, shape, at in placed:
            put(name, shape, bank_start[bank] + at)
        self.buffers = buffers
        self.shared_memory_size = max(64, offset + bank_size[0] + bank_size[1])
        # Public: an exact split's halves are there for anyone to see in the file (converters.exact_split).
        split = {"split": True}
        self.rounds = [{"signature": f"round_{r}",
                        "inputs": [{"name": p["name"], "buffer": f"round_{r}/in/{p['name']}",
                                    **(split if p["split"] is not None else {})}
                                   for p in self.pushes[r - 1]],
                        "outputs": [{"name": rest["name"], "buffer": f"round_{r}/out/{rest['name']}",
                                     **(split if rest["split"] is not None else {})}
                                    for rest in self.restores[r - 1]]}
                       for r in range(1, self.R + 1)]


def _scalar_io(g: Graph, sig: Signature) -> Signature:
    """``sig`` with each scalar (rank-0) input and output passed as one element of shape [1], RESHAPEd inside
    it: LiteRT's Python API gives no view of a rank-0 tensor (a copy, or a numpy scalar), so the TA could
    neither write such an input nor read such an output in place (a scalar made in one step and used in
    another - a global maximum's - came out stale). ``g`` gains the tensors and ops."""
    def reshape(src: int, dst: int) -> int:
        shape = g.tensors[dst].shape
        options = schema_fb.ReshapeOptionsT()
        options.newShape = list(shape)
        new_shape = g.add_tensor(f"{g.tensors[dst].name}/shape", (len(shape),), np.int32, list(shape))
        return g.add_op("RESHAPE", [src, new_shape], [dst], options)

    before, after = [], []
    inputs, outputs = dict(sig.inputs), dict(sig.outputs)
    for name, t in sig.inputs.items():
        if not g.tensors[t].shape:
            inputs[name] = g.add_tensor(f"{g.tensors[t].name}/as_vector", (1,), g.tensors[t].dtype)
            before.append(reshape(inputs[name], t))
    for name, t in sig.outputs.items():
        if not g.tensors[t].shape:
            outputs[name] = g.add_tensor(f"{g.tensors[t].name}/as_vector", (1,), g.tensors[t].dtype)
            after.append(reshape(t, outputs[name]))
    if not before and not after:
        return sig
    return Signature(sig.key, [*before, *sig.ops, *after], inputs, outputs)


DEPTHWISE_CLAMPS = frozenset({"RELU", "RELU6", "RELU_N1_TO_1"})  # tee_sim.ta_shadownet_depthwise.CLAMPS


def _non_float_spans(g: Graph, ordered: Sequence[int]) -> set[int]:
    """The ops of one step that must run in one LiteRT signature: from the op that makes a tensor other than
    float32 (a comparison's bool mask, an index) to its last consumer in the step, so that the tensor never
    crosses between the step's units (the TA passes only float32 tensors between them). Without it, SELU
    (GREATER, then numpy EXP / SUB / MUL, then SELECT) was refused."""
    position = {i: n for n, i in enumerate(ordered)}
    consumers: dict[int, list[int]] = {}
    for i in ordered:
        for t in g.ops[i].inputs:
            consumers.setdefault(t, []).append(position[i])
    spans: set[int] = set()
    for n, i in enumerate(ordered):
        for t in g.ops[i].outputs:
            if t >= 0 and g.tensors[t].dtype != np.float32 and consumers.get(t):
                spans.update(ordered[n:max(consumers[t]) + 1])
    return spans


def _fuse_depthwise_clamps(g: Any, units: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A step's units with each clamp activation that only reads a depthwise layer's output, right after it,
    fused into the layer's unit (its kernel clamps as it writes: one pass over the tensor fewer, and the
    layer's own output never stored; ``converters.normalize`` had split it off)."""
    fused: list[dict[str, Any]] = []
    for unit in units:
        before = fused[-1] if fused else None
        if (before is not None and unit["kind"] == "numpy" and before["kind"] == "numpy"
                and before["form"]["op"] == "depthwise" and "activation" not in before["form"]
                and unit["form"]["op"] == "activation" and unit["form"]["activation"] in DEPTHWISE_CLAMPS):
            made = g.ops[before["ops"][0]].outputs[0]
            if g.ops[unit["ops"][0]].inputs[0] == made and g.consumers(made) == [unit["ops"][0]] \
                    and made not in g.outputs:
                fused[-1] = {**before, "ops": [*before["ops"], *unit["ops"]],
                             "form": {**before["form"], "activation": unit["form"]["activation"]}}
                continue
        fused.append(unit)
    return fused
