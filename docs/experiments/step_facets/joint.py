"""ATTACK (uses only seen.npz: round 3's accelerator results y, round 4's accelerator inputs x').
Per x' block h (paired with the y block that best explains it linearly): points z = (y, 1, x') in R^33.
Unit i gives two hyperplanes through the origin: [0, 0, b_i] (x' on its facet: unit off) and
[-r_i, -b_i, b_i] (h_i = b_i.x' = r_i.y + b_i: unit on). DPCP (min ||Z w||_1 by IRLS) with deflation
(w_x orthogonal to the columns found so far) finds one of them per unit, whichever holds more points;
then b_i = w_x/|w_x| (sign: b_i.x' >= 0), and [r_i, b_i] by exact least squares of b_i.x' on the positions
where it is > 0 (all data). Usage: joint.py NSUB STARTS ITERS"""
import sys, time
import numpy as np
from joint_common import TOL, block_points, paired_blocks, report_block
NSUB, STARTS, ITERS = (int(a) for a in sys.argv[1:4])
Y, X, n, rng, pair = paired_blocks()
for h in range(4):
    t = time.perf_counter()
    p, y, x, sx, sy, Z, Zs, idx, live, N, P = block_points(Y, X, n, rng, pair, h, NSUB)
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
    report_block("joint", h, p, y, x, n, F, kinds, fracs, live, N, t)
