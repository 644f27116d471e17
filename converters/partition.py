"""Partition a normalized graph into accelerator rounds and TEE steps.

Every offloadable op (a CONV_2D, DEPTHWISE_CONV_2D or FULLY_CONNECTED with constant weights and a
computed input) gets a level: one more than the highest level among the offloadable ops it depends on,
directly or through TEE ops. The offloadable ops of level ``r`` form round ``r``: their inputs are all
ready when step ``r - 1`` ends, so one accelerator call runs them together (a ResNet block's shortcut
conv and its first conv share a round). Every other op runs in the TEE, in step ``L`` = the highest
level it depends on, i.e. right after the last round it needs. One inference is step 0, round 1,
step 1, ..., round R, step R: R accelerator calls and R + 1 TEE entries.

Long sums on the user's input. A conv or dense layer that reads the user's input (``carries_input``) with
more than ``converters.exact_split.MAX_DOT_LENGTH`` terms per output cannot take that input as an exact
split, so under one-time masks (~10x the input) its float32 sums would cancel: a helper measured outputs
1-12% off and honest results failing ``--verify``'s check (31x31 convs of 512 channels; a 96x96x3 image
flattened into a dense layer, 8.9e-4). ``converters.normalize.normalize_for`` cuts such a layer into chunks
of its sum short enough to split where it can; with ``long_input_sums_in_tee`` (schemes whose one-time
masks are split) one it cannot cut runs in the TEE instead, and the layers after it are partitioned again:
they now read what the TEE made from the input.
"""

from __future__ import annotations

from dataclasses import dataclass

from converters import exact_split
from converters.graph import Graph, is_offloadable


@dataclass(frozen=True)
class Partition:
    """``rounds[r - 1]``: op indices of round ``r``; ``steps[k]``: TEE op indices of step ``k`` (both in
    graph order); ``level[t]``: the step after which tensor ``t`` is available (0 = before round 1)."""

    graph: Graph
    rounds: list[list[int]]
    steps: list[list[int]]
    level: list[int]
    long_sums: frozenset[int] = frozenset()  # offloadable layers kept in the TEE for their long sums

    @property
    def offloaded(self) -> set[int]:
        return {i for r in self.rounds for i in r}

    def round_of(self, op_index: int) -> int:
        """The round (1-based) of an offloaded op."""
        return self.level[self.graph.ops[op_index].outputs[0]]


def input_rounds(part: Partition) -> list[int]:
    """The rounds whose offloaded layers read a model input, or a tensor the TEE made from one with no
    offloaded layer between (``carries_input``): round 1, and any round a user input joins later (a vector
    concatenated to pooled features, an input added to a deeper layer's output, an embedding of an integer
    input), which would otherwise cross with the user's raw values only mixed. The default mask policy
    masks them all."""
    raw = carries_input(part)
    return sorted({1} | {part.round_of(i) for i in part.offloaded if part.graph.ops[i].inputs[0] in raw})


def carries_input(part: Partition) -> set[int]:
    """The tensors made from a model input with no offloaded layer between: the inputs, and every output of
    an op the TEE runs on one of these. An offloaded depthwise layer (``groupmix:depthwise=offload``)
    counts as no layer between: it filters each channel on its own, and its results cross back channel by
    channel, so the next round would receive a filtered copy of the input (a review recovered the image
    from it at 0.70-0.80)."""
    graph, offloaded = part.graph, part.offloaded
    raw = set(graph.inputs)
    for i, op in enumerate(graph.ops):
        through = i not in offloaded or op.kind == "DEPTHWISE_CONV_2D"
        if through and any(t in raw for t in op.inputs if t >= 0):
            raw.update(op.outputs)
    return raw


# Kinds of op that are layers of weights (with a constant second input): what stands between a tensor and
# the user's input for ``one_layer_from_input``.
LAYER_KINDS = frozenset({"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV", "CONV_3D",
                         "BATCH_MATMUL"})


def after_input_rounds(part: Partition) -> list[int]:
    """The rounds, other than ``input_rounds``, whose offloaded layers read what one layer on the user's input
    made (``one_layer_from_input``): a normal world that chooses its inputs solves that layer, in real
    coordinates, from such a round's input where it crosses unmasked (``shadownet.chosen_inputs``: every
    first-layer filter of the zoo's MiniVGG and ResNet-44 from 21 inferences, a helper's probe). The default
    mask policy masks them as it masks the rounds that carry the input."""
    graph, made = part.graph, one_layer_from_input(part)
    carrying = set(input_rounds(part))
    return sorted({part.round_of(i) for i in part.offloaded if graph.ops[i].inputs[0] in made} - carrying)


# Ops that carry each of their inputs into their output unchanged, as a part of it: a tensor that holds
# what one layer made of the input, beside anything else, holds it still (a DenseNet block's concatenation
# of the first layer's output with a deeper one's gave the chosen-input attack all 16 of the first layer's
# filters from the round that read it, unmasked: a review).
CARRY_THROUGH = frozenset({"CONCATENATION", "PACK"})


def one_layer_from_input(part: Partition) -> set[int]:
    """The tensors that hold what one layer of weights made of a user input with no other layer on any path
    between (the layer's activation, a pool, a pad, a per-channel scale, the input beside it), or that
    carry such a tensor unchanged as a part of theirs (``CARRY_THROUGH``: a concatenation)."""
    graph, raw = part.graph, carries_input(part)
    made: set[int] = set()
    for i, op in enumerate(graph.ops):
        computed = [t for t in op.inputs if t >= 0 and graph.tensors[t].data is None]
        weights = len(op.inputs) > 1 and op.inputs[1] >= 0 and graph.tensors[op.inputs[1]].data is not None
        if op.kind in LAYER_KINDS and (weights or i in part.offloaded):
            if op.inputs[0] in raw and op.outputs[0] not in raw:  # (an offloaded depthwise layer: raw still)
                made.update(op.outputs)
        elif any(t in made for t in computed) and (
                op.kind in CARRY_THROUGH or all(t in made or t in raw for t in computed)):
            made.update(op.outputs)
    return made


def layers_from_input(part: Partition) -> dict[int, int]:
    """The tensors computed from a user input, each with the most layers of weights on any path from one
    (0: the inputs and what the TEE made of them with no layer between; a residual sum counts its deeper
    path): the depth of the network a normal world that chooses its inputs must fit to explain the tensor
    where it crosses (two layers fitted through round 3's Gaussian mask took MiniVGG's first two:
    SECURITY.md). A depthwise layer counts, offloaded or not."""
    graph = part.graph
    depth = {t: 0 for t in graph.inputs}
    for i, op in enumerate(graph.ops):
        reached = [depth[t] for t in op.inputs if t in depth]
        if not reached:
            continue
        weights = len(op.inputs) > 1 and op.inputs[1] >= 0 and graph.tensors[op.inputs[1]].data is not None
        layer = op.kind in LAYER_KINDS and (weights or i in part.offloaded)
        for t in op.outputs:
            depth[t] = max(reached) + layer
    return depth


def narrow_rounds(part: Partition, min_channels: int | None) -> list[int]:
    """The rounds, other than ``input_rounds``, with an offloaded layer whose input has fewer channels than
    the scheme mixes (``min_channels``: ``converters.schemes.group_min_channels``; None: it mixes none, and
    no round counts): unmasked, such an input crosses as the TEE made it, channel by channel, and the
    restore regression learns the restore of the layer that made it, then its filters (SECURITY.md, "narrow
    layers' inputs"; a helper's model of 3-, 5- and 7-channel layers: 6 of its 17 filters, stop 56)."""
    if min_channels is None:
        return []
    graph, carrying = part.graph, set(input_rounds(part))
    narrow = {part.round_of(i) for i in part.offloaded
              if (shape := graph.tensors[graph.ops[i].inputs[0]].shape) and shape[-1] < min_channels}
    return sorted(narrow - carrying)


def always_masked(part: Partition, min_channels: int | None) -> list[int]:
    """The rounds one-time masks cover whatever the policy: those that carry a user input
    (``input_rounds``), those one layer from it (``after_input_rounds``) and those whose input is too narrow
    to mix (``narrow_rounds``)."""
    return sorted({*input_rounds(part), *after_input_rounds(part), *narrow_rounds(part, min_channels)})


def offloads(graph: Graph, op_index: int, in_tee: frozenset[str] = frozenset()) -> bool:
    """Whether the op goes to the accelerator: offloadable, not of a kind the scheme keeps in the TEE
    (``in_tee``), and its input is computed (an op on a constant input is constant folding, left to the
    TEE)."""
    if not is_offloadable(graph, op_index) or graph.ops[op_index].kind in in_tee:
        return False
    x = graph.ops[op_index].inputs[0]
    return x >= 0 and graph.tensors[x].data is None


def partition(graph: Graph, in_tee: frozenset[str] = frozenset(),
              long_input_sums_in_tee: bool = False, longest: int | None = None) -> Partition:
    """Levels, rounds and steps of a normalized graph (ops in execution order); ``in_tee``: the kinds of
    offloadable op the scheme keeps in the TEE (``groupmix``'s ``depthwise="tee"``);
    ``long_input_sums_in_tee``: also the conv and dense layers on the user's input whose sums are too long
    for an exact split (module docstring), as ``Partition.long_sums``: more than ``longest`` terms per
    output (None: ``exact_split.MAX_DOT_LENGTH``; the audit gives an older artifact's)."""
    kept: frozenset[int] = frozenset()
    while True:
        part = _levels(graph, in_tee, kept)
        more = long_sums(part, carries_input(part), longest) if long_input_sums_in_tee else set()
        if not more:
            return part
        kept |= more


def _levels(graph: Graph, in_tee: frozenset[str], kept: frozenset[int]) -> Partition:
    """The partition with the ops ``kept`` in the TEE besides the kinds ``in_tee``."""
    level = [0] * len(graph.tensors)
    rounds: dict[int, list[int]] = {}
    steps: dict[int, list[int]] = {}
    for i, op in enumerate(graph.ops):
        deps = max((level[t] for t in op.inputs if t >= 0), default=0)
        if i not in kept and offloads(graph, i, in_tee):
            op_level = deps + 1
            rounds.setdefault(op_level, []).append(i)
        else:
            op_level = deps
            steps.setdefault(op_level, []).append(i)
        for t in op.outputs:
            level[t] = op_level
    count = max(rounds, default=0)
    return Partition(graph, [rounds.get(r, []) for r in range(1, count + 1)],
                     [steps.get(k, []) for k in range(count + 1)], level, kept)


def long_sums(part: Partition, reading: set[int], longest: int | None = None) -> set[int]:
    """The offloaded conv and dense layers that read a tensor of ``reading`` (the user's input:
    ``carries_input``) with more terms per output than ``longest`` (None: ``exact_split.MAX_DOT_LENGTH``),
    what an exact split allows."""
    graph, longest = part.graph, longest or exact_split.MAX_DOT_LENGTH
    return {i for i in part.offloaded
            if graph.ops[i].kind in ("CONV_2D", "FULLY_CONNECTED") and graph.ops[i].inputs[0] in reading
            and exact_split.dot_length(graph.tensors[graph.ops[i].inputs[1]].data) > longest}
