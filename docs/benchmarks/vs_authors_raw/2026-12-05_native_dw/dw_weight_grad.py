import torch, time, statistics, sys, os
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[4]))
torch.set_num_threads(2)
from densenas import native; mod = native.dw_conv()
from densenas.ops import _dw_weight_grad
def t(f, n=9):
    for _ in range(2): f()
    ts=[]
    for _ in range(n):
        a=time.perf_counter(); f(); ts.append(time.perf_counter()-a)
    return statistics.median(ts)*1e3
shapes=[(32,96,32,1,3),(32,96,32,1,7),(32,144,16,1,5),(32,144,16,2,7),(32,240,8,1,3),(32,480,4,1,7),(32,1152,2,1,5),
        (8,48,112,1,3),(8,144,56,1,7),(8,144,56,2,5),(8,288,28,1,7),(8,768,14,1,3),(8,1152,7,1,7)]
for N,C,hw,s,k in shapes:
    p=k//2
    x=torch.randn(N,C,hw,hw).contiguous(memory_format=torch.channels_last)
    w=torch.randn(C,1,k,k)
    y=torch.nn.functional.conv2d(x,w,None,s,p,1,C)
    g=torch.randn_like(y).contiguous(memory_format=torch.channels_last)
    ref=torch.ops.aten.convolution_backward(g,x,w,None,[s,s],[p,p],[1,1],False,[0,0],C,[False,True,False])[1]
    got=mod.weight_grad(x,g,k,s,p)
    err=((got-ref).abs().max()/ref.abs().max()).item()
    a=t(lambda: torch.ops.aten.convolution_backward(g,x,w,None,[s,s],[p,p],[1,1],False,[0,0],C,[False,True,False]))
    b=t(lambda: _dw_weight_grad(x,g,k,s,p))
    c=t(lambda: mod.weight_grad(x,g,k,s,p))
    d=t(lambda: torch.ops.aten.convolution_backward(g,x,w,None,[s,s],[p,p],[1,1],False,[0,0],C,[True,False,False]))
    f=t(lambda: torch.nn.functional.conv2d(x,w,None,s,p,1,C))
    gf=2*N*y.shape[2]*y.shape[3]*C*k*k/1e9
    print(f"N{N} C{C} {hw}x{hw} s{s} k{k}: onednn_w {a:.2f} grouped {b:.2f} native {c:.2f} ({gf/c*1e3:.0f} GF/s) | in-grad {d:.2f} fwd {f:.2f} err {err:.1e}", flush=True)
