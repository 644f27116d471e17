"""Two-layer fit of round 3's crossing: o3 ~ A maxpool(relu(W2 relu(W1 x + b1) + b2)) + c.
Nothing but the inputs X and the crossing O is used in the fit; truth.npz only scores it."""
import argparse, time, json, numpy as np, tensorflow as tf
tf.config.threading.set_intra_op_parallelism_threads(2); tf.config.threading.set_inter_op_parallelism_threads(1)
p = argparse.ArgumentParser()
p.add_argument('data'); p.add_argument('--N', type=int, default=800)
p.add_argument('--K1', type=int, default=32); p.add_argument('--K2', type=int, default=32)
p.add_argument('--steps', type=int, default=3000); p.add_argument('--lr', type=float, default=3e-3)
p.add_argument('--bs', type=int, default=16); p.add_argument('--seed', type=int, default=0)
p.add_argument('--known1', action='store_true', help='layer 1 fixed to the truth (stepping stone)')
p.add_argument('--chunks', type=int, default=6); p.add_argument('--tag', default='')
p.add_argument('--save', default='')
p.add_argument('--no-pool', action='store_true', help='no max pool before round 3 (ResNet-44; MiniVGG pools)')
a = p.parse_args()
t = np.load('truth.npz'); W1t, b1t, W2t, b2t = t['W1'], t['b1'], t['W2'], t['b2']
d = np.load(a.data); X = d['X'][:a.N].astype(np.float32); O = d['O3'][:a.N].astype(np.float64)
C = W1t.shape[0]; O = O - O.reshape(-1, C).mean(0); O = (O / O.reshape(-1, C).std()).astype(np.float32)
tf.keras.utils.set_random_seed(a.seed)
K1 = C if a.known1 else a.K1
inp = tf.keras.Input((32, 32, 3))
c1 = tf.keras.layers.Conv2D(K1, 3, padding='same', activation='relu'); c2 = tf.keras.layers.Conv2D(a.K2, 3, padding='same', activation='relu')
c3 = tf.keras.layers.Conv2D(C, 1)
h = c2(c1(inp)); out = c3(h if a.no_pool else tf.keras.layers.MaxPool2D(2)(h)); model = tf.keras.Model(inp, out)
if a.known1:
    c1.set_weights([W1t.transpose(1, 2, 3, 0), b1t]); c1.trainable = False
opt = tf.keras.optimizers.Adam(tf.keras.optimizers.schedules.CosineDecay(a.lr, a.steps))
Xt, Ot = tf.constant(X), tf.constant(O)
@tf.function
def step():
    idx = tf.random.uniform((a.bs,), 0, a.N, dtype=tf.int32)
    xb, ob = tf.gather(Xt, idx), tf.gather(Ot, idx)
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(tf.square(model(xb, training=True) - ob))
    g = tape.gradient(loss, model.trainable_variables); opt.apply_gradients(zip(g, model.trainable_variables)); return loss
rng = np.random.default_rng(123); Xe = rng.standard_normal((24, 32, 32, 3)).astype(np.float32)  # scoring inputs
He = tf.nn.relu(tf.nn.conv2d(Xe, W1t.transpose(1, 2, 3, 0), 1, 'SAME') + b1t).numpy().reshape(-1, C)
def bestcos(T, F):
    T = T / np.linalg.norm(T, axis=1, keepdims=True); F = F / (np.linalg.norm(F, axis=1, keepdims=True) + 1e-12)
    return np.abs(T @ F.T).max(1)
def score():
    w1, bb1 = c1.get_weights(); w2, bb2 = c2.get_weights()   # HWIO
    s1 = bestcos(W1t.reshape(C, -1), w1.reshape(-1, K1).T)
    # W2 in the true layer-1 coordinates: fitted h ~ [h_true, 1] T  (T from activations on scoring inputs)
    Hf = tf.nn.relu(tf.nn.conv2d(Xe, w1, 1, 'SAME') + bb1).numpy().reshape(-1, K1)
    A1 = np.hstack([He, np.ones((len(He), 1))]); T, *_ = np.linalg.lstsq(A1, Hf, rcond=None)
    r2 = 1 - ((Hf - A1 @ T) ** 2).sum() / ((Hf - Hf.mean(0)) ** 2).sum()
    weff = np.einsum('hwio,ji->ohwj', w2, T[:C])             # (K2, 3, 3, C) true (kh,kw,cin) order
    s2 = bestcos(W2t.reshape(C, -1), weff.reshape(a.K2, -1))
    return s1, s2, r2
t0 = time.time(); hist = []
for c in range(a.chunks):
    for _ in range(a.steps // a.chunks): loss = step()
    s1, s2, r2 = score()
    hist.append([int((s1 >= .9).sum()), round(float(np.median(s1)), 3), int((s2 >= .9).sum()), round(float(np.median(s2)), 3), round(float(loss), 4)])
    print(f"{a.data} N={a.N} K={K1},{a.K2} lr={a.lr} seed={a.seed} known1={a.known1} step {(c+1)*(a.steps//a.chunks)} loss {float(loss):.4f} "
          f"W1 {hist[-1][0]}/{C} med {hist[-1][1]:.3f}  W2 {hist[-1][2]}/{C} med {hist[-1][3]:.3f} (h-map R2 {r2:.3f}) t={time.time()-t0:.0f}s", flush=True)
res = dict(vars(a), W1_n9=hist[-1][0], W1_med=hist[-1][1], W2_n9=hist[-1][2], W2_med=hist[-1][3], hmapR2=round(float(r2), 4),
           seconds=round(time.time() - t0, 1), hist=hist, W1_best=np.round(s1, 3).tolist(), W2_best=np.round(s2, 3).tolist())
open('results.jsonl', 'a').write(json.dumps(res) + "\n")
if a.save: model.save_weights(a.save)
