import numpy as np, sys
sys.path.insert(0, '/work/main')
from converters.tflite_reader import read_model
g = read_model(open(sys.argv[1] if len(sys.argv) > 1 else '/tmp/me/zoo/minivgg.tflite','rb').read())  # or resnet44.tflite
convs = [op for op in g.ops if op.kind == 'CONV_2D']
for op in convs[:2]:
    print(g.tensors[op.inputs[1]].name, g.tensors[op.inputs[1]].shape, op.options.fusedActivationFunction, op.options.padding)
W1, b1 = g.tensors[convs[0].inputs[1]].data, g.tensors[convs[0].inputs[2]].data
W2, b2 = g.tensors[convs[1].inputs[1]].data, g.tensors[convs[1].inputs[2]].data
print(W1.shape, b1.shape, W2.shape, b2.shape, np.linalg.norm(W1.reshape(len(W1),-1),axis=1).round(2), b1.round(2))
np.savez('truth.npz', W1=W1, b1=b1, W2=W2, b2=b2)
