"""Record the boundary of N protected MiniVGG inferences (default groupmix artifacts in out/)."""
import sys, time, json
import numpy as np
from shadownet import boundary
n = int(sys.argv[1])
m = json.load(open("out/manifest.json"))
t = time.perf_counter()
seen = boundary.observe_boundary("out", boundary.sample_inputs(m["inputs"], n, seed=1))
print("observe", n, "inferences", round(time.perf_counter() - t, 1), "s")
keep = {k: v for k, v in seen.items() if k in ("round_1/in/x0", "round_1/out/y0", "round_2/in/x0",
                                                 "round_3/out/y0", "round_4/in/x0")}
for k, v in keep.items(): print(k, v.shape, v.dtype)
np.savez("seen.npz", **{k.replace("/", "_"): v for k, v in keep.items()})
