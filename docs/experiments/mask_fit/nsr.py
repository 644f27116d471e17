import sys, numpy as np, tensorflow as tf
d=np.load(sys.argv[1]); X=d['X'][:,0]; O=d['O'][:,0]
t=np.load('truth.npz'); W=t['W'].transpose(1,2,3,0); b=t['b']   # -> HWIO
A=tf.nn.relu(tf.nn.conv2d(X,W,1,'SAME')+b).numpy()
a=A.reshape(-1,32).astype(np.float64); o=O.reshape(-1,32).astype(np.float64)
a1=np.hstack([a,np.ones((len(a),1))])
M,*_=np.linalg.lstsq(a1,o,rcond=None)
sig=a@M[:32]; res=o-a1@M
print("signal std (B a, centred) %.4f  residual(mask) std %.4f  NSR(std) %.2f" % (sig.std(0).mean() if False else np.sqrt(((sig-sig.mean(0))**2).mean()), np.sqrt((res**2).mean()), np.sqrt((res**2).mean())/np.sqrt(((sig-sig.mean(0))**2).mean())))
print("act std %.4f; M orthogonal? |M^T M - I| max %.3g" % (a.std(), np.abs(M[:32].T@M[:32]-np.eye(32)).max()))
print("block structure: off-diag block norms", np.abs(M[:16,16:32]).max(), np.abs(M[16:32,:16]).max())
r=res.reshape(O.shape)
print("mask mean per channel (over samples) range", r.mean((0,1,2)).min(), r.mean((0,1,2)).max())
print("mask corr with neighbour pixel", np.corrcoef(r[:,:,:-1].ravel(), r[:,:,1:].ravel())[0,1])
print("mask corr across inferences same pos", np.corrcoef(r[:-1].ravel(), r[1:].ravel())[0,1])
print("mask channel cov eig range", np.linalg.eigvalsh(np.cov(res.T))[[0,-1]])
print("per-position mask var range", r.var((0,3)).min(), r.var((0,3)).max())
