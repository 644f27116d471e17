"""Facet normals of the cone the positions x' = B h (h >= 0) fill: for each unit i that is off on some
positions, b_i . x' = 0 there exactly (a hyperplane holding a share of the points, all others on its positive
side). Dual principal component pursuit (min ||X v||_1, |v| = 1, by IRLS) from random starts, deflated:
B is orthogonal, so each next normal lies in the complement of those found. Used by facets.py and final.py."""
import numpy as np

TOL = 1e-5  # a position lies on a hyperplane when |v . x'| <= TOL |x'|


def find_facets(xt, starts=6, seed=0):
    """The facet normals found in ``xt`` (positions, 16), their on-fractions, and ``P``, the live span's
    basis (16, k): units that never move x' (dead on these positions) have no facet to find."""
    nrm = np.linalg.norm(xt, axis=1); keep = nrm > 1e-6 * nrm.max()
    sv, P = np.linalg.svd(xt, full_matrices=False)[1:]
    k = int((sv > 1e-6 * sv[0]).sum()); P = P[:k].T  # live span (dead units: x' never moves along theirs)
    xu = (xt[keep] @ P) / nrm[keep, None]  # unit rows, k coordinates
    rng = np.random.default_rng(seed)
    fracs = []; found = []  # deflation: B is orthogonal, so each next facet normal lies in the found ones' complement
    for rounds in range(k):
        C = np.eye(k) if not found else np.linalg.svd(np.array(found), full_matrices=True)[2][len(found):].T
        xc = xu @ C; rej = []
        best = None
        for s in range(starts):
            w = rng.standard_normal(C.shape[1]); w /= np.linalg.norm(w)
            for it in range(60):
                wt = 1 / np.maximum(np.abs(xc @ w), 1e-9)
                w = np.linalg.eigh((xc * wt[:, None]).T @ xc)[1][:, 0]
            proj = xc @ w
            on = np.abs(proj) <= TOL
            if on.sum() < 16 or on.all(): continue
            if (proj[~on] > 0).mean() < 0.5: w, proj = -w, -proj
            if proj[~on].min() < -TOL:  # points on both sides: not a facet of the cone
                rej.append((on.mean(), (proj[~on] < -TOL).mean())); continue
            if best is None or on.mean() > best[0]: best = (on.mean(), C @ w)
        if best is None:
            print("  stop after", len(found), "- rejected (on-fraction, fraction on the wrong side):", [(round(a, 4), round(b, 4)) for a, b in sorted(rej)[-4:]]); break
        found.append(best[1]); fracs.append(best[0])
    return np.array([P @ v for v in found]), fracs, P
