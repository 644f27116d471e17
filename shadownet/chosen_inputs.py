"""The chosen-input attack: the normal world runs inputs of its own and solves a first layer from what
crosses after it.

Until stop 56 the rounds after the first crossed unmasked by default; since, those this attack reads get
one-time masks whatever the policy (``converters.partition.always_masked``), and it finds nothing there: it
measures ``groupmix:mask_floor=input``, older artifacts and any round the floor would miss. Where a conv
layer reads the user's input (through no other layer of weights) and its output, through a ReLU or ReLU6
alone, crosses as the input of a round without a one-time mask, that crossing is
``o = B act(w . patch + b)`` at every position: ``B`` the scheme's secret input mixing (``groupmix``:
orthogonal blocks of a public size; none for a tensor too narrow to mix), the patches known to an attacker
who chose the input. Two steps (a helper's probe, stop 56):

1. ``B``'s columns. Inputs moved around one input ``x0`` by a small step leave every unit on or off as it
   was at almost every position; there the changes of ``o`` span the columns of ``B`` of the units that are
   on. ``B`` being orthogonal, the projectors onto those spans commute, and a random combination of them
   has ``B``'s columns as its eigenvectors; a trimmed refit makes each exact (it annihilates every position
   where its unit is off).
2. The filters. ``u_j . o = act(w_j . patch + b_j)`` exactly; least squares over the positions where the
   unit is on gives ``w_j`` (and ``b_j``) in the input's real coordinates.

No secret and no reference weight is used: the reference only says which layer is whose (the architecture,
which is public) and scores the estimates, as for every attack of the suite. One-time masks on the round
stop it (each inference's fresh mask is in every change of ``o``, so no projector is of low rank).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from shadownet.audit_layers import LinearLayer, join_halves, match_layers, split_names

STEPS = 20  # inputs moved around the base input, each by a fresh random direction
STEP = 1e-3  # their step, relative to the base input's RMS: small enough that few units switch
INFERENCES = STEPS + 1
_ACTIVATIONS = {"RELU": math.inf, "RELU6": 6.0}  # an activation whose units are off at exactly zero: its top
_MIN_POSITIONS = 4  # positions per unknown of a filter (and its bias) that the least squares want
_TRIMMED = 0.3  # the share of positions a column's refit takes as those its unit is off at (half, for ReLU)


def chosen_input_attack(out_dir: str | os.PathLike, graph: Any, manifest: dict, reference: list[LinearLayer],
                        obfuscated: list[LinearLayer], scheme: Any,
                        progress: Callable[[str], None] | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """Run the attack on the protected model in ``out_dir``: its estimates by reference layer name (rows like
    its filters, for ``attacks.attack_layer``'s ``from_crossings``), and what ran, for the report. No
    inference when no layer fits (``targets``)."""
    from shadownet.audit_leakage import raw_tensors, reference_activations, round_sources
    from shadownet.boundary import observe_boundary

    pairs, _, _ = match_layers(reference, obfuscated)
    raw = set().union(*(raw_tensors(graph, t) for t in graph.inputs))
    found = targets(graph, raw, round_sources(manifest, pairs))
    if not found:
        return {}, {"inferences": 0, "layers": []}
    if progress:
        layers = len({t["layer"] for t in found})
        progress(f"chosen inputs: {INFERENCES} inferences of the attacker's own inputs, to solve "
                 f"{layers} first layer{'s' * (layers != 1)} from the rounds that carry it")
    inputs = batches(manifest["inputs"])
    seen = join_halves(observe_boundary(out_dir, inputs), split_names(manifest)[1])
    read = reference_activations(graph, inputs, {t["input"] for t in found})
    blocks = getattr(scheme, "input_blocks", lambda channels: None)
    estimates, rows = {}, []
    for t in found:
        crossing = seen[t["buffer"]]
        a, b = t["channels"]
        # The scheme's mixing blocks within those channels (one that straddles them mixes in others)
        within = [(lo - a, hi - a) for lo, hi in (blocks(crossing.shape[-1]) or
                                                   [(c, c + 1) for c in range(crossing.shape[-1])])
                  if a <= lo and hi <= b]
        found_rows = attack(t, graph, carried(t, crossing), read[t["input"]], within)
        rows.append({"layer": t["layer"], "buffer": t["buffer"], "estimates": len(found_rows)})
        if t["layer"] in estimates:  # another crossing that carries it
            found_rows = np.vstack([estimates[t["layer"]], found_rows])
        estimates[t["layer"]] = found_rows
    return estimates, {"inferences": INFERENCES, "layers": rows}


def targets(graph: Any, raw: set[str], sources: dict[str, str | None], leaky: bool = False) -> list[dict]:
    """The layers the attack applies to, in the reference ``graph`` (``audit_layers.reference_graph``):
    a CONV_2D of constant weights reading a tensor of ``raw`` (made from a user input with no layer of
    weights between: ``audit_leakage.raw_tensors``), whose output, through a RELU or RELU6 alone (or a
    LEAKY_RELU of slope in [0, 1), with ``leaky``: the mask-fit attack's, which needs no unit off), is what
    a round input buffer carries, whole, as channels of a concatenation or padded (``_carriers``;
    ``sources``: buffer -> reference tensor, ``audit_leakage.round_sources``). Each with its activation's
    ``top`` and ``slope`` below 0, and where in the buffer it is (``carried``)."""
    by_tensor = {t: buffer for buffer, t in sources.items() if t}
    found = []
    for op in graph.ops:
        if op.kind != "CONV_2D" or len(op.inputs) < 2 or graph.tensors[op.inputs[1]].data is None:
            continue
        if graph.tensors[op.inputs[0]].name not in raw:
            continue
        readers = [o for o in graph.ops if op.outputs[0] in o.inputs]
        if len(readers) != 1:
            continue
        kind, slope = readers[0].kind, 0.0
        if leaky and kind == "LEAKY_RELU":
            slope = float(np.float32(readers[0].options.alpha))
            if not 0 <= slope < 1:
                continue
        elif kind not in _ACTIVATIONS:
            continue
        for buffer, channels, offset in _carriers(graph, readers[0].outputs[0], by_tensor):
            found.append({"layer": graph.tensors[op.outputs[0]].name, "op": op,
                          "input": graph.tensors[op.inputs[0]].name, "top": _ACTIVATIONS.get(kind, math.inf),
                          "slope": slope, "buffer": buffer, "channels": channels, "offset": offset,
                          "shape": graph.tensors[op.outputs[0]].shape})
    return found


def _carriers(graph: Any, tensor: int, by_tensor: dict[str, str]) -> list[tuple[str, tuple[int, int], tuple]]:
    """The round input buffers that carry ``tensor`` unchanged, itself, as the channels ``(a, b)`` of a
    concatenation on the last axis (a DenseNet block's: ``converters.partition.CARRY_THROUGH``) or inside a
    zero PAD of its rows and columns (YOLOv4-tiny's before a stride-2 conv), each with those channels and the
    ``(top, left)`` at which the tensor starts in the buffer."""
    name, shape = graph.tensors[tensor].name, graph.tensors[tensor].shape
    found = [(by_tensor[name], (0, shape[-1]), (0, 0))] if name in by_tensor else []
    for op in graph.ops:
        out = graph.tensors[op.outputs[0]]
        if tensor not in op.inputs or out.name not in by_tensor:
            continue
        if op.kind == "CONCATENATION" and op.options.axis in (-1, len(out.shape) - 1):
            start = sum(graph.tensors[t].shape[-1] for t in op.inputs[:op.inputs.index(tensor)])
            found.append((by_tensor[out.name], (start, start + shape[-1]), (0, 0)))
        elif op.kind in ("PAD", "PADV2") and op.inputs[0] == tensor and len(shape) == 4:
            pads = graph.tensors[op.inputs[1]].data
            value = graph.tensors[op.inputs[2]].data if len(op.inputs) > 2 else None
            if (pads is not None and np.shape(pads) == (4, 2) and not np.any(np.asarray(pads)[[0, 3]])
                    and (value is None or not np.any(value))):
                found.append((by_tensor[out.name], (0, shape[-1]), (int(pads[1][0]), int(pads[2][0]))))
    return found


def carried(target: dict, crossing: np.ndarray) -> np.ndarray:
    """The part of ``crossing`` (``target``'s buffer over inferences, ``[K, 1, h, w, C]``) that carries the
    layer's activated output: its channels, within a PAD's border (``_carriers``)."""
    (a, b), (top, left) = target["channels"], target["offset"]
    height, width = target["shape"][1:3]
    return crossing[:, :, top:top + height, left:left + width, a:b]


def batches(specs: list[dict], seed: int = 1) -> list[list[np.ndarray]]:
    """The attacker's inputs: one random normal input per model input, then ``STEPS`` copies of it moved by
    ``STEP`` times its RMS in random directions (float inputs only; others kept as they are)."""
    rng = np.random.default_rng(seed)
    base = random_inputs(specs, rng)
    moved = [[(x + STEP * rng.standard_normal(x.shape)).astype(x.dtype) if x.dtype.kind == "f" else x
              for x in base] for _ in range(STEPS)]
    return [base, *moved]


def random_inputs(specs: list[dict], rng: np.random.Generator) -> list[np.ndarray]:
    """One inference's inputs (the manifest's ``inputs``): random normal float inputs, zeros for others."""
    made = []
    for spec in specs:
        shape, dtype = tuple(int(d) for d in spec["shape"]), np.dtype(spec.get("dtype", "float32"))
        made.append(rng.standard_normal(shape).astype(dtype) if dtype.kind == "f" else np.zeros(shape, dtype))
    return made


def attack(target: dict, graph: Any, crossing: np.ndarray, layer_input: np.ndarray,
           blocks: list[tuple[int, int]] | None) -> np.ndarray:
    """The estimates of ``target``'s filters (rows like ``LinearLayer.filters``: ``(kh, kw, cin)`` flattened)
    from ``crossing`` (the ``C`` channels of its round input buffer that carry the layer's output, over the
    ``INFERENCES`` inferences of ``batches``, ``[K, 1, h, w, C]``) and ``layer_input`` (the tensor the layer
    read in each, ``[K, 1, H, W, cin]``: made from the attacker's own inputs with no weights); ``blocks``: the
    scheme's public input blocks within those channels (None: not mixed; none: nothing to solve). Empty when
    the geometry does not fit or too few positions are on."""
    op = target["op"]
    kernel = graph.tensors[op.inputs[1]].shape
    patches = windows_of(np.asarray(layer_input, np.float64)[:, 0], kernel, op.options)
    o = np.asarray(crossing, np.float64)[:, 0]
    if patches is None or patches.shape[:3] != o.shape[:3]:
        return np.zeros((0, int(np.prod(kernel[1:]))))
    count, channels = o.shape[0], o.shape[-1]
    flat_o, flat_p = o.reshape(-1, channels), patches.reshape(-1, patches.shape[-1])
    estimates = []
    for a, b in blocks if blocks is not None else [(c, c + 1) for c in range(channels)]:
        for u, offset in _columns(o[..., a:b], count):
            h = flat_o[:, a:b] @ u + offset
            if (h < 0).sum() > (h > 0).sum():
                h = -h
            scale = np.max(np.abs(h), initial=0.0)
            on = (h > 1e-6 * scale) & (h < target["top"] * (1 - 1e-6))
            if on.sum() < _MIN_POSITIONS * (flat_p.shape[1] + 1):
                continue
            fit, *_ = np.linalg.lstsq(np.hstack([flat_p[on], np.ones((int(on.sum()), 1))]), h[on], rcond=None)
            estimates.append(fit[:-1])
    return np.array(estimates).reshape(-1, flat_p.shape[1])


def _columns(o: np.ndarray, count: int) -> list[tuple[np.ndarray, float]]:
    """One block's mixing columns, each a unit vector ``u`` with the offset ``t`` that makes ``u . o + t``
    zero where its unit is off (a constant the TEE adds - a mask's mean - shifts that zero: step 1 of the
    module's docstring, in affine form); ``o`` is the block's crossing, ``[K, h, w, m]``, the base input's
    first."""
    m = o.shape[-1]
    rows = o.reshape(-1, m)
    if m == 1:
        return [(np.ones(1), -_mode(rows[:, 0]))]
    base, moved = o[0].reshape(-1, m), o[1:count].reshape(count - 1, -1, m)
    changes = moved - base
    rng = np.random.default_rng(7)
    combined = np.zeros((m, m))
    for n in range(changes.shape[1]):
        u, s, _ = np.linalg.svd(changes[:, n, :].T, full_matrices=False)
        if s[0] == 0:
            continue
        r = int((s > 1e-2 * s[0]).sum())
        combined += rng.standard_normal() * (u[:, :r] @ u[:, :r].T)
    _, vectors = np.linalg.eigh(combined)
    augmented = np.hstack([rows, np.ones((len(rows), 1))])
    augmented /= np.linalg.norm(augmented, axis=1, keepdims=True)
    columns = []
    for j in range(m):
        v = np.append(vectors[:, j], -_mode(rows @ vectors[:, j]))
        for _ in range(10):  # the null vector of the positions it nearly annihilates
            near = np.abs(augmented @ v)
            v = np.linalg.svd(augmented[near <= np.quantile(near, _TRIMMED)], full_matrices=False)[2][-1]
        scale = np.linalg.norm(v[:m])
        if scale > 0:
            columns.append((v[:m] / scale, float(v[m] / scale)))
    return columns


def _mode(values: np.ndarray) -> float:
    """The value most of ``values`` share: the middle of the narrowest window holding ``_TRIMMED`` of them
    (a unit's off positions, all at its offset)."""
    ordered = np.sort(values)
    width = max(int(len(ordered) * _TRIMMED), 1)
    if len(ordered) <= width:
        return float(np.median(ordered))
    start = int(np.argmin(ordered[width:] - ordered[:-width]))
    return float(np.median(ordered[start:start + width]))


def windows_of(x: np.ndarray, kernel: tuple[int, ...], options: Any) -> np.ndarray | None:
    """Every output position's input window of a CONV_2D (``kernel`` ``[M, kh, kw, cin]``) over ``x``
    (``[K, H, W, cin]``), as LiteRT pads and strides it (``converters.linear.windows``):
    ``[K, h, w, kh * kw * cin]``; None for a geometry it does not read."""
    from ai_edge_litert import schema_py_generated as schema_fb

    from converters import linear

    _, kh, kw, cin = kernel
    if x.ndim != 4 or x.shape[-1] != cin:
        return None
    same = options.padding == schema_fb.Padding.SAME
    out = [linear.padding(size, k, stride, max(int(dilation), 1), same)[0] for size, k, stride, dilation in
           ((x.shape[1], kh, options.strideH, options.dilationHFactor),
            (x.shape[2], kw, options.strideW, options.dilationWFactor))]
    if min(out) < 1:
        return None
    return np.ascontiguousarray(linear.windows(x, kh, kw, options)).reshape(x.shape[0], *out, kh * kw * cin)
