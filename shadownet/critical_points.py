"""The critical-point attack: a first conv layer's filters from a deeper round input that crosses without
one-time masks, from inputs the normal world chooses (Carlini, Jagielski and Mironov, 2020, as a helper ran
it on MiniVGG: ``docs/experiments/critical_points``; this is that script made general and budgeted).

The crossing is ``o = B f(x)`` at each of its positions: ``B`` the scheme's secret orthogonal input mixing,
``f`` piecewise linear in that position's receptive field of the input (convolutions, pools, ReLUs, sums,
paddings: ``shadownet.receptive_fields``). Along lines ``x0 + t d`` of inputs the attacker picks, at each grid
point, the local Jacobian of every position comes from ``1 + 2 F_h F_w C`` inferences at once (the input
perturbed on a lattice of the fields' period, so each field holds one perturbed coordinate per inference;
central differences; a column is dropped where its two sides disagree: a unit switched inside the probe).
Between two grid points each ReLU or pool switch changes a position's Jacobian by a rank-1 term, and a
first-layer unit's switch by that unit's filter placed on its window (the first conv's geometry says where). A
change that sits in one window, rank 1 there and at the noise level elsewhere, is a candidate; candidates are
clustered at ``|cos| >= CLUSTER_COS`` and a cluster seen ``MIN_EVENTS`` times is an estimate. The noise is
measured by the attacker (``REPEATS`` runs of one input) and every test is calibrated to it: unmasked, it is
the float error other rounds' masks leave (~1e-6 of the crossing); under one-time masks it is the mask itself,
every probe is lost in it, and the attack stops after its first grid point with nothing.

No secret is used. The reference model is the attacker's public weights: its graph gives the geometry
(which crossing carries what, each position's receptive field, the first layer's windows) and its
first-layer weights score the estimates, nothing else.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from shadownet.attacks import RECOVERY_COS, abs_cosines, best_cosines
from shadownet.audit_layers import LinearLayer, layer_label, match_layers, split_names
from shadownet.boundary import Crossing, round_number
from shadownet.receptive_fields import Axis, receptive_fields

# The default budget: inferences the attack may run. MiniVGG's round 3 (6x6 fields, 217 inferences a grid
# point) recovered its 32 first-layer filters in ~3,000 (a helper's run); on the 6 ms this machine takes
# per MiniVGG inference, the budget is under half a minute.
BUDGET = 4000
REPEATS = 20  # inferences of the base input that measure the crossing's noise
POINTS = 14  # grid points per line
SPACING = 2e-3  # the first grid step along a line, relative to the base input's RMS (then ``SWITCHING``)
SWITCHING = 0.25  # the share of positions the steps aim to see a switch at: fewer, the next step is longer
PROBE = 2e-3  # the Jacobian probes' step, relative to the base input's RMS
SCALE = 0.5  # the base inputs' spread: N(mean, SCALE^2), the mean 0 on the first line, a random colour after
QUIET = 1.5  # a window's change over its noise below which nothing switched there
SNR = 4.0  # a candidate's top singular value over the noise's
CHI = 1.6  # the most a change outside its window, and its remainder in it, may exceed the noise (chi^2 ratio)
CLUSTER_COS = 0.9
MIN_EVENTS = 2  # distinct switches (line, unit) a cluster needs to count as an estimate
SURE_EVENTS = 3  # the attack stops when as many clusters as the layer has filters have this many
NOISE_FLOOR = 3.0  # a Jacobian below this many times its noise is not measured: the crossing is masked


def critical_point_attack(out_dir: str | os.PathLike, graph: Any, manifest: dict,
                          reference: list[LinearLayer], obfuscated: list[LinearLayer], budget: int = BUDGET,
                          progress: Callable[[str], None] | None = None,
                          seed: int = 0) -> tuple[dict[str, np.ndarray], dict]:
    """Run the attack on the protected model in ``out_dir`` within ``budget`` inferences: its estimates by
    reference layer name (the first layer's, rows like its filters, for ``attacks.attack_layer``'s
    ``from_crossings``; empty when it made none), and what ran and what it found, for the report.
    ``graph`` is the reference as the audit planned it (``audit_layers.reference_graph``), ``reference``
    and ``obfuscated`` the layers the audit paired (they say which reference tensor each round input
    carries). The crossing attacked is the first round input
    that the manifest leaves without one-time masks and that carries, through ops
    ``shadownet.receptive_fields`` follows, what the first layer made; none unmasked: the first masked one
    (the attack then measures its noise and says so). ``{"skipped": why}`` when the model has no such
    first layer or crossing."""
    found = target(graph, manifest, match_layers(reference, obfuscated)[0])
    if isinstance(found, str):
        return {}, {"skipped": found, "inferences": 0, "recovered": 0}
    started = time.perf_counter()
    if progress:
        state = "masked" if found["masked"] else "unmasked"
        progress(f"critical points: up to {budget} inferences of the attacker's own inputs, to solve "
                 f"{layer_label(found['layer'])} from {found['buffer']} ({state})")
    with Crossing(out_dir, found["buffer"], split_names(manifest)[1]) as crossing:
        result = _attack(found, crossing, budget, np.random.default_rng(seed), progress)
        result["inferences"] = crossing.count
    weights = found["weights"]
    picked = result.pop("estimates")
    cosines = abs_cosines(picked, weights) if len(picked) else np.zeros((0, len(weights)))
    best = best_cosines(picked, weights)
    return ({found["layer"]: picked} if len(picked) else {}), {
        "layer": found["layer"], "buffer": found["buffer"], "masked": found["masked"],
        "field": list(found["field"]), "filters": len(weights), "budget": int(budget)} | result | {
        "recovered": int((best >= RECOVERY_COS).sum()),
        "false_estimates": int((cosines.max(1) < RECOVERY_COS).sum()) if len(picked) else 0,
        "best_cos": [round(float(b), 4) for b in best],
        "seconds": round(time.perf_counter() - started, 1)}


def target(graph: Any, manifest: dict, pairs: list[tuple[LinearLayer, LinearLayer]]) -> dict | str:
    """The first layer and the crossing the attack reads, with their geometry; a string that says why
    not when the model does not fit."""
    from shadownet.audit_leakage import round_sources

    if len(graph.inputs) != 1:
        return f"the model has {len(graph.inputs)} inputs: the attack reads one image"
    image = graph.tensors[graph.inputs[0]]
    if len(image.shape) != 4 or image.shape[0] != 1 or np.dtype(image.dtype).kind != "f":
        return f"the model input {image.name} is not a float image [1, H, W, C] ({list(image.shape)})"
    first, geometry = receptive_fields(graph)
    if isinstance(first, str):
        return first
    weights = graph.tensors[first.inputs[1]].data
    units = geometry[first.outputs[0]]
    sources = round_sources(manifest, pairs)
    masked = set((manifest.get("masks") or {}).get("one_time_rounds") or [])
    shapes = {b.get("name"): b.get("shape") for b in manifest.get("buffers", []) if isinstance(b, dict)}
    by_name = {graph.tensors[t].name: t for t in geometry}
    skipped = {}
    candidates = []
    for r in sorted(manifest.get("rounds", []), key=lambda r: round_number(r.get("signature", ""))):
        for entry in r.get("inputs", []):
            buffer = entry.get("buffer")
            name = sources.get(buffer)
            tensor = by_name.get(name)
            if tensor is None:
                continue
            if isinstance(geometry[tensor], str):
                skipped[buffer] = geometry[tensor]
                continue
            if not geometry[tensor].after_first:
                continue
            shape = graph.tensors[tensor].shape
            if len(shape) != 4 or list(shapes.get(buffer) or [])[:3] != list(shape)[:3]:
                skipped[buffer] = f"carries {name} {list(shape)} as {shapes.get(buffer)}"
                continue
            candidates.append((round_number(r["signature"]) in masked, buffer, tensor))
    if not candidates:
        why = "; ".join(f"{b}: {w}" for b, w in skipped.items()) or "none carries what it made"
        return f"no round input carries the first layer's output through ops the attack follows ({why})"
    is_masked, buffer, tensor = min(candidates, key=lambda c: c[0])  # the first unmasked, else the first
    rows, cols = geometry[tensor].rows, geometry[tensor].cols
    kernel = weights.shape[1:3]
    dilation = (int(getattr(first.options, "dilationHFactor", 1) or 1),
                int(getattr(first.options, "dilationWFactor", 1) or 1))
    return {"layer": graph.tensors[first.outputs[0]].name, "buffer": buffer, "masked": is_masked,
            "weights": np.asarray(weights, np.float64).reshape(len(weights), -1),
            "image": tuple(image.shape[1:]), "crossing": tuple(graph.tensors[tensor].shape[1:3]),
            "rows": rows, "cols": cols, "field": (rows.span, cols.span),
            "units": (units.rows, units.cols),
            "unit_counts": tuple(graph.tensors[first.outputs[0]].shape[1:3]),
            "kernel": tuple(int(k) for k in kernel), "dilation": dilation}


def _windows(found: dict) -> list[tuple[tuple[int, int], np.ndarray]]:
    """Each first-layer unit window that lies in a crossing position's field, the same for every position
    (the geometry is affine): its offset in the field and its mask over the field's columns, in the order
    of the filters' ``(kh, kw, cin)``."""
    fx = found["field"][1]
    channels = found["image"][-1]
    offsets = []
    for crossing, unit, kernel, dilation in zip(
            (found["rows"], found["cols"]), found["units"], found["kernel"], found["dilation"], strict=True):
        # unit u starts at u * s1 - p1; position i's field at i * S - P; S is a multiple of s1
        phase = (crossing.start - unit.start) % unit.stride
        offsets.append(list(range(phase, crossing.span - dilation * (kernel - 1), unit.stride)))
    windows = []
    (kh, kw), (dh, dw) = found["kernel"], found["dilation"]
    for r in offsets[0]:
        for s in offsets[1]:
            columns = [((r + dh * a) * fx + s + dw * b) * channels + c
                       for a in range(kh) for b in range(kw) for c in range(channels)]
            windows.append(((r, s), np.array(columns)))
    return windows


def _attack(found: dict, crossing: Crossing, budget: int, rng: np.random.Generator,
            progress: Callable[[str], None] | None) -> dict:
    """Lines of grid points within ``budget`` inferences (``crossing.count``); stops when as many estimates
    as the layer has filters (its size is public) were each seen ``SURE_EVENTS`` times (a false one is
    seldom seen that often: the best supported are kept), or at the first grid point when the probes are
    lost in the noise (one-time masks)."""
    h_img, w_img, channels = found["image"]
    fy, fx = found["field"]
    per_point = 1 + 2 * fy * fx * channels
    if REPEATS + 2 * per_point > budget:
        return {"stopped": f"a budget of {budget} inferences is under the {REPEATS + 2 * per_point} of one "
                           f"step ({fy}x{fx} fields)", "sigma": None, "lines": 0,
                "estimates": np.zeros((0, len(found["weights"][0]))), "events": {}}
    windows = _windows(found)
    candidates: list[dict] = []
    stats = dict(quiet=0, events=0, invalid=0, weak=0, wide_or_multi=0, edge=0, local=0)
    sigmas, lines, stopped = [], 0, "budget"
    filters = len(found["weights"])
    while crossing.count + REPEATS + 2 * per_point <= budget:
        mean = 0.0 if lines == 0 else SCALE * rng.standard_normal(channels)
        x0 = mean + SCALE * rng.standard_normal((h_img, w_img, channels))
        rms = float(np.sqrt(np.mean(x0 ** 2)))
        direction = rms * rng.standard_normal(x0.shape)
        eps = PROBE * rms
        # [h, w, channels]; in float64: a float32 mean of 20 values ~1 errs by about the noise itself
        spread = crossing(np.repeat(x0[None], REPEATS, 0)).var(0, ddof=1, dtype=np.float64)
        sigma = float(np.sqrt(np.mean(spread)))
        sigmas.append(sigma)
        lines += 1
        previous, along, step = None, 0.0, SPACING
        for g in range(POINTS):
            if crossing.count + per_point > budget:
                break
            jacobian, valid, floor = _jacobians(found, crossing, x0 + along * direction, eps,
                                                np.sqrt(spread.mean(-1)))
            noise = np.maximum(floor, 1e-30) / eps  # per position, of an entry of a Jacobian's change
            if g == 0 and lines == 1:
                size = float(np.sqrt(((jacobian ** 2).sum(2) * valid).sum()
                                     / max(valid.sum() * jacobian.shape[2], 1)))
                level = float(np.sqrt(np.mean(noise ** 2) / 2))  # of a Jacobian's entry
                if size < NOISE_FLOOR * level:
                    return {"stopped": f"masked: the crossing's noise (sigma {sigma:.3g}) drowns what the "
                                       f"probes move it by (Jacobian entries {size:.3g} against noise "
                                       f"{level:.3g})", "sigma": sigma, "sigmas": sigmas,
                            "lines": lines, "estimates": np.zeros((0, len(found["weights"][0]))),
                            "events": stats}
            if previous is not None:
                seen = stats["events"] + stats["quiet"]
                events = stats["events"]
                _analyse(found, windows, previous[:2], (jacobian, valid), (lines, g),
                         np.maximum(noise, previous[2]), candidates, stats)
                share = (stats["events"] - events) / max(stats["events"] + stats["quiet"] - seen, 1)
                # as many switches as the positions tell apart: few, and the budget is spent on quiet steps
                step *= float(np.clip(SWITCHING / max(share, 1e-9), 0.5, 2.0))
                kept = _prune_aliases(_cluster(candidates), found["kernel"], channels)
                if sum(cl["events"] >= SURE_EVENTS for cl in kept) >= filters:
                    stopped = f"as many estimates as filters, each seen {SURE_EVENTS} times"
                    break
            previous = (jacobian, valid, noise)
            along += step
        if progress:
            progress(f"critical points: line {lines}, {crossing.count} inferences, {len(candidates)} "
                     f"candidates (noise sigma {sigma:.3g})")
        if stopped != "budget":
            break
    kept = _prune_aliases(_cluster(candidates), found["kernel"], channels)[:filters]
    estimates = np.array([c["dir"] for c in kept]) if kept else np.zeros((0, len(found["weights"][0])))
    return {"stopped": stopped, "sigma": float(np.median(sigmas)), "sigmas": sigmas, "lines": lines,
            "candidates": len(candidates), "estimates": estimates, "events": stats}


def _jacobians(found: dict, crossing: Crossing, x: np.ndarray, eps: float,
               sigma: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every crossing position's Jacobian on its field at ``x``, ``[h, w, channels, Fy * Fx * C]`` (columns
    in (row, col, channel) order), which columns are valid, ``[h, w, Fy * Fx * C]``, and the crossing's
    noise at each position, ``[h, w]``: ``sigma`` (what varies between runs of one input, measured), or the
    float error of its computation where that is larger (it varies between inputs: the spread of the forward
    differences less the backward ones, zero but for it where no unit switches). A column whose two sides
    disagree by 8 of those (a unit switched inside the probe) is not valid."""
    fy, fx = found["field"]
    h_img, w_img, channels = found["image"]
    h, w = found["crossing"]
    rows, cols = found["rows"], found["cols"]
    shifts = [(a, b, c) for a in range(fy) for b in range(fx) for c in range(channels)]
    # built in float32 as the model takes them (in float64 the lattice and the inputs took 2.4 GB of
    # YOLOv4-tiny's 416x416 images); ``delta``: each perturbation as applied, after the rounding to float32,
    # on its lattice's pixels
    inputs = np.repeat(np.asarray(x, np.float32)[None], 1 + 2 * len(shifts), 0)
    delta = []
    for n, (a, b, c) in enumerate(shifts):
        inputs[1 + n, a::fy, b::fx, c] = x[a::fy, b::fx, c] + eps
        inputs[1 + len(shifts) + n, a::fy, b::fx, c] = x[a::fy, b::fx, c] - eps
        delta.append(inputs[1 + n, a::fy, b::fx, c].astype(np.float64)
                     - inputs[1 + len(shifts) + n, a::fy, b::fx, c])
    out = crossing(inputs)
    del inputs
    base, plus, minus = out[0], out[1:1 + len(shifts)], out[1 + len(shifts):]
    forward, backward = plus - base, base - minus
    # robust: the columns where a unit switched are few
    spread = np.abs(forward - backward).transpose(1, 2, 0, 3).reshape(*forward.shape[1:3], -1)
    floor = np.maximum(sigma, 1.4826 * np.median(spread, axis=-1) / np.sqrt(6))
    tol = 8 * floor * np.sqrt(6)
    jacobian = np.zeros((h, w, fy, fx, channels, out.shape[-1]), np.float32)  # its noise: far over float32's
    valid = np.ones((h, w, fy, fx, channels), bool)
    py, px = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    oy, ox = py * rows.stride - rows.start, px * cols.stride - cols.start  # each field's first pixel
    for n, (a, b, c) in enumerate(shifts):
        r, s = (a - oy) % fy, (b - ox) % fx  # the field row/col the lattice pixel falls on
        yy, xx = oy + r, ox + s
        inside = (yy >= 0) & (yy < h_img) & (xx >= 0) & (xx < w_img)
        rows_n, cols_n = delta[n].shape
        on = (np.clip((yy - a) // fy, 0, rows_n - 1), np.clip((xx - b) // fx, 0, cols_n - 1))
        step = np.where(inside, delta[n][on], 1.0)  # (yy, xx) is (a, b) modulo the field: on the lattice
        valid[py, px, r, s, c] = np.abs(forward[n] - backward[n]).max(-1) <= tol
        difference = (forward[n] + backward[n]) / step[..., None]
        jacobian[py, px, r, s, c] = np.where(inside[..., None], difference, 0.0)
    return (jacobian.transpose(0, 1, 5, 2, 3, 4).reshape(h, w, out.shape[-1], fy * fx * channels),
            valid.reshape(h, w, fy * fx * channels), floor)


def _analyse(found: dict, windows: list, before: tuple, after: tuple, key: tuple[int, int], noise: np.ndarray,
             candidates: list[dict], stats: dict) -> None:
    """The switches between two grid points: per crossing position, is its Jacobian's change one
    first-layer unit's? It is when, for some unit window, the change there is rank 1 and well above the
    noise, and the change outside it and the remainder inside are at the noise level (chi-square ratios)."""
    (ja, va), (jb, vb) = before, after
    change, valid = jb - ja, va & vb
    h, w, outputs, columns = change.shape
    h_img, w_img, _ = found["image"]
    rows, cols = found["rows"], found["cols"]
    (kh, kw), (dh, dw) = found["kernel"], found["dilation"]
    units, counts = found["units"], found["unit_counts"]
    width = len(windows[0][1])
    masks = np.zeros((columns, len(windows)))
    for j, (_, m) in enumerate(windows):
        masks[m, j] = 1.0
    energy = ((change ** 2).sum(2) * valid) @ masks / (noise[..., None] ** 2 * outputs * width)
    whole = ((~valid).astype(float) @ masks) == 0
    energy = np.where(whole, energy, -1.0)
    for py in range(h):
        for px in range(w):
            d, v, sd = change[py, px], valid[py, px], noise[py, px]
            if not whole[py, px].any():
                stats["invalid"] += 1
                continue
            order = np.argsort(-energy[py, px])
            if energy[py, px, order[0]] < QUIET:
                stats["quiet"] += 1
                continue
            stats["events"] += 1
            best = None
            for j in order[:3]:  # of the windows of most energy, the one of largest top singular value
                if energy[py, px, j] < 0:
                    continue
                m = windows[j][1]
                sv = np.linalg.svd(d[:, m], compute_uv=False)
                if best is None or sv[0] > best[0]:
                    best = (sv[0], windows[j][0], m, sv)
            top, (r, s), m, sv = best
            outside = v.copy()
            outside[m] = False
            chi_out = float((d[:, outside] ** 2).sum()) / (sd ** 2 * outputs * max(outside.sum(), 1))
            rest = max(outputs * width - (outputs + width - 1), 1)  # the remainder's degrees of freedom
            chi_rest = float((sv[1:] ** 2).sum()) / (sd ** 2 * rest)
            snr = top / (sd * (np.sqrt(outputs) + np.sqrt(width)))
            if snr < SNR:
                stats["weak"] += 1
                continue
            if chi_out > CHI or chi_rest > CHI:
                stats["wide_or_multi"] += 1
                continue
            y0, x0 = py * rows.stride - rows.start + r, px * cols.stride - cols.start + s
            # a unit whose window reaches into the padding shows only its cropped filter, which fits the
            # window one tap further in: windows that close to a padded border are skipped
            reach = (units[0].start > 0 and y0 < dh) or (units[1].start > 0 and x0 < dw) or y0 < 0 or x0 < 0
            far = (y0 + dh * (kh - 1) > h_img - 1 - dh * _pads_after(units[0], counts[0], h_img)
                   or x0 + dw * (kw - 1) > w_img - 1 - dw * _pads_after(units[1], counts[1], w_img))
            if reach or far:
                stats["edge"] += 1
                continue
            estimate = np.linalg.svd(d[:, m], full_matrices=False)[2][0]
            estimate *= np.sign(estimate[np.argmax(np.abs(estimate))])
            stats["local"] += 1
            candidates.append({"w": estimate, "unit": (key[0], y0, x0), "snr": snr})


def _pads_after(units: Axis, count: int, size: int) -> int:
    """1 when the last of ``count`` first-layer units reaches past the image's end on this axis."""
    return int((count - 1) * units.stride - units.start + units.span > size)


def _cluster(candidates: list[dict]) -> list[dict]:
    """Greedy ``|cos|`` clustering; a cluster's direction is its members' top singular vector (weighted by
    their SNR); its events, the distinct (line, unit) switches in it (a unit switches once per line and is
    seen from up to several positions)."""
    clusters: list[dict] = []
    for c in candidates:
        for cl in clusters:
            if abs(cl["dir"] @ c["w"]) >= CLUSTER_COS:
                cl["members"].append(c)
                rows = np.array([m["w"] * np.sign(m["w"] @ cl["dir"]) * m["snr"] for m in cl["members"]])
                cl["dir"] = np.linalg.svd(rows, full_matrices=False)[2][0]
                break
        else:
            clusters.append({"dir": c["w"].copy(), "members": [c]})
    for cl in clusters:
        cl["events"] = len({m["unit"] for m in cl["members"]})
    return clusters


def _shifted(w: np.ndarray, dy: int, dx: int, kernel: tuple[int, int], channels: int) -> np.ndarray:
    """Filter ``w`` moved by ``(dy, dx)`` taps inside its window, zero filled."""
    kh, kw = kernel
    a, out = w.reshape(kh, kw, channels), np.zeros((kh, kw, channels))
    out[max(dy, 0):kh + min(dy, 0), max(dx, 0):kw + min(dx, 0)] = \
        a[max(-dy, 0):kh - max(dy, 0), max(-dx, 0):kw - max(dx, 0)]
    return out.reshape(-1)


def _prune_aliases(clusters: list[dict], kernel: tuple[int, int], channels: int) -> list[dict]:
    """Clusters of ``MIN_EVENTS`` or more, best supported first, without the one-tap shifts of better
    supported ones (a filter with a weak edge row or column is also seen one window over)."""
    kept: list[dict] = []
    for cl in sorted(clusters, key=lambda c: -c["events"]):
        if cl["events"] < MIN_EVENTS:
            continue
        alias = False
        for big in kept:
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    if dy or dx:
                        s = _shifted(big["dir"], dy, dx, kernel, channels)
                        norm = np.linalg.norm(s)
                        alias = alias or (norm > 0 and abs(s @ cl["dir"]) / norm >= RECOVERY_COS)
        if not alias:
            kept.append(cl)
    return kept
