"""ATTACK (uses only seen.npz: round 3's accelerator results y, round 4's accelerator inputs x').
Per x' block h (paired with the y block that best explains it linearly): points z = (y, 1, x') in R^33.
Unit i gives two hyperplanes through the origin: [0, 0, b_i] (x' on its facet: unit off) and
[-r_i, -b_i, b_i] (h_i = b_i.x' = r_i.y + b_i: unit on). DPCP (min ||Z w||_1 by IRLS) with deflation
(w_x orthogonal to the columns found so far) finds one of them per unit, whichever holds more points;
then b_i = w_x/|w_x| (sign: b_i.x' >= 0), and [r_i, b_i] by exact least squares of b_i.x' on the positions
where it is > 0 (all data). Fix over joint.py: the normal DPCP returns is only known modulo the joint null space (always-on and
dead units), so b_i is not read off w: b_i is the x' direction the positions OFF that hyperplane's unit
lie orthogonal to: the smallest singular vector of x' on the hyperplane's inliers (off-facet) or on its
outliers (on-plane), among directions orthogonal to the columns found and to x's null space (dead units).
Usage: joint2.py NSUB STARTS ITERS"""
import sys, time
import numpy as np
from joint_common import TOL, block_points, paired_blocks, report_block
NSUB, STARTS, ITERS = (int(a) for a in sys.argv[1:4])
Y, X, n, rng, pair = paired_blocks()
for h in range(4):
    t = time.perf_counter()
    p, y, x, sx, sy, Z, Zs, idx, live, N, P = block_points(Y, X, n, rng, pair, h, NSUB)
    xs = x[idx]
    svx, Vx = np.linalg.svd(xs, full_matrices=True)[1:]
    xr = int((svx > 1e-6 * svx[0]).sum()); dead = Vx[xr:]  # x' never moves along these
    found, kinds, fracs = [], [], []
    for rnd in range(xr):
        if len(found) == xr - 1:  # the last live unit: the complement (sign below)
            Q = np.vstack([np.array(found).reshape(-1, 16), dead])
            found.append(np.linalg.svd(Q, full_matrices=True)[2][-1]); kinds.append("complement"); fracs.append(np.nan); break
        cons = [np.hstack([np.zeros(17), bb * sx]) for bb in found]
        if not cons: A = P
        else:  # w modulo the null space N: some representative with w_x orthogonal to the columns found
            C = np.linalg.svd(np.array(cons), full_matrices=True)[2][len(cons):].T
            u_, s_v, _ = np.linalg.svd(P @ (P.T @ C), full_matrices=False)
            A = u_[:, s_v > 1e-8]
        zc = Zs @ A
        cands = []
        for s_ in range(STARTS):
            w = rng.standard_normal(A.shape[1]); w /= np.linalg.norm(w)
            for it in range(ITERS):
                wt = 1 / np.maximum(np.abs(zc @ w), 1e-9)
                w = np.linalg.eigh((zc * wt[:, None]).T @ zc)[1][:, 0]
            inl = np.abs(Z @ (A @ w)) <= TOL  # all positions
            if inl.sum() >= 20: cands.append((inl.mean(), inl, A @ w))
        Qc = np.vstack([np.array(found).reshape(-1, 16), dead])
        allowed = np.linalg.svd(Qc, full_matrices=True)[2][len(Qc):].T if len(Qc) else np.eye(16)
        best = None
        ya_ = np.hstack([y, np.ones((n, 1))]); sc_ = np.linalg.norm(x, axis=1)
        def exact(v):  # v (sign-fixed) gives h = v.x' >= 0 and h = relu(r.y + b) exactly
            hv = x @ v
            if (hv < -TOL * sc_).sum() > (hv > TOL * sc_).sum(): hv = -hv
            if (hv < -1e-4 * sc_).any(): return False
            on = hv > TOL * sc_
            if on.sum() < 17: return False
            c_, *_ = np.linalg.lstsq(ya_[on], hv[on], rcond=None)
            return np.abs(np.maximum(ya_ @ c_, 0) - hv).max() < 1e-4 * np.abs(hv).max()
        for frac, inl, wfull in sorted(cands, key=lambda c: -c[0]):
            vs = []
            for kind, part in (("off-facet", inl), ("on-plane", ~inl)):
                if part.sum() < 60: continue
                xp = x[part] @ allowed
                xp = xp / np.linalg.norm(xp, axis=1, keepdims=True)
                vs.append((kind, allowed @ np.linalg.svd(xp, full_matrices=False)[2][-1]))
            wx = allowed @ (allowed.T @ wfull[17:])
            vs.append(("w_x", wx / np.linalg.norm(wx)))
            for kind, v in vs:
                if exact(v): best = (frac, kind, v); break
            if best: break
        if best is None: print("   stop: no exact hyperplane among", [round(c[0], 4) for c in cands]); break
        found.append(best[2]); kinds.append(best[1]); fracs.append(best[0])
    F = np.array(found).reshape(-1, 16)
    report_block("joint2", h, p, y, x, n, F, kinds, fracs, live, N, t)
