"""Digits test accuracy (the fine-tuning's held-out split) of models assembled from: public W_ref / b_ref,
private W / b, and the attacker's W_est (OUT.west.npz). The attacker has b_ref only (biases stay in the TEE)."""
import sys, numpy as np, tensorflow as tf
from sklearn.datasets import load_digits
from ai_edge_litert.interpreter import Interpreter

tag = sys.argv[1]
ids = {1: (12, 13), 2: (9, 3), 3: (8, 2), 4: (7, 1), 5: (6, 5), 6: (10, 4)}
def params(path):
    it = Interpreter(model_path=path); it.allocate_tensors()
    return {r: (np.array(it.get_tensor(w), np.float64), np.array(it.get_tensor(b), np.float64)) for r, (w, b) in ids.items()}
ref, priv = params("ref.tflite"), params(f"priv_{tag}.tflite")
est = np.load(f"out_{tag}.west.npz")
d = load_digits()
X = np.repeat(np.kron(d.images / 16.0, np.ones((4, 4)))[..., None], 3, -1)
idx = np.random.default_rng(0).permutation(len(X)); te = idx[1400:]
X, y = X[te], d.target[te]

def forward(P):
    a = tf.constant(X)
    for r in (1, 2, 3, 4):
        w, b = P[r]
        a = tf.nn.relu(tf.nn.conv2d(a, np.transpose(w, (1, 2, 3, 0)), 1, "SAME") + b)
        if r in (2, 4):
            a = tf.nn.max_pool2d(a, 2, 2, "VALID")
    a = tf.reshape(a, (len(X), -1))
    a = tf.nn.relu(a @ P[5][0].T + P[5][1])
    return (a @ P[6][0].T + P[6][1]).numpy()

def acc(P):
    return float(np.mean(forward(P).argmax(1) == y))

W = lambda src: {r: src[r][0] for r in ids}
E = {r: est[f"r{r}"].reshape(ref[r][0].shape) for r in ids}
def mk(ws, bs, over=None):
    P = {r: (ws[r], bs[r]) for r in ids}
    for r, w in (over or {}).items():
        P[r] = (w, P[r][1])
    return P
bref, bpriv = {r: ref[r][1] for r in ids}, {r: priv[r][1] for r in ids}
rows = [("public W_ref, b_ref", mk(W(ref), bref)),
        ("private W, b (vendor)", mk(W(priv), bpriv)),
        ("private W, public b_ref", mk(W(priv), bref)),
        ("attack W_est, b_ref", mk(E, bref)),
        ("attack W_est (fc2 = private), b_ref", mk(E, bref, {6: priv[6][0]})),
        ("attack W_est, private b (oracle biases)", mk(E, bpriv)),
        ("W_ref, private b (oracle biases)", mk(W(ref), bpriv))]
for name, P in rows:
    print(f"{tag}: {name:45s} test acc {acc(P):.3f}")
