"""Offline scoring of saved candidates: the attacker keeps the N best-supported clusters (N = 32 filters,
public), aliases pruned. Ground truth used only to score."""
import sys, numpy as np, critical_attack as ca
W = ca.truth("minivgg.tflite"); Wn = W / np.linalg.norm(W, axis=1, keepdims=True)
for f in sys.argv[1:]:
    C = np.load(f)
    cands = [{"w": c[7:], "k": (int(c[0]), int(c[1])), "q": (int(c[2]), int(c[3])), "p": (int(c[4]), int(c[5])), "snr": c[6]} for c in C]
    cl = ca.cluster(cands, 0.9)
    kept = ca.prune_aliases(cl, 1)[:32]
    cos = np.abs(np.array([k["dir"] for k in kept]) @ Wn.T)
    print(f, "candidates", len(cands), "top-32 clusters: true", int((cos.max(1) >= 0.9).sum()), "distinct filters",
          len(set(cos.argmax(1)[cos.max(1) >= 0.9])), "false", int((cos.max(1) < 0.9).sum()),
          "min support among kept", kept[-1]["events"])
