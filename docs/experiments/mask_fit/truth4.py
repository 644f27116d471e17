import numpy as np, sys
sys.path.insert(0, '/work/main')
from converters.tflite_reader import read_model
g = read_model(open(sys.argv[1] if len(sys.argv) > 1 else '/tmp/me/zoo/minivgg.tflite', 'rb').read())
convs = [op for op in g.ops if op.kind == 'CONV_2D']
d = {}
for k, op in enumerate(convs[:3], 1):
    print(g.tensors[op.inputs[1]].name, g.tensors[op.inputs[1]].shape, op.options.fusedActivationFunction, op.options.padding)
    d[f'W{k}'] = g.tensors[op.inputs[1]].data; d[f'b{k}'] = g.tensors[op.inputs[2]].data
print([(k, v.shape) for k, v in d.items()])
np.savez('truth.npz', **d)
