import numpy as np, sys
sys.path.insert(0, '/work/main')
from converters.tflite_reader import read_model
# [MODEL [LAYERS]]: the first LAYERS convs' weights and biases (2 by default; 3 for the fit through round 4)
g = read_model(open(sys.argv[1] if len(sys.argv) > 1 else '/tmp/me/zoo/minivgg.tflite','rb').read())  # or resnet44.tflite
layers = int(sys.argv[2]) if len(sys.argv) > 2 else 2
convs = [op for op in g.ops if op.kind == 'CONV_2D']
d = {}
for k, op in enumerate(convs[:layers], 1):
    print(g.tensors[op.inputs[1]].name, g.tensors[op.inputs[1]].shape, op.options.fusedActivationFunction, op.options.padding)
    d[f'W{k}'], d[f'b{k}'] = g.tensors[op.inputs[1]].data, g.tensors[op.inputs[2]].data
print([(k, v.shape) for k, v in d.items()], np.linalg.norm(d['W1'].reshape(len(d['W1']), -1), axis=1).round(2))
np.savez('truth.npz', **d)
