"""SCORING ONLY: regenerate the seed-0 secrets by re-running the converter with seed 0 and recording what the
groupmix scheme returns per layer. Checks the recorded obfuscated weights equal out/untrusted.tflite's round 3.
Saves gt.npz: R[g] (16x16 restore for real group g, acting on accelerator block p(g)), order, B4[h] (16x16
input mixing of conv2_2 block h), bias of conv2_1."""
import json, numpy as np, shutil
from converters.schemes import groupmix
from converters import pipeline
from shadownet import audit
rec = []
orig = groupmix.GroupMixScheme.obfuscate
def patched(self, layer, rng):
    r = orig(self, layer, rng); rec.append((layer, r)); return r
groupmix.GroupMixScheme.obfuscate = patched
shutil.rmtree("gtout", ignore_errors=True)
pipeline.convert("minivgg.tflite", "gtout", seed=0)
for l, r in rec: print(l.name, l.kind, l.weights.shape, r.weights.shape, r.input_coef is not None)
m = json.load(open("out/manifest.json"))
obf = audit.untrusted_layers(open("out/untrusted.tflite", "rb").read(), audit.split_names(m)[0])
W3o = [l for l in obf if l.where == "round_3"][0].filters
l3, o3 = rec[2]; l4, o4 = rec[3]
print("round_3 weights identical:", np.array_equal(o3.weights.reshape(64, -1), W3o))
# restore: y_n = sum_j coef[j,n] y'[index[j,n]]
R = np.zeros((64, 64))
for n in range(64):
    for j in range(o3.restore_index.shape[0]): R[n, o3.restore_index[j, n]] += o3.restore_coef[j, n]
Bfull = np.zeros((64, 64))  # x'_c = sum coef[j,c] x[index[j,c]]
for c in range(64):
    for j in range(o4.input_index.shape[0]): Bfull[c, o4.input_index[j, c]] += o4.input_coef[j, c]
blocks = {}
for g in range(4):
    cols = np.nonzero(np.abs(R[16*g:16*g+16]).sum(0))[0]
    blocks[g] = cols.min() // 16
    print("group", g, "-> acc block", blocks[g], "cols", cols.min(), cols.max())
ref = audit.reference_layers("minivgg.tflite", m)
print([ (x.name, getattr(x, 'bias', None) is not None) for x in ref][:4])
np.savez("gt.npz", R=R, B=Bfull, order=np.array([blocks[g] for g in range(4)]))
