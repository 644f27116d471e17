"""The audit's input leakage: what the accelerator receives in each round, against the reference tensor it
carries and against the user's input (``shadownet audit``; the measures themselves are
``shadownet.input_leakage``'s).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np

from shadownet.audit_layers import LinearLayer, join_halves, split_names
from shadownet.boundary import round_number
from shadownet.input_leakage import (
    averaging_leakage,
    difference_leakage,
    known_input_leakage,
    pooled_leakage,
    single_leakage,
)


def reference_activations(graph: Any, batches: list[list[np.ndarray]],
                          names: set[str]) -> dict[str, np.ndarray]:
    """The reference model's true tensors ``names`` (plus its inputs) on the same inputs, stacked. Run as
    the converter normalized it (``graph``: ``audit_layers.reference_graph``, exact), so that the tensors
    the rewrites make - a transposed convolution's padded input, which its phases' pushes carry, a grouped
    convolution's groups' inputs - are there too."""
    from ai_edge_litert.interpreter import Interpreter

    from converters.graph import write_model

    with warnings.catch_warnings():
        # LiteRT warns that keeping every tensor is for debugging: here it is the point.
        warnings.simplefilter("ignore", UserWarning)
        interpreter = Interpreter(model_content=write_model(graph), experimental_preserve_all_tensors=True)
    interpreter.allocate_tensors()
    index = {d["name"]: d["index"] for d in interpreter.get_tensor_details()}
    inputs = interpreter.get_input_details()
    out: dict[str, list[np.ndarray]] = {}
    for arrays in batches:
        for detail, x in zip(inputs, arrays, strict=True):
            interpreter.set_tensor(detail["index"], x)
        interpreter.invoke()
        for name in names:
            if name in index:
                out.setdefault(name, []).append(np.array(interpreter.get_tensor(index[name])))
    return {name: np.stack(values) for name, values in out.items()}


def round_sources(manifest: dict, pairs: list[tuple[LinearLayer, LinearLayer]]) -> dict[str, str | None]:
    """Round input buffer -> the reference tensor it carries (masked): the input of the reference layer
    matched to an obfuscated layer that reads it. The attacker learns this from the layer matching."""
    by_input = {}
    for ref, obf in pairs:
        if obf.input is not None:
            by_input.setdefault((obf.where, obf.input), ref.input)
    sources: dict[str, str | None] = {}
    for r in manifest.get("rounds", []):
        for t in r.get("inputs", []):
            sources[t["buffer"]] = t.get("tensor") or by_input.get((r["signature"], t["name"]))
    return sources


# Layers whose weights stand between a model input and what they make of it: their output is no longer the
# user's input, wherever they run (offloaded, or kept in the TEE). By kind, the input that holds the weights
# when constant (None: either), an embedding's table too (a review) - not a gather's indices, which only
# reorder the input (a review of that)
_WEIGHTS_AT: dict[str, int | None] = {"CONV_2D": 1, "DEPTHWISE_CONV_2D": 1, "FULLY_CONNECTED": 1,
                                      "TRANSPOSE_CONV": 1, "CONV_3D": 1, "BATCH_MATMUL": None, "GATHER": 0,
                                      "GATHER_ND": 0, "EMBEDDING_LOOKUP": 1}


def raw_tensors(graph: Any, given: int) -> set[str]:
    """The reference tensors made from model input ``given`` (a tensor id) with no layer of weights between
    (padded, sliced, reshaped, concatenated, activated...): where a round carries the user's input itself.
    A first layer kept in the TEE made round 1 carry its hidden activation, which was scored as the user's
    input (a helper's probe)."""
    raw = {given}
    for op in graph.ops:
        at = _WEIGHTS_AT.get(op.kind, -1)
        weights = [] if at == -1 else op.inputs if at is None else op.inputs[at:at + 1]
        weighted = any(graph.tensors[t].data is not None for t in weights if t >= 0 and t not in raw)
        if not weighted and any(t in raw for t in op.inputs if t >= 0):
            raw.update(op.outputs)
    return {graph.tensors[t].name for t in raw}


def input_leakage(seen: dict[str, np.ndarray], batches: list[list[np.ndarray]], reference: Any,
                  manifest: dict, pairs: list[tuple[LinearLayer, LinearLayer]]) -> dict:
    """Leakage of the user's input and of every round's true activation through the accelerator's inputs
    (``seen``: ``boundary.observe_boundary`` on ``batches``; ``reference``: the reference model's graph,
    ``audit_layers.reference_graph``)."""
    inferences = len(batches)
    seen = join_halves({k: v for k, v in seen.items() if k.startswith("round_") and "/in/" in k},
                       split_names(manifest)[1])
    sources = round_sources(manifest, pairs)
    truth = reference_activations(reference, batches, {s for s in sources.values() if s})
    user = [np.stack([b[i] for b in batches]) for i in range(len(manifest["inputs"]))]
    carrying = set((manifest.get("masks") or {}).get("input_rounds") or [1])  # rounds that push a user input
    # (round 1 always, masked whatever it carries): each input measured only where what crosses is still
    # that input (raw_tensors)
    raw = [raw_tensors(reference, t) for t in reference.inputs]
    rows = []
    first: dict[str, float] = {}

    def measure(r: int, buffer: str, observed: np.ndarray, tensor: str | None) -> dict[str, Any]:
        row: dict[str, Any] = {"round": r, "buffer": buffer, "shape": list(observed.shape[1:]),
                               "tensor": tensor}
        target = truth.get(tensor) if tensor else None
        if target is not None:
            row["single"] = single_leakage(observed, target)
            row["difference"] = difference_leakage(observed, target)
            row["pooled"] = pooled_leakage(observed, target)
        if r in carrying:
            # Against the user's raw input itself, whatever tensor round 1 carries: its reference tensor when
            # that is the input zero-padded (as the model pads it) or a group's channels of it (as a grouped
            # convolution reads it), the shape pushed; the input itself for a tensor's copies side by side.
            # Likewise in a round a user input joins later (``input_rounds``), where the fits that match its
            # positions run (a vector beside pooled features: the pooled fit).
            for k, x in enumerate(user):
                if tensor is not None and tensor not in raw[k]:
                    continue
                if x.ndim < 2:  # a scalar per inference (a temperature): no fit has values to score
                    row[f"user_input_{k}"] = {fit: {} for fit in ("single", "difference", "pooled",
                                                                  "averaged", "known_input")}
                    continue
                if r == 1 and x.shape != observed.shape and target is not None and len(user) == 1 and (
                        target.shape == observed.shape or (x.shape[:-1] != observed.shape[:-1]
                                                           and target.shape[:-1] == observed.shape[:-1])):
                    x = target
                single = single_leakage(observed, x)
                diff = difference_leakage(observed, x)
                pooled = pooled_leakage(observed, x)
                averaged = averaging_leakage(observed, x)
                known = known_input_leakage(observed, x)
                row[f"user_input_{k}"] = {"single": single, "difference": diff, "pooled": pooled,
                                          "averaged": averaged, "known_input": known}
                for key, fig in (("correlation", single), ("difference_correlation", diff),
                                 ("pooled_correlation", pooled), ("averaged_correlation", averaged),
                                 ("known_input_correlation", known)):
                    if fig.get("correlation") is not None:
                        first[key] = max(first.get(key, 0.0), fig["correlation"])
                for key, fig in (("psnr_db", single), ("known_input_psnr_db", known)):
                    if fig.get("psnr_db") is not None:
                        first[key] = max(first.get(key, -math.inf), fig["psnr_db"])
        return row

    copies: dict[tuple[int, str], list[str]] = {}
    for buffer in sorted(seen, key=lambda b: (round_number(b.split("/")[0]), b)):
        r = round_number(buffer.split("/")[0])
        rows.append(measure(r, buffer, seen[buffer], sources.get(buffer)))
        if sources.get(buffer):
            copies.setdefault((r, sources[buffer]), []).append(buffer)
    # A tensor that crosses more than once in a round (readers that cannot share one push: SECURITY.md),
    # each copy transformed and masked independently: fitted from all its copies together too.
    for (r, tensor), buffers in copies.items():
        if len(buffers) > 1 and len({seen[b].shape[:-1] for b in buffers}) == 1:
            joint = np.concatenate([seen[b] for b in buffers], axis=-1)
            rows.append(measure(r, "+".join(buffers), joint, tensor) | {"copies": len(buffers)})
    singles = [r["single"]["correlation"] for r in rows if r.get("single", {}).get("correlation") is not None]
    diffs = [r["difference"]["correlation"] for r in rows
             if r.get("difference", {}).get("correlation") is not None]
    pooled = [r["pooled"]["correlation"] for r in rows if r.get("pooled", {}).get("correlation") is not None]
    # A user input no fit could score (a 10-value vector: too few values in one inference, too few
    # inferences for the fit across them): said by name, not a row of dashes (a helper's probe).
    measured = {int(key.rsplit("_", 1)[1]) for row in rows for key, figs in row.items()
                if key.startswith("user_input_") and any((figs.get(fit) or {}).get("correlation") is not None
                                                         for fit in ("single", "difference", "pooled"))}
    crossed = {int(key.rsplit("_", 1)[1]) for row in rows for key in row if key.startswith("user_input_")}
    unmeasured = [f"{spec['name']} {list(spec['shape'])}" for k, spec in enumerate(manifest["inputs"])
                  if k in crossed and k not in measured]
    kept = [f"{spec['name']} {list(spec['shape'])}" for k, spec in enumerate(manifest["inputs"])
            if k not in crossed]
    return {
        "inferences": inferences,
        "first_round": first,
        "unmeasured_inputs": unmeasured,
        "inputs_not_crossing": kept,
        "max_round_correlation": max(singles) if singles else None,
        "max_round_difference_correlation": max(diffs) if diffs else None,
        "max_round_pooled_correlation": max(pooled) if pooled else None,
        "rounds": rows,
    }
