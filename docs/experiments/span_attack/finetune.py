"""Realistic private model: fine-tune MiniVGG (W_ref = ref.tflite) on scikit-learn digits (8x8 -> 32x32x3),
all layers, then write the fine-tuned weights into a copy of ref.tflite (priv_ft<E>.tflite)."""
import sys, numpy as np, tensorflow as tf
from sklearn.datasets import load_digits
from ai_edge_litert.interpreter import Interpreter
from mk import replace

epochs, lr = int(sys.argv[1]), float(sys.argv[2])
tag = sys.argv[3] if len(sys.argv) > 3 else f"ft{epochs}"
it = Interpreter(model_path="ref.tflite"); it.allocate_tensors()
g = lambda i: np.array(it.get_tensor(i), np.float32)
W = {"c1": (12, 13), "c2": (9, 3), "c3": (8, 2), "c4": (7, 1), "d1": (6, 5), "d2": (10, 4)}
L = tf.keras.layers
inp = tf.keras.Input((32, 32, 3))
x = L.Conv2D(32, 3, padding="same", activation="relu", name="c1")(inp)
x = L.Conv2D(32, 3, padding="same", activation="relu", name="c2")(x); x = L.MaxPool2D()(x)
x = L.Conv2D(64, 3, padding="same", activation="relu", name="c3")(x)
x = L.Conv2D(64, 3, padding="same", activation="relu", name="c4")(x); x = L.MaxPool2D()(x)
x = L.Flatten()(x)
x = L.Dense(512, activation="relu", name="d1")(x)
out = L.Dense(10, name="d2")(x)
m = tf.keras.Model(inp, out)
for n, (wi, bi) in W.items():
    w = g(wi)
    k = np.transpose(w, (1, 2, 3, 0)) if n[0] == "c" else w.T
    m.get_layer(n).set_weights([k, g(bi)])
d = load_digits()
X = np.repeat(np.kron(d.images / 16.0, np.ones((4, 4)))[..., None], 3, -1).astype(np.float32)
y = d.target
# check the Keras copy computes what the tflite computes
it.set_tensor(it.get_input_details()[0]["index"], X[:1]); it.invoke()
p_tfl = it.get_tensor(it.get_output_details()[0]["index"])
p_k = tf.nn.softmax(m(X[:1])).numpy()
print("keras vs tflite max diff", np.abs(p_tfl - p_k).max())
rng = np.random.default_rng(0); idx = rng.permutation(len(X)); tr, te = idx[:1400], idx[1400:]
m.compile(tf.keras.optimizers.Adam(lr), tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
          metrics=["accuracy"])
print("before: test acc", m.evaluate(X[te], y[te], verbose=0)[1])
m.fit(X[tr], y[tr], epochs=epochs, batch_size=32, verbose=2)
print("after: test acc", m.evaluate(X[te], y[te], verbose=0)[1])
new = {}
for n, (wi, bi) in W.items():
    k, b = m.get_layer(n).get_weights()
    w = np.transpose(k, (3, 0, 1, 2)) if n[0] == "c" else k.T
    w0 = g(wi)
    print(n, "||W - W_ref|| / ||W_ref|| =", np.linalg.norm(w - w0) / np.linalg.norm(w0))
    new[wi], new[bi] = w, b
replace("ref.tflite", f"priv_{tag}.tflite", new)
