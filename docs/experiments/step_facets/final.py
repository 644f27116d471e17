"""Step 3: exact map with the facets found (facets.py logic: switching units) + a linear map on the
complement (units never off in the data), held-out residual; then each switching unit's restore row r_i
times round 3's obfuscated weights W'_3 (its y block's rows) = conv2_1's real filter in B_2-mixed input
coordinates: compared with the reference (a) directly (best_cosines; expected to fail: B_2 unknown) and
(b) by a B_2-invariant: the filter's norm per (tap, 16-channel input block), 18 numbers, normalized."""
import json, time, subprocess
import numpy as np
from shadownet import audit, attacks
from facets_core import TOL, find_facets
m = json.load(open("out/manifest.json"))
obf = audit.untrusted_layers(open("out/untrusted.tflite", "rb").read(), audit.split_names(m)[0])
ref = audit.reference_layers("minivgg.tflite", m)
W3o = [l for l in obf if l.where == "round_3"][0].filters  # (64, 288) obfuscated
W3 = ref[2].filters  # conv2_1 real (64, 288)
print("round_3 layer", [l.name for l in obf if l.where == "round_3"], W3o.shape, "reference", ref[2].name, W3.shape)
def prof(w): n = np.linalg.norm(w.reshape(len(w), 9, 2, 16), axis=3).reshape(len(w), -1); return n / np.linalg.norm(n, axis=1, keepdims=True)
PR = prof(W3)
d = np.load("seen.npz")
Y = d["round_3_out_y0"].reshape(-1, 64).astype(np.float64); X = d["round_4_in_x0"].reshape(-1, 64).astype(np.float64)
idx = np.random.default_rng(0).permutation(len(Y)); tr, te = idx[:40000], idx[40000:]
PAIR = {0: 3, 1: 2, 2: 1, 3: 0}
for h in range(4):
    p = PAIR[h]; y, x = Y[:, 16 * p:16 * p + 16], X[:, 16 * h:16 * h + 16]
    F, fr, _ = find_facets(x[tr], seed=h)
    Cc = np.linalg.svd(F, full_matrices=True)[2][len(F):].T  # 16 x (16 - f) complement
    hid = x @ F.T
    rows, bias = [], []
    for i in range(len(F)):
        on = tr[hid[tr, i] > TOL * np.linalg.norm(x[tr], axis=1)]
        coef, *_ = np.linalg.lstsq(np.hstack([y[on], np.ones((len(on), 1))]), hid[on, i], rcond=None)
        rows.append(coef[:16]); bias.append(coef[16])
    R, b = np.array(rows), np.array(bias)
    A, *_ = np.linalg.lstsq(np.hstack([y[tr], np.ones((len(tr), 1))]), x[tr] @ Cc, rcond=None)
    pred = np.maximum(y[te] @ R.T + b, 0) @ F + (np.hstack([y[te], np.ones((len(te), 1))]) @ A) @ Cc.T
    rel = np.linalg.norm(pred - x[te]) / np.linalg.norm(x[te] - x[tr].mean(0))
    E = R @ W3o[16 * p:16 * p + 16]  # estimates in B_2-mixed input coordinates
    direct = attacks.abs_cosines(E, W3).max(axis=1)
    pc = prof(E) @ PR.T
    best = pc.argmax(1); srt = np.sort(pc, 1)
    print(f"x' block {h} <- y block {p}: {len(F)} switching units (off-fractions {' '.join(f'{f:.3f}' for f in fr)}), "
          f"{16 - len(F)} never off; exact-structure map held-out rel residual {rel:.2e} ({len(te)} positions)")
    print(f"   direct |cos| with any real conv2_1 filter: {np.round(direct, 2)}")
    print(f"   invariant-profile match: best ref {best} (real group {h} = {16*h}..{16*h+15}), "
          f"cos {np.round(srt[:, -1], 4)}, runner-up {np.round(srt[:, -2], 3)}")
