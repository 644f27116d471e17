"""Step 2c: B's columns as the normals of the facets {h_i = 0}: x' = B h, h = relu(R y + b) >= 0, so b_i . x' = h_i
is 0 exactly on every position where unit i is off (a 15-dim subspace holding a fraction of the points).
Found by dual principal component pursuit (min ||X v||_1, |v| = 1, by IRLS) from random starts; kept when
>= 2% of positions lie on the hyperplane (|v.x'| <= 1e-5 |x'|) and v.x' >= 0 elsewhere (sign fixed).
Then units not found (never off in the data) from the orthogonal complement; R rows by least squares on
positions where each unit is on; held-out residual of the whole map. Usage: facets.py NTRAIN STARTS"""
import sys, time
import numpy as np
from facets_core import TOL, find_facets
ntrain, starts = int(sys.argv[1]), int(sys.argv[2])
PAIR = {0: 3, 1: 2, 2: 1, 3: 0}
d = np.load("seen.npz")
Y = d["round_3_out_y0"].reshape(-1, 64).astype(np.float64)
X = d["round_4_in_x0"].reshape(-1, 64).astype(np.float64)
idx = np.random.default_rng(0).permutation(len(Y))
tr, te = idx[:ntrain], idx[ntrain:]
for h in range(4):
    t = time.perf_counter()
    p = PAIR[h]
    y, x = Y[:, 16 * p:16 * p + 16], X[:, 16 * h:16 * h + 16]
    xt = x[tr]
    F, fracs, P = find_facets(xt, starts, h)
    k = P.shape[1]
    G = F @ F.T
    msg = (f"x' block {h} <- y block {p}: rank {k}, {len(F)} facets from {starts} starts, "
           f"max |b_i.b_j| (i!=j) {np.abs(G - np.eye(len(F))).max() if len(F) else float('nan'):.1e}")
    msg += " off-fractions " + " ".join(f"{f:.4f}" for f in fracs)
    if len(F) < k - 1:
        print(msg + " - not enough to fix B", flush=True); continue
    if len(F) == k - 1:  # the unit never off: the complement in the live span, sign from h >= 0
        u = P @ np.linalg.svd(F @ P)[2][-1]
        if (xt @ u).mean() < 0: u = -u
        F = np.vstack([F, u])
    B = F.T  # live units only (k columns); dead units' columns and rows are not learnt
    hid = x @ B
    rows, bias, act = [], [], []
    for i in range(B.shape[1]):
        on = tr[hid[tr, i] > TOL * np.linalg.norm(x[tr], axis=1)]
        a = np.hstack([y[on], np.ones((len(on), 1))])
        coef, *_ = np.linalg.lstsq(a, hid[on, i], rcond=None)
        rows.append(coef[:16]); bias.append(coef[16]); act.append(len(on) / len(tr))
    R, b = np.array(rows), np.array(bias)
    pred = np.maximum(y[te] @ R.T + b, 0) @ B.T
    rel = np.linalg.norm(pred - x[te]) / np.linalg.norm(x[te] - x[tr].mean(0))
    np.savez(f"facet_block{h}.npz", B=B, R=R, b=b, ypair=p, rel=rel)
    print(msg + f", B^T B - I max {np.abs(B.T @ B - np.eye(B.shape[1])).max():.1e}, map held-out rel residual "
          f"{rel:.2e} on {len(te)} positions, unit activity {min(act):.2f}-{max(act):.2f}, "
          f"{time.perf_counter() - t:.1f} s", flush=True)
