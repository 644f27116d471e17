"""MobileNet (weights=None: glorot_uniform kernels untouched) with BN statistics set to the data's own
(as training leaves them) and random gamma/beta, so activations stay alive and some saturate at 6."""
import os, sys, json, numpy as np
os.environ["TF_CPP_MIN_LOG_LEVEL"]="2"
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", ".."))
import tensorflow as tf
from shadownet.boundary import sample_inputs
tf.random.set_seed(0)
m = tf.keras.applications.MobileNet(input_shape=(224,224,3), weights=None, alpha=1.0, include_top=True, classes=100)
rng = np.random.default_rng(1)
x = np.concatenate([b[0] for b in sample_inputs([{"shape": [1,224,224,3], "dtype": "float32"}], 16, seed=123)])
for l in m.layers:
    if isinstance(l, tf.keras.layers.BatchNormalization):
        sub = tf.keras.Model(m.input, l.input)
        a = sub.predict(x, verbose=0).reshape(-1, l.input.shape[-1])
        c = a.shape[1]
        g = rng.uniform(0.5, 2.5, c).astype(np.float32)
        b = rng.normal(0.3, 0.5, c).astype(np.float32)
        l.set_weights([g, b, a.mean(0).astype(np.float32), (a.var(0) + 1e-6).astype(np.float32)])
conv = tf.lite.TFLiteConverter.from_keras_model(m)
open("model.tflite","wb").write(conv.convert())
print("ok")
