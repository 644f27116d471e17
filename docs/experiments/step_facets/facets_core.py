def find_facets(xt, starts=6):
    rng = np.random.default_rng(0)
    nrm = np.linalg.norm(xt, axis=1); keep = nrm > 1e-6 * nrm.max()
    sv, P = np.linalg.svd(xt, full_matrices=False)[1:]
    k = int((sv > 1e-6 * sv[0]).sum()); P = P[:k].T  # live span (dead units: x' never moves along theirs)
    xu = (xt[keep] @ P) / nrm[keep, None]  # unit rows, k coordinates
    rng = np.random.default_rng(h)
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
            ("  stop after", len(found), "- rejected (on-fraction, fraction on the wrong side):", [(round(a, 4), round(b, 4)) for a, b in sorted(rej)[-4:]]); break
        found.append(best[1]); fracs.append(best[0])
    found = [P @ v for v in found]
    return np.array(found), fracs
