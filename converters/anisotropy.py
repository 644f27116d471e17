"""How far each checked layer's inputs are from isotropic, measured on the calibration inputs, so that the
TA's integrity checks take enough projections (``tee_sim.freivalds``).

The TA picks a layer's number of projections ``k`` at load from an estimate of ``||tau|| / ||y'||`` - the
check's tolerance against the result's norm - that assumes the accelerator's input windows point in every
direction alike: ``||y'_p|| ~ ||W'||_F ||x_p|| / sqrt(T C)`` (``T`` taps, ``C`` channels). A layer whose
inputs lie where its filters respond little (activations whose channels move together, a mixing of
filters whose span misses them) has a smaller ``||y'||`` than that, a larger ``beta`` per projection, and
fell short of the 2^-20 bound (a helper's probe of stop 38: 2^-17 to 2^-19.3 under ``--scheme shadownet``).
Here the converter pushes each calibration sample as the TEE would (the layer input transformed as the
scheme transforms it, the static mask added; padded as the push pads it), runs the untrusted model's
rounds on it with LiteRT and measures, per layer, ``||n|| ||W'||_F / (sqrt(T C) ||y'||)`` over the
output positions (``n_p`` the window's norm, over every tap and channel, as the TA's ``tau`` reads it):
1 for isotropic inputs. The largest over the samples (the first ``MEASURED_SAMPLES``; a blank one says
nothing), at least 1, goes into the layer's descriptor (``anisotropy``); the TA multiplies its estimate by
it before its margin (which stays for inputs unlike the calibration's), and says at load how many layers
would need more projections than a check takes. One-time-masked pushes (a mask of 10x their input's
spread dominates them) and exact splits keep 1. What it cannot bound: a layer whose ratio varies from
input to input by more than the margin - under the paper's scheme, a small dense layer whose obfuscated
filters put nearly all their energy in one or two N(0, 1) fakes follows one random projection of its
input (a review: 10-30x from input to input on the zoo MiniVGG's classifier, whose checks then reached
2^-8 and worse; past about 20x the honest tolerance exceeds a 1e-3 change and no number of projections
helps). The TA computes such dense layers instead (``tee_sim.freivalds_directions``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from converters import linear
from converters.calibration import litert_runner
from converters.graph import Graph

# A layer whose results vanish on a sample whose windows do not gets this: k at its maximum.
MAX_ANISOTROPY = 2.0 ** 20
# At most this many calibration samples are measured: their activations are held until the untrusted
# model exists (float32; MobileNet's 7.5 MiB a sample).
MEASURED_SAMPLES = 16


def layer_inputs(builder: Any, samples: list[list[np.ndarray]]) -> list[dict[int, np.ndarray]]:
    """Per calibration sample, the values of the tensors whose pushes ``measure`` measures, from LiteRT
    running the graph of ``builder`` (after ``obfuscate_rounds``, before the TEE's plan adds to it)."""
    g: Graph = builder.g
    measured = [p["tensor"] for pushes in builder.pushes for p in pushes if _measured(p)]
    if not samples or not measured:
        return []
    sources = sorted(set(measured) - set(g.inputs))
    run = litert_runner(g, sources)
    values = []
    for sample in samples[:MEASURED_SAMPLES]:
        outputs = run(sample)[len(g.outputs):]
        found = {t: np.asarray(v, np.float32) for t, v in zip(sources, outputs, strict=True)}
        found.update(zip(g.inputs, sample, strict=False))
        values.append(found)
    return values


def measure(builder: Any, layers: dict[str, dict[str, Any]], inputs: list[dict[int, np.ndarray]],
            untrusted: bytes) -> dict[str, float]:
    """{layer descriptor name: anisotropy > 1} for the checked layers of ``builder``'s rounds (a
    ``converters.plan_tee.TeeProgramBuilder``) that the calibration samples (``layer_inputs``) show
    further from isotropic than the TA's estimate assumes."""
    from ai_edge_litert.interpreter import Interpreter

    if not inputs:
        return {}
    wanted = sorted({r for r, pushes in enumerate(builder.pushes, start=1) for p in pushes if _measured(p)})
    g: Graph = builder.g
    interpreter = Interpreter(model_content=untrusted, num_threads=2)
    runners: dict[int, Any] = {}
    found: dict[str, float] = {}
    for values in inputs:
        for r in wanted:
            feeds, squares = {}, {}
            # Each push's readers share its input transform: any one of them applies it.
            reader = {rest["push"]: rest["obf"] for rest in builder.restores[r - 1]}
            for p in builder.pushes[r - 1]:
                if not _measured(p):
                    feeds[p["name"]] = np.zeros(p["wire_shape"], np.float32)
                    continue
                x = np.asarray(values[p["tensor"]], np.float64)
                if p["pad"] is not None:
                    x = np.pad(x, p["pad"])
                x = reader[p["name"]].transform_input(x)
                if p["mask"] is not None:
                    x = x + np.asarray(p["mask"], np.float64)
                feeds[p["name"]] = x.astype(np.float32)
                squares[p["name"]] = np.square(x).sum(axis=-1, keepdims=True)
            if r not in runners:
                runners[r] = interpreter.get_signature_runner(f"round_{r}")
            results = runners[r](**feeds)
            for rest in builder.restores[r - 1]:
                name = f"round_{r}/out/{rest['name']}"
                if rest["push"] not in squares or name not in layers:
                    continue
                op = g.ops[rest["op"]]
                weights = np.asarray(rest["obf"].weights, np.float64)
                y_norm = float(np.sqrt(np.sum(np.square(np.asarray(results[rest["name"]], np.float64)))))
                window = _window_norm2(op.kind, squares[rest["push"]], weights.shape, op.options)
                taps_channels = weights.shape[1] if op.kind == "FULLY_CONNECTED" \
                    else weights.shape[1] * weights.shape[2] * feeds[rest["push"]].shape[-1]
                if window == 0:  # a blank sample (zero windows, zero results): it says nothing
                    continue
                ratio = float(np.sqrt(window * np.sum(np.square(weights)) / taps_channels)) / y_norm \
                    if y_norm > 0 else MAX_ANISOTROPY
                found[name] = max(found.get(name, 1.0), min(ratio, MAX_ANISOTROPY))
    return {name: value for name, value in found.items() if value > 1.0}


def _measured(push: dict[str, Any]) -> bool:
    """Whether a push's layers are measured: not one-time-masked (the mask dominates), not split."""
    return not push["one_time"] and push["split"] is None


def _window_norm2(kind: str, squares: np.ndarray, weights_shape: tuple[int, ...], options: Any) -> float:
    """``sum_p ||window_p||^2`` over the output positions, for an input whose squared norms per position
    are ``squares`` (``[..., 1]``): each position's, times the windows that read it."""
    if kind == "FULLY_CONNECTED":
        return float(squares.sum())
    return float(linear.conv2d(squares, np.ones((1, weights_shape[1], weights_shape[2], 1)), options).sum())
