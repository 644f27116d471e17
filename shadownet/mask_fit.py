"""The mask-fit attack: a first conv layer's filters fitted through the one-time mask of the round that
carries its output (stop 60; a helper ran it with Keras on MiniVGG first: ``docs/experiments/mask_fit``).

Where a conv layer reads the user's input (with no layer of weights between) and its output, through a ReLU,
ReLU6 or leaky ReLU alone, crosses as a round's input (``chosen_inputs.targets``), each position of that
crossing is ``o = B act(W p + b) + r``: ``p`` the position's input window, known to an attacker who chose the
input, ``B`` the scheme's input mixing, ``r`` the round's one-time mask - fresh every inference and
independent of the input. Fitting ``o ~ A act(W p + b) + c`` by least squares (Adam on random positions of
many inferences; ``A`` a free linear map, which takes ``B`` and the activation's scale, ``c`` the masks'
mean) averages an additive mask out: the estimate's variance goes as (mask / signal)^2 over the samples, and
every inference gives one sample per position. Unlike the chosen-input attack (exact relations, which any
mask breaks) and the critical-point attack (probe steps far under the noise), nothing here needs the
crossing exact.

Measured: through a Gaussian one-time mask 18-25x the activations (the default until stop 61, now
``groupmix:modular_masks=false``) the zoo MiniVGG gave 30 of its 32 first-layer filters from 1,600
inferences, as many as from the unmasked crossing. A modular mask (``tee_sim.modular_masks``: what crosses is
uniform over the period whatever the input) leaves nothing to fit: 0 of 32. No secret is used; the
reference model gives the geometry and scores the estimates.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from shadownet.attacks import RECOVERY_COS, best_cosines
from shadownet.audit_layers import LinearLayer, match_layers, split_names
from shadownet.chosen_inputs import carried, random_inputs, targets, windows_of

BUDGET = 1600  # inferences: MiniVGG's 30 of 32 (the helper's fit), ~30 s of inferences on this machine
CHUNK = 100  # inferences whose windows are made at once
MAX_SAMPLES = 1 << 22  # positions kept in all (a large image's are drawn at random from each inference)
STEPS = 6000  # Adam steps, the learning rate on a cosine from LEARNING_RATE to 0
LEARNING_RATE = 3e-3
BATCH = 16384  # positions a step


def mask_fit_attack(out_dir: str | os.PathLike, graph: Any, manifest: dict, reference: list[LinearLayer],
                    obfuscated: list[LinearLayer], budget: int = BUDGET,
                    progress: Callable[[str], None] | None = None,
                    seed: int = 0, steps: int | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """Run the attack on the protected model in ``out_dir`` with ``budget`` inferences of the attacker's
    own random inputs: its estimates by reference layer name (for ``attacks.attack_layer``'s
    ``from_crossings``) and what ran, for the report (``skipped`` when no layer fits ``targets``)."""
    from shadownet.audit_leakage import raw_tensors, reference_activations, round_sources
    from shadownet.boundary import Crossing, round_number

    started = time.perf_counter()
    pairs, _, _ = match_layers(reference, obfuscated)
    raw = set().union(*(raw_tensors(graph, t) for t in graph.inputs))
    found = targets(graph, raw, round_sources(manifest, pairs), leaky=True)
    if not found:
        return {}, {"skipped": "no conv layer on the user's input whose activated output a round carries",
                    "inferences": 0}
    target = found[0]
    op = target["op"]
    kernel = graph.tensors[op.inputs[1]].shape
    carrier = round_number(target["buffer"].split("/")[0])
    rng = np.random.default_rng(seed)
    if progress:
        progress(f"mask fit: {budget} inferences of the attacker's own inputs, for {target['layer']} from "
                 f"{target['buffer']}")
    positions, windows, crossings = None, [], []
    # One load of the protected model, its target buffer alone recorded and emptied chunk by chunk: only
    # the sampled positions are kept (YOLOv4-tiny's round 2 is 5.5 MB an inference, 8.8 GB for 1,600)
    with Crossing(out_dir, target["buffer"], split_names(manifest)[1]) as crossing:
        for start in range(0, budget, CHUNK):
            count = min(CHUNK, budget - start)
            inputs = [random_inputs(manifest["inputs"], rng) for _ in range(count)]
            seen = crossing.observe(inputs)
            read = reference_activations(graph, inputs, {target["input"]})
            p = windows_of(np.asarray(read[target["input"]], np.float32)[:, 0], kernel, op.options)
            o = np.asarray(carried(target, seen), np.float32)[:, 0]
            if p is None or p.shape[:3] != o.shape[:3]:
                return {}, {"skipped": f"{target['buffer']}'s positions do not match {target['layer']}'s "
                            "windows", "inferences": 0}
            p, o = p.reshape(count, -1, p.shape[-1]), o.reshape(count, -1, o.shape[-1])
            if positions is None:
                positions = min(p.shape[1], max(MAX_SAMPLES // budget, 1))
            for i in range(count):
                kept = (rng.choice(p.shape[1], positions, replace=False) if positions < p.shape[1]
                        else slice(None))
                windows.append(p[i, kept])
                crossings.append(o[i, kept])
            if progress and start + count < budget:
                progress(f"mask fit: {start + count} of {budget} inferences")
    if progress:
        progress(f"mask fit: fitting {2 * kernel[0]} units for {kernel[0]} filters to {budget * positions} "
                 "positions")
    # Twice the layer's units: with as many, the fit left the filters of smallest norm out, with or without
    # the mask (a helper: ResNet-44's 12 of 16 against 16 of 16 from 1,600 inferences)
    estimates = fit(np.concatenate(windows), np.concatenate(crossings), 2 * int(kernel[0]), rng,
                    steps or STEPS, taps=int(kernel[1]) * int(kernel[2]), slope=target["slope"])
    ref = next((r for r, _ in pairs if r.name == target["layer"]), None)
    recovered = 0 if ref is None else int(np.sum(best_cosines(estimates, ref.filters) >= RECOVERY_COS))
    return {target["layer"]: estimates}, {
        "layer": target["layer"], "buffer": target["buffer"], "inferences": budget, "positions": positions,
        "filters": int(kernel[0]), "slope": target["slope"], "recovered": recovered,
        "masked": carrier in set((manifest.get("masks") or {}).get("one_time_rounds") or ()),
        "seconds": round(time.perf_counter() - started, 1)}


def fit(windows: np.ndarray, crossings: np.ndarray, units: int, rng: np.random.Generator,
        steps: int = STEPS, taps: int = 1, slope: float = 0.0) -> np.ndarray:
    """The filters (``[units, window]``) of ``crossings ~ A act(windows @ W + b) + c`` fitted by least
    squares, ``act(z) = max(z, slope z)`` (ReLU, or a leaky ReLU's known slope; Adam on random batches of
    rows, the learning rate on a cosine to 0; Glorot-uniform starts as Keras makes them for a conv of
    ``taps`` taps and a 1x1 one, with which the helper measured it)."""
    p = np.ascontiguousarray(windows, np.float32)
    o = np.asarray(crossings, np.float32)
    o = np.ascontiguousarray(o / (float(o.std()) or 1.0))
    n, k = p.shape
    c = o.shape[1]
    params = [rng.uniform(-1, 1, (k, units)) * math.sqrt(6 / (k + taps * units)), np.zeros(units),
              rng.uniform(-1, 1, (units, c)) * math.sqrt(6 / (units + c)), np.zeros(c)]
    # The parameters and Adam's moments in float64 (small), the products over the batch in float32: in
    # float32 the second moments of a unit's vanishing gradients sank into subnormal numbers, 40x slower.
    first, second = [np.zeros_like(x) for x in params], [np.zeros_like(x) for x in params]
    batch = min(BATCH, n)
    for step in range(1, steps + 1):
        rows = rng.integers(0, n, batch)
        x, y = p[rows], o[rows]
        w, bias, mix, offset = (v.astype(np.float32) for v in params)
        z = x @ w + bias
        on = z > 0
        h = np.where(on, z, np.float32(slope) * z)
        r = (h @ mix + offset - y) * np.float32(2 / (batch * c))
        dh = (r @ mix.T) * np.where(on, np.float32(1), np.float32(slope))
        grads = [x.T @ dh, dh.sum(0), h.T @ r, r.sum(0)]
        rate = LEARNING_RATE * 0.5 * (1 + math.cos(math.pi * (step - 1) / steps))
        correction = math.sqrt(1 - 0.999 ** step) / (1 - 0.9 ** step)
        for x_, g, m, v in zip(params, grads, first, second, strict=True):
            m *= 0.9
            m += 0.1 * g
            v *= 0.999
            v += 0.001 * np.square(g, dtype=np.float64)
            x_ -= rate * correction * m / (np.sqrt(v) + 1e-7)
    return params[0].T
