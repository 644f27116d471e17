import numpy as np
from tensorflow.lite.python import schema_py_generated as s
buf=open('/tmp/helperREG/minivgg.tflite','rb').read()
m=s.ModelT.InitFromObj(s.Model.GetRootAsModel(buf,0))
g=m.subgraphs[0]; op=g.operators[0]
def arr(i):
    t=g.tensors[i]; b=m.buffers[t.buffer].data
    return np.frombuffer(bytes(b),np.float32).reshape(t.shape)
W=arr(op.inputs[1]); b=arr(op.inputs[2])
np.savez('/tmp/helperREG/truth.npz',W=W,b=b)
print(W.shape,b.shape,np.abs(W).mean(),b[:5])
