"""Step 1: which y block (16 channels of L's results) explains each x' block (16 channels of L+1's input).
Score: held-out relative residual of a least-squares fit of x'_block on [1, y_block, relu(y_block G + c)]
(256 random ReLU features), and of the linear part alone."""
import sys, time
import numpy as np
d = np.load("seen.npz")
pairs = {"1->2": ("round_1_out_y0", "round_2_in_x0"), "3->4": ("round_3_out_y0", "round_4_in_x0")}
rng = np.random.default_rng(0)
for name, (ky, kx) in pairs.items():
    t = time.perf_counter()
    y = d[ky].reshape(-1, d[ky].shape[-1]).astype(np.float64)
    x = d[kx].reshape(-1, d[kx].shape[-1]).astype(np.float64)
    idx = rng.permutation(len(y))[:60000]
    tr, te = idx[:40000], idx[40000:]
    nb = y.shape[1] // 16
    print(f"{name}: {len(y)} positions, y {y.shape[1]} ch, x' {x.shape[1]} ch")
    for h in range(x.shape[1] // 16):
        xs = x[:, 16 * h:16 * h + 16]
        row = []
        for p in range(nb):
            ys = y[:, 16 * p:16 * p + 16]
            ys = (ys - ys[tr].mean(0)) / ys[tr].std(0)
            G = rng.standard_normal((16, 256)) / 4; c = rng.standard_normal(256) * 0.5
            def feats(a, lin_only=False):
                f = [np.ones((len(a), 1)), a]
                if not lin_only: f.append(np.maximum(a @ G + c, 0))
                return np.hstack(f)
            out = []
            for lin in (True, False):
                coef, *_ = np.linalg.lstsq(feats(ys[tr], lin), xs[tr], rcond=None)
                r = feats(ys[te], lin) @ coef - xs[te]
                out.append(np.linalg.norm(r) / np.linalg.norm(xs[te] - xs[tr].mean(0)))
            row.append(out)
        print(f"  x' block {h}: " + "  ".join(f"y{p}: lin {a:.3f} relu-feat {b:.3f}" for p, (a, b) in enumerate(row)))
    print(f"  ({time.perf_counter() - t:.1f} s)")
