"""SCORING ONLY: distinct true units learnt exactly (column and row |cos| > 0.999) by joint.py or joint2.py."""
import numpy as np
gt = np.load("gt.npz"); R, B, order = gt["R"], gt["B"], gt["order"]
tot = 0
for h in range(4):
    p = order[h]; Bg = B[16*h:16*h+16, 16*h:16*h+16]; Rg = R[16*h:16*h+16, 16*p:16*p+16]
    got = {}
    for pre in ("joint", "joint2"):
        L = np.load(f"{pre}_block{h}.npz")
        for b, r in zip(L["B"].T, L["Rb"]):
            i = int(np.abs(b @ Bg).argmax()); cb = abs(b @ Bg[:, i])
            if np.isnan(r[0]): continue
            cr = abs(r[:16] @ Rg[i]) / np.linalg.norm(r[:16]) / np.linalg.norm(Rg[i]); e = np.linalg.norm(r[:16] - Rg[i]) / np.linalg.norm(Rg[i])
            if cb > 0.999 and cr > 0.999: got[i] = min(got.get(i, (9, 9, 9)), (e, 1 - cb, 1 - cr))
    tot += len(got)
    print(f"block {h}: {len(got)} units {sorted(got)}; worst 1-cos column {max(v[1] for v in got.values()):.1e}, row {max(v[2] for v in got.values()):.1e}, worst row rel err {max(v[0] for v in got.values()):.1e}")
print("union total", tot)
