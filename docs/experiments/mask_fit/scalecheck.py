import sys, numpy as np
w=np.load(sys.argv[1]); t=np.load('truth.npz'); Wt=t['W'].reshape(32,-1); bt=t['b']
conv=w['conv'].reshape(-1,w['conv'].shape[-1]).T; cb=w['cb']; L=w['lin']   # L: (K,32) rows = unit k's output column
s=w['scale']*np.linalg.norm(L,axis=1)          # B orthogonal => each unit's column has norm 1: fixes ReLU's scale
West=conv*s[:,None]; best=West*0; 
C=(Wt/np.linalg.norm(Wt,axis=1,keepdims=True))@(conv/np.linalg.norm(conv,axis=1,keepdims=True)).T
j=C.argmax(1); ok=C.max(1)>=0.9
ratio=np.linalg.norm(West[j],axis=1)/np.linalg.norm(Wt,axis=1); bh=cb[j]*s[j]
print("recovered (cos>=0.9):",ok.sum(),"; norm ratio est/true over them: median %.3f range %.3f-%.3f"%(np.median(ratio[ok]),ratio[ok].min(),ratio[ok].max()))
print("bias: true vs est (first 8 ok):",np.round(np.c_[bt[ok],bh[ok]][:8].T,3)); print("bias abs err median %.3f (true |b| median %.3f)"%(np.median(np.abs(bt[ok]-bh[ok])),np.median(np.abs(bt))))
# the learnt 32x32 map vs B: recovered unit columns L_k/|L_k| should be orthonormal
U=L[j[ok]]/np.linalg.norm(L[j[ok]],axis=1,keepdims=True); G=U@U.T; print("learnt B columns of recovered units: max |off-diag Gram| %.3f"%np.abs(G-np.eye(len(G))).max())
