"""Critical-point attack on MiniVGG's first conv layer from an unmasked crossing (ShadowNet helper probe).

Default (``--round 3``): o_3 = B_3 maxpool(relu(conv1_2(relu(conv1_1(x))))) crosses unmasked.  o_3 at pool
position p is a piecewise-linear function of p's 6x6x3 input field.  Along lines x(t) = x0 + t d (x0 random
normal, later lines about a random colour) we measure, at each grid point, the local Jacobian J_p (32 x 108)
of EVERY position at once from 216 lattice-perturbed inferences (a pixel/channel lattice of period 6: each
field holds exactly one perturbed coordinate per inference; central differences; a column is dropped where
forward and backward differences disagree, i.e. a unit switched inside the probe).  o_3 is noisy (the
one-time masks of rounds 1-2 leave float32 error, sigma ~4e-6 measured from repeats of x0), so the tests
are noise-calibrated.  Between consecutive grid points J_p changes by one rank-1 term per ReLU / pool
switch; a first-layer unit (filter i at position q) gives the row vector w1_i placed at q's 3x3 window.  A
change whose energy sits in one 3x3 window, rank 1 there (top singular value >= --snr times the noise's),
noise-level outside the window and in the remainder (chi-square ratios <= --chi), is a candidate (its top
right singular vector, 27 numbers).  Candidates are clustered by |cos| >= --cos; a cluster's support is the
number of distinct (line, unit position) switches in it (a unit switches at most once per line); windows
touching the image border are skipped (cropped filters) and clusters that are a one-pixel shift of a
better-supported cluster are pruned (filters with a weak edge row seen one window over).
``--round 4`` does the same on o_4 = B_4 relu(conv2_1(...)) (10x10 fields, 64 channels, 600 probes/point).
The ground truth (first-layer weights from the .tflite) is used ONLY to score (|cos| >= 0.9 recovered).

Run (in a directory of its own, the repository on PYTHONPATH):
       python critical_attack.py [--out mv] [--lines 3] [--points 14] [--json r.json]
(mv: ``python -m shadownet convert minivgg.tflite -o mv --seed 1`` under the default masking policy.)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

P = 16  # the crossing's positions: a 16x16 grid, each position's input field starting at 2p - OFF
# geometry by crossing: round 3 = B pool(relu(conv(relu(conv x)))): 6x6 fields, 32 channels;
# round 4 = B relu(conv(pool(relu(conv(relu(conv x)))))): 10x10 fields, 64 channels
GEOMETRY = {3: dict(FIELD=6, OFF=2, CH=32), 4: dict(FIELD=10, OFF=4, CH=64)}
FIELD, OFF, CH = 6, 2, 32


def configure(round_no: int) -> None:
    global FIELD, OFF, CH, REL, WINDOWS
    FIELD, OFF, CH = (GEOMETRY[round_no][k] for k in ("FIELD", "OFF", "CH"))
    REL = lattice_index()
    WINDOWS = []
    for r in range(FIELD - 2):
        for s in range(FIELD - 2):
            m = np.zeros((FIELD, FIELD, 3), bool)
            m[r:r + 3, s:s + 3] = True
            WINDOWS.append(((r, s), m.reshape(-1)))


class Oracle:
    """The normal world's view: run the protected model on chosen inputs, keep one round's input."""

    def __init__(self, out_dir: str, round_no: int = 3, buffer: str = "round_3/in/x0", avg: int = 1,
                 synth: float = 0.0, noise_seed: int = 12345):
        import shadownet
        self.count = 0
        self.avg, self.synth = avg, synth
        self.noise_rng = np.random.default_rng(noise_seed)
        me = self

        class Rec:
            def __init__(self, inner):
                self.inner, self.buffers = inner, {}

            def bind(self, buffers):
                self.buffers = dict(buffers)
                self.inner.bind(buffers)

            def run_round(self, r):
                if r == round_no:
                    me.last = np.array(self.buffers[buffer])
                self.inner.run_round(r)

            def close(self):
                self.inner.close()

        self._ctx = shadownet.load(out_dir, accelerator=Rec)
        self.model = self._ctx.__enter__()

    def __call__(self, xs: np.ndarray) -> np.ndarray:
        out = []
        for x in xs:
            acc = None
            for _ in range(self.avg):  # the averaging attacker: n inferences of each input
                self.model(np.asarray(x, np.float32)[None])
                v = self.last[0].astype(np.float64)
                acc = v if acc is None else acc + v
                self.count += 1
            o = acc / self.avg
            if self.synth:  # simulated residual noise (what averaging leaves), on an unmasked crossing
                o = o + self.synth * self.noise_rng.standard_normal(o.shape)
            out.append(o)
        return np.array(out)

    def close(self):
        self._ctx.__exit__(None, None, None)


def lattice_index():
    """For each lattice offset (a, b): the relative field row/col of each pool position's one lattice pixel."""
    py = np.arange(P)
    rel = {a: (a - (2 * py - OFF)) % FIELD for a in range(FIELD)}
    return rel




def jacobians(oracle, x: np.ndarray, eps: float, tol: float, dtype=np.float32):
    """J (16,16,32,108) of o_3 wrt each pool position's 6x6x3 input field at x (columns in (row, col, ch)
    order), and which columns are valid (16,16,108): a column is dropped where the forward and backward
    differences disagree beyond ``tol`` (a unit switched inside the probe)."""
    shifts, signs = [], []
    for a in range(FIELD):
        for b in range(FIELD):
            for c in range(3):
                e = np.zeros_like(x)
                e[a::FIELD, b::FIELD, c] = eps
                shifts.append((a, b, c))
                signs.append(e)
    E = np.array(signs)
    xs = np.concatenate([x[None], x[None] + E, x[None] - E]).astype(dtype)
    # the perturbation actually applied after rounding of the input
    delta = (xs[1:1 + len(E)].astype(np.float64) - xs[1 + len(E):].astype(np.float64))
    out = oracle(xs)
    o0, op, om = out[0], out[1:1 + len(E)], out[1 + len(E):]
    fwd, bwd = op - o0, o0 - om
    J = np.zeros((P, P, FIELD, FIELD, 3, CH))
    ok = np.ones((P, P, FIELD, FIELD, 3), bool)
    PY, PX = np.meshgrid(np.arange(P), np.arange(P), indexing="ij")
    for n, (a, b, c) in enumerate(shifts):
        R, S = REL[a][PY], REL[b][PX]
        yy, xx = 2 * PY - OFF + R, 2 * PX - OFF + S  # the pixel (image coordinates) this field holds
        inside = (yy >= 0) & (yy < 32) & (xx >= 0) & (xx < 32)
        step = np.where(inside, delta[n][np.clip(yy, 0, 31), np.clip(xx, 0, 31), c], 1.0)
        mism = np.abs(fwd[n] - bwd[n]).max(-1)
        ok[PY, PX, R, S, c] = mism <= tol
        J[PY, PX, R, S, c] = np.where(inside[..., None], (fwd[n] + bwd[n]) / step[..., None], 0.0)
    return (J.transpose(0, 1, 5, 2, 3, 4).reshape(P, P, CH, FIELD * FIELD * 3),
            ok.reshape(P, P, FIELD * FIELD * 3), o0)


def analyse(Ja, Jb, va, vb, k, cfg, cands, stats):
    """Events between two grid points: per pool position, is J's change one first-layer switch? It is
    when, for some 3x3 window, the change there is rank 1 and well above the noise, and the change
    outside it and the in-window remainder are at the noise level (chi-square ratios, sigma_D from the
    measured output noise)."""
    D = Jb - Ja
    V = va & vb
    sd = cfg.sigma_d
    M = np.array([m for _, m in WINDOWS], float).T  # (F, windows)
    col_e = (D ** 2).sum(2) * V  # (16,16,F)
    win_e = col_e @ M / (sd ** 2 * CH * 27)  # each window's energy over its noise's mean
    win_ok = ((~V).astype(float) @ M) == 0
    win_e = np.where(win_ok, win_e, -1.0)
    for py in range(P):
        for px in range(P):
            d, v = D[py, px], V[py, px]
            if not win_ok[py, px].any():
                stats["invalid"] += 1
                continue
            order = np.argsort(-win_e[py, px])
            if win_e[py, px, order[0]] < cfg.quiet:
                stats["quiet"] += 1
                continue
            stats["events"] += 1
            best = None
            for j in order[:3]:  # the windows of most energy: the one of largest top singular value
                if win_e[py, px, j] < 0:
                    continue
                m = WINDOWS[j][1]
                sv = np.linalg.svd(d[:, m], compute_uv=False)
                if best is None or sv[0] > best[0]:
                    best = (sv[0], WINDOWS[j][0], m, sv)
            s1, (r, s), m, sv = best
            out = v & ~m
            chi_out = float((d[:, out] ** 2).sum()) / (sd ** 2 * CH * max(out.sum(), 1))
            chi_rest = float((sv[1:] ** 2).sum()) / (sd ** 2 * (CH * 27 - (CH + 26)))
            snr = s1 / (sd * (np.sqrt(CH) + np.sqrt(27)))
            if snr < cfg.snr:
                stats["weak"] += 1
                continue
            if chi_out > cfg.chi or chi_rest > cfg.chi:
                stats["wide_or_multi"] += 1
                continue
            y0, x0 = 2 * py - OFF + r, 2 * px - OFF + s
            # a window on the image's border may hold a unit whose own window reaches into the padding
            # (a cropped filter): skip those
            if y0 <= 0 or x0 <= 0 or y0 + 3 >= 32 or x0 + 3 >= 32:
                stats["edge"] += 1
                continue
            w = np.linalg.svd(d[:, m], full_matrices=False)[2][0]
            w /= np.linalg.norm(w)
            w *= np.sign(w[np.argmax(np.abs(w))])
            stats["local"] += 1
            cands.append({"w": w, "k": k, "q": (y0 + 1, x0 + 1), "p": (py, px), "snr": snr})


def cluster(cands, thr):
    """Greedy |cos| clustering; a cluster's direction is its members' top singular vector; events are the
    distinct (line, unit position) pairs in it (one switch seen from up to 4 pool positions)."""
    clusters = []
    for c in cands:
        for cl in clusters:
            if abs(cl["dir"] @ c["w"]) >= thr:
                cl["m"].append(c)
                M = np.array([m["w"] * np.sign(m["w"] @ cl["dir"]) * m["snr"] for m in cl["m"]])
                cl["dir"] = np.linalg.svd(M, full_matrices=False)[2][0]
                break
        else:
            clusters.append({"dir": c["w"].copy(), "m": [c]})
    for cl in clusters:
        cl["events"] = len({(m["k"][0], m["q"]) for m in cl["m"]})  # a unit switches once per line
    return clusters


def shifted(w: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Filter w (27 = 3x3x3) moved by (dy, dx) inside its 3x3 window, zero filled."""
    a, out = w.reshape(3, 3, 3), np.zeros((3, 3, 3))
    out[max(dy, 0):3 + min(dy, 0), max(dx, 0):3 + min(dx, 0)] = a[max(-dy, 0):3 - max(dy, 0), max(-dx, 0):3 - max(dx, 0)]
    return out.reshape(27)


def prune_aliases(clusters, min_events, thr=0.9):
    """Clusters with min_events or more, without the shifted aliases of better-supported ones (a filter
    with a weak edge row/column may be seen one window over: its shifted, cropped copy)."""
    kept = []
    for cl in sorted(clusters, key=lambda c: -c["events"]):
        if cl["events"] < min_events:
            continue
        alias = False
        for big in kept:
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    if (dy or dx):
                        s = shifted(big["dir"], dy, dx)
                        if np.linalg.norm(s) > 0 and abs(s @ cl["dir"]) / np.linalg.norm(s) >= thr:
                            alias = True
        if not alias:
            kept.append(cl)
    return kept


def truth(model_path: str) -> np.ndarray:
    """Scoring only: the first conv layer's filters (32, 27) from the original model."""
    from ai_edge_litert.interpreter import Interpreter
    it = Interpreter(model_path)
    for d in it.get_tensor_details():
        if "conv1_1_1/convolution" in d["name"] and list(d["shape"]) == [32, 3, 3, 3]:
            return it.get_tensor(d["index"]).reshape(32, 27).astype(np.float64)
    raise SystemExit("no first-layer weights found")


def score(clusters, W, min_events, thr=0.9):
    Wn = W / np.linalg.norm(W, axis=1, keepdims=True)
    kept = prune_aliases(clusters, min_events)
    if not kept:
        return 0, 0, []
    C = np.abs(np.array([cl["dir"] for cl in kept]) @ Wn.T)  # (clusters, 32)
    recovered = C.max(0) >= thr
    false = int((C.max(1) < thr).sum())
    return int(recovered.sum()), false, C.max(0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="minivgg.tflite")
    ap.add_argument("--out", default="mv")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lines", type=int, default=3)
    ap.add_argument("--points", type=int, default=14, help="grid points per line")
    ap.add_argument("--spacing", type=float, default=2e-3, help="grid step along the line, relative to the base input RMS")
    ap.add_argument("--eps", type=float, default=2e-3, help="probe step, relative to the base input RMS")
    ap.add_argument("--tol", type=float, default=None)
    ap.add_argument("--quiet", type=float, default=1.5, help="best window's energy over noise below which nothing changed")
    ap.add_argument("--snr", type=float, default=4.0, help="window top singular value over the noise's")
    ap.add_argument("--chi", type=float, default=1.6, help="max chi-square ratio outside the window / rest")
    ap.add_argument("--cos", type=float, default=0.9)
    ap.add_argument("--repeats", type=int, default=20, help="repeated inferences of x0 to measure noise")
    ap.add_argument("--min-events", type=int, default=2)
    ap.add_argument("--json", default=None)
    ap.add_argument("--avg", type=int, default=1, help="inferences averaged per probe input (an attacker against fresh masks)")
    ap.add_argument("--synth", type=float, default=0.0, help="add N(0, synth^2) to every (averaged) output: what averaging would leave")
    ap.add_argument("--round", type=int, default=3, choices=[3, 4], help="the unmasked crossing attacked")
    ap.add_argument("--stop", action="store_true",
                    help="stop once as many clusters (min-events or more, aliases pruned) as the layer has "
                         "filters (public: the architecture)")
    ap.add_argument("--base", default="normal", choices=["normal", "uniform"])
    ap.add_argument("--scale", type=float, default=0.5, help="std of a normal base input")
    ap.add_argument("--debug-ref", type=float, default=None,
                    help="DEBUG: use the float64 reference model (weights!) with this output noise std instead")
    cfg = ap.parse_args()
    t0 = time.time()
    rng = np.random.default_rng(cfg.seed)
    configure(cfg.round)
    if cfg.debug_ref is not None:
        import refmodel
        inner = refmodel.RefOracle(np.load("Bt_debug.npy"))
        noise_rng = np.random.default_rng(99)

        class oracle_cls:
            count = 0

            def __call__(self, xs):
                self.count += len(xs)
                out = inner(np.asarray(xs, np.float32))
                return out + cfg.debug_ref * noise_rng.standard_normal(out.shape)

            def close(self):
                pass
        oracle = oracle_cls()
    else:
        oracle = Oracle(cfg.out, cfg.round, f"round_{cfg.round}/in/x0", cfg.avg, cfg.synth)
    W = truth(cfg.model)
    cands, stats = [], dict(quiet=0, events=0, invalid=0, weak=0, wide_or_multi=0, edge=0, local=0)

    history = []
    sigmas = []
    for line in range(cfg.lines):
        # line 0 about zero; the later ones about a random colour, so that units with a large bias
        # switch somewhere too
        mean = 0.0 if line == 0 else cfg.scale * rng.standard_normal(3)
        x0 = (rng.uniform(0, 1, (32, 32, 3)) if cfg.base == "uniform" else
              mean + cfg.scale * rng.standard_normal((32, 32, 3)))
        rms = float(np.sqrt(np.mean(x0 ** 2)))
        d = rms * rng.standard_normal((32, 32, 3))
        eps = cfg.eps * rms
        # the output noise (other rounds' one-time masks leave float32 error in o_3): measured at x0
        rep = oracle(np.repeat(x0[None], cfg.repeats, 0).astype(np.float32))
        sigma = float(np.sqrt(np.mean(rep.var(0, ddof=1))))
        sigmas.append(sigma)
        cfg.sigma_d = sigma * np.sqrt(2) / (2 * eps) * np.sqrt(2)  # per entry of a Jacobian difference
        tol = cfg.tol if cfg.tol is not None else 8 * sigma * np.sqrt(6)
        print(f"line {line}: input rms {rms:.3g}, output noise {sigma:.3g}, J-difference noise "
              f"{cfg.sigma_d:.3g}, probe {eps:.3g}, tol {tol:.3g}")
        prev = None
        for g in range(cfg.points):
            x = x0 + g * cfg.spacing * d
            J, valid, _ = jacobians(oracle, x, eps, tol)
            if prev is not None:
                analyse(prev[0], J, prev[1], valid, (line, g), cfg, cands, stats)
            prev = (J, valid)
            cl = cluster(cands, cfg.cos)
            rec, false, _ = score(cl, W, cfg.min_events)
            history.append({"inferences": oracle.count, "seconds": round(time.time() - t0, 1),
                            "candidates": len(cands), "recovered": rec, "false_clusters": false})
            print(f"line {line} point {g}: inferences {oracle.count}, {time.time() - t0:.0f}s, "
                  f"candidates {len(cands)}, recovered {rec}/32, false clusters {false}, {stats}", flush=True)
            if cfg.stop and len(prune_aliases(cl, cfg.min_events)) >= 32:
                break
        if cfg.stop and len(prune_aliases(cluster(cands, cfg.cos), cfg.min_events)) >= 32:
            break
    oracle.close()
    clusters = cluster(cands, cfg.cos)
    rec, false, best = score(clusters, W, cfg.min_events)
    rec1, false1, best1 = score(clusters, W, 1)
    # the attacker's own pick: as many best-supported clusters (aliases pruned) as the layer has filters
    top = prune_aliases(clusters, 1)[:32]
    top_cos = (np.abs(np.array([c["dir"] for c in top]) @ (W / np.linalg.norm(W, axis=1, keepdims=True)).T)
               if top else np.zeros((0, 32)))
    result = {"avg": cfg.avg, "synth": cfg.synth, "eps": cfg.eps, "spacing": cfg.spacing, "sigmas": sigmas,
              "recovered": rec, "false_clusters": false, "min_events": cfg.min_events,
              "top32_true": int((top_cos.max(1) >= 0.9).sum()) if top else 0,
              "top32_distinct_filters": len(set(top_cos.argmax(1)[top_cos.max(1) >= 0.9])) if top else 0,
              "recovered_any_cluster": rec1, "false_any_cluster": false1,
              "inferences": oracle.count, "seconds": round(time.time() - t0, 1), "stats": stats,
              "best_cos_per_filter": [round(float(b), 4) for b in best1],
              "clusters": sorted([cl["events"] for cl in clusters], reverse=True), "history": history}
    Wn = W / np.linalg.norm(W, axis=1, keepdims=True)
    result["cluster_detail"] = sorted([{"events": cl["events"], "members": len(cl["m"]),
                                        "median_snr": round(float(np.median([m["snr"] for m in cl["m"]])), 1),
                                        "spread": round(float(np.median([abs(m["w"] @ cl["dir"]) for m in cl["m"]])), 4),
                                        "best_true": int(np.argmax(np.abs(Wn @ cl["dir"]))),
                                        "cos": round(float(np.abs(Wn @ cl["dir"]).max()), 4)}
                                       for cl in clusters], key=lambda c: -c["events"])
    print(json.dumps({k: v for k, v in result.items() if k not in ("history", "cluster_detail")}))
    for c in result["cluster_detail"]:
        if c["events"] >= 2 or c["cos"] >= 0.9:
            print(c)
    if cfg.json:
        json.dump(result, open(cfg.json, "w"), indent=1)
        np.save(cfg.json.replace(".json", "_cands.npy"), np.array(
            [(c["k"][0], c["k"][1], c["q"][0], c["q"][1], c["p"][0], c["p"][1], c["snr"], *c["w"]) for c in cands]))


if __name__ == "__main__":
    main()
