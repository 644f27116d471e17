"""From a partitioned graph to the contents of the three artifacts.

``build`` obfuscates every offloaded op with the scheme, writes the accelerator's model (one signature
``round_r`` per round: obfuscated weights only, no bias, no activation), draws the push masks, computes
the pop masks by linearity (float64, through the obfuscated layer and the restore) - the accelerator side,
``converters.plan_rounds`` - and lays out the TEE program: per step, an instruction list over named
buffers, the TEE-side ``.tflite`` with the step's other ops, a secure arena of slots, and the
shared-memory layout that the manifest publishes - the TEE side, ``converters.plan_tee``, with the ops
the TA runs in numpy in ``converters.plan_numpy``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from converters import anisotropy, exact_split
from converters.graph import Graph, write_model
from converters.normalize import PLAN_REVISION
from converters.partition import Partition
from converters.per_inference import describe, locate_weights
from converters.plan_tee import TeeProgramBuilder
from converters.schemes import ActivationStats, Scheme
from converters.secret_random import Random
from tee_sim.program import PROGRAM_FORMAT

# Ops that multiply by weights: what is not offloaded of these (a grouped convolution of narrow groups, a
# matrix product, a 3-D convolution, a layer whose weights are computed) runs in the TEE, and the
# conversion says so.
LINEAR_KINDS = frozenset({"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV",
                          "BATCH_MATMUL", "CONV_3D", "CONV_3D_TRANSPOSE"})


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
    # Each offloaded layer's result buffer ("round_2/out/y0") -> the model's layer, for the conversion's
    # messages (not written anywhere)
    layer_names: dict[str, str] = field(default_factory=dict)


def build(graph: Graph, part: Partition, scheme: Scheme, rng: Random,
          stats: dict[int, ActivationStats], one_time_rounds: Sequence[int] = (),
          needs_split: dict[int, bool] | None = None, samples: list[list[np.ndarray]] | None = None) -> Plan:
    """Obfuscate, mask and lay out a partitioned, normalized graph (see the module docstring);
    ``one_time_rounds``: the rounds whose masks the TEE draws per inference (``converters.per_inference``);
    ``needs_split``: per model input, whether its mask needs an exact split (``converters.calibration``);
    ``samples``: calibration inputs, on which the checked layers' anisotropy is measured
    (``converters.anisotropy``)."""
    b = TeeProgramBuilder(graph, part, scheme, rng, stats, one_time_rounds, needs_split)
    b.obfuscate_rounds()
    measured = anisotropy.layer_inputs(b, samples or [])  # before the TEE's plan adds to the graph
    b.plan_tee()
    b.emit()
    b.layout()
    per_inference = describe(b, one_time_rounds)
    untrusted = write_model(b.untrusted, b.signatures)
    locate_weights(untrusted, per_inference["layers"])
    for name, value in anisotropy.measure(b, per_inference["layers"], measured, untrusted).items():
        per_inference["layers"][name]["anisotropy"] = value
    arrays = dict(b.arrays)
    if b.tee_model is not None:
        arrays["tee_model"] = np.frombuffer(b.tee_model, np.uint8)
    program = {
        "format": PROGRAM_FORMAT,
        "scheme": scheme.name,
        "shared_memory_size": b.shared_memory_size,
        "shared_buffers": {x["name"]: {"offset": x["offset"], "dtype": "float32",
                                       "shape": b.tee_shapes.get(x["name"], x["shape"])} for x in b.buffers},
        "arena_size": b.arena_size,
        "slots": b.slots,
        "tee_model": "tee_model" if b.tee_model is not None else None,
        "tee_model_arena_bytes": b.tee_arena_bytes,
        "signatures": b.signature_specs,
        "steps": b.steps,
        **per_inference,
    }
    offloaded = part.offloaded
    in_tee = [op.kind for i, op in enumerate(graph.ops) if op.kind in LINEAR_KINDS and i not in offloaded]
    summary = {"rounds": b.R, "offloaded_ops": sum(len(r) for r in part.rounds),
               "tee_linear_ops": len(in_tee), "tee_linear_kinds": sorted(set(in_tee)),
               "tee_litert_ops": sum(len(s) for s in b.step_ops), "tee_numpy_activations": len(b.fused),
               "tee_numpy_ops": len(b.numpy_ops),
               # Layers kept in the TEE for their long sums (converters.partition), by op index in the
               # normalized graph: the audit reads them (a later rule would misjudge an older artifact).
               "long_sums": [{"op": i, "layer": graph.tensors[graph.ops[i].outputs[0]].name}
                             for i in sorted(part.long_sums)],
               # The longest sum per output an exact split took (converters.exact_split): longer ones were
               # cut into chunks (converters.normalize.chunked). Absent before stop 56, whose artifacts the
               # audit plans as they were: no chunks, 16,384 terms (shadownet.audit_layers.planned_as).
               "long_sum_terms": exact_split.MAX_DOT_LENGTH,
               # What the normalization did beyond stop 56's plan (converters.normalize.PLAN_REVISION).
               # Absent before stop 57 (shadownet.audit_layers.planned_as).
               "plan_revision": PLAN_REVISION}
    names = {f"round_{r}/out/{rest['name']}": graph.describe_op(rest["op"])
             for r, rests in enumerate(b.restores, start=1) for rest in rests}
    return Plan(untrusted, program, arrays, b.rounds, b.buffers, b.shared_memory_size, summary, names)
