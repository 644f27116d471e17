# mask-all artifact: do one-time masks on round 3 ever repeat across inferences (same input 300 times)?
import numpy as np, critical_attack as ca
o = ca.Oracle("mv_all")
x = np.random.default_rng(0).standard_normal((32, 32, 3)) * 0.5
a = o(np.repeat(x[None], 300, 0).astype(np.float32)).reshape(300, -1)
d = np.abs(a[:, None, :64] - a[None, :, :64]).max(-1) + np.eye(300) * 1e9
print("min pairwise max-diff over 300 repeats:", d.min(), "typical:", np.median(d))
