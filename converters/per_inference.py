"""What the TEE needs to make per-inference material: one-time masks and the integrity checks' layers.

One-time masks (schemes with ``static_masks = False``): on the rounds the mask policy selects, no two
inferences share a mask. The converter then draws no mask and computes no pop mask for them; it records
each such push's mask distribution (``std * N(0, 1) + mean``, from the scheme; shaped across frequency
bands and channels where the push carries a user input: ``converters.schemes.MaskDistribution``) and each
such restore's bias, and the TA draws a fresh mask per inference and precomputes its unblinding term
offline (Slalom's approach, ``tee_sim.per_inference``); a modular mask's spec says so (``modular``:
uniform, the input sent modulo its period, ``tee_sim.modular_masks``). The other rounds get the scheme's
static masks, which for ``groupmix`` means none by default (``static_mask_scale = 0``).

The policy (``--mask-rounds``): ``auto`` (the default, below), ``first`` (round 1, the user's raw input, and
the rounds every policy masks, below), ``all``, or a list of
round numbers (``"1,2,5"``, ``"1-4"``); round 1 is always included, and so are the rounds a user input
joins later and, since stop 56, those that read what one layer made of it (from such a round's input
crossing unmasked, a normal world that chooses its inputs solves that layer exactly,
``shadownet.chosen_inputs``) and those whose input is too narrow to mix (``converters.partition``'s
``always_masked``; ``groupmix:mask_floor=input`` leaves the round 1 and the rounds a user input joins alone,
as before). The default, ``auto`` (since stop 58), is ``all`` for a model whose every round's masks take
at most ``AUTO_MASK_BYTES`` (4 MiB since stop 59; 1 before) of a pool entry and whose largest layer's
weights at most ``AUTO_LAYER_BYTES`` (16 MiB), ``first`` for any other: the zoo's MiniVGG and ResNet-44 get
every round (a critical-point attack on their unmasked round 3 took MiniVGG's first layer, 4.5% of its
filters, and ResNet-44's first two, 1.9%: SECURITY.md), the other three the floor. The rounds past the
floor take masks at ``groupmix``'s ``deep_mask_scale`` (1x their input's spread, under ``all`` and a list
too), which drown that attack's probes and do not hide the values (MiniVGG's rounds 3-4 at 0.16-0.31 in
the audit); their cost is offline TEE work (the layers redone on each entry's masks: MiniVGG 2.0 -> 4.4-5.1
ms per inference, ResNet-44 ~2 -> 16-21, in batches of 4) and secure memory (MiniVGG 5.3 -> 13.7 MiB, its
dense layer's weights kept for the refills; ResNet-44's entry 0.3 -> 3.4 MiB). ``first`` and ``all``
against each other, from what ``shadownet audit`` measures and what they cost (groupmix, 4 inferences
observed; the figures below are from before stop 56, round 2 then unmasked, and before stop 58, deeper
rounds' masks then at ``mask_scale``, 10x):

- ResNet-44, ``first``: the user's input from round 1 at correlation 0.03 in one inference, 0.04 across
  two, 0.03 after a chosen input - the target is 0.1. The deeper rounds cross unmasked: the audit
  recovers their features (input mixing undone by the best affine fit: 1.0 for the stage-1 rounds, 0.4 -
  0.5 later). Static masks there (``groupmix:static_mask_scale=10``) hid one inference's features (0.04 -
  0.16) but cancelled in the difference of two inferences, with the same 1.0 / 0.4 - 0.5: what a normal
  world that runs inputs of its choosing learns either way - at the price of a mask and an unblinding
  term per input in secure memory (MobileNet, its depthwise layers offloaded: 44 MiB against 7.6 without them)
  and ~3 bits of float32 precision per layer.
- ResNet-44, ``all``: every round <= 0.15 both ways, but per inference the TEE redoes every layer on a
  mask in float64 (225 ms offline against a 20 ms inference: the pool cannot keep up with more than a
  few inferences a second) and a pool entry holds every layer's output (1.7 MB against 64 KB). On
  MobileNet an entry is 40.4 MiB: the pool holds one (53.9 MiB of secure memory in all, against 7.6 MiB
  with ``first``) and making it takes 309 ms of offline TEE work per inference (run BO). And every masked
  layer computes at the mask's magnitude in float32: against LiteRT on the original, MobileNet's outputs at
  7-9e-4 relative error (median), up to 2-3e-3 (5e-4 / 9.5e-4 with ``groupmix:exact_split=all``: its
  depthwise layers cannot be split), MiniVGG up to 2-3e-4, ResNet-44 up to 0.6-1.5e-4; YOLOv4-tiny with it
  does not fit the default 64 MiB cap (the conversion warns of the cost; ``BENCHMARKS.md``).

So ``first`` meets the input target everywhere at the smallest cost (offline 0.75 - 37 ms per inference
across the zoo, run CV); ``all`` or a list with ``groupmix:deep_mask_scale=10`` closes the difference
attack on deeper rounds where its cost is acceptable (at the default 1x it closes the critical-point
attack, as ``auto`` does for a small model, not that one).

Layers (for ``verify`` and for pop masks): per accelerator output buffer, the offloaded layer's kind, the
name of its obfuscated weights in ``untrusted.tflite`` (public: the TA reads them from the file it
authenticated at load), its geometry and its input buffer. Public too, so it lives in the program only
for convenience.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from ai_edge_litert import schema_py_generated as schema_fb

from converters.partition import Partition

DEFAULT_MASK_ROUNDS = "auto"
# The "auto" policy masks every round of a model whose every round's masks take at most AUTO_MASK_BYTES of
# a pool entry and whose largest layer's weights, which the trusted app reads back at every refill of a
# masked layer, take at most AUTO_LAYER_BYTES (``RoundCost``), and the rounds every policy masks of any
# other: the zoo's MiniVGG (0.63 MiB estimated, its dense layer's weights 8 MiB) and, since stop 59,
# ResNet-44 (3.2 MiB: the critical-point attack took its first two layers, 1.9% of its filters, from its
# unmasked round 3) get every round; MobileNet (20), ResNet-404 and YOLOv4-tiny the floor, which leaves
# them open to that attack (SECURITY.md); so does an MLP of small activations and a 4096 x 4096 layer
# (64 MiB: masked, it did not load under the 64 MiB cap, a review). All or nothing: a prefix of rounds
# past the floor leaves a later crossing for the attack (ResNet-44 under rounds 1-10: round 11, 21x21
# fields, 2,647 inferences a grid point; slower, not stopped), reached through a ResNet's shortcuts.
AUTO_MASK_BYTES = 4 << 20
AUTO_LAYER_BYTES = 16 << 20


@dataclass(frozen=True)
class RoundCost:
    """What one-time masks on a round would cost, estimated from the graph's shapes (``round_costs``):
    ``entry``, the bytes they add to a pool entry (a float32 mask per input its layers read and an
    unblinding term per layer's output; a scheme's fakes and an exact split make the TA's a little larger:
    MiniVGG's whole entry 0.75 MiB against 0.63 estimated); ``weights``, its largest layer's float32
    weights as the graph holds them, which the TA holds in secure memory for its refills (an exactly split
    layer's, as the TA reads them, are 4x)."""

    entry: int
    weights: int


def parse_mask_rounds(spec: str | Iterable[int] | None, rounds: int, inputs: Iterable[int] = (1,),
                      costs: Sequence[RoundCost] | None = None) -> list[int]:
    """The rounds (1-based, sorted) that get one-time masks: ``None`` (the default policy), ``"auto"``,
    ``"first"``, ``"all"``, ``"1,3,5"`` / ``"2-4"`` or integers. The rounds every policy masks (``inputs``:
    ``converters.schemes.always_masked_for``; round 1 at least) are always in; ``"auto"`` is ``"all"``
    where every round's masks together take at most ``AUTO_MASK_BYTES`` of a pool entry and no layer's
    weights more than ``AUTO_LAYER_BYTES`` (``costs``, per round: ``round_costs``; None: not known,
    ``"first"``), ``"first"`` elsewhere. ``ValueError`` for a round outside ``1..rounds`` or a malformed
    spec."""
    if spec is None:
        spec = DEFAULT_MASK_ROUNDS
    chosen: set[int] = {1, *inputs}
    if isinstance(spec, str) and spec.strip().lower() == "auto":
        if costs is not None and auto_masks_all(costs):
            return list(range(1, rounds + 1))
        return sorted(chosen)
    beyond: list[str] = []  # what the policy names past the last round, as it named it
    if isinstance(spec, str):
        ranges = mask_round_ranges(spec)
        if ranges is None:
            return list(range(1, rounds + 1))
        for a, b in ranges:
            chosen.update(range(a, min(b, rounds) + 1))
            if b > rounds:
                low = max(a, rounds + 1)
                beyond.append(str(low) if low == b else f"{low}-{b}")
    else:
        chosen.update(_named_rounds(spec))
        beyond = [str(r) for r in sorted(chosen) if not 1 <= r <= rounds]
    if beyond:
        raise ValueError(f"mask rounds [{', '.join(beyond)}] are outside the model's rounds 1..{rounds}")
    return sorted(chosen)


def auto_masks_all(costs: Sequence[RoundCost]) -> bool:
    """Whether ``"auto"`` masks every round of a model of these ``costs`` (``AUTO_MASK_BYTES``,
    ``AUTO_LAYER_BYTES``)."""
    return (sum(c.entry for c in costs) <= AUTO_MASK_BYTES
            and max((c.weights for c in costs), default=0) <= AUTO_LAYER_BYTES)


def round_costs(part: Partition) -> list[RoundCost]:
    """Per round, what one-time masks on it would cost (``RoundCost``), from the graph's shapes."""
    graph = part.graph
    costs = []
    for ops in part.rounds:
        inputs = {graph.ops[i].inputs[0] for i in ops}
        elements = sum(math.prod(graph.tensors[t].shape) for t in inputs)
        elements += sum(math.prod(graph.tensors[graph.ops[i].outputs[0]].shape) for i in ops)
        weights = max(4 * math.prod(graph.tensors[graph.ops[i].inputs[1]].shape) for i in ops)
        costs.append(RoundCost(4 * elements, weights))
    return costs


def mask_rounds_form(spec: str | Iterable[int] | None) -> str | list[int] | None:
    """``spec`` after ``parse_mask_rounds``'s checks that need no model, before the work (a malformed policy,
    a round below 1), as a value that can be read again: rounds given as an iterator were used up by this
    check, and the conversion then masked round 1 alone (a review). Whether its rounds are the model's is
    for ``parse_mask_rounds`` (checked against 65536 rounds here, "--mask-rounds 9223372036854775808" was
    said to be outside "the model's rounds 1..65536": a probe)."""
    if spec is None:
        return None
    if isinstance(spec, str):
        mask_round_ranges(spec)
        return spec
    named = _named_rounds(spec)
    low = [str(r) for r in named if r < 1]
    if low:
        raise ValueError(f"mask rounds [{', '.join(low)}]: rounds are numbered from 1")
    return named


def _named_rounds(spec: Iterable[int]) -> list[int]:
    if not isinstance(spec, Iterable):  # an int: "'int' object is not iterable" said nothing (a probe)
        raise TypeError(f"mask rounds are a policy (\"auto\", \"first\", \"all\", \"1,3\", \"2-4\") or a "
                        f"list of rounds, not {spec!r}")
    named = list(spec)
    if not all(isinstance(r, int | np.integer) and not isinstance(r, bool) for r in named):
        raise ValueError(f"mask rounds must be whole numbers, not {named!r}")
    return [int(r) for r in named]


def mask_round_ranges(spec: str) -> list[tuple[int, int]] | None:
    """A ``--mask-rounds`` text as ranges of rounds (``"first"``: none beyond the rounds every policy masks,
    ``converters.schemes.always_masked_for``, and ``"auto"`` before ``parse_mask_rounds`` sizes it;
    ``None`` for ``"all"``); ``ValueError`` for a malformed one, a range that runs backwards or a round
    below 1."""
    text = spec.strip().lower()
    if text == "all":
        return None
    if text in ("first", "auto"):
        return []
    ranges = []
    for part in (p.strip() for p in text.split(",")):
        low, dash, high = part.partition("-")
        try:
            a, b = int(low), int(high) if dash else int(low)
        except ValueError:
            raise ValueError(f"mask rounds {spec!r}: expected 'auto', 'first', 'all' or round numbers such "
                             "as '1,2,5' or '1-4'") from None
        if a > b:
            raise ValueError(f"mask rounds {spec!r}: the range {part!r} runs backwards")
        if a < 1:
            raise ValueError(f"mask rounds {spec!r}: rounds are numbered from 1")
        ranges.append((a, b))
    return ranges


def layer_descriptor(kind: str, options: Any, weights: str, input_buffer: str) -> dict[str, Any]:
    """A layer as the TA's checks and pop masks read it (``tee_sim.layer_geometry.geometry``)."""
    layer: dict[str, Any] = {"kind": kind, "weights": weights, "input": input_buffer}
    if kind != "FULLY_CONNECTED":
        layer["padding"] = "SAME" if options.padding == schema_fb.Padding.SAME else "VALID"
        layer["stride"] = [int(options.strideH), int(options.strideW)]
        layer["dilation"] = [int(getattr(options, "dilationHFactor", 1) or 1),
                             int(getattr(options, "dilationWFactor", 1) or 1)]
    return layer


def _writer(steps: list[list[dict[str, Any]]], field: str, ref: str, op: str | None = None) -> dict[str, Any]:
    found = [i for step in steps for i in step if i.get(field) == ref and (op is None or i["op"] == op)]
    if len(found) != 1:
        raise AssertionError(f"expected one instruction with {field} {ref!r}, found {len(found)}")
    return found[0]


def locate_weights(untrusted: bytes, layers: dict[str, dict[str, Any]]) -> None:
    """Add where each layer's weights lie in ``untrusted.tflite`` (``weights_at``: byte offset, shape), so
    the TA slices them out of the file it authenticated instead of parsing the flatbuffer."""
    model = schema_fb.Model.GetRootAs(untrusted, 0)
    base = np.frombuffer(untrusted, np.uint8).ctypes.data
    wanted = {layer["weights"]: layer for layer in layers.values()}
    for s in range(model.SubgraphsLength()):
        subgraph = model.Subgraphs(s)
        for t in range(subgraph.TensorsLength()):
            tensor = subgraph.Tensors(t)
            layer = wanted.get(tensor.Name().decode())
            if layer is None:
                continue
            data = model.Buffers(tensor.Buffer()).DataAsNumpy()
            layer["weights_at"] = [int(data.ctypes.data - base), [int(d) for d in tensor.ShapeAsNumpy()]]
    missing = [name for name, layer in wanted.items() if "weights_at" not in layer]
    if missing:
        raise AssertionError(f"untrusted model lacks the weights {missing[:3]}")


def describe(builder: Any, one_time_rounds: Iterable[int]) -> dict[str, Any]:
    """The program entries ``layers`` and ``one_time`` for a built plan
    (``converters.plan_tee.TeeProgramBuilder`` after ``emit``). One-time rounds get no mask at conversion;
    their offsets leave ``builder.arrays``; their mask distributions and biases come in."""
    g, steps, arrays = builder.g, builder.steps, builder.arrays
    layers: dict[str, dict[str, Any]] = {}
    for r, restores in enumerate(builder.restores, start=1):
        for rest in restores:
            op = g.ops[rest["op"]]
            layers[f"round_{r}/out/{rest['name']}"] = layer_descriptor(
                op.kind, op.options, f"round_{r}/w{rest['name'][1:]}", f"round_{r}/in/{rest['push']}")
    one_time_rounds = sorted(set(one_time_rounds))
    masks: dict[str, dict[str, Any]] = {}
    offsets: dict[str, dict[str, Any]] = {}
    for r in one_time_rounds:
        by_push = {}
        for p in builder.pushes[r - 1]:
            buffer = f"round_{r}/in/{p['name']}"
            instr = _writer(steps, "dst", f"shm:{buffer}")
            name = instr["mask"]
            dist = p["dist"]
            arrays[f"{name}/mean"] = np.asarray(dist.mean, np.float32)
            masks[name] = {"buffer": buffer, "shape": list(p["shape"]), "std": float(dist.std),
                           "mean": f"{name}/mean"}
            if dist.bands:  # shaped (tee_sim.one_time_masks)
                masks[name]["bands"] = dist.bands
                if dist.common is not None:
                    arrays[f"{name}/common"] = np.asarray(dist.common, np.float32)
                    masks[name]["common"] = f"{name}/common"
            if dist.modular:  # uniform, sent modulo its period (tee_sim.modular_masks)
                masks[name]["modular"] = True
            if p["split"] is not None:  # sent as [x_hi | x_lo] (converters.exact_split)
                masks[name]["split"] = {"grid": p["split"].grid}
            spread = max(p["stats"].std, p["stats"].rms)
            # The TEE follows the input's spread by powers of two (tee_sim.mask_spread): before a plain
            # push, and as a restore's fused push makes it.
            if 0 < spread < math.inf:
                masks[name]["spread"] = float(spread)
                if p.get("scale") is not None:
                    # It follows the spread of the input's channels scaled (ObfuscatedLinear.input_scale), as
                    # mixed: the input's own would size it for its largest raw channel.
                    arrays[f"{name}/scale"] = np.asarray(p["scale"], np.float32)
                    masks[name]["scale"] = f"{name}/scale"
            by_push[p["name"]] = name
        for rest in builder.restores[r - 1]:
            buffer = f"round_{r}/out/{rest['name']}"
            instr = _writer(steps, "src", f"shm:{buffer}", "restore")
            if rest["split"] is not None:
                # Its offset stays the bias; the pop mask, made per inference, comes off before the restore.
                offsets[instr["pop"]] = {"layer": buffer, "mask": by_push[rest["push"]], "split": True}
                continue
            name = instr["offset"]
            arrays.pop(name, None)
            op = g.ops[rest["op"]]
            n = g.tensors[rest["tensor"]].shape[-1]
            bias = np.zeros(n, np.float32)
            if len(op.inputs) > 2 and op.inputs[2] >= 0:
                bias = np.asarray(g.tensors[op.inputs[2]].data, np.float32).reshape(n)
            arrays[f"{name}/bias"] = bias
            offsets[name] = {"layer": buffer, "mask": by_push[rest["push"]], "bias": f"{name}/bias",
                             "index": instr["index"], "coef": instr["coef"],
                             "permutation": instr.get("permutation")}
    return {"layers": layers, "one_time": {"rounds": one_time_rounds, "masks": masks, "offsets": offsets}}

