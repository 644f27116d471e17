import os, sys, json, time, numpy as np
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", ".."))
from shadownet.boundary import observe_boundary, sample_inputs
N = int(sys.argv[1])
man = json.load(open(os.environ.get("OUT","out")+"/manifest.json"))
t = time.time()
seen = observe_boundary(os.environ.get("OUT","out"), sample_inputs(man["inputs"], N))
print("observed", N, time.time() - t)
np.savez(os.environ.get("OUT","out")+f"_seen{N}.npz", **{k.replace("/", "|"): v for k, v in seen.items()})
for k, v in seen.items(): print(k, v.shape, v.dtype)
