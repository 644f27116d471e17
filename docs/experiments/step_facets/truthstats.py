import numpy as np
d = np.load("seen.npz"); gt = np.load("gt.npz")
Y = d["round_3_out_y0"].reshape(-1, 64).astype(np.float64); X = d["round_4_in_x0"].reshape(-1, 64).astype(np.float64)
R, B, order = gt["R"], gt["B"], gt["order"]
for g in range(4):
    p = order[g]; Rg = R[16*g:16*g+16, 16*p:16*p+16]; Bg = B[16*g:16*g+16, 16*g:16*g+16]
    x = X[:, 16*g:16*g+16]; y = Y[:, 16*p:16*p+16]
    h = x @ Bg  # B^T x' (B orthogonal) -> rows: h = x @ B
    print("g", g, "B orth err", np.abs(Bg.T@Bg-np.eye(16)).max())
    z = y @ Rg.T
    nx = np.linalg.norm(x, axis=1)
    off = np.abs(h) <= 1e-5 * nx[:, None]
    bias = np.array([np.median((h - z)[~off[:, i], i]) for i in range(16)])
    resid = np.abs(np.maximum(z + bias, 0) - h).max() / np.abs(h).max()
    print("  off fraction per unit", np.round(off.mean(0), 4))
    print("  bias", np.round(bias, 3), "max rel resid of truth map", f"{resid:.1e}")
    print("  h scale per unit (rms)", np.round(np.sqrt((h**2).mean(0)), 3))
    pat = off @ (1 << np.arange(16))
    u, c = np.unique(pat, return_counts=True)
    print("  distinct patterns", len(u), "top counts", np.sort(c)[::-1][:10])
