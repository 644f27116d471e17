"""Make a private model W from the public W_ref: W = W_ref + eps * N(0, var(W_ref)) per conv/dense weight."""
import sys, dataclasses, numpy as np
from converters.tflite_reader import read_model
from converters.graph import write_model

def linear_weights(g):
    out = []
    for op in g.ops:
        if op.kind in ("CONV_2D", "FULLY_CONNECTED", "DEPTHWISE_CONV_2D"):
            out.append((op.kind, op.inputs[1]))
    return out

def replace(src, dst, new):   # new: {tensor_id: array}
    g = read_model(src)
    for tid, a in new.items():
        t = g.tensors[tid]
        g.tensors[tid] = dataclasses.replace(t, data=np.asarray(a, t.dtype).reshape(t.shape))
    open(dst, "wb").write(write_model(g))

if __name__ == "__main__":
    eps, seed = float(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 0
    g = read_model("ref.tflite")
    rng = np.random.default_rng(seed)
    new = {}
    for kind, tid in linear_weights(g):
        w = np.asarray(g.tensors[tid].data, np.float64)
        print(kind, tid, w.shape, w.std())
        new[tid] = w + eps * w.std() * rng.standard_normal(w.shape)
    replace("ref.tflite", f"priv_{eps}.tflite", new)
