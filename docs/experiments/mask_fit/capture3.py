import sys, time, json, numpy as np
import shadownet.audit_layers as al
from shadownet.boundary import observe_boundary
# OUT N SEED DEST [ROUND]: round 3's crossing by default (stop 62), round 4's with ROUND 4 (stop 63)
out, n, seed, dest = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
r = int(sys.argv[5]) if len(sys.argv) > 5 else 3
name = f"round_{r}/in/x0"
m = json.load(open(f"{out}/manifest.json"))
print("masks", m["masks"], f"round{r} split", m["rounds"][r - 1]["inputs"][0].get("split"))
rng = np.random.default_rng(seed)
X = rng.standard_normal((n, 1, 32, 32, 3)).astype(np.float32)
t = time.time(); O = []
for i in range(0, n, 400):
    seen = observe_boundary(out, [[x] for x in X[i:i+400]], {name})
    seen = al.join_halves(seen, al.split_names(m)[1])
    O.append(np.asarray(seen[name], np.float32)); print(i, time.time() - t, flush=True)
O = np.concatenate(O)
print(f"O{r}", O.shape, "time", time.time() - t, flush=True)
np.savez(dest, X=X[:, 0], **{f"O{r}": O[:, 0]})
