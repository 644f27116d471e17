"""Second-layer critical-point attack on ResNet-44's round 3 crossing (helper L2 experiment).

Round 3's input is o(p) = B relu(W2 * a1 + b2)(p), a1 = relu(W1 * x + b1), B the secret 16x16 orthogonal
input mixing (one block: same matrix at every position). Along lines x0 + t d of chosen inputs, at each grid
point the Jacobian J_p (16 x 75) of every crossing position p on its 5x5x3 input field is measured (151
inferences, lattice probes, as shadownet.critical_points). Between grid points, a switch of second-layer unit
k at p (and no first-layer switch feeding p) changes J_p by the rank-1 term +-B[:,k] (w2_k^T M_p), with
M_p = D1 W1field (144 x 75) the first layer's active part on p's field. Left singular vectors of such rank-1
changes cluster on the 16 columns of B (identical at every position and line); for each column u_k,
u_k^T J = [k on] w2_k^T M, so w2_k follows by least squares from events (strict: only the switch events'
on-side Jacobians) or from every measured Jacobian where u_k^T J is nonzero ("all").

--first known     : W1, b1 from the reference (only what the brief allows for the first experiment).
--first recovered : W1 directions from the product's critical-point attack on the same crossing
                    (shadownet.critical_points._attack), the zero set of each first-layer unit (its bias)
                    from the kinks of its switch events (no extra inference), its sign by a fit.
The reference W2 scores only (|cos| >= 0.9).

Run (from this folder, a helper's at stop 59; its results in second_layer.json, README.md):
``shadownet zoo resnet44 -o resnet44.tflite --seed 1; shadownet convert resnet44.tflite -o r44 --seed 1
--mask-rounds first; python second_layer.py --out r44 --first recovered`` (``RESNET44`` names another
reference file). Since stop 59 the default masks every round of ResNet-44: ``--mask-rounds first`` is
what it attacked then.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", ".."))  # the repo
import numpy as np  # noqa: E402

REF = os.environ.get("RESNET44", "resnet44.tflite")  # shadownet zoo resnet44 -o resnet44.tflite --seed 1


def setup(out):
    from shadownet.audit import _manifest_scheme, _planned, _untrusted_model
    from shadownet.audit_layers import match_layers, model_bytes, split_names, untrusted_layers
    from shadownet.critical_points import target
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    split = split_names(manifest)[0]
    obf = untrusted_layers(_untrusted_model(out, manifest), split)
    ref_bytes = model_bytes(REF)
    graph, ref, ops, planning = _planned(ref_bytes, REF, manifest, _manifest_scheme(manifest), obf)
    # the crossing: round 3 (the second conv layer's output); target() picks the first unmasked one, so it
    # is shown the manifest without round 3's masks only to choose it (the geometry comes from the graph)
    masked = set((manifest.get("masks") or {}).get("one_time_rounds") or [])
    shown = json.loads(json.dumps(manifest))
    shown.setdefault("masks", {})["one_time_rounds"] = [r for r in masked if r != 3]
    found = target(graph, shown, match_layers(ref, obf)[0])
    assert not isinstance(found, str), found
    assert found["buffer"] == "round_3/in/x0", found["buffer"]
    found["masked"] = 3 in masked
    # the reference layers (public architecture; the weights: W1/b1 known in experiment 1, W2 scores only)
    convs = [op for op in graph.ops if op.kind == "CONV_2D"]
    l1, l2 = convs[0], convs[1]
    W1 = np.asarray(graph.tensors[l1.inputs[1]].data, np.float64)  # [16,3,3,3]
    b1 = np.asarray(graph.tensors[l1.inputs[2]].data, np.float64)
    W2 = np.asarray(graph.tensors[l2.inputs[1]].data, np.float64)  # [16,3,3,16]
    b2 = np.asarray(graph.tensors[l2.inputs[2]].data, np.float64)
    return manifest, split_names(manifest)[1], graph, found, (W1, b1), (W2, b2)


# ---------------------------------------------------------------- the crossing and its Jacobians
def jacobians(found, crossing, x, eps, sigma):
    """As shadownet.critical_points._jacobians, plus the base inference's crossing."""
    fy, fx = found["field"]
    h_img, w_img, channels = found["image"]
    h, w = found["crossing"]
    rows, cols = found["rows"], found["cols"]
    shifts = [(a, b, c) for a in range(fy) for b in range(fx) for c in range(channels)]
    lattice = np.zeros((len(shifts), h_img, w_img, channels))
    for n, (a, b, c) in enumerate(shifts):
        lattice[n, a::fy, b::fx, c] = eps
    inputs = np.concatenate([x[None], x[None] + lattice, x[None] - lattice]).astype(np.float32)
    delta = inputs[1:1 + len(shifts)].astype(np.float64) - inputs[1 + len(shifts):]
    out = crossing(inputs)
    base, plus, minus = out[0], out[1:1 + len(shifts)], out[1 + len(shifts):]
    forward, backward = plus - base, base - minus
    spread = np.abs(forward - backward).transpose(1, 2, 0, 3).reshape(*forward.shape[1:3], -1)
    floor = np.maximum(sigma, 1.4826 * np.median(spread, axis=-1) / np.sqrt(6))
    tol = 8 * floor * np.sqrt(6)
    jac = np.zeros((h, w, fy, fx, channels, out.shape[-1]))
    valid = np.ones((h, w, fy, fx, channels), bool)
    py, px = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    oy, ox = py * rows.stride - rows.start, px * cols.stride - cols.start
    for n, (a, b, c) in enumerate(shifts):
        r, s = (a - oy) % fy, (b - ox) % fx
        yy, xx = oy + r, ox + s
        inside = (yy >= 0) & (yy < h_img) & (xx >= 0) & (xx < w_img)
        step = np.where(inside, delta[n][np.clip(yy, 0, h_img - 1), np.clip(xx, 0, w_img - 1), c], 1.0)
        valid[py, px, r, s, c] = np.abs(forward[n] - backward[n]).max(-1) <= tol
        jac[py, px, r, s, c] = np.where(inside[..., None], (forward[n] + backward[n]) / step[..., None], 0.0)
    return (jac.transpose(0, 1, 5, 2, 3, 4).reshape(h, w, out.shape[-1], fy * fx * channels),
            valid.reshape(h, w, fy * fx * channels), floor, base)


# ---------------------------------------------------------------- the first layer, as the attacker holds it
def patches(x, k=3):
    """x [H,W,C] -> [H,W,k*k*C] SAME-padded windows in (kh,kw,c) order."""
    H, W, C = x.shape
    p = k // 2
    xp = np.pad(x, ((p, p), (p, p), (0, 0)))
    out = np.empty((H, W, k, k, C))
    for a in range(k):
        for b in range(k):
            out[:, :, a, b] = xp[a:a + H, b:b + W]
    return out.reshape(H, W, k * k * C)


class FirstLayer:
    """a1 = n * relu(s * (w . x_window) - c0) per channel: w [16,27] unit directions (known or estimated),
    s signs, c0 zero-set offsets, n norms (1 for the recovered layer: the scale symmetry)."""

    def __init__(self, w, s, c0, n):
        self.w, self.s, self.c0, self.n = map(lambda a: np.asarray(a, np.float64), (w, s, c0, n))

    @classmethod
    def from_reference(cls, W1, b1):
        flat = W1.reshape(len(W1), -1)
        n = np.linalg.norm(flat, axis=1)
        # relu(W.x + b) = n relu(u.x + b/n): s = +1, c0 = -b/n
        return cls(flat / n[:, None], np.ones(len(n)), -b1 / n, n)

    def pre(self, x):
        """[H,W,16] of s*(w.x) - s*c0... the argument of the relu (up to n)."""
        return self.s * (patches(x) @ self.w.T - self.c0)

    def a1(self, x):
        return self.n * np.maximum(self.pre(x), 0.0)

    def M(self, x, py, px):
        """M_p [144,75] for crossing position (py,px): rows (a,b,c) of the second layer's window, columns the
        5x5x3 field (row, col, channel); a unit outside the image contributes nothing (zero padding)."""
        pre = self.pre(x)
        H, W, _ = x.shape
        out = np.zeros((3, 3, 16, 5, 5, 3))
        fil = (self.n * self.s)[:, None] * self.w  # [16,27]
        fil = fil.reshape(16, 3, 3, 3)
        for a in range(3):
            for b in range(3):
                uy, ux = py - 1 + a, px - 1 + b
                if not (0 <= uy < H and 0 <= ux < W):
                    continue
                on = pre[uy, ux] > 0
                out[a, b, on, a:a + 3, b:b + 3, :] = fil[on]
        return out.reshape(144, 75)


def rank1(d, sd):
    """(u, sv, v, snr, chi_rest) of a 16x75 change."""
    U, S, Vt = np.linalg.svd(d, full_matrices=False)
    o, w = d.shape
    snr = S[0] / (sd * (np.sqrt(o) + np.sqrt(w)))
    chi = float((S[1:] ** 2).sum()) / (sd ** 2 * max(o * w - (o + w - 1), 1))
    return U[:, 0], S, Vt[0], snr, chi


# ---------------------------------------------------------------- the walk: grid points and events
def walk(found, crossing, first, budget, rng, args, log, window_dirs=None):
    """Lines of grid points; returns per-grid-point records and the rank-1 candidate events.
    first: FirstLayer or None (then first-layer switches are screened by the right vector's match with
    ``window_dirs``, the recovered first-layer directions)."""
    h_img, w_img, C = found["image"]
    per_point = 1 + 2 * 75 * C // 3
    lo, hi = args.margin, 32 - args.margin
    points, events, l1_events = [], [], []
    stats = dict(pairs=0, positions=0, quiet=0, invalid=0, l1_switched=0, weak=0, multi=0, l1_like=0,
                 kept=0)
    line = 0
    while crossing.count + args.repeats + 2 * per_point <= budget:
        mean = 0.0 if line == 0 else args.scale * rng.standard_normal(C)
        x0 = mean + args.scale * rng.standard_normal((h_img, w_img, C))
        rms = float(np.sqrt(np.mean(x0 ** 2)))
        direction = rms * rng.standard_normal(x0.shape)
        eps = args.probe * rms
        spread = crossing(np.repeat(x0[None], args.repeats, 0)).var(0, ddof=1)
        sig = np.sqrt(spread.mean(-1))
        stats.setdefault("sigma_per_line", []).append(float(np.sqrt(spread.mean())))
        stats.setdefault("crossing_rms_per_line", []).append(None)
        line += 1
        prev, along, step = None, 0.0, args.spacing
        for g in range(args.points):
            if crossing.count + per_point > budget:
                break
            x = x0 + along * direction
            J, V, floor, base = jacobians(found, crossing, x, eps, sig)
            noise = np.maximum(floor, 1e-30) / eps
            rec = dict(line=line, g=g, t=along, x=x, J=J, V=V, noise=noise, base=base, d=direction)
            points.append(rec)
            if g == 0:
                stats["crossing_rms_per_line"][-1] = float(np.sqrt((base ** 2).mean()))
                size = np.sqrt((J[V.all(-1)] ** 2).mean()) if V.all(-1).any() else 0.0
                stats.setdefault("jacobian_entry_rms", []).append(float(size))
                stats.setdefault("jacobian_noise_entry", []).append(float(np.median(noise)))
            if prev is not None:
                stats["pairs"] += 1
                n_events, n_seen = 0, 0
                pre_a = first.pre(prev["x"]) > 0 if first is not None else None
                pre_b = first.pre(x) > 0 if first is not None else None
                for py in range(lo, hi):
                    for px in range(lo, hi):
                        stats["positions"] += 1
                        n_seen += 1
                        v = prev["V"][py, px] & V[py, px]
                        if not v.all():
                            stats["invalid"] += 1
                            continue
                        sd = max(noise[py, px], prev["noise"][py, px])
                        d = J[py, px] - prev["J"][py, px]
                        if (d ** 2).mean() / sd ** 2 < args.quiet:
                            stats["quiet"] += 1
                            continue
                        n_events += 1
                        if first is not None:
                            sl = (slice(py - 1, py + 2), slice(px - 1, px + 2))
                            if (pre_a[sl] != pre_b[sl]).any():
                                stats["l1_switched"] += 1
                                continue
                        u, S, vr, snr, chi = rank1(d, sd)
                        if snr < args.snr:
                            stats["weak"] += 1
                            continue
                        if chi > args.chi:
                            stats["multi"] += 1
                            continue
                        if window_dirs is not None:
                            best, chan, (wa, wb) = l1_match(vr, window_dirs, full=True)
                            if best >= 0.9:
                                stats["l1_like"] += 1
                                l1_events.append(dict(p=len(points) - 2, q=len(points) - 1, py=py, px=px,
                                                      c=chan, a=wa, b=wb, cos=best, line=line))
                                continue
                        stats["kept"] += 1
                        events.append(dict(p=len(points) - 2, q=len(points) - 1, py=py, px=px, u=u, v=vr,
                                           s=S[0], snr=snr, line=line))
                share = n_events / max(n_seen, 1)
                step *= float(np.clip(args.switching / max(share, 1e-9), 0.5, 2.0))
                if args.sure:
                    sure = [c for c in cluster_left(events, args.cos) if c["distinct"] >= args.sure]
                    if len(sure) >= 16:
                        log(f"16 left-vector clusters seen {args.sure}+ times: stop")
                        return points, events, stats, l1_events
            prev = rec
            along += step
            log(f"line {line} point {g}: {crossing.count} inferences, {len(events)} rank-1 events, "
                f"t={along:.3g}")
        if args.stop and len(events) >= args.stop:
            break
    return points, events, stats, l1_events


def l1_match(v, window_dirs, full=False):
    """Largest |cos| of a right vector (75 = 5x5x3 field) with a first-layer direction on one of the 9 windows
    (the signature of a first-layer switch); full: also which direction and window."""
    f = v.reshape(5, 5, 3)
    best, where = 0.0, (0, (0, 0))
    norm = np.linalg.norm(v)
    for a in range(3):
        for b in range(3):
            seg = f[a:a + 3, b:b + 3].reshape(-1)
            c = np.abs(window_dirs @ seg) / norm  # window_dirs unit rows: the cos with the placed filter
            j = int(np.argmax(c))
            if c[j] > best:
                best, where = float(c[j]), (j, (a, b))
    return (best, *where) if full else best


def cluster_left(events, cos=0.98, min_events=2):
    """Greedy |cos| clustering of the events' left vectors (columns of B up to sign)."""
    clusters = []
    for i, e in enumerate(events):
        for cl in clusters:
            if abs(cl["dir"] @ e["u"]) >= cos:
                cl["members"].append(i)
                rows = np.array([events[m]["u"] * np.sign(events[m]["u"] @ cl["dir"]) for m in cl["members"]])
                cl["dir"] = np.linalg.svd(rows, full_matrices=False)[2][0]
                break
        else:
            clusters.append(dict(dir=e["u"].copy(), members=[i]))
    for cl in clusters:
        cl["distinct"] = len({(events[m]["line"], events[m]["p"], events[m]["py"], events[m]["px"])
                              for m in cl["members"]})
    clusters = [c for c in clusters if c["distinct"] >= min_events]
    return sorted(clusters, key=lambda c: -c["distinct"])


def orient(u, points, lo, hi):
    """u's sign such that u . o >= 0 (u . o = relu(z2_k) >= 0 on every position)."""
    vals = np.concatenate([(pt["base"][lo:hi, lo:hi] @ u).ravel() for pt in points])
    return u if vals.sum() >= 0 else -u


def solve_events(u, members, events, points, first, noise_gate=4.0):
    """Strict CJM: from each switch event only, the on side's u^T J = w^T M (the off side's is ~0)."""
    A, y = [], []
    used = 0
    for m in members:
        e = events[m]
        sides = []
        for k in (e["p"], e["q"]):
            pt = points[k]
            g = u @ pt["J"][e["py"], e["px"]]
            sides.append((np.linalg.norm(g), g, pt))
        sides.sort(key=lambda s: -s[0])
        (n_on, g, pt), (n_off, _, _) = sides
        if n_off > 0.2 * n_on:  # not a clean on/off pair
            continue
        A.append(first.M(pt["x"], e["py"], e["px"]).T)
        y.append(g)
        used += 1
    if not A:
        return None, 0
    A, y = np.concatenate(A), np.concatenate(y)
    w, *_ = np.linalg.lstsq(A, y, rcond=1e-8)
    return w, used


def solve_all(u, points, first, lo, hi, max_rows=6000, rng=None):
    """Every measured Jacobian where unit k is on (u^T J clearly nonzero): u^T J_p = w^T M_p."""
    A, y = [], []
    for pt in points:
        G = np.einsum("hwok,o->hwk", pt["J"], u)  # [h,w,75]
        for py in range(lo, hi):
            for px in range(lo, hi):
                if not pt["V"][py, px].all():
                    continue
                g = G[py, px]
                if np.linalg.norm(g) < 50 * pt["noise"][py, px] * np.sqrt(75):
                    continue
                A.append((py, px, pt))
                y.append(g)
    if not A:
        return None, 0
    if len(A) * 75 > max_rows * 75 and rng is not None:
        pick = rng.choice(len(A), max_rows, replace=False)
        A, y = [A[i] for i in pick], [y[i] for i in pick]
    M = np.concatenate([first.M(pt["x"], py, px).T for py, px, pt in A])
    w, *_ = np.linalg.lstsq(M, np.concatenate(y), rcond=1e-8)
    return w, len(A)


def score(est, ref):
    from shadownet.attacks import abs_cosines
    if len(est) == 0:
        return dict(recovered=0, false_estimates=0, best_cos=[0.0] * len(ref))
    cos = abs_cosines(np.asarray(est), ref)
    return dict(recovered=int((cos.max(0) >= 0.9).sum()), false_estimates=int((cos.max(1) < 0.9).sum()),
                best_cos=[round(float(c), 4) for c in cos.max(0)],
                est_cos=[round(float(c), 4) for c in cos.max(1)])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="r44")  # shadownet convert resnet44.tflite -o r44 --seed 1
    ap.add_argument("--first", choices=["known", "recovered"], default="known")
    ap.add_argument("--budget", type=int, default=6000)
    ap.add_argument("--l1-budget", type=int, default=4000)
    ap.add_argument("--points", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--scale", type=float, default=0.5)
    ap.add_argument("--probe", type=float, default=2e-3)
    ap.add_argument("--spacing", type=float, default=2e-3)
    ap.add_argument("--switching", type=float, default=0.5)
    ap.add_argument("--quiet", type=float, default=1.5)
    ap.add_argument("--snr", type=float, default=4.0)
    ap.add_argument("--chi", type=float, default=1.6)
    ap.add_argument("--cos", type=float, default=0.98)
    ap.add_argument("--margin", type=int, default=2)
    ap.add_argument("--stop", type=int, default=0)
    ap.add_argument("--sure", type=int, default=3)
    ap.add_argument("--all-positions", type=int, default=1200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    t0 = time.perf_counter()
    log = lambda m: print(f"[{time.perf_counter() - t0:7.1f}s] {m}", flush=True)  # noqa: E731
    manifest, split, graph, found, (W1, b1), (W2, b2) = setup(args.out)
    log(f"crossing {found['buffer']} (masked={found['masked']}), field {found['field']}; "
        f"one-time rounds {manifest['masks']['one_time_rounds']}")
    from shadownet.critical_points import _Crossing
    rng = np.random.default_rng(args.seed)
    ref2 = W2.reshape(16, -1)
    result = dict(args=vars(args), crossing=found["buffer"], masked=found["masked"])
    lo, hi = args.margin, 32 - args.margin
    with _Crossing(args.out, found["buffer"], split) as crossing:
        if args.first == "known":
            first = FirstLayer.from_reference(W1, b1)
            window_dirs = None
            l1_info = dict(source="reference (assumed known)")
        else:
            from shadownet import critical_points as cp
            t1 = time.perf_counter()
            r1 = cp._attack(found, crossing, args.l1_budget, np.random.default_rng(args.seed), None)
            dirs = np.asarray(r1["estimates"])
            l1_inf = crossing.count
            sc1 = score(dirs, W1.reshape(16, -1))
            l1_info = dict(source="product critical-point attack", inferences=l1_inf,
                           seconds=round(time.perf_counter() - t1, 1), estimates=len(dirs),
                           stopped=r1["stopped"], **sc1)
            log(f"first layer: {len(dirs)} estimates, {sc1['recovered']} recovered, "
                f"{sc1['false_estimates']} false, {l1_inf} inferences")
            window_dirs = dirs / np.linalg.norm(dirs, axis=1, keepdims=True)
            first = None
        result["first_layer"] = l1_info
        start_count = crossing.count
        t2 = time.perf_counter()
        points, events, stats, l1_events = walk(found, crossing, first, start_count + args.budget, rng, args, log,
                                     window_dirs)
        walk_inf = crossing.count - start_count
        walk_s = time.perf_counter() - t2
        log(f"walk: {walk_inf} inferences, {len(points)} grid points, {len(events)} rank-1 events; {stats}")
        clusters = cluster_left(events, args.cos)
        U = np.array([c["dir"] for c in clusters[:16]])
        gram = np.abs(U @ U.T) - np.eye(len(U)) if len(U) else np.zeros((0, 0))
        log(f"{len(clusters)} left-vector clusters (>=2 distinct events); supports "
            f"{[c['distinct'] for c in clusters[:24]]}; max |u_i.u_j| among top 16 "
            f"{gram.max() if len(U) > 1 else 0:.3g}")
        result.update(walk_inferences=walk_inf, walk_seconds=round(walk_s, 1), grid_points=len(points),
                      events=len(events), stats=stats, clusters=len(clusters),
                      supports=[c["distinct"] for c in clusters], top16_max_offdiag=float(gram.max())
                      if len(U) > 1 else None)
        if args.first == "recovered":
            first, fit_info = recover_first(window_dirs, l1_events, points, clusters, lo, hi, log, W1, b1)
            result["first_layer"].update(fit_info)
        est_events, est_all, used = [], [], []
        for cl in clusters[:16]:
            u = orient(cl["dir"], points, lo, hi)
            w, n = solve_events(u, cl["members"], events, points, first)
            if w is not None:
                est_events.append(w)
            used.append(n)
            w2, n2 = solve_all(u, points, first, lo, hi, max_rows=args.all_positions, rng=rng)
            if w2 is not None:
                est_all.append(w2)
        result["events_used_per_cluster"] = used
        # the scale symmetry: the attacker's first layer has unit-norm filters, so what it can recover is
        # W2 diag(n) per input channel (n the reference first-layer norms); known first layer: n as given
        n1 = np.linalg.norm(W1.reshape(16, -1), axis=1)
        ref_sym = (W2 * (n1 / first.n)[None, None, None, :]).reshape(16, -1)
        if args.first == "recovered":
            perm = first.perm  # estimated channel c -> reference channel
            ref_sym = ref_sym.reshape(16, 3, 3, 16)
            ref_raw = W2.reshape(16, 3, 3, 16)
            ref_sym = np.stack([ref_sym[..., perm[c]] for c in range(16)], -1).reshape(16, -1)
            ref_raw = np.stack([ref_raw[..., perm[c]] for c in range(16)], -1).reshape(16, -1)
        else:
            ref_raw = ref2
        result["strict_events"] = dict(raw=score(est_events, ref_raw), up_to_symmetry=score(est_events, ref_sym))
        result["all_jacobians"] = dict(raw=score(est_all, ref_raw), up_to_symmetry=score(est_all, ref_sym))
        result["total_inferences"] = crossing.count
        np.savez(os.path.splitext(args.json or "run.json")[0] + ".npz", U=U, strict=np.array(est_events),
                 all=np.array(est_all), w1=first.w, s1=first.s, c01=first.c0, n1=first.n)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    for key in ("strict_events", "all_jacobians"):
        r = result[key]
        log(f"{key}: raw {r['raw']['recovered']}/16 (false {r['raw']['false_estimates']}), "
            f"up to symmetry {r['up_to_symmetry']['recovered']}/16; best {r['up_to_symmetry']['best_cos']}")
    log(f"total {result['total_inferences']} inferences, {result['seconds']} s")
    if args.json:
        json.dump(result, open(args.json, "w"), indent=1, default=float)


def recover_first(dirs, l1_events, points, clusters, lo, hi, log, W1, b1, samples=4000, seed=0):
    """The recovered first layer's zero sets (from its switch events' kinks) and signs (from a fit of the
    unmixed crossing); W1, b1 only score what was found (the sign and offset each channel should have)."""
    k1 = len(dirs)
    c0s = [[] for _ in range(k1)]
    for e in l1_events:
        A, Bp = points[e["p"]], points[e["q"]]
        if A["line"] != Bp["line"]:
            continue
        d = A["d"]
        field = lambda x: x[e["py"] - 2:e["py"] + 3, e["px"] - 2:e["px"] + 3].reshape(-1)  # noqa: E731
        va, vb = A["J"][e["py"], e["px"]] @ field(d), Bp["J"][e["py"], e["px"]] @ field(d)
        oa, ob = A["base"][e["py"], e["px"]], Bp["base"][e["py"], e["px"]]
        # oa + (t - ta) va = ob + (t - tb) vb  ->  t (va - vb) = ob - oa - tb vb + ta va
        dv = va - vb
        if np.linalg.norm(dv) == 0:
            continue
        t = float(dv @ (ob - oa - Bp["t"] * vb + A["t"] * va) / (dv @ dv))
        if not (A["t"] - 1e-9 <= t <= Bp["t"] + 1e-9):
            continue
        x = A["x"] + (t - A["t"]) * d
        uy, ux = e["py"] - 1 + e["a"], e["px"] - 1 + e["b"]
        c0s[e["c"]].append(float(dirs[e["c"]] @ patches(x)[uy, ux]))
    c0 = np.array([np.median(v) if v else 0.0 for v in c0s])
    spread = [float(np.median(np.abs(np.array(v) - m))) if v else None for v, m in zip(c0s, c0)]
    counts = [len(v) for v in c0s]
    log(f"first-layer zero sets from {sum(counts)} kinks: per channel {counts}")
    # the unmixed crossing h = U o (U: the left-vector clusters, oriented so that h >= 0)
    U = np.array([orient(cl["dir"], points, lo, hi) for cl in clusters[:16]])
    rng = np.random.default_rng(seed)
    pos = [(i, py, px) for i in range(len(points)) for py in range(lo, hi) for px in range(lo, hi)]
    pick = [pos[j] for j in rng.choice(len(pos), min(samples, len(pos)), replace=False)]
    P = np.array([patches(points[i]["x"])[py - 1:py + 2, px - 1:px + 2] for i, py, px in pick])  # [N,3,3,27]
    H = np.array([U @ points[i]["base"][py, px] for i, py, px in pick])  # [N,16]
    proj = P @ dirs.T - c0  # [N,3,3,k1]: w.x - c0 of the 9 feeding units

    def residual(s):
        A = np.maximum(proj * s, 0.0).reshape(len(P), -1)
        A = np.concatenate([A, np.ones((len(A), 1))], 1)
        total = 0.0
        for k in range(len(U)):
            on = H[:, k] > 1e-3 * H[:, k].max()
            w, *_ = np.linalg.lstsq(A[on], H[on, k], rcond=None)
            total += float(((A[on] @ w - H[on, k]) ** 2).sum())
        return total / float((H ** 2).sum())

    s = np.ones(k1)
    best = residual(s)
    trace = [best]
    for sweep in range(4):
        changed = False
        for c in range(k1):
            s[c] *= -1
            r = residual(s)
            if r < best:
                best, changed = r, True
            else:
                s[c] *= -1
        trace.append(best)
        if not changed:
            break
    log(f"signs by fit: relative residual {trace}")
    first = FirstLayer(dirs, s, c0, np.ones(k1))
    # scoring only: each estimate's reference channel, whether its sign and zero set match
    ref = W1.reshape(len(W1), -1)
    n = np.linalg.norm(ref, axis=1)
    cos = (dirs @ (ref / n[:, None]).T)
    perm = np.abs(cos).argmax(1)
    true_sign = np.sign(cos[np.arange(k1), perm])
    true_c0 = -b1[perm] / n[perm] * true_sign
    first.perm = perm
    info = dict(kinks_per_channel=counts, c0=c0.tolist(), c0_mad=spread, c0_true=true_c0.tolist(),
                c0_abs_err=np.abs(c0 - true_c0).tolist(), signs=s.tolist(),
                signs_correct=int((s == true_sign).sum()), residual_trace=trace,
                channels_distinct=len(set(perm.tolist())))
    log(f"first layer: signs correct {info['signs_correct']}/{k1}, zero-set errors "
        f"{np.round(info['c0_abs_err'], 4).tolist()}")
    return first, info


if __name__ == "__main__":
    main()
