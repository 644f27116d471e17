"""What joint.py and joint2.py share: round 3's results y and round 4's inputs x' from seen.npz, each x'
block paired with the y block that explains it best linearly, each pair's points z = (y, 1, x') and their
joint null space, and the report of the units found (rows by exact least squares, saved per block)."""
import time
import numpy as np

TOL = 1e-5


def paired_blocks():
    """(Y, X, n, rng, pair): positions x 64 channels (float64), the rng after the pairing drew from it."""
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
    return Y, X, n, rng, pair


def block_points(Y, X, n, rng, pair, h, nsub):
    """x' block h and its y block: (p, y, x, sx, sy, Z, Zs, idx, live, N, P), Z the normalised points, Zs
    the nsub of them (at idx) the search runs on, N / P the null space / row space of Zs."""
    p = pair[h]; y = Y[:, 16*p:16*p+16]; x = X[:, 16*h:16*h+16]
    sy, sx = np.sqrt((y**2).mean()), np.sqrt((x**2).mean())
    Z = np.hstack([y / sy, np.ones((n, 1)), x / sx])
    Z /= np.linalg.norm(Z, axis=1, keepdims=True)
    idx = rng.permutation(n)[:nsub]; Zs = Z[idx]
    # null space of Z: dead units [0,0,b] and always-on units [-r,-b,b] (hold every point)
    sv, V = np.linalg.svd(Zs, full_matrices=True)[1:]
    live = int((sv > 1e-6 * sv[0]).sum()); N = V[live:].T; P = V[:live].T
    return p, y, x, sx, sy, Z, Zs, idx, live, N, P


def report_block(name, h, p, y, x, n, F, kinds, fracs, live, N, t):
    """Each column b_i of F (sign fixed: b_i.x' >= 0), its row [r_i, b_i] by exact least squares where it
    is on, the map the units give; printed, and saved as {name}_block{h}.npz."""
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
    np.savez(f"{name}_block{h}.npz", B=F.T, Rb=rows, ypair=p, kinds=np.array(kinds), N=N)
