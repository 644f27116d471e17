"""Three-layer fit of round 4's crossing: o4 ~ A relu(W3 maxpool(relu(W2 relu(W1 x + b1) + b2)) + b3) + c.
Only the inputs X and the crossing O4 are used in the fit; truth.npz only scores it. Adapted from helperR3's fit2.py."""
import argparse, time, json, os, numpy as np, tensorflow as tf
p = argparse.ArgumentParser()
p.add_argument('data'); p.add_argument('--N', type=int, default=800)
p.add_argument('--K1', type=int, default=64); p.add_argument('--K2', type=int, default=64); p.add_argument('--K3', type=int, default=128)
p.add_argument('--steps', type=int, default=8000); p.add_argument('--lr', type=float, default=1e-3)
p.add_argument('--bs', type=int, default=16); p.add_argument('--seed', type=int, default=0)
p.add_argument('--chunks', type=int, default=8); p.add_argument('--tag', default='')
p.add_argument('--threads', type=int, default=2); p.add_argument('--jit', action='store_true')
p.add_argument('--bench', type=int, default=0); p.add_argument('--save', default='')
p.add_argument('--init', default='', help='start from saved weights (a continuation)')
a = p.parse_args()
tf.config.threading.set_intra_op_parallelism_threads(a.threads); tf.config.threading.set_inter_op_parallelism_threads(1)
t = np.load('truth.npz'); W1t, b1t, W2t, b2t, W3t, b3t = (t[k] for k in ['W1', 'b1', 'W2', 'b2', 'W3', 'b3'])
C0, C1, C2, C3 = 3, W1t.shape[0], W2t.shape[0], W3t.shape[0]
d = np.load(a.data); X = d['X'][:a.N].astype(np.float32); O = d['O4'][:a.N].astype(np.float64)
CO = O.shape[-1]
O = O - O.reshape(-1, CO).mean(0); O = (O / O.reshape(-1, CO).std()).astype(np.float32)
tf.keras.utils.set_random_seed(a.seed)
inp = tf.keras.Input((32, 32, 3))
c1 = tf.keras.layers.Conv2D(a.K1, 3, padding='same', activation='relu'); c2 = tf.keras.layers.Conv2D(a.K2, 3, padding='same', activation='relu')
c3 = tf.keras.layers.Conv2D(a.K3, 3, padding='same', activation='relu'); c4 = tf.keras.layers.Conv2D(CO, 1)
out = c4(c3(tf.keras.layers.MaxPool2D(2)(c2(c1(inp))))); model = tf.keras.Model(inp, out)
if a.init: model.load_weights(a.init)
opt = tf.keras.optimizers.Adam(tf.keras.optimizers.schedules.CosineDecay(a.lr, a.steps))
Xt, Ot = tf.constant(X), tf.constant(O)
@tf.function(jit_compile=a.jit)
def step():
    idx = tf.random.uniform((a.bs,), 0, a.N, dtype=tf.int32)
    xb, ob = tf.gather(Xt, idx), tf.gather(Ot, idx)
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(tf.square(model(xb, training=True) - ob))
    g = tape.gradient(loss, model.trainable_variables); opt.apply_gradients(zip(g, model.trainable_variables)); return loss
if a.bench:
    step(); t0 = time.time()
    for _ in range(a.bench): step()
    print(f"bench threads={a.threads} jit={a.jit}: {(time.time()-t0)/a.bench*1000:.1f} ms/step"); raise SystemExit
rng = np.random.default_rng(123); Xe = rng.standard_normal((24, 32, 32, 3)).astype(np.float32)  # scoring inputs
conv = lambda x, w, b: tf.nn.relu(tf.nn.conv2d(x, w, 1, 'SAME') + b)
He1 = conv(Xe, W1t.transpose(1, 2, 3, 0), b1t)
He2 = tf.nn.max_pool2d(conv(He1, W2t.transpose(1, 2, 3, 0), b2t), 2, 2, 'VALID')
He1, He2 = He1.numpy().reshape(-1, C1), He2.numpy().reshape(-1, C2)
def bestcos(T, F):
    T = T / np.linalg.norm(T, axis=1, keepdims=True); F = F / (np.linalg.norm(F, axis=1, keepdims=True) + 1e-12)
    return np.abs(T @ F.T).max(1)
def tomap(Htrue, Hf):
    A1 = np.hstack([Htrue, np.ones((len(Htrue), 1))]); T, *_ = np.linalg.lstsq(A1, Hf, rcond=None)
    r2 = 1 - ((Hf - A1 @ T) ** 2).sum() / ((Hf - Hf.mean(0)) ** 2).sum(); return T[:-1], r2
def score():
    (w1, bb1), (w2, bb2), (w3, bb3) = c1.get_weights(), c2.get_weights(), c3.get_weights()   # HWIO
    s1 = bestcos(W1t.reshape(C1, -1), w1.reshape(-1, a.K1).T)
    Hf1 = conv(Xe, w1, bb1)
    T1, r21 = tomap(He1, Hf1.numpy().reshape(-1, a.K1))
    s2 = bestcos(W2t.reshape(C2, -1), np.einsum('hwio,ji->ohwj', w2, T1).reshape(a.K2, -1))
    Hf2 = tf.nn.max_pool2d(conv(Hf1, w2, bb2), 2, 2, 'VALID').numpy().reshape(-1, a.K2)
    T2, r22 = tomap(He2, Hf2)
    s3 = bestcos(W3t.reshape(C3, -1), np.einsum('hwio,ji->ohwj', w3, T2).reshape(a.K3, -1))
    return s1, s2, s3, r21, r22
t0 = time.time(); hist = []
for c in range(a.chunks):
    for _ in range(a.steps // a.chunks): loss = step()
    s1, s2, s3, r21, r22 = score()
    h = [int((s1 >= .9).sum()), round(float(np.median(s1)), 3), int((s2 >= .9).sum()), round(float(np.median(s2)), 3),
         int((s3 >= .9).sum()), round(float(np.median(s3)), 3), round(float(loss), 4), round(time.time() - t0, 1)]
    hist.append(h)
    print(f"{a.data} N={a.N} K={a.K1},{a.K2},{a.K3} step {(c+1)*(a.steps//a.chunks)} loss {float(loss):.4f} "
          f"W1 {h[0]}/{C1} med {h[1]:.3f}  W2 {h[2]}/{C2} med {h[3]:.3f}  W3 {h[4]}/{C3} med {h[5]:.3f} "
          f"(map R2 {r21:.3f} {r22:.3f}) t={time.time()-t0:.0f}s", flush=True)
res = dict(vars(a), W1_n9=hist[-1][0], W1_med=hist[-1][1], W2_n9=hist[-1][2], W2_med=hist[-1][3], W3_n9=hist[-1][4], W3_med=hist[-1][5],
           mapR2=[round(float(r21), 4), round(float(r22), 4)], seconds=round(time.time() - t0, 1), hist=hist,
           W1_best=np.round(s1, 3).tolist(), W2_best=np.round(s2, 3).tolist(), W3_best=np.round(s3, 3).tolist())
open('results.jsonl', 'a').write(json.dumps(res) + "\n")
if a.save: model.save_weights(a.save)
