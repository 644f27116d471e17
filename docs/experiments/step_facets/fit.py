"""Step 2: fit x'_block = V relu(U y_block + a) + c (16-16-16, float64, scipy L-BFGS, several restarts)
on round 3's results (y) -> round 4's input (x'), per pair found by pairing.py; held-out relative residual.
Usage: fit.py RESTARTS MAXITER NTRAIN [blocks...]; saves fit_block{h}.npz (best restart)."""
import sys, time
import numpy as np
from scipy.optimize import minimize
restarts, maxiter, ntrain = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
blocks = [int(b) for b in sys.argv[4:]] or [0, 1, 2, 3]
PAIR = {0: 3, 1: 2, 2: 1, 3: 0}  # x' block -> y block (pairing.py)
d = np.load("seen.npz")
Y = d["round_3_out_y0"].reshape(-1, 64).astype(np.float64)
X = d["round_4_in_x0"].reshape(-1, 64).astype(np.float64)
rng = np.random.default_rng(0)
idx = rng.permutation(len(Y))
tr, te = idx[:ntrain], idx[ntrain:ntrain + 40000]
H = int(__import__("os").environ.get("HID", "16"))

def unpack(th):
    U = th[:16 * H].reshape(16, H); a = th[16 * H:17 * H]; V = th[17 * H:33 * H].reshape(H, 16); c = th[33 * H:33 * H + 16]
    return U, a, V, c

def loss(th, y, x):
    U, a, V, c = unpack(th)
    z = y @ U + a; h = np.maximum(z, 0); r = h @ V + c - x
    n = len(y); f = 0.5 * (r * r).sum() / n
    gV = h.T @ r / n; gc = r.sum(0) / n
    gz = (r @ V.T) * (z > 0)
    gU = y.T @ gz / n; ga = gz.sum(0) / n
    return f, np.concatenate([gU.ravel(), ga, gV.ravel(), gc])

for h in blocks:
    p = PAIR[h]
    y = Y[:, 16 * p:16 * p + 16]; x = X[:, 16 * h:16 * h + 16]
    mu, sd = y[tr].mean(0), y[tr].std(0); xs = x[tr].std()
    yn = (y - mu) / sd; xn = x / xs
    best = None
    for k in range(restarts):
        t = time.perf_counter()
        r = np.random.default_rng(100 + k)
        th0 = np.concatenate([r.standard_normal(16 * H) / 4, r.uniform(0, 0.5, H),
                              r.standard_normal(16 * H) / 4, np.zeros(16)])
        res = minimize(loss, th0, args=(yn[tr], xn[tr]), jac=True, method="L-BFGS-B",
                       options={"maxiter": maxiter, "maxfun": 2 * maxiter, "ftol": 1e-20, "gtol": 1e-14})
        U, a, V, c = unpack(res.x)
        pred = np.maximum(yn[te] @ U + a, 0) @ V + c
        rel = np.linalg.norm(pred - xn[te]) / np.linalg.norm(xn[te] - xn[tr].mean(0))
        reltr = np.sqrt(2 * res.fun) / np.sqrt(((xn[tr] - xn[tr].mean(0)) ** 2).sum(1).mean())
        act = (yn[te] @ U + a > 0).mean(0)
        print(f"block {h} (y{p}) restart {k}: held-out rel residual {rel:.2e} (train {reltr:.2e}), "
              f"{res.nit} it, {time.perf_counter() - t:.0f} s, unit activity min {act.min():.2f} max {act.max():.2f}",
              flush=True)
        if best is None or rel < best[0]:
            best = (rel, U, a, V, c)
    rel, U, a, V, c = best
    # back to raw units: hidden = relu(y @ U_raw + a_raw); x' = hidden @ V_raw + c_raw
    U_raw = U / sd[:, None]; a_raw = a - (mu / sd) @ U
    np.savez(f"fit_block{h}_H{H}.npz", rel=rel, U=U_raw, a=a_raw, V=V * xs, c=c * xs, ypair=p)
    print(f"block {h}: best held-out rel residual {rel:.2e}", flush=True)
