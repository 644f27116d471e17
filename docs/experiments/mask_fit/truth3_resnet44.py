import numpy as np, sys
sys.path.insert(0, '/work/main')
from converters.tflite_reader import read_model
g = read_model(open('/tmp/me/zoo/resnet44.tflite','rb').read())
convs = [op for op in g.ops if op.kind == 'CONV_2D']
W1, b1 = g.tensors[convs[0].inputs[1]].data, g.tensors[convs[0].inputs[2]].data
W2, b2 = g.tensors[convs[1].inputs[1]].data, g.tensors[convs[1].inputs[2]].data
print(W1.shape, W2.shape)
np.savez('truth.npz', W1=W1, b1=b1, W2=W2, b2=b2)
