"""The accelerator side of a plan: each round's offloaded linear ops obfuscated by the scheme, the
untrusted model (one signature ``round_r`` per round: obfuscated weights only, no bias, no activation),
the push masks, and the restores' offsets - the bias minus the pop mask, computed by linearity in float64
through the obfuscated layer and the restore.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from ai_edge_litert import schema_py_generated as schema_fb

from converters import exact_split, linear
from converters.graph import Graph, Signature
from converters.partition import Partition, carries_input, input_rounds, layers_from_input
from converters.plan_numpy import numpy_activation, numpy_form
from converters.schemes import (
    ActivationStats,
    LinearLayer,
    MaskDistribution,
    ObfuscatedLinear,
    Scheme,
    always_masked_for,
)
from converters.secret_random import Random
from shadownet.exceptions import ModelFormatError, UnsupportedOpError

# Offloaded weights beyond this magnitude are no trained model's (a damaged file): added masks of the
# activations' scale times such a weight leave float32 too few digits for the layer's other outputs.
MAX_ABS_WEIGHT = 1e8
MODULAR_READERS = ("CONV_2D", "FULLY_CONNECTED")  # the layers a modular mask's unwrap serves (tee_sim)


def _check_linear(graph: Graph, i: int) -> None:
    op = graph.ops[i]
    tensors = [graph.tensors[op.inputs[0]], graph.tensors[op.outputs[0]], graph.tensors[op.inputs[1]]]
    if any(t.dtype != np.float32 for t in tensors):
        raise UnsupportedOpError(f"{graph.describe_op(i)}: only float32 linear ops can be offloaded "
                                 f"({', '.join(str(t.dtype) for t in tensors)})")
    if len(op.inputs) > 2 and op.inputs[2] >= 0 and graph.tensors[op.inputs[2]].data is None:
        raise UnsupportedOpError(f"{graph.describe_op(i)}: its bias is computed, not a constant")
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
            out_h = linear.padding(x[1], w[1], o.strideH, o.dilationHFactor or 1, same)[0]
            out_w = linear.padding(x[2], w[2], o.strideW, o.dilationWFactor or 1, same)[0]
            channels = w[0] if op.kind == "CONV_2D" else w[3]
            ok = y == (x[0], out_h, out_w, channels) and out_h > 0 and out_w > 0 \
                and (op.kind == "CONV_2D" or (w[0] == 1 and w[3] % x[3] == 0))
    if not ok or (bias is not None and bias != (channels,)):
        raise ModelFormatError(f"corrupt TFLite model: {graph.describe_op(i)} has input {list(x)}, weights "
                               f"{list(w)}, bias {bias and list(bias)} and output {list(y)}, which do not "
                               "fit together")


class RoundsBuilder:
    """The accelerator side of a plan: ``obfuscate_rounds`` fills ``untrusted`` and ``signatures`` (the
    accelerator's model), ``pushes`` and ``restores`` per round, and the ops the TEE folds into them
    (``fused`` activations, ``residuals``, ``pads``)."""

    def __init__(self, graph: Graph, part: Partition, scheme: Scheme, rng: Random,
                 stats: dict[int, ActivationStats], one_time_rounds: Sequence[int],
                 needs_split: dict[int, bool] | None = None) -> None:
        self.g, self.part, self.scheme, self.rng, self.stats = graph, part, scheme, rng, stats
        self.one_time = set(one_time_rounds)
        self.carrying = carries_input(part)  # tensors made from a model input: shaped one-time masks
        self.depth = layers_from_input(part)  # how many layers from a model input: modular deeper masks
        # Round 1 and the others every policy masks (a user input joins them, or they are one layer from it,
        # or too narrow to mix): the first policy splits them all, auto round 1 and the others up to
        # exact_split.LATE_SPLIT_BYTES.
        # Round 1's alone left a raw image concatenated to deeper features (a U-Net's skip) computing at its
        # mask's magnitude: outputs up to 2e-3 off (a helper's probe); round 2 of the zoo's MiniVGG and
        # ResNet-44 unsplit, 4-6x their error split (stop 56).
        self.always_masked = set(always_masked_for(part, scheme))
        self.input_rounds = set(input_rounds(part))
        self.needs_split = needs_split or {}  # model input -> whether its mask needs the split
        self.R = len(part.rounds)
        self.untrusted = Graph()
        self.signatures: list[Signature] = []

    def obfuscate_rounds(self) -> None:
        g, u = self.g, self.untrusted
        self.fused: dict[int, int] = {}  # offloaded op -> the activation op the restore applies
        self.pads: dict[int, int] = {}  # padded tensor -> the PAD op a push does instead
        self.result: dict[int, int] = {}  # offloaded op -> the tensor its restore produces
        self.pushes: list[list[dict[str, Any]]] = []  # per round: {tensor, name, permutation, mask}
        self.restores: list[list[dict[str, Any]]] = []  # per round: {op, name, tensor, ...arrays}
        for r, ops in enumerate(self.part.rounds, start=1):
            obfs, readers = self._obfuscate_round(r, ops)
            key_of = {i: key for key, ops_k in readers.items() for i in ops_k}
            pushes: dict[Any, dict[str, Any]] = {}
            restores = []
            sig_in: dict[str, int] = {}
            sig_out: dict[str, int] = {}
            sig_ops = []
            for i in ops:
                op = g.ops[i]
                x, y = op.inputs[0], op.outputs[0]
                obf = obfs[i]
                key = key_of[i]
                if key not in pushes:
                    j = len(pushes)
                    shape = g.tensors[x].shape
                    stats = self.stats.get(x) or ActivationStats.unit(shape[-1])
                    stats = stats.for_input_of(obf)
                    # One-time rounds: the TEE draws the mask per inference (converters.per_inference),
                    # shaped where it carries a user input, in the accelerator's channels.
                    one_time = r in self.one_time
                    dist = None
                    if one_time:
                        carries = x in self.carrying
                        dist = self.scheme.mask_distribution(
                            stats, shape if carries else None,
                            obf.transform_input(np.ones(shape[-1])) if carries else None,
                            deep=r not in self.always_masked, depth=self.depth.get(x, 0),
                            modular=all(g.ops[k].kind in MODULAR_READERS for k in readers[key]))
                    mask = None if one_time else self.scheme.push_mask(shape, stats, self.rng)
                    source, pad = self._zero_pad(x)
                    split = self._split(x, readers[key], stats, dist) \
                        if one_time and self._splits(r, source, readers[key]) else None
                    wire = shape if split is None else (*shape[:-1], 2 * shape[-1])
                    tid = u.add_tensor(f"round_{r}/x{j}", wire, np.float32)
                    sig_in[f"x{j}"] = tid
                    pushes[key] = {"tensor": source, "pad": pad, "shape": shape, "name": f"x{j}",
                                   "untrusted": tid, "permutation": obf.input_permutation, "mask": mask,
                                   "one_time": one_time, "stats": stats, "dist": dist, "split": split,
                                   "wire_shape": wire,
                                   "mix": None if obf.input_index is None
                                   else (obf.input_index, obf.input_coef),
                                   "scale": obf.input_scale}
                push = pushes[key]
                j = len(restores)
                out_shape = g.tensors[y].shape
                m = obf.weights.shape[-1] if op.kind == "DEPTHWISE_CONV_2D" else obf.weights.shape[0]
                obf_shape = (*out_shape[:-1], m)
                stored = obf.weights
                if push["split"] is not None:
                    stored = exact_split.split_weights(op.kind, obf.weights, push["split"])
                wire_shape = (*out_shape[:-1], stored.shape[0] if push["split"] is not None else m)
                w = u.add_tensor(f"round_{r}/w{j}", stored.shape, np.float32, stored)
                yt = u.add_tensor(f"round_{r}/y{j}", wire_shape, np.float32)
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
                        and numpy_activation(g.ops[consumers[0]])
                        and len(g.ops[consumers[0]].inputs) == 1):
                    self.fused[i] = consumers[0]
                self.result[i] = g.ops[self.fused[i]].outputs[0] if i in self.fused else y
                restores.append({"op": i, "name": f"y{j}", "tensor": self.result[i], "obf": obf,
                                 "offset": offset, "obf_shape": obf_shape, "wire_shape": wire_shape,
                                 "split": push["split"], "push": push["name"],
                                 "activation": g.ops[self.fused[i]] if i in self.fused else None})
            self.signatures.append(Signature(f"round_{r}", sig_ops, sig_in, sig_out))
            self.pushes.append(list(pushes.values()))
            self.restores.append(restores)
        self._fuse_residuals()

    def _obfuscate_round(self, r: int, ops: Sequence[int]) -> tuple[dict[int, ObfuscatedLinear],
                                                                    dict[Any, list[int]]]:
        """Each op of round ``r`` obfuscated by the scheme, and its pushes: key -> the ops that read it.
        The readers of one tensor share one push where their input transforms are the same - every reader
        the scheme can give the first one's transform (``Scheme.obfuscate``'s ``input_of``) - so that the
        tensor crosses once, under one mask: a block's shortcut and first conv, a transposed conv's phases.
        On a round whose pushes may cross as exact splits, readers a split cannot serve (a dense layer on a
        flattened tensor) get a push of their own, so that the others' can still be split."""
        g = self.g
        obfs: dict[int, ObfuscatedLinear] = {}
        # (tensor, split class, first reader or None when untransformed) -> readers
        readers: dict[Any, list[int]] = {}
        may_split = self._may_split(r)
        # Round 1 reads the user's input, and a later round the tensors it joins (a vector concatenated to
        # pooled features): their channels' scales are the vendor's (raw features, a standardization folded
        # into the layer), and a scheme may scale them by the columns of every conv and dense layer that
        # reads them here (``LinearLayer.peers``), one transform serving them all. Such a push is a plain
        # one (``plan_tee``: not a restore's fused push), whose mask's spread measure may weigh the
        # channels (``ObfuscatedLinear.input_scale``).
        raw = {g.ops[i].inputs[0] for i in ops if r == 1 or g.ops[i].inputs[0] in self.carrying}
        mixable = [i for i in ops if g.ops[i].kind in ("CONV_2D", "FULLY_CONNECTED")]
        for i in ops:
            _check_linear(g, i)
            op = g.ops[i]
            x, weights = op.inputs[0], g.tensors[op.inputs[1]].data
            mult = int(getattr(op.options, "depthMultiplier", 1) or 1)
            if op.kind == "DEPTHWISE_CONV_2D":
                mult = weights.shape[-1] // g.tensors[x].shape[-1]
            name = g.describe_op(i)
            split_class = self._splittable(i) if may_split else None
            mixed = [k for k in readers if k[:2] == (x, split_class) and k[2] is not None]  # x's, transformed
            first = obfs[mixed[0][2]] if mixed else None
            peers = tuple(g.tensors[g.ops[j].inputs[1]].data for j in mixable
                          if j != i and g.ops[j].inputs[0] == x) if x in raw else ()
            try:
                obf = obfs[i] = self.scheme.obfuscate(
                    LinearLayer(op.kind, weights, mult, name, g.tensors[x].shape[-1], x in raw, peers),
                    self.rng, first)
            except ValueError as exc:
                raise UnsupportedOpError(f"{name}: {exc}") from None
            key = (x, split_class, None)
            if obf.transforms_input():
                key = next((k for k in mixed if obfs[k[2]].same_input_as(obf)), (x, split_class, i))
            readers.setdefault(key, []).append(i)
        return obfs, readers

    def _fuse_residuals(self) -> None:
        """A restore with no activation of its own whose result only feeds an ADD with a tensor the TEE
        has before that restore runs (a residual block's shortcut) adds it, and the activation that
        alone follows the sum, as it stores each vector (``addend``): the ADD and the activation never
        run as numpy ops, two passes over the block's output fewer (ResNets: ~20 us of a 32x32x16
        block's TEE step)."""
        g = self.g
        self.residuals: set[int] = set()  # the ADD and activation ops the restores do
        step_of = {i: k for k, ops in enumerate(self.part.steps) for i in ops}
        ready: dict[int, int] = {t: 0 for t in g.inputs}  # tensor -> the step that makes it (inputs: 0)
        for i, k in step_of.items():
            for t in g.ops[i].outputs:
                ready[t] = k
        for r, restores in enumerate(self.restores, start=1):
            for rest in restores:
                ready[rest["tensor"]] = r
        for r, restores in enumerate(self.restores, start=1):
            for rest in restores:
                t = rest["tensor"]
                consumers = g.consumers(t)
                if rest["activation"] is not None or len(consumers) != 1 or t in g.outputs:
                    continue
                j = consumers[0]
                add = g.ops[j]
                if add.kind != "ADD" or len(add.inputs) != 2 or step_of.get(j) != r \
                        or numpy_form(g, j) is None:
                    continue
                skip = add.inputs[1] if add.inputs[0] == t else add.inputs[0]
                # Restores run first in their step: the shortcut must come from an earlier one.
                if (skip == t or skip < 0 or g.tensors[skip].data is not None
                        or g.tensors[skip].shape != g.tensors[t].shape or ready.get(skip, r) >= r):
                    continue
                total = add.outputs[0]
                after = g.consumers(total)
                act = after[0] if (len(after) == 1 and total not in g.outputs and step_of.get(after[0]) == r
                                   and numpy_activation(g.ops[after[0]])
                                   and len(g.ops[after[0]].inputs) == 1) else None
                self.residuals.add(j)
                if act is not None:
                    self.residuals.add(act)
                rest["addend"] = skip
                rest["activation"] = g.ops[act] if act is not None else None
                rest["tensor"] = self.result[rest["op"]] = g.ops[act].outputs[0] if act is not None else total

    def _may_split(self, r: int) -> bool:
        """Whether the scheme's split policy (``_splits``) may split a push of round ``r``."""
        policy = getattr(self.scheme, "exact_split", "none")
        return r in self.one_time and (policy == "all" or (r in self.always_masked
                                                            and policy in ("first", "auto")))

    def _splittable(self, i: int) -> bool:
        """Whether an exact split of its input can serve op ``i``: a conv, or a dense layer on the input's
        last axis (one on a flattened NHWC tensor would need its weights reordered)."""
        op, tensors = self.g.ops[i], self.g.tensors
        on_last_axis = tensors[op.inputs[1]].shape[-1] == tensors[op.inputs[0]].shape[-1]
        return op.kind == "CONV_2D" or (op.kind == "FULLY_CONNECTED" and on_last_axis)

    def _splits(self, r: int, source: int, readers: Sequence[int]) -> bool:
        """Whether round ``r``'s one-time push of ``source`` (read by the ops ``readers``) crosses as an
        exact split, by the scheme's policy: every one-time round (``all``), the rounds that carry a user
        input, read what one layer made of it or are too narrow to mix (``first``: the rounds of
        ``converters.schemes.always_masked_for``), or (``auto``) round 1 where the mask is
        shaped or its float32 rounding costs the outputs precision (``needs_split``, True for a shaped mask,
        measured by calibration for a white one; a tensor it did not measure, one the TEE computes, is
        split) or where the split - 3x more multiply-adds on its readers - is cheap
        (``exact_split.CHEAP_BELOW``), a later round that carries a user input where its readers' split
        weights fit ``exact_split.LATE_SPLIT_BYTES``, and one that reads what one layer made of it or is too
        narrow to mix where the split costs little (``exact_split.LATER_CHEAP_BELOW``, ``LATER_CHEAP_MACS``);
        or none."""
        policy = getattr(self.scheme, "exact_split", "none")
        if policy == "all":
            return True
        if r not in self.always_masked or policy not in ("first", "auto"):
            return False
        total = sum(_macs(self.g, i) for i in self.part.offloaded)
        extra = 3 * sum(_macs(self.g, i) for i in readers)  # the split's multiply-adds
        split_bytes = sum(4 * self.g.tensors[self.g.ops[i].inputs[1]].data.nbytes for i in readers)
        if policy == "auto" and r != 1 and r not in self.input_rounds:
            # A hidden activation under its mask loses less than a raw input does, and its split can cost
            # much (exact_split.LATER_CHEAP_BELOW), but not the long sums of layers of one output position (a
            # dense layer's, a dense layer on a 4-D tensor planned as a conv, a 1x1 conv on one position:
            # LATER_LONG_TERMS), whose split costs a pool entry little
            terms = max(exact_split.dot_length(self.g.tensors[self.g.ops[i].inputs[1]].data) for i in readers)
            long = terms > exact_split.LATER_LONG_TERMS and all(self._one_position(i) for i in readers)
            if long and self._unsplit_long(source, terms, split_bytes):
                return False
            return long or extra < max(exact_split.LATER_CHEAP_BELOW * total, exact_split.LATER_CHEAP_MACS)
        if policy == "auto" and r != 1:
            return split_bytes <= exact_split.LATE_SPLIT_BYTES
        if policy == "first" or self.needs_split.get(source, True):
            return True
        return extra < exact_split.CHEAP_BELOW * total

    def _one_position(self, i: int) -> bool:
        """Whether op ``i`` computes one output position per row: a dense layer, or a conv whose output is
        1x1 (a dense layer on a 4-D tensor as ``converters.normalize.as_convolutions`` plans it)."""
        op = self.g.ops[i]
        shape = self.g.tensors[op.outputs[0]].shape
        return op.kind == "FULLY_CONNECTED" or (
            op.kind == "CONV_2D" and len(shape) == 4 and tuple(shape[1:3]) == (1, 1))

    def _unsplit_long(self, x: int, terms: int, split_bytes: int) -> bool:
        """Whether the one-time push of ``x``, whose readers sum ``terms`` terms, stays unsplit for its split
        weights' ``split_bytes`` (past ``exact_split.LATER_SPLIT_BYTES``): warned of."""
        if split_bytes <= exact_split.LATER_SPLIT_BYTES:
            return False
        warnings.warn(
            f"{self.g.tensors[x].name!r} crosses with its one-time mask (~10x its values) unsplit: its "
            f"readers sum {terms} terms per output, whose float32 rounding at the mask's magnitude costs the "
            "outputs precision (a 4,096-term dense layer: up to 2.3e-4 of them), and their exact split would "
            f"take {split_bytes / (1 << 20):.0f} MiB of weights (at most "
            f"{exact_split.LATER_SPLIT_BYTES >> 20} split by default; --scheme groupmix:exact_split=first "
            "splits it whatever its size)",
            stacklevel=2)
        return True

    def _split(self, x: int, ops: Sequence[int], stats: ActivationStats,
               dist: MaskDistribution) -> exact_split.Split | None:
        """The exact split of a one-time push of ``x`` (``converters.exact_split``) when every op of
        ``ops`` that reads it is a conv or a dense layer on its last axis; else ``None``."""
        g = self.g
        ops = [i for i in ops if g.ops[i].inputs[0] == x]
        if not ops or not all(self._splittable(i) for i in ops):
            return None
        readers = [g.ops[i] for i in ops]
        terms = max(exact_split.dot_length(g.tensors[op.inputs[1]].data) for op in readers)
        if terms > exact_split.MAX_DOT_LENGTH and dist.std > 0:  # wanted, impossible: said (a probe)
            # (Such layers on the user's input, or one layer from it, are cut into chunks of their sums
            # where they can be, converters.normalize.chunked, and those on the input that cannot run in
            # the TEE. A deeper round's are offloaded, its one-time masks being the user's choice of
            # --mask-rounds.)
            warnings.warn(
                f"{g.tensors[x].name!r} crosses with its one-time mask (~10x its values) unsplit: a layer "
                f"reading it sums {terms} terms per output, too many for the exact split (at most "
                f"{exact_split.MAX_DOT_LENGTH}), so its results lose precision by cancellation (such "
                "layers on the user's input, where a helper measured 8.9e-4 relative error on a 96x96x3 "
                "image flattened into a dense layer and 1-12% on 31x31 convolutions of 512 positive "
                "channels, whose verified checks also failed honest results, are cut into chunks of their "
                "sums, or run in the TEE: SECURITY.md, 'Long sums')", stacklevel=2)
        return exact_split.plan(float(dist.std), np.asarray(dist.mean, np.float64),
                                max(stats.std, stats.rms), terms, modular=dist.modular)

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
        if np.any(paddings[-1]):
            # A PAD of channels runs in the TEE: a push's mixing and exact split are of the accelerator's
            # channels, and the TA refused the program for both (reviews: a split, then groupmix's input
            # mixing, which failed to load whenever such a push was not split).
            return x, None
        value = g.tensors[op.inputs[2]].data if op.kind == "PADV2" and len(op.inputs) > 2 else None
        if op.kind == "PADV2" and (value is None or np.any(value)):
            return x, None
        if not all(c in self.part.offloaded and g.ops[c].inputs[0] == x for c in g.consumers(x)):
            return x, None
        if g.tensors[op.inputs[0]].dtype != np.float32 or g.tensors[x].shape[:1] != (1,):
            # (The push writes the padded tensor's interior as rows of one stride: at a batch above 1 the
            # images' interiors are not, and the TA refused the program.)
            return x, None
        self.pads[x] = p
        return op.inputs[0], paddings.astype(int).tolist()

    def _pop(self, kind: str, obf: ObfuscatedLinear, mask: np.ndarray, options: Any,
             obf_shape: tuple[int, ...]) -> np.ndarray:
        """The pop mask: the push mask through the obfuscated layer and the restore, in float64. Zero
        padding keeps every op exactly linear, so subtracting it removes the mask's whole effect."""
        y_obf = linear.apply(kind, mask.astype(np.float64), obf.weights, options, obf_shape)
        return obf.restore(y_obf)


def _macs(g: Graph, i: int) -> int:
    """Multiply-adds of the offloaded op ``i`` (``linear.macs``)."""
    op = g.ops[i]
    return linear.macs(op.kind, g.tensors[op.outputs[0]].shape, g.tensors[op.inputs[1]].shape)
