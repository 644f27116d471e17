import sys, time, numpy as np
from shadownet.boundary import observe_boundary
out, n, seed, dest = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
kind = sys.argv[5] if len(sys.argv) > 5 else "normal"
rng = np.random.default_rng(seed)
if kind.startswith("normal"):
    S = float(kind.split(":")[1]) if ":" in kind else 1.0
    X = (S * rng.standard_normal((n, 1, 32, 32, 3))).astype(np.float32)
else:
    X = rng.uniform(0, 1, (n, 1, 32, 32, 3)).astype(np.float32)
t = time.time()
seen = observe_boundary(out, [[x] for x in X])
print("keys", {k: v.shape for k, v in seen.items()}, "time", time.time() - t, flush=True)
np.savez(dest, X=X, O=seen["round_2/in/x0"].astype(np.float32))
