import sys, time, torch
sys.path.insert(0, "/work/main")
torch.set_num_threads(2)
from bench.bench_vs_authors import build_ours, _batch
from densenas.ops import use_fused_bn
step, build, counts = build_ours("arch", 8)
net = step.__closure__[0].cell_contents.__self__.net
if sys.argv[1] == "fused": use_fused_bn(net)
x, y = _batch(224, 8)
t0 = time.time()
for _ in range(2): step(x, y)
print("warm-up %.1f s" % (time.time() - t0))
ts = []
for _ in range(3):
    t = time.perf_counter(); step(x, y); ts.append(time.perf_counter() - t)
print("steps", [round(t, 3) for t in ts])
from torch.profiler import profile, ProfilerActivity
with profile(activities=[ProfilerActivity.CPU]) as p:
    step(x, y)
print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=22))
ka = p.key_averages()
tot = sum(k.self_cpu_time_total for k in ka if k.key.startswith("## Call CompiledFxGraph")) / 1e3
cf = sum(k.self_cpu_time_total for k in ka if k.key in ("CompiledFunction", "CompiledFunctionBackward", "TorchDynamo Cache Lookup")) / 1e3
bn = sum(k.self_cpu_time_total for k in ka if k.key in ("aten::native_batch_norm", "aten::native_batch_norm_backward", "aten::hardtanh_backward", "aten::clamp_", "_ReLU6InplaceFn", "_ReLU6InplaceFnBackward")) / 1e3
print("kernels %.0f ms, wrappers %.0f ms, aten bn/relu %.0f ms" % (tot, cf, bn))
