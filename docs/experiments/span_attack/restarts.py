"""eps=1.0 layers where stage 2 stuck: restarts (stage-1 seeds, B = I), keep the lowest attacker-side fit
||C W' B - W_ref|| (no private information used to choose)."""
import sys
from attack import *
ref, priv, outd, r = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
wref, w, wo = load(ref, priv, outd)[r]
N, P, c = wref.shape
inb, rg, ob = split_groups(c, 16), split_groups(N, 16), obf_blocks(wo)
def run(Bs, iters=40):
    prev = None
    for it in range(iters):
        z = apply_B(wo, Bs, inb); C = ls_C(z, wref, ob, rg); west = cw(C, z)
        fit = float(np.linalg.norm(west - wref))
        if prev is not None and abs(prev - fit) < 1e-10 * fit: break
        prev = fit; Bs = procrustes(cw(C, wo), wref, inb)
    return fit, west
inits = [("B=I", [np.eye(b - a) for a, b in inb])]
for s in range(int(sys.argv[5]) if len(sys.argv) > 5 else 4):
    C1 = stage1(wref, wo, inb, seed=s)
    inits.append((f"stage1 seed {s}", procrustes(cw(C1, wo), wref, inb)))
best = None
for name, B0 in inits:
    fit, west = run(B0)
    sc = score(west, w, wref)
    print(f"L{r} init {name:15s} fit {fit / np.linalg.norm(wref):.4f}  ratio {sc['ratio']:.3f} dcos {sc['dcos_all']:.3f} rec90 {sc['rec90']:.2f}", flush=True)
    if best is None or fit < best[0]: best = (fit, name, sc)
print(f"L{r} chosen by fit: {best[1]} ratio {best[2]['ratio']:.3f} dcos {best[2]['dcos_all']:.3f} rec90 {best[2]['rec90']:.2f}")
