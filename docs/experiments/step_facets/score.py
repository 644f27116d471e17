"""SCORING ONLY: learnt columns/rows vs the seed-0 secrets (gt.npz from gt.py)."""
import sys, numpy as np
pre = sys.argv[1]
gt = np.load("gt.npz"); R, B, order = gt["R"], gt["B"], gt["order"]
d = np.load("seen.npz"); X = d["round_4_in_x0"].reshape(-1, 64).astype(np.float64)
tot = 0; totrow = 0
for h in range(4):
    L = np.load(f"{pre}_block{h}.npz"); p = int(L["ypair"]); g = h
    assert p == order[g], "pairing wrong"
    Bg = B[16*g:16*g+16, 16*g:16*g+16]; Rg = R[16*g:16*g+16, 16*p:16*p+16]
    x = X[:, 16*g:16*g+16]; hid = x @ Bg; offf = (np.abs(hid) <= 1e-5*np.linalg.norm(x, axis=1)[:, None]).mean(0)
    cb = np.abs(L["B"].T @ Bg)  # learnt x true
    rows = L["Rb"][:, :16]
    got = []
    for j in range(cb.shape[0]):
        i = int(cb[j].argmax())
        rc = abs(rows[j] @ Rg[i]) / np.linalg.norm(rows[j]) / np.linalg.norm(Rg[i]) if not np.isnan(rows[j, 0]) else np.nan
        rerr = np.linalg.norm(rows[j] - Rg[i]) / np.linalg.norm(Rg[i]) if not np.isnan(rows[j, 0]) else np.nan
        got.append((i, cb[j, i], rc, rerr))
    good = [t for t in got if t[1] > 0.999 and t[2] > 0.999]
    tot += len(set(t[0] for t in good))
    print(f"block {h} (group {g}, y block {p}): {len(got)} learnt, {len(set(t[0] for t in good))} distinct true units at |cos| > 0.999 (column and row)")
    for i, c, rc, e in sorted(got):
        print(f"   true unit {i:2d} (off {offf[i]:.4f}): column |cos| {c:.7f}, row |cos| {rc:.7f}, row rel err {e:.1e}")
    missing = sorted(set(range(16)) - set(t[0] for t in good))
    print(f"   not learnt: {[(i, round(float(offf[i]), 4)) for i in missing]} (unit, off-fraction)")
print("TOTAL units learnt exactly:", tot, "of 64")
