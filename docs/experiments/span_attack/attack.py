"""Weights-only attack on groupmix with a PUBLIC reference W_ref, scored against the PRIVATE W it protects.

Attacker's inputs: ref.tflite (W_ref), OUT/untrusted.tflite (W'), OUT/manifest.json. The private model is
read only for scoring (and for the 'oracle span' bound). Model: W = C W' B, C block diagonal (groups of 16
outputs, blocks in secret order), B block orthogonal on the input channels (public blocks of 16, the same
at every tap / position). Stage 1 (helperS's Gram similarity, with W_ref's Grams standing in for W's) gives
C; B per input block by orthogonal Procrustes of C W' against W_ref; stage 2 alternates least-squares C per
(matched) group and Procrustes B, i.e. minimises ||C W' B - W_ref|| (the MAP estimate for W = W_ref +
isotropic noise): W_est = the projection of W_ref (in the accelerator's coordinates) onto each group's
public span."""
import json, sys, time
import numpy as np
from scipy.optimize import linear_sum_assignment
from shadownet.audit_layers import untrusted_layers, split_names, reference_layers
from converters.schemes.groupmix import split_groups

IN_CH = {1: 3, 2: 32, 3: 32, 4: 64, 5: 4096, 6: 512}  # public: the architecture (fc1's input is mixed as a 4096-vector)


def load(ref, priv, out):
    man = json.load(open(f"{out}/manifest.json"))
    obf = untrusted_layers(open(f"{out}/untrusted.tflite", "rb").read(), split_names(man)[0])
    R, P = reference_layers(ref), reference_layers(priv)
    layers = {}
    for r, (a, b, o) in enumerate(zip(R, P, obf), 1):
        c = IN_CH[r]
        sh = lambda f: f.filters.reshape(f.filters.shape[0], -1, c)
        layers[r] = (sh(a), sh(b), sh(o))
    return layers


def obf_blocks(wo, tol=1e-4):
    """Contiguous blocks of mutually orthogonal rows (groupmix's groups; orthogonality survives B)."""
    f = wo.reshape(len(wo), -1)
    u = f / np.linalg.norm(f, axis=1, keepdims=True)
    cos = np.abs(u @ u.T)
    blocks, a = [], 0
    for i in range(1, len(f) + 1):
        if i == len(f) or cos[i, a:i].max() > tol:
            blocks.append((a, i)); a = i
    return blocks


def apply_B(w, Bs, inb):
    out = w.copy()
    if Bs is None:
        return out
    for (a, b), B in zip(inb, Bs):
        out[..., a:b] = w[..., a:b] @ B
    return out


def procrustes(x, y, inb):
    """B_h = argmin ||x[..., h] B_h - y[..., h]|| over orthogonal B_h."""
    Bs = []
    for a, b in inb:
        X, Y = x[..., a:b].reshape(-1, b - a), y[..., a:b].reshape(-1, b - a)
        u, _, vt = np.linalg.svd(X.T @ Y)
        Bs.append(u @ vt)
    return Bs


def ls_C(z, wref, ob, rg):
    """Per real group g, the obfuscated block k (Hungarian on residuals) and C_g = W_ref_g Z_k^+."""
    zf, rf = z.reshape(len(z), -1), wref.reshape(len(wref), -1)
    Qs = [np.linalg.qr(zf[c:d].T)[0] for c, d in ob]          # orthonormal bases of the blocks' spans
    proj = rf @ np.hstack(Qs)                                   # [N, sum m_k]
    ends = np.cumsum([0] + [q.shape[1] for q in Qs])
    res = np.array([[np.sum(rf[a:b] ** 2) - np.sum(proj[a:b, ends[k]:ends[k + 1]] ** 2)
                     for k in range(len(ob))] for a, b in rg])
    gi, ki = linear_sum_assignment(res)
    C = np.zeros((len(wref), len(z)))
    for g, k in zip(gi, ki):
        (a, b), (c, d) = rg[g], ob[k]
        C[a:b, c:d] = np.linalg.lstsq(zf[c:d].T, rf[a:b].T, rcond=None)[0].T
    return C


def gram_list(w, inb, taps):
    """Grams of w's rows over slices B preserves: (tap, input block)."""
    return [w[:, t, a:b] @ w[:, t, a:b].T for t in taps for a, b in inb]


def stage1(wref, wo, inb, seed=0):
    """helperS's Gram-similarity C (eigenvectors of G_0^-1 sum a G matched by sorted eigenvalue)."""
    rng = np.random.default_rng(seed)
    P = wref.shape[1]
    fr, fo = wref.reshape(len(wref), -1), wo.reshape(len(wo), -1)
    G0, G0p = fr @ fr.T, fo @ fo.T
    al = rng.standard_normal((P, wref.shape[2]))
    # sum over (tap, block) of a_{t,h} W_{t,h} W_{t,h}^T = W diag(a) W^T, a constant over each block
    a_full = np.zeros((P, wref.shape[2]))
    for hi, (a, b) in enumerate(inb):
        a_full[:, a:b] = al[:, hi:hi + 1]
    A = np.linalg.solve(G0, (fr * a_full.reshape(-1)) @ fr.T)
    Ap = np.linalg.solve(G0p, (fo * a_full.reshape(-1)) @ fo.T)
    lam, V = np.linalg.eig(A); lamp, Vp = np.linalg.eig(Ap)
    o, op = np.argsort(lam.real), np.argsort(lamp.real)
    V, Vp = V[:, o].real, Vp[:, op].real
    K, Kp = V.T @ G0 @ V, Vp.T @ G0p @ Vp
    s = np.sqrt(np.abs(np.diag(K) / np.diag(Kp)))
    taps = list(range(min(P, 12)))
    Q = np.zeros_like(K)
    for g, gp in zip(gram_list(wref, inb, taps), gram_list(wo, inb, taps)):
        Q += (V.T @ g @ V) * (Vp.T @ gp @ Vp) / np.outer(s, s)
    sig = np.sign(np.linalg.eigh(Q)[1][:, -1]); sig[sig == 0] = 1
    X = Vp @ np.diag(s * sig) @ np.linalg.inv(V)
    return X.T


def cw(C, w):
    return (C @ w.reshape(len(w), -1)).reshape(len(C), *w.shape[1:])


def score(west, w, wref):
    f = lambda a: a.reshape(len(a), -1)
    west, w, wref = f(west), f(w), f(wref)
    cos = lambda a, b: np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-300)
    d_est, d = west - wref, w - wref
    return {"rec90": float(np.mean(np.abs(cos(west, w)) >= 0.9)),
            "dcos_med": float(np.median(cos(d_est, d))),
            "dcos_all": float(np.sum(d_est * d) / (np.linalg.norm(d_est) * np.linalg.norm(d) + 1e-300)),
            "ratio": float(np.linalg.norm(west - w) / np.linalg.norm(d))}


def oracle_span(w, wref, rg):
    """Bound for a perfect B: W_ref projected onto each private group's span (what stage 2 converges to)."""
    f = lambda a: a.reshape(len(a), -1)
    wf, rf = f(w), f(wref)
    out = np.zeros_like(rf)
    for a, b in rg:
        q = np.linalg.qr(wf[a:b].T)[0]
        out[a:b] = rf[a:b] @ q @ q.T
    return out


def attack_layer(r, wref, w, wo, iters=80, restarts=int(__import__('os').environ.get('RESTARTS', '0')), log=print):
    N, P, c = wref.shape
    inb = split_groups(c, 16) if c >= 8 else None
    rg, ob = split_groups(N, 16), obf_blocks(wo)
    t = time.time()
    out = {"baseline_ref": score(wref, w, wref), "oracle_span": score(oracle_span(w, wref, rg), w, wref)}
    inits = [None]
    if inb is not None:
        C1 = stage1(wref, wo, inb)
        z = cw(C1, wo)
        inits = [procrustes(z, wref, inb)]
        out["stage1"] = score(apply_B(z, inits[0], inb), w, wref)
        if restarts:   # more starts, the lowest attacker-side fit ||C W' B - W_ref|| kept
            inits.append([np.eye(b - a) for a, b in inb])
            inits += [procrustes(cw(stage1(wref, wo, inb, seed=s), wo), wref, inb) for s in range(1, restarts)]
    best = None
    for Bs in inits:
        prev = None
        for it in range(iters):
            z = apply_B(wo, Bs, inb)
            C = ls_C(z, wref, ob, rg)
            west = cw(C, z)
            fit = float(np.linalg.norm(west - wref))
            if inb is None or (prev is not None and abs(prev - fit) < 1e-10 * fit):
                break
            prev = fit
            Bs = procrustes(cw(C, wo), wref, inb)
        if best is None or fit < best[0]:
            best = (fit, west, it)
    fit, west, it = best
    out["stage2"] = score(west, w, wref)
    out["stage2"]["iters"] = it + 1
    out["secs"] = round(time.time() - t, 1)
    return out, west


if __name__ == "__main__":
    ref, priv, outd = sys.argv[1:4]
    rounds = [int(x) for x in sys.argv[4].split(",")] if len(sys.argv) > 4 else list(range(1, 7))
    L = load(ref, priv, outd)
    res, est = {}, {}
    for r in rounds:
        wref, w, wo = L[r]
        res[r], west = attack_layer(r, wref, w, wo)
        est[f"r{r}"] = west
        print(r, tuple(wref.shape), json.dumps(res[r]), flush=True)
    json.dump(res, open(f"{outd}.attack.json", "w"), indent=1)
    np.savez(f"{outd}.west.npz", **est)
