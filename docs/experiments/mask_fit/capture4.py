import sys, time, json, numpy as np
import shadownet.audit_layers as al
from shadownet.boundary import observe_boundary
out, n, seed, dest = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
m = json.load(open(f"{out}/manifest.json"))
print("masks", m["masks"], "round4 split", m["rounds"][3]["inputs"][0].get("split"), m["rounds"][3]["signature"])
rng = np.random.default_rng(seed)
X = rng.standard_normal((n, 1, 32, 32, 3)).astype(np.float32)
t = time.time(); O = []
for i in range(0, n, 400):
    seen = observe_boundary(out, [[x] for x in X[i:i+400]], {"round_4/in/x0"})
    seen = al.join_halves(seen, al.split_names(m)[1])
    O.append(np.asarray(seen["round_4/in/x0"], np.float32)); print(i, time.time() - t, flush=True)
O = np.concatenate(O)
print("O4", O.shape, "time", time.time() - t, flush=True)
np.savez(dest, X=X[:, 0], O4=O[:, 0])
