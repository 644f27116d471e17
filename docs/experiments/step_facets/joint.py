"""ATTACK (uses only seen.npz: round 3's accelerator results y, round 4's accelerator inputs x').
Per x' block h (paired with the y block that best explains it linearly): points z = (y, 1, x') in R^33.
Unit i gives two hyperplanes through the origin: [0, 0, b_i] (x' on its facet: unit off) and
[-r_i, -b_i, b_i] (h_i = b_i.x' = r_i.y + b_i: unit on). DPCP (min ||Z w||_1 by IRLS) with deflation
(w_x orthogonal to the columns found so far) finds one of them per unit, whichever holds more points;
then b_i = w_x/|w_x| (sign: b_i.x' >= 0), and [r_i, b_i] by exact least squares of b_i.x' on the positions
where it is > 0 (all data). Usage: joint.py NSUB STARTS ITERS"""
import sys, time
import numpy as np
NSUB, STARTS, ITERS = (int(a) for a in sys.argv[1:4])
TOL = 1e-5
d = np.load("seen.npz")
Y = d["round_3_out_y0"].reshape(-1, 64).astype(np.float64)
X = d["round_4_in_x0"].reshape(-1, 64).astype(np.float64)
n = len(Y); rng = np.random.default_rng(0)
t0 = time.perf_counter()
sub = rng.permutation(n)[:40000]
pair = {}
for h in range(4):
    x = X[sub, 16*h:16*h+16]; res = []
    for p in range(4):
        a = np.hstack([Y[sub, 16*p:16*p+16], np.ones((len(sub), 1))])
        c, *_ = np.linalg.lstsq(a, x, rcond=None)
        res.append(np.linalg.norm(a @ c - x) / np.linalg.norm(x - x.mean(0)))
    pair[h] = int(np.argmin(res)); print(f"x' block {h}: linear rel residual per y block {np.round(res, 3)} -> y {pair[h]}")
print(f"pairing {time.perf_counter()-t0:.1f} s", flush=True)
for h in range(4):
    t = time.perf_counter()
    p = pair[h]; y = Y[:, 16*p:16*p+16]; x = X[:, 16*h:16*h+16]
    sy, sx = np.sqrt((y**2).mean()), np.sqrt((x**2).mean())
    Z = np.hstack([y / sy, np.ones((n, 1)), x / sx])
    Z /= np.linalg.norm(Z, axis=1, keepdims=True)
    idx = rng.permutation(n)[:NSUB]; Zs = Z[idx]
    # null space of Z: dead units [0,0,b] and always-on units [-r,-b,b] (hold every point)
    sv, V = np.linalg.svd(Zs, full_matrices=True)[1:]
    live = int((sv > 1e-6 * sv[0]).sum()); N = V[live:].T; P = V[:live].T
    found, kinds, fracs = [], [], []
    for rnd in range(16):
        # constraint: w in span(P) and w_x orthogonal to the columns found so far
        cons = [np.hstack([np.zeros(17), b]) for b in found]
        A = P if not cons else P @ np.linalg.svd(np.array(cons) @ P, full_matrices=True)[2][len(cons):].T
        if A.shape[1] == 0: break
        zc = Zs @ A
        best = None
        for s in range(STARTS):
            w = rng.standard_normal(A.shape[1]); w /= np.linalg.norm(w)
            for it in range(ITERS):
                wt = 1 / np.maximum(np.abs(zc @ w), 1e-9)
                w = np.linalg.eigh((zc * wt[:, None]).T @ zc)[1][:, 0]
            on = np.abs(zc @ w) <= TOL
            if on.sum() < 20: continue
            if best is None or on.mean() > best[0]: best = (on.mean(), A @ w)
        if best is None: break
        w = best[1]; wx = w[17:] / sx; wy = w[:16] / sy
        if np.linalg.norm(wx) < 1e-3 * np.linalg.norm(w): print("   normal with no x' part?", best[0]); break
        b = wx / np.linalg.norm(wx)
        kind = "off-facet" if np.linalg.norm(w[:17]) < 1e-4 else "on-plane"
        found.append(b); kinds.append(kind); fracs.append(best[0])
    F = np.array(found)
    scale = np.linalg.norm(x, axis=1)
    hid = x @ F.T
    sgn = np.where((hid < -TOL * scale[:, None]).sum(0) > (hid > TOL * scale[:, None]).sum(0), -1, 1)
    F *= sgn[:, None]; hid *= sgn
    neg = (hid < -1e-4 * scale[:, None]).mean(0)
    ya = np.hstack([y, np.ones((n, 1))])
    rows, err, onf = [], [], []
    for i in range(len(F)):
        on = hid[:, i] > TOL * scale
        onf.append(on.mean())
        if on.sum() < 17: rows.append(np.full(17, np.nan)); err.append(np.nan); continue
        c, *_ = np.linalg.lstsq(ya[on], hid[on, i], rcond=None)
        rows.append(c); err.append(np.abs(np.maximum(ya @ c, 0) - hid[:, i]).max() / np.abs(hid[:, i]).max())
    rows = np.array(rows)
    G = F @ F.T
    print(f"x' block {h} <- y {p}: joint rank {live} (null {N.shape[1]}), {len(F)} units: "
          + ", ".join(f"{k[:3]} {f:.3f}" for k, f in zip(kinds, fracs)), flush=True)
    print(f"   max |b_i.b_j| {np.abs(G - np.eye(len(F))).max():.1e}, negative side max {neg.max():.1e}, on-fractions {np.round(onf, 4)}")
    print(f"   row exactness max |relu(r.y+b) - b.x'| / max {np.array2string(np.array(err), precision=1)}")
    ok = ~np.isnan(rows[:, 0])
    pred = np.maximum(ya @ rows[ok].T, 0) @ F[ok]
    print(f"   map with the {ok.sum()} units: rel residual {np.linalg.norm(pred - x) / np.linalg.norm(x - x.mean(0)):.2e}; {time.perf_counter()-t:.1f} s", flush=True)
    np.savez(f"joint_block{h}.npz", B=F.T, Rb=rows, ypair=p, kinds=np.array(kinds), N=N)
