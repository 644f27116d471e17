import sys, time, json, numpy as np, tensorflow as tf
tf.config.threading.set_inter_op_parallelism_threads(1); tf.config.threading.set_intra_op_parallelism_threads(2)
f, N, K, steps, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
lr = float(sys.argv[6]) if len(sys.argv) > 6 else 3e-3
d = np.load(f, mmap_mode='r'); X = np.array(d['X'][:N, 0]); O = np.array(d['O'][:N, 0])
scale = O.reshape(-1, 32).std(); O = O / scale          # targets in units of the crossing's spread
t = np.load('truth.npz'); Wt = t['W'].reshape(32, -1)    # (32 filters, 3*3*3) in (kh,kw,cin) order
def score(model):
    Wl = model.layers[1].kernel.numpy()                  # HWIO (3,3,3,K)
    Wl = Wl.reshape(-1, Wl.shape[-1]).T                  # (K, 27) same (kh,kw,cin) order
    c = np.abs((Wt / np.linalg.norm(Wt, axis=1, keepdims=True)) @ (Wl / (np.linalg.norm(Wl, axis=1, keepdims=True) + 1e-12)).T)
    best = c.max(1); return int((best >= 0.9).sum()), float(np.median(best)), best
tf.keras.utils.set_random_seed(seed)
inp = tf.keras.Input((32, 32, 3))
h = tf.keras.layers.Conv2D(K, 3, padding='same', activation='relu')(inp)
out = tf.keras.layers.Conv2D(32, 1)(h)
model = tf.keras.Model(inp, out)
sched = tf.keras.optimizers.schedules.CosineDecay(lr, steps)
model.compile(tf.keras.optimizers.Adam(sched), 'mse')
bs = 16
ds = tf.data.Dataset.from_tensor_slices((X, O)).shuffle(N, seed=seed).repeat().batch(bs)
t0 = time.time(); hist = []
chunks = 5
for c in range(chunks):
    h = model.fit(ds, steps_per_epoch=steps // chunks, epochs=1, verbose=0)
    n9, med, best = score(model)
    hist.append((n9, round(med, 3), round(float(h.history['loss'][-1]), 5)))
    print(f"N={N} K={K} chunk {c+1}/{chunks} step {(c+1)*steps//chunks} loss {h.history['loss'][-1]:.5f} filters>=0.9: {n9}/32 median best|cos| {med:.3f} t={time.time()-t0:.0f}s", flush=True)
res = dict(file=f, N=N, K=K, steps=steps, seed=seed, lr=lr, n9=n9, median=med, best=[round(float(x), 3) for x in best], seconds=round(time.time() - t0, 1), hist=hist)
open('results.jsonl', 'a').write(json.dumps(res) + "\n")
print("best per true filter:", np.round(np.sort(best), 2))
np.savez(f"w_{f.split('.')[0]}_{N}_{K}_{seed}.npz", conv=model.layers[1].kernel.numpy(), cb=model.layers[1].bias.numpy(), lin=model.layers[2].kernel.numpy()[0,0], lb=model.layers[2].bias.numpy(), scale=scale)
